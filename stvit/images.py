"""Reading images safely and turning them into model inputs (Pillow + torch; no torchvision).

* :func:`load_image` opens a file, applies its EXIF orientation and converts any colour mode to
  8-bit RGB; a file that is missing, not an image, truncated or absurdly large raises
  :class:`ImageError` with a message that names the file and the problem.
* :func:`to_rgb` does the conversion: grayscale and palette images are expanded to RGB,
  transparent images (RGBA, LA, palette with transparency) are composited over a white
  background, 16-bit and float images are rescaled to 0..255.
* :class:`EvalTransform` is the evaluation transform described by a model's ``pretrained_cfg``:
  resize (shorter side to ``input_size / crop_pct``), center crop to ``input_size``, scale to
  [0, 1] and normalise with ``mean`` / ``std`` — the same recipe as DeiT/timm evaluation.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .contract import IMAGENET_MEAN, IMAGENET_STD

WHITE = (255, 255, 255)
PIL_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


class ImageError(ValueError):
    """An image file that cannot be read or converted; the message says which file and why."""


def load_image(path: str | os.PathLike, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Open ``path`` as an 8-bit RGB image (EXIF rotation applied, transparency flattened)."""
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path} is a directory, not an image file")
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; both mean "too big".
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decode now, so truncated data fails here and not later
                img = ImageOps.exif_transpose(img)
    except UnidentifiedImageError:
        raise ImageError(f"cannot decode {path}: not an image format Pillow can read "
                         f"(use a JPEG, PNG, WebP, BMP, GIF or TIFF file)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{path} is too large to open safely ({e}); downscale it first") from None
    except (OSError, SyntaxError, ValueError) as e:  # Pillow reports broken data with these
        raise ImageError(f"cannot decode {path}: the file is truncated or corrupt ({e})") from None
    try:
        return to_rgb(img, background)
    except ImageError as e:
        raise ImageError(f"{path}: {e}") from None


def to_rgb(img: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any Pillow image -> 8-bit RGB.

    Transparent pixels are composited over ``background`` (their colour values are often
    meaningless); 16-bit integer images are scaled down from 0..65535, float images from 0..1
    (or clipped to 0..255 when they already use that range).
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img), mode), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"cannot convert an image in colour mode {mode!r} to RGB ({e}); "
                         f"save it as an RGB or grayscale image") from None


def _to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    a = a.astype(np.float64)
    if mode == "F":
        a = a * 255.0 if a.size and np.nanmax(a) <= 1.0 else a
    elif mode.startswith("I;16") or (a.size and a.max() > 255):
        a = a / 257.0  # 65535 -> 255
    return np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)


def pil_resample(name: str) -> Image.Resampling:
    """Pillow's resampling filter for an interpolation name (``bicubic``, ``bilinear``, ...)."""
    try:
        return PIL_RESAMPLE[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown interpolation {name!r}; expected one of {sorted(PIL_RESAMPLE)}") from None


def resize_to_cover(img: Image.Image, size_hw: tuple[int, int], interpolation: str = "bicubic") -> Image.Image:
    """Scale ``img`` keeping its aspect ratio so that it covers ``size_hw``: for a square size,
    the shorter side becomes the size (torchvision's ``Resize(int)``; the longer side is truncated)."""
    height, width = size_hw
    scale = max(height / img.height, width / img.width)
    if img.width <= img.height:
        new_w = max(width, round(img.width * scale))
        new_h = max(height, int(new_w * img.height / img.width))
    else:
        new_h = max(height, round(img.height * scale))
        new_w = max(width, int(new_h * img.width / img.height))
    if (new_w, new_h) == img.size:
        return img
    return img.resize((new_w, new_h), pil_resample(interpolation))


def resize_shorter_side(img: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Scale ``img`` so its shorter side is ``size``, keeping the aspect ratio."""
    if size < 1:
        raise ValueError(f"resize size must be positive, got {size}")
    return resize_to_cover(img, (size, size), interpolation)


def center_crop(img: Image.Image, size_hw: tuple[int, int]) -> Image.Image:
    """The central ``size_hw`` window (the image must be at least that large)."""
    height, width = size_hw
    if img.width < width or img.height < height:
        raise ValueError(f"center crop {width}x{height} is larger than the image {img.width}x{img.height}")
    top = int(round((img.height - height) / 2.0))
    left = int(round((img.width - width) / 2.0))
    return img.crop((left, top, left + width, top + height))


def to_tensor(img: Image.Image, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """RGB image -> float32 (3, H, W) tensor: pixel / 255, then (x - mean) / std per channel.

    In NumPy, as one multiply-add: torch's intra-op thread pool makes such small per-image ops
    many times slower when data loading shares the machine with training.
    """
    check_mean_std(mean, std)
    std32 = np.asarray(std, dtype=np.float32)
    scale = (1.0 / (255.0 * std32)).astype(np.float32)
    offset = -np.asarray(mean, dtype=np.float32) / std32
    pixels = np.asarray(to_rgb(img), dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy(np.ascontiguousarray((pixels * scale + offset).transpose(2, 0, 1)))


def check_mean_std(mean: Sequence[float], std: Sequence[float]) -> None:
    """Per-channel normalisation constants: 3 means and 3 positive standard deviations."""
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need 3 values each (std > 0); got {tuple(mean)}, {tuple(std)}")


def eval_resize_size(size_hw: tuple[int, int], crop_pct: float) -> tuple[int, int]:
    """The size an evaluation image is resized to cover before its ``size_hw`` centre crop."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return int(size_hw[0] / crop_pct), int(size_hw[1] / crop_pct)


class EvalTransform:
    """The evaluation transform a ``pretrained_cfg`` describes: PIL image -> (3, H, W) tensor.

    Resize (keeping the aspect ratio) so the image covers ``input_size / crop_pct`` — for the
    usual square input the shorter side becomes ``int(size / crop_pct)``, 256 for 224 at
    crop_pct 0.875 — with the cfg's interpolation, center crop ``input_size``, normalise.
    """

    def __init__(self, pretrained_cfg: Mapping):
        _, height, width = pretrained_cfg.get("input_size", (3, 224, 224))
        self.size = (int(height), int(width))
        self.crop_pct = float(pretrained_cfg.get("crop_pct", 0.875))
        self.scale_size = eval_resize_size(self.size, self.crop_pct)
        self.interpolation = str(pretrained_cfg.get("interpolation", "bicubic"))
        pil_resample(self.interpolation)  # validate now
        self.mean = tuple(pretrained_cfg.get("mean", IMAGENET_MEAN))
        self.std = tuple(pretrained_cfg.get("std", IMAGENET_STD))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = resize_to_cover(to_rgb(img), self.scale_size, self.interpolation)
        return to_tensor(center_crop(img, self.size), self.mean, self.std)

    def __repr__(self) -> str:
        return (f"EvalTransform(resize {self.interpolation} to cover {self.scale_size}, "
                f"center crop {self.size}, mean={self.mean}, std={self.std})")
