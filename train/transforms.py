"""Image transforms for training and evaluation, on Pillow + torch (no torchvision).

Every transform is a callable ``(img, rng) -> output`` taking an explicit ``random.Random``;
deterministic transforms ignore ``rng``. The pipelines follow DeiT/timm:

* train: RandomResizedCrop (bicubic) -> horizontal flip -> RandAugment -> tensor + normalize
  -> Random Erasing;
* eval: resize (keeping the aspect ratio) to cover ``input_size / crop_pct`` -> center crop ->
  tensor + normalize: the geometry of ``stvit.images.EvalTransform``, whose helpers do the work.

The train pipeline runs fused (:class:`TrainPipeline`): it draws every random parameter exactly
as the step-by-step ``Compose`` of the same transforms does (same ``rng`` calls in the same order,
so the same crop boxes, flips, RandAugment ops and magnitudes, erasing boxes and noise for a
seed), but decides the crop from the JPEG header first and decodes at a reduced DCT scale when
the crop still covers the output size (``draft``), crops and resizes in one call (torch's uint8
antialiased kernel for bilinear/bicubic), flips the small image, and normalises and erases in
one NumPy buffer. ``build_train_transform(..., fast=False)`` is the step-by-step reference (today's
implementation, kept for ``python -m bench data --baseline`` and the tests).

``defer=True`` (what ``python -m train`` uses on a GPU, ``--augment-on``) stops the worker after
the resize: it hands over the uint8 pixels with every draw made, and the pipeline's
``device_stage`` (``train.batch_augment``) flips, augments, normalises and erases the batch on the
device, with the same result as the fused pipeline (Random Erasing's noise aside).
"""

from __future__ import annotations

import math
import numbers
import random
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from stvit.images import (center_crop, check_mean_std, eval_resize_size, resize_to_cover, to_rgb,
                          to_tensor)
from stvit.contract import IMAGENET_MEAN as IMAGENET_DEFAULT_MEAN
from stvit.contract import IMAGENET_STD as IMAGENET_DEFAULT_STD
from train.augment import RandAugment, RandomErasing, pil_interpolation
from train.batch_augment import DeferredSample, DeviceStage

Transform = Callable[[object, random.Random], object]


def _size_hw(input_size: int | Sequence[int]) -> tuple[int, int]:
    """Accept ``224``, ``(224, 224)`` or ``(3, 224, 224)``; return (height, width)."""
    if isinstance(input_size, numbers.Integral):
        size = (int(input_size), int(input_size))
    elif len(input_size) in (2, 3):
        size = tuple(int(s) for s in input_size[-2:])
    else:
        raise ValueError(f"input_size must be an int, (H, W) or (C, H, W); got {input_size!r}")
    if min(size) < 1:
        raise ValueError(f"input_size must be positive, got {input_size!r}")
    return size


def _resample(interpolation: str, rng: random.Random) -> Image.Resampling:
    if interpolation == "random":
        interpolation = rng.choice(("bilinear", "bicubic"))
    return pil_interpolation(interpolation)


class Compose:
    """Chain transforms, passing the same ``rng`` to each (so draws happen in a fixed order).

    ``fast=False`` marks today's step-by-step reference pipeline (``ImageFolder`` then decodes the
    way it always did, with a copy in ``convert("RGB")``), kept to be measured against."""

    def __init__(self, transforms: Sequence[Transform], fast: bool = True):
        self.transforms = list(transforms)
        self.fast = fast

    def __call__(self, img, rng: random.Random):
        for transform in self.transforms:
            img = transform(img, rng)
        return img

    @property
    def device_stage(self) -> DeviceStage:
        """What finishes this pipeline's batches on the training device: normalises a deferred
        (uint8) batch, only moves a finished one."""
        last = self.transforms[-1] if self.transforms else None
        return DeviceStage(last if isinstance(last, ToNormalizedTensor) else None)

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"Compose([{inner}\n])"


class RandomResizedCrop:
    """Crop a random area fraction in ``scale`` with a log-uniform aspect ratio in ``ratio``,
    then resize to ``size``. After 10 failed tries, fall back to a center crop with the aspect
    ratio clamped into ``ratio``."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 interpolation: str = "bicubic"):
        self.size = _size_hw(size)
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"crop ratio must satisfy 0 < min <= max, got {ratio}")
        if interpolation != "random":
            pil_interpolation(interpolation)  # validate the name now, not per image
        self.scale, self.ratio, self.interpolation = scale, ratio, interpolation
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def get_params(self, rng: random.Random, width: int, height: int) -> tuple[int, int, int, int]:
        """Return the crop box ``(top, left, h, w)`` for an image of ``width`` x ``height``."""
        area = width * height
        for _ in range(10):
            target_area = rng.uniform(*self.scale) * area
            aspect = math.exp(rng.uniform(*self.log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        # Fallback: the whole image, trimmed to the nearest allowed aspect ratio, centered.
        in_ratio = width / height
        w, h = width, height
        if in_ratio < self.ratio[0]:
            h = int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w = int(round(height * self.ratio[1]))
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        top, left, h, w = self.get_params(rng, *img.size)
        resample = _resample(self.interpolation, rng)
        height, width = self.size
        # `box` crops inside the resize: no intermediate copy of the crop.
        return img.resize((width, height), resample, box=(left, top, left + w, top + h))

    def __repr__(self) -> str:
        return (f"RandomResizedCrop(size={self.size}, scale={self.scale}, "
                f"ratio={tuple(round(r, 4) for r in self.ratio)}, "
                f"interpolation={self.interpolation!r})")


class RandomHorizontalFlip:
    def __init__(self, prob: float = 0.5):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {prob}")
        self.prob = prob

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        # Always draw, so later transforms see the same rng stream whatever prob is.
        flip = rng.random() < self.prob
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(prob={self.prob})"


class ResizeToCover:
    """Resize keeping the aspect ratio so the image covers ``size`` (an int: the shorter side
    becomes ``size``, torchvision's ``Resize(int)``; or (height, width))."""

    def __init__(self, size, interpolation: str = "bicubic"):
        self.size = _size_hw(size)
        if min(self.size) < 1:
            raise ValueError(f"resize size must be positive, got {size}")
        self.interpolation = interpolation
        pil_interpolation(interpolation)

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        return resize_to_cover(img, self.size, self.interpolation)

    def __repr__(self) -> str:
        return f"ResizeToCover(size={self.size}, interpolation={self.interpolation!r})"


class CenterCrop:
    def __init__(self, size):
        self.size = _size_hw(size)

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        return center_crop(img, self.size)

    def __repr__(self) -> str:
        return f"CenterCrop(size={self.size})"


class ToNormalizedTensor:
    """PIL image -> float32 (3, H, W) tensor, scaled to [0, 1] then ``(x - mean) / std``.

    The same float32 operations as ``stvit.images.to_tensor`` (``x * (1 / (255 std)) - mean /
    std``), so bit-identical output, but on a planar uint8 copy: the multiply-add then runs over
    long contiguous rows instead of broadcasting a 3-vector over the innermost axis (6-10x
    faster). ``fast=False`` calls ``stvit.images.to_tensor`` itself (the reference)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD, fast: bool = True,
                 defer: bool = False):
        check_mean_std(mean, std)  # at construction, not first at the first image
        self.mean, self.std, self.fast, self.defer = tuple(mean), tuple(std), fast, defer
        std32 = np.asarray(std, dtype=np.float32)
        # Exactly stvit.images.to_tensor's constants.
        self._scale = (1.0 / (255.0 * std32)).astype(np.float32).reshape(3, 1, 1)
        self._offset = (-np.asarray(mean, dtype=np.float32) / std32).reshape(3, 1, 1)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> new (3, H, W) float32 array, normalised."""
        planar = np.ascontiguousarray(pixels.transpose(2, 0, 1))
        out = np.multiply(planar, self._scale, dtype=np.float32)
        out += self._offset
        return out

    def normalize_batch(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 on any device -> float32, normalised with the same float32
        operations as :meth:`normalize` (bit-identical on the CPU)."""
        dev = images.device
        scale = torch.from_numpy(self._scale).to(dev).unsqueeze(0)
        offset = torch.from_numpy(self._offset).to(dev).unsqueeze(0)
        out = images.float().mul_(scale)
        return out.add_(offset)

    def __call__(self, img: Image.Image, rng: random.Random):
        if not self.fast:
            return to_tensor(img, self.mean, self.std)
        if self.defer:  # normalised on the device (train.batch_augment.DeviceStage)
            return DeferredSample(_pixels_tensor(np.asarray(to_rgb(img))))
        return torch.from_numpy(self.normalize(np.asarray(to_rgb(img))))

    def __repr__(self) -> str:
        return f"ToNormalizedTensor(mean={self.mean}, std={self.std})"


def mean_fill_color(mean: Sequence[float]) -> tuple[int, int, int]:
    """The dataset mean as a uint8 RGB colour (fill for RandAugment's geometric ops)."""
    return tuple(min(255, round(255 * m)) for m in mean)


def build_train_transform(input_size, aa: str | None = "rand-m9-mstd0.5-inc1",
                          reprob: float = 0.25, interpolation: str = "bicubic",
                          mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                          std: Sequence[float] = IMAGENET_DEFAULT_STD, hflip: float = 0.5,
                          scale: tuple[float, float] = (0.08, 1.0),
                          remode: str = "pixel", recount: int = 1, fast: bool = True,
                          defer: bool = False) -> Compose:
    """DeiT's training pipeline. ``aa=None`` or ``"none"`` disables RandAugment; ``reprob=0``
    disables Random Erasing; ``hflip=0`` disables flipping. ``fast=False``: the step-by-step
    reference (:class:`Compose`) instead of the fused :class:`TrainPipeline`; both draw the same
    random parameters for a seed. ``defer=True``: the worker stops after the resize and the
    pipeline's ``device_stage`` flips, augments, normalises and erases the uint8 batch on the
    training device (``train.batch_augment``)."""
    transforms: list[Transform] = [
        RandomResizedCrop(input_size, scale=scale, interpolation=interpolation)
    ]
    if hflip > 0:
        transforms.append(RandomHorizontalFlip(hflip))
    if aa is not None and str(aa).strip().lower() not in ("", "none"):
        transforms.append(RandAugment(aa, fill=mean_fill_color(mean), interpolation=interpolation))
    transforms.append(ToNormalizedTensor(mean, std, fast=fast))
    if reprob > 0:
        transforms.append(RandomErasing(reprob, mode=remode, count=recount))
    if defer and not fast:
        raise ValueError("defer=True needs the fused pipeline (fast=True)")
    return TrainPipeline(transforms, defer=defer) if fast else Compose(transforms, fast=False)


def build_eval_transform(input_size, crop_pct: float = 0.875, interpolation: str = "bicubic",
                         mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                         std: Sequence[float] = IMAGENET_DEFAULT_STD, fast: bool = True,
                         defer: bool = False) -> Compose:
    """Resize to cover ``input_size / crop_pct`` (for a square size: the shorter side becomes
    ``int(size / crop_pct)``), center crop ``input_size``, normalize. The output is the same
    with ``fast`` on or off (``fast=False`` is the reference: today's tensor conversion).
    ``defer=True``: uint8 images, normalised by the pipeline's ``device_stage``."""
    height, width = _size_hw(input_size)
    if interpolation == "random":  # evaluation is deterministic
        interpolation = "bicubic"
    return Compose([
        ResizeToCover(eval_resize_size((height, width), crop_pct), interpolation),
        CenterCrop((height, width)),
        ToNormalizedTensor(mean, std, fast=fast, defer=defer),
    ], fast=fast)


# ---------------------------------------------------------------------------------------------
# The fused train pipeline
# ---------------------------------------------------------------------------------------------

_TORCH_RESIZE = ("bilinear", "bicubic")  # torch's uint8 antialiased kernels (Pillow's filters)
# Below this output size Pillow's resize is as fast as torch's call overhead: keep Pillow's
# (the reference's) exact result there, e.g. for the 32² demo.
_TORCH_MIN_PIXELS = 96 * 96
_DRAFT_SCALES = (8, 4, 2)  # the DCT scalings Pillow's JPEG decoder offers (1/8, 1/4, 1/2)


def draft_scale(crop_hw: tuple[int, int], out_hw: tuple[int, int]) -> int:
    """The largest JPEG DCT downscale ``k`` (8, 4, 2 or 1) at which a crop of ``crop_hw``
    original pixels still has at least ``out_hw`` pixels, so the resize still only shrinks."""
    for k in _DRAFT_SCALES:
        if crop_hw[0] >= k * out_hw[0] and crop_hw[1] >= k * out_hw[1]:
            return k
    return 1


class DecodedCrop:
    """What :meth:`TrainPipeline.load` hands to :meth:`TrainPipeline.apply`: the decoded RGB
    image (possibly at 1/``scale`` of the file's size) and the crop box in its pixels."""

    __slots__ = ("image", "box", "scale", "resample")

    def __init__(self, image: Image.Image, box: tuple[float, float, float, float], scale: int,
                 resample: str):
        self.image, self.box, self.scale, self.resample = image, box, scale, resample


class TrainPipeline(Compose):
    """The train :class:`Compose` (RandomResizedCrop [-> flip] [-> RandAugment] -> tensor
    [-> Random Erasing]) run fused, drawing the same random parameters in the same order.

    Two phases, so a dataset can hand over a JPEG that is opened but not decoded yet:
    :meth:`load` draws the crop box from the image size (the header's, for a file), decodes at
    the smallest DCT scale whose crop still covers the output (``img.draft``) and maps the box
    into it; :meth:`apply` does the rest. ``pipeline(img, rng)`` does both. Pixel differences
    to the reference (``build_train_transform(..., fast=False)``) come only from the crop +
    resize step: a drafted decode is an 8x8-DCT-domain downscale instead of a bicubic of the full
    image, and torch's antialiased uint8 resize (the same filter as Pillow's) does not read
    pixels beyond the crop box at the border; see ``tests/test_data_pipeline.py`` and
    ``bench/RESULTS.md`` for the measured differences. Everything after the resize is the same
    code as the reference.
    """

    def __init__(self, transforms: Sequence[Transform], draft: bool = True, defer: bool = False):
        super().__init__(transforms, fast=True)
        self.draft, self.defer = draft, defer
        kinds = (RandomResizedCrop, RandomHorizontalFlip, RandAugment, ToNormalizedTensor,
                 RandomErasing)
        names = [type(t).__name__ for t in self.transforms]
        order = [kinds.index(type(t)) if type(t) in kinds else -1 for t in self.transforms]
        if (-1 in order or order != sorted(order) or len(set(order)) != len(order)
                or order[0] != 0 or 3 not in order):
            raise ValueError(f"TrainPipeline fuses RandomResizedCrop [-> RandomHorizontalFlip] "
                             f"[-> RandAugment] -> ToNormalizedTensor [-> RandomErasing]; got {names}")
        by_kind = {type(t): t for t in self.transforms}
        self.crop: RandomResizedCrop = by_kind[RandomResizedCrop]
        self.flip: RandomHorizontalFlip | None = by_kind.get(RandomHorizontalFlip)
        self.randaug: RandAugment | None = by_kind.get(RandAugment)
        self.to_tensor: ToNormalizedTensor = by_kind[ToNormalizedTensor]
        self.erasing: RandomErasing | None = by_kind.get(RandomErasing)

    # -- phase 1: crop box, then decode ---------------------------------------------------------
    def load(self, img: Image.Image, rng: random.Random) -> DecodedCrop:
        """Draw the crop from ``img.size`` (a lazily opened file: its header), decode (drafted
        when the crop allows it) and convert to RGB. Pillow's decoding errors propagate."""
        width, height = img.size
        top, left, h, w = self.crop.get_params(rng, width, height)
        interpolation = self.crop.interpolation
        if interpolation == "random":
            interpolation = rng.choice(("bilinear", "bicubic"))  # as _resample draws it
        scale = draft_scale((h, w), self.crop.size) if self.draft else 1
        if scale > 1 and getattr(img, "format", None) == "JPEG" and img.tile:
            # Asking for (W // k, H // k) makes Pillow pick exactly k; the image becomes
            # (ceil(W / k), ceil(H / k)), drafted pixel i covering original pixels [k i, k i + k).
            img.draft(None, (width // scale, height // scale))
            scale = next((k for k in _DRAFT_SCALES
                          if img.size == (-(-width // k), -(-height // k))), 1)
        else:
            scale = 1
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
        box = (left, top, left + w, top + h)
        if scale > 1:
            box = (left / scale, top / scale, min((left + w) / scale, img.width),
                   min((top + h) / scale, img.height))
        return DecodedCrop(img, box, scale, interpolation)

    # -- phase 2: the rest ------------------------------------------------------------------------
    def apply(self, decoded: DecodedCrop, rng: random.Random) -> torch.Tensor | DeferredSample:
        height, width = self.crop.size
        pixels = self._crop_resize(decoded, (height, width))  # (H, W, 3) uint8
        flip = self.flip is not None and rng.random() < self.flip.prob  # drawn as the flip does
        plan = self.randaug.sample_plan(rng) if self.randaug is not None else None
        if self.defer:  # the same draws, in the same order; the pixels are done on the device
            boxes, seed = self.erasing.draw(rng, height, width) if self.erasing else ([], None)
            return DeferredSample(_pixels_tensor(pixels), flip, tuple(plan or ()), tuple(boxes),
                                  seed)
        if plan:  # RandAugment's Pillow ops, exactly as in the reference, on the output size
            img = Image.fromarray(pixels, "RGB")
            if flip:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            pixels = np.asarray(self.randaug.apply_plan(img, plan))
        elif flip:
            pixels = pixels[:, ::-1]  # a view; normalize() makes the planar copy anyway
        out = self.to_tensor.normalize(pixels)
        if self.erasing is not None:
            self.erasing.erase_(out, rng)
        return torch.from_numpy(out)

    @staticmethod
    def _crop_resize(decoded: DecodedCrop, size_hw: tuple[int, int]) -> np.ndarray:
        img, box = decoded.image, decoded.box
        height, width = size_hw
        if (decoded.scale == 1 and decoded.resample in _TORCH_RESIZE
                and height * width >= _TORCH_MIN_PIXELS):
            left, top, right, bottom = (int(v) for v in box)
            crop = np.asarray(img.crop((left, top, right, bottom)))  # only the box is copied
            if crop.shape[:2] == (height, width):
                return crop
            # A channels-last view of the (h, w, 3) pixels: torch's vectorised uint8 path, and
            # the result is channels-last too, i.e. an (H, W, 3) array Pillow takes as it is.
            with warnings.catch_warnings():  # read-only (Pillow's bytes); torch only reads it
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                x = torch.from_numpy(crop).unsqueeze(0).permute(0, 3, 1, 2)
            out = F.interpolate(x, size=(height, width), mode=decoded.resample, antialias=True)
            return out[0].permute(1, 2, 0).numpy()
        resized = img.resize((width, height), pil_interpolation(decoded.resample), box=box)
        return np.asarray(resized)

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        return self.apply(self.load(img, rng), rng)

    def reference(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        """The same transforms run step by step (``Compose``): the reference output (for today's
        code and timing, ``build_train_transform(..., fast=False)``)."""
        return Compose.__call__(self, img, rng)

    @property
    def device_stage(self) -> DeviceStage:
        # Without defer the batches are finished tensors, which the stage only moves.
        return DeviceStage(self.to_tensor, self.randaug, self.erasing)

    def __repr__(self) -> str:
        defer = ", defer=True" if self.defer else ""
        return "TrainPipeline" + super().__repr__()[len("Compose"):] + defer


def _pixels_tensor(pixels: np.ndarray) -> torch.Tensor:
    """An (H, W, 3) uint8 array as a tensor the worker owns (Pillow's arrays are read-only
    views of its bytes; a flipped view has negative strides)."""
    if not (pixels.flags.writeable and pixels.flags.c_contiguous):
        pixels = np.array(pixels, order="C")
    return torch.from_numpy(pixels)
