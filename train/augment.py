"""RandAugment (timm ``rand-...`` config strings) and Random Erasing, on Pillow and torch.

Every entry point takes an explicit ``rng: random.Random`` so a sample's augmentation is a pure
function of its seed (see ``train.samplers``).

RandAugment semantics (as in DeiT's recipe, ``rand-m9-mstd0.5-inc1``):

* ``n`` ops (default 2) are drawn *with replacement* from the op list;
* each drawn op is applied with probability ``p`` (default 0.5);
* its magnitude is ``m`` plus Gaussian noise of std ``mstd`` (``mstdinf``: uniform in [0, m]),
  clipped to [0, ``mmax``] (default 10); magnitudes are on a 0..10 scale;
* ``inc1`` selects the "increasing" op set, where a larger magnitude is always a stronger change
  (e.g. PosterizeIncreasing keeps *fewer* bits as m grows, SolarizeIncreasing lowers the threshold);
* signed ops (Rotate, Shear, Translate, *Increasing enhancements) flip sign with probability 0.5;
* geometric ops fill uncovered pixels with the dataset mean colour and resample with the
  training interpolation.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from stvit.images import PIL_RESAMPLE

MAX_LEVEL = 10.0  # magnitudes live on a 0..10 scale

# ---------------------------------------------------------------------------------------------
# Pillow ops. Each takes (img, arg, fill, resample); arg is the already-scaled op parameter.
# ---------------------------------------------------------------------------------------------


def _auto_contrast(img, _arg, _fill, _resample):
    return ImageOps.autocontrast(img)


def _equalize(img, _arg, _fill, _resample):
    return ImageOps.equalize(img)


def _invert(img, _arg, _fill, _resample):
    return ImageOps.invert(img)


def _rotate(img, degrees, fill, resample):
    return img.rotate(degrees, resample=resample, fillcolor=fill)


def rotate_coeffs(degrees: float, size: tuple[int, int]) -> tuple[float, ...] | None:
    """The inverse affine map Pillow's ``img.rotate(degrees)`` samples with (about the image
    centre, same size), term for term as ``Image.rotate`` builds it; None where Pillow does not
    resample at all (0, 180, and 90/270 on a square image: an exact copy or transpose)."""
    angle = degrees % 360.0
    width, height = size
    if angle in (0.0, 180.0) or (angle in (90.0, 270.0) and width == height):
        return None
    cx, cy = width / 2, height / 2
    rad = -math.radians(angle)
    a, b, d, e = (round(math.cos(rad), 15), round(math.sin(rad), 15), round(-math.sin(rad), 15),
                  round(math.cos(rad), 15))
    return (a, b, a * -cx + b * -cy + 0.0 + cx, d, e, d * -cx + e * -cy + 0.0 + cy)


def _posterize(img, bits, _fill, _resample):
    if bits >= 8:
        return img
    if bits <= 0:  # keep no bits: black (Pillow's posterize refuses 0)
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits)


def _solarize(img, threshold, _fill, _resample):
    return ImageOps.solarize(img, threshold)


def _solarize_add(img, add, _fill, _resample, threshold=128):
    # Brighten the dark pixels (below `threshold`) by `add`, saturating at 255.
    lut = [min(255, v + add) if v < threshold else v for v in range(256)]
    return img.point(lut * len(img.getbands()))


def _enhancer(cls) -> Callable:
    def op(img, factor, _fill, _resample):
        return cls(img).enhance(factor)

    return op


# Pillow's AFFINE coefficients (a, b, c, d, e, f): output pixel (x, y) samples the input at
# (a x + b y + c, d x + e y + f). Shared with the batched ops (train.batch_augment).
AFFINE_COEFFS: dict[str, Callable[[float, tuple[int, int]], tuple[float, ...]]] = {
    "ShearX": lambda f, size: (1, f, 0, 0, 1, 0),
    "ShearY": lambda f, size: (1, 0, 0, f, 1, 0),
    "TranslateXRel": lambda pct, size: (1, 0, pct * size[0], 0, 1, 0),
    "TranslateYRel": lambda pct, size: (1, 0, 0, 0, 1, pct * size[1]),
}


def _affine(name: str) -> Callable:
    def op(img, value, fill, resample):
        coeffs = AFFINE_COEFFS[name](value, img.size)
        return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=resample,
                             fillcolor=fill)

    return op


_shear_x, _shear_y = _affine("ShearX"), _affine("ShearY")
_translate_x_rel, _translate_y_rel = _affine("TranslateXRel"), _affine("TranslateYRel")

# ---------------------------------------------------------------------------------------------
# Magnitude (0..10) -> op parameter. `negate` is a fair coin so signed ops go both ways.
# ---------------------------------------------------------------------------------------------


def _signed(value: float, rng: random.Random) -> float:
    return -value if rng.random() < 0.5 else value


def _none_arg(level, rng):
    return None


def _rotate_arg(level, rng):
    return _signed(level / MAX_LEVEL * 30.0, rng)  # degrees


def _shear_arg(level, rng):
    return _signed(level / MAX_LEVEL * 0.3, rng)


def _translate_rel_arg(level, rng, max_pct=0.45):
    return _signed(level / MAX_LEVEL * max_pct, rng)  # fraction of the image side


def _posterize_bits_removed(level):
    return int(level / MAX_LEVEL * 4)


def _posterize_arg(level, rng):
    return _posterize_bits_removed(level)  # original TPU semantics: keep 0..4 bits


def _posterize_increasing_arg(level, rng):
    return 4 - _posterize_bits_removed(level)  # keep 4..0 bits: stronger with level


def _solarize_arg(level, rng):
    return int(level / MAX_LEVEL * 256)


def _solarize_increasing_arg(level, rng):
    return 256 - _solarize_arg(level, rng)  # lower threshold inverts more pixels


def _solarize_add_arg(level, rng):
    return int(level / MAX_LEVEL * 110)


def _enhance_arg(level, rng):
    return level / MAX_LEVEL * 1.8 + 0.1  # factor in [0.1, 1.9]; 1.0 is identity


def _enhance_increasing_arg(level, rng):
    return 1.0 + _signed(level / MAX_LEVEL * 0.9, rng)  # further from 1.0 with level


@dataclass(frozen=True)
class OpSpec:
    """One RandAugment op: the Pillow function and its magnitude -> parameter mapping."""

    name: str
    apply: Callable
    level_to_arg: Callable[[float, random.Random], object]


_OPS = {
    spec.name: spec
    for spec in [
        OpSpec("AutoContrast", _auto_contrast, _none_arg),
        OpSpec("Equalize", _equalize, _none_arg),
        OpSpec("Invert", _invert, _none_arg),
        OpSpec("Rotate", _rotate, _rotate_arg),
        OpSpec("Posterize", _posterize, _posterize_arg),
        OpSpec("PosterizeIncreasing", _posterize, _posterize_increasing_arg),
        OpSpec("Solarize", _solarize, _solarize_arg),
        OpSpec("SolarizeIncreasing", _solarize, _solarize_increasing_arg),
        OpSpec("SolarizeAdd", _solarize_add, _solarize_add_arg),
        OpSpec("Color", _enhancer(ImageEnhance.Color), _enhance_arg),
        OpSpec("ColorIncreasing", _enhancer(ImageEnhance.Color), _enhance_increasing_arg),
        OpSpec("Contrast", _enhancer(ImageEnhance.Contrast), _enhance_arg),
        OpSpec("ContrastIncreasing", _enhancer(ImageEnhance.Contrast), _enhance_increasing_arg),
        OpSpec("Brightness", _enhancer(ImageEnhance.Brightness), _enhance_arg),
        OpSpec("BrightnessIncreasing", _enhancer(ImageEnhance.Brightness),
               _enhance_increasing_arg),
        OpSpec("Sharpness", _enhancer(ImageEnhance.Sharpness), _enhance_arg),
        OpSpec("SharpnessIncreasing", _enhancer(ImageEnhance.Sharpness), _enhance_increasing_arg),
        OpSpec("ShearX", _shear_x, _shear_arg),
        OpSpec("ShearY", _shear_y, _shear_arg),
        OpSpec("TranslateXRel", _translate_x_rel, _translate_rel_arg),
        OpSpec("TranslateYRel", _translate_y_rel, _translate_rel_arg),
    ]
}

RAND_OPS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)
"""The default op set (``inc0``)."""

RAND_INCREASING_OPS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
"""The ``inc1`` op set: a larger magnitude always means a stronger change."""

# Affine/rotate in Pillow only support these three filters.
_GEOMETRIC_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def pil_interpolation(name: str) -> Image.Resampling:
    """Pillow resampling filter for an interpolation name (``"bicubic"``, ``"bilinear"``, ...)."""
    try:
        return PIL_RESAMPLE[name]
    except KeyError:
        raise ValueError(
            f"unknown interpolation {name!r}; use one of {sorted(PIL_RESAMPLE)} or 'random'"
        ) from None


# ---------------------------------------------------------------------------------------------
# Config string parsing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RandAugmentConfig:
    """Parsed ``rand-...`` string. Fields mirror the string keys."""

    magnitude: float = MAX_LEVEL  # m
    num_ops: int = 2  # n
    magnitude_std: float = 0.0  # mstd; math.inf means uniform in [0, magnitude]
    magnitude_max: float = MAX_LEVEL  # mmax
    increasing: bool = False  # inc
    prob: float = 0.5  # p

    @property
    def op_names(self) -> tuple[str, ...]:
        return RAND_INCREASING_OPS if self.increasing else RAND_OPS


_CONFIG_HELP = (
    "expected 'rand' followed by '-'-separated keys, e.g. 'rand-m9-mstd0.5-inc1': "
    "m<magnitude 0..10, default 10>, n<number of ops, default 2>, mstd<magnitude std or 'inf'>, "
    "mmax<max magnitude>, inc<0|1> (1 = increasing op set), p<op probability 0..1>"
)


def parse_rand_config(config: str) -> RandAugmentConfig:
    """Parse a timm-style RandAugment string such as ``"rand-m9-mstd0.5-inc1"``."""
    if not isinstance(config, str) or not config.strip():
        raise ValueError(f"bad RandAugment config {config!r}: {_CONFIG_HELP}")
    parts = config.strip().split("-")
    if parts[0] != "rand":
        raise ValueError(f"bad augmentation config {config!r}: only RandAugment is implemented "
                         f"('none' disables it); {_CONFIG_HELP}")
    values: dict[str, float] = {}
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+?)(\d.*|inf)", part)
        key = match.group(1) if match else part
        if not match or key not in ("m", "n", "mstd", "mmax", "inc", "p"):
            raise ValueError(f"bad RandAugment config {config!r}: unknown item {part!r}; "
                             f"{_CONFIG_HELP}")
        try:
            values[key] = float(match.group(2))
        except ValueError:
            raise ValueError(f"bad RandAugment config {config!r}: {part!r} needs a number; "
                             f"{_CONFIG_HELP}") from None
        if math.isnan(values[key]) or (values[key] < 0):
            raise ValueError(f"bad RandAugment config {config!r}: {part!r} must be >= 0")

    cfg = RandAugmentConfig(
        magnitude=values.get("m", MAX_LEVEL),
        num_ops=values.get("n", 2),
        # timm reads any std above 100 as "uniform" too
        magnitude_std=math.inf if values.get("mstd", 0.0) > 100 else values.get("mstd", 0.0),
        magnitude_max=values.get("mmax", MAX_LEVEL),
        increasing=bool(values.get("inc", 0)),
        prob=values.get("p", 0.5),
    )
    if cfg.num_ops != int(cfg.num_ops) or math.isinf(cfg.num_ops):
        raise ValueError(f"bad RandAugment config {config!r}: n must be a whole number")
    if values.get("inc", 0) not in (0, 1):
        raise ValueError(f"bad RandAugment config {config!r}: inc must be 0 or 1")
    if cfg.prob > 1:
        raise ValueError(f"bad RandAugment config {config!r}: p must be in [0, 1]")
    if math.isinf(cfg.magnitude) or math.isinf(cfg.magnitude_max):
        raise ValueError(f"bad RandAugment config {config!r}: m and mmax must be finite")
    if cfg.magnitude > cfg.magnitude_max:
        raise ValueError(f"bad RandAugment config {config!r}: magnitude m{cfg.magnitude:g} "
                         f"exceeds the maximum {cfg.magnitude_max:g}; lower m or add "
                         f"mmax{cfg.magnitude:g}")
    return RandAugmentConfig(cfg.magnitude, int(cfg.num_ops), cfg.magnitude_std,
                             cfg.magnitude_max, cfg.increasing, cfg.prob)


# ---------------------------------------------------------------------------------------------
# RandAugment
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedOp:
    """One op RandAugment decided to apply: its name, sampled magnitude and parameter."""

    name: str
    magnitude: float
    arg: object
    interpolation: str = "bicubic"


class RandAugment:
    """RandAugment on PIL images, ``(img, rng) -> img``.

    Args:
        config: a ``rand-...`` string (see :func:`parse_rand_config`) or a parsed config.
        fill: RGB fill colour for geometric ops (uint8 tuple; use the dataset mean colour).
        interpolation: resampling for geometric ops (``"bicubic"``, ``"bilinear"``,
            ``"nearest"`` or ``"random"`` = bilinear/bicubic per op).
    """

    def __init__(self, config: str | RandAugmentConfig = "rand-m9-mstd0.5-inc1",
                 fill: Sequence[int] = (124, 116, 104), interpolation: str = "bicubic"):
        self.config = parse_rand_config(config) if isinstance(config, str) else config
        self.fill = tuple(int(c) for c in fill)
        if interpolation != "random" and interpolation not in _GEOMETRIC_INTERPOLATIONS:
            # Pillow's affine/rotate reject lanczos/box/hamming: fall back to bicubic.
            interpolation = "bicubic"
        self.interpolation = interpolation
        # Names, not functions: keeps the transform picklable for spawned DataLoader workers.
        self.op_names = self.config.op_names

    def _sample_magnitude(self, rng: random.Random) -> float:
        cfg = self.config
        magnitude = cfg.magnitude
        if cfg.magnitude_std == math.inf:
            magnitude = rng.uniform(0.0, magnitude)
        elif cfg.magnitude_std > 0:
            magnitude = rng.gauss(magnitude, cfg.magnitude_std)
        return max(0.0, min(magnitude, cfg.magnitude_max))

    def sample_plan(self, rng: random.Random) -> list[PlannedOp]:
        """Draw the ops (and their parameters) this call will apply; skipped ops are omitted."""
        plan = []
        for name in rng.choices(self.op_names, k=self.config.num_ops):  # with replacement
            spec = _OPS[name]
            if self.config.prob < 1.0 and rng.random() > self.config.prob:
                continue
            magnitude = self._sample_magnitude(rng)
            arg = spec.level_to_arg(magnitude, rng)
            interpolation = self.interpolation
            if interpolation == "random":
                interpolation = rng.choice(("bilinear", "bicubic"))
            plan.append(PlannedOp(spec.name, magnitude, arg, interpolation))
        return plan

    def apply_plan(self, img: Image.Image, plan: Sequence[PlannedOp]) -> Image.Image:
        """Apply ops drawn by :meth:`sample_plan` (no randomness left here)."""
        for op in plan:
            img = _OPS[op.name].apply(img, op.arg, self.fill, PIL_RESAMPLE[op.interpolation])
        return img

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        return self.apply_plan(img, self.sample_plan(rng))

    def __repr__(self) -> str:
        return f"RandAugment({self.config}, fill={self.fill}, interpolation={self.interpolation!r})"


# ---------------------------------------------------------------------------------------------
# Random Erasing
# ---------------------------------------------------------------------------------------------


class RandomErasing:
    """Random Erasing on a normalized (C, H, W) tensor, ``(tensor, rng) -> tensor``.

    With probability ``prob`` erase ``count`` rectangles, each covering a fraction of the image
    drawn uniformly from ``area`` (divided by count) with a log-uniform aspect ratio in
    ``aspect``; up to 10 tries per rectangle to fit it inside the image, else it is skipped.
    ``mode``: ``"pixel"`` = per-pixel N(0, 1) noise (the DeiT default), ``"rand"`` = one
    N(0, 1) value per channel, ``"const"`` = zeros (the mean colour after normalization).
    Returns a new tensor; the input is not modified.
    """

    MODES = ("pixel", "rand", "const")

    def __init__(self, prob: float = 0.25, mode: str = "pixel",
                 area: tuple[float, float] = (0.02, 1 / 3),
                 aspect: tuple[float, float] = (0.3, 1 / 0.3), count: int = 1):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"random erasing probability must be in [0, 1], got {prob}")
        if mode not in self.MODES:
            raise ValueError(f"random erasing mode {mode!r} unknown; use one of {self.MODES}")
        if not 0.0 < area[0] <= area[1] <= 1.0:
            raise ValueError(f"random erasing area must satisfy 0 < min <= max <= 1, got {area}")
        if not 0.0 < aspect[0] <= aspect[1]:
            raise ValueError(f"random erasing aspect must satisfy 0 < min <= max, got {aspect}")
        if count < 1:
            raise ValueError(f"random erasing count must be >= 1, got {count}")
        self.prob, self.mode, self.area, self.count = prob, mode, area, count
        self.log_aspect = (math.log(aspect[0]), math.log(aspect[1]))

    def sample_boxes(self, rng: random.Random, height: int,
                     width: int) -> list[tuple[int, int, int, int]]:
        """The rectangles ``(top, left, h, w)`` one call would erase (empty if not applied)."""
        if rng.random() >= self.prob:
            return []
        boxes = []
        for _ in range(self.count):
            for _attempt in range(10):
                target = rng.uniform(*self.area) * height * width / self.count
                aspect = math.exp(rng.uniform(*self.log_aspect))
                h = int(round(math.sqrt(target * aspect)))
                w = int(round(math.sqrt(target / aspect)))
                if 0 < h < height and 0 < w < width:
                    boxes.append((rng.randint(0, height - h), rng.randint(0, width - w), h, w))
                    break
        return boxes

    def draw(self, rng: random.Random, height: int,
             width: int) -> tuple[list[tuple[int, int, int, int]], int | None]:
        """The rectangles one call erases and the seed of their noise, drawn from ``rng`` only
        when there is a box (None otherwise)."""
        boxes = self.sample_boxes(rng, height, width)
        return boxes, (rng.getrandbits(63) if boxes else None)

    def __call__(self, tensor: torch.Tensor, rng: random.Random) -> torch.Tensor:
        if tensor.dim() != 3:
            raise ValueError(f"random erasing expects a (C, H, W) tensor, "
                             f"got {tuple(tensor.shape)}")
        boxes, seed = self.draw(rng, *tensor.shape[1:])
        if not boxes:
            return tensor
        # NumPy, not torch: per-image torch ops pay for the intra-op thread pool (a 600 kB
        # clone takes milliseconds on a busy machine); this runs in data-loading code on CPU.
        out = tensor.detach().cpu().numpy().copy()
        self._fill(out, boxes, _numpy_normal(seed))
        return torch.from_numpy(out).to(tensor.device)

    def erase_(self, array: np.ndarray, rng: random.Random) -> np.ndarray:
        """Erase in place in a (C, H, W) float32 array the pipeline owns: the same draws and the
        same values as ``__call__``, without copying the image first."""
        boxes, seed = self.draw(rng, *array.shape[1:])
        if boxes:
            self._fill(array, boxes, _numpy_normal(seed))
        return array

    def erase_batch_(self, batch: torch.Tensor, boxes: list, seeds: list) -> torch.Tensor:
        """Erase in place in a (B, C, H, W) batch on any device: image ``i`` gets ``boxes[i]``
        and ``seeds[i]`` (from :meth:`draw`, in the worker), its noise from the device's
        generator. Same boxes and statistics as :meth:`erase_`; the noise values come from
        torch's generator instead of NumPy's."""
        generator = None
        for image, image_boxes, seed in zip(batch, boxes, seeds):
            if not image_boxes:
                continue
            if generator is None:
                generator = torch.Generator(device=batch.device)
            generator.manual_seed(seed)
            self._fill(image, image_boxes, lambda shape: torch.randn(
                shape, generator=generator, device=batch.device, dtype=batch.dtype))
        return batch

    def _fill(self, image, boxes, normal: Callable) -> None:
        """Fill ``boxes`` of one (C, H, W) image (array or tensor) in place, by ``mode``;
        ``normal(shape)`` gives N(0, 1) values."""
        channels = image.shape[0]
        for top, left, h, w in boxes:
            if self.mode == "pixel":
                value = normal((channels, h, w))
            elif self.mode == "rand":
                value = normal((channels, 1, 1))
            else:
                value = 0.0
            image[:, top:top + h, left:left + w] = value

    def __repr__(self) -> str:
        return (f"RandomErasing(prob={self.prob}, mode={self.mode!r}, area={self.area}, "
                f"count={self.count})")


def _numpy_normal(seed: int) -> Callable:
    noise = np.random.default_rng(seed)  # deterministic, fast in bulk
    return lambda shape: noise.standard_normal(shape, dtype=np.float32)
