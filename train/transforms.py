"""Image transforms for training and evaluation, on Pillow + torch (no torchvision).

Every transform is a callable ``(img, rng) -> output`` taking an explicit ``random.Random``;
deterministic transforms ignore ``rng``. The pipelines follow DeiT/timm:

* train: RandomResizedCrop (bicubic) -> horizontal flip -> RandAugment -> tensor + normalize
  -> Random Erasing;
* eval: resize (keeping the aspect ratio) to cover ``input_size / crop_pct`` -> center crop ->
  tensor + normalize: the geometry of ``stvit.images.EvalTransform``, whose helpers do the work.
"""

from __future__ import annotations

import math
import numbers
import random
from typing import Callable, Sequence

import torch
from PIL import Image

from stvit.images import center_crop, check_mean_std, eval_resize_size, resize_to_cover, to_tensor
from stvit.models.stvit import IMAGENET_MEAN as IMAGENET_DEFAULT_MEAN
from stvit.models.stvit import IMAGENET_STD as IMAGENET_DEFAULT_STD
from train.augment import RandAugment, RandomErasing, pil_interpolation

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
    """Chain transforms, passing the same ``rng`` to each (so draws happen in a fixed order)."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, img, rng: random.Random):
        for transform in self.transforms:
            img = transform(img, rng)
        return img

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
    """PIL image -> float32 (3, H, W) tensor, scaled to [0, 1] then ``(x - mean) / std``."""

    def __init__(self, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD):
        check_mean_std(mean, std)  # at construction, not first at the first image
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        return to_tensor(img, self.mean, self.std)

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
                          remode: str = "pixel", recount: int = 1) -> Compose:
    """DeiT's training pipeline. ``aa=None`` or ``"none"`` disables RandAugment; ``reprob=0``
    disables Random Erasing; ``hflip=0`` disables flipping."""
    transforms: list[Transform] = [
        RandomResizedCrop(input_size, scale=scale, interpolation=interpolation)
    ]
    if hflip > 0:
        transforms.append(RandomHorizontalFlip(hflip))
    if aa is not None and str(aa).strip().lower() not in ("", "none"):
        transforms.append(RandAugment(aa, fill=mean_fill_color(mean), interpolation=interpolation))
    transforms.append(ToNormalizedTensor(mean, std))
    if reprob > 0:
        transforms.append(RandomErasing(reprob, mode=remode, count=recount))
    return Compose(transforms)


def build_eval_transform(input_size, crop_pct: float = 0.875, interpolation: str = "bicubic",
                         mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                         std: Sequence[float] = IMAGENET_DEFAULT_STD) -> Compose:
    """Resize to cover ``input_size / crop_pct`` (for a square size: the shorter side becomes
    ``int(size / crop_pct)``), center crop ``input_size``, normalize."""
    height, width = _size_hw(input_size)
    if interpolation == "random":  # evaluation is deterministic
        interpolation = "bicubic"
    return Compose([
        ResizeToCover(eval_resize_size((height, width), crop_pct), interpolation),
        CenterCrop((height, width)),
        ToNormalizedTensor(mean, std),
    ])
