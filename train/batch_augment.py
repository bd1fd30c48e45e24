"""The paper pipeline's second half on uint8 batches, on the training device.

DataLoader workers are what limits a DeiT-style recipe on an 8-GPU node, so the work is split
the way DALI and FFCV split it. A worker (``TrainPipeline(defer=True)``, see
``train.transforms``) decodes, crops and resizes, and draws every random parameter exactly as
the all-in-the-worker pipeline does. It hands over a :class:`DeferredSample`: the uint8 pixels
plus the draws. The collated :class:`DeferredBatch` travels to the device as uint8 (a quarter of
float32's bytes), and :class:`DeviceStage` runs the rest there, batched:

    flip -> RandAugment -> normalise -> Random Erasing

RandAugment's ops here redo Pillow's own arithmetic (the reference is ``train.augment``):
lookup tables for the point ops, float32 blends, the 3x3 smoothing filter, and Pillow's affine
sampler (a = -1 bicubic, edge clamping, truncation, the fill colour outside) in float64.
``tests/test_batch_augment.py`` checks every op against Pillow pixel for pixel. Random
Erasing draws its boxes in the worker and its noise on the device, from a seed drawn in the
worker: the same boxes and the same N(0, 1) statistics, from the device's generator.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple, Sequence

import torch

from train.augment import AFFINE_COEFFS, PlannedOp, RandAugment, RandomErasing, rotate_coeffs


class DeferredSample(NamedTuple):
    """One image as a worker hands it over: pixels and the draws still to apply."""

    pixels: torch.Tensor  # (H, W, 3) uint8, cropped and resized
    flip: bool = False
    ops: tuple[PlannedOp, ...] = ()  # RandAugment's ops to apply, in order
    boxes: tuple[tuple[int, int, int, int], ...] = ()  # Random Erasing's (top, left, h, w)
    noise_seed: int | None = None  # Random Erasing's noise, when there is a box


class DeferredBatch:
    """Collated :class:`DeferredSample` s: ``pixels`` (B, H, W, 3) uint8 and per-sample draws."""

    def __init__(self, pixels: torch.Tensor, flips: list[bool], ops: list, boxes: list,
                 seeds: list):
        self.pixels, self.flips, self.ops, self.boxes, self.seeds = pixels, flips, ops, boxes, seeds

    @classmethod
    def stack(cls, samples: Sequence[DeferredSample]) -> "DeferredBatch":
        return cls(torch.stack([s.pixels for s in samples]), [s.flip for s in samples],
                   [s.ops for s in samples], [s.boxes for s in samples],
                   [s.noise_seed for s in samples])

    @property
    def shape(self) -> torch.Size:
        """The shape of the images this batch becomes: (B, 3, H, W)."""
        b, h, w, c = self.pixels.shape
        return torch.Size((b, c, h, w))

    def pin_memory(self) -> "DeferredBatch":  # DataLoader(pin_memory=True) calls this
        return DeferredBatch(self.pixels.pin_memory(), self.flips, self.ops, self.boxes,
                             self.seeds)


class DeviceStage:
    """Finish a batch on ``device``: ``stage(batch, device) -> (B, 3, H, W) float32``.

    A :class:`DeferredBatch` gets flip -> RandAugment -> normalise -> Random Erasing; a tensor
    batch (a pipeline that finished in the worker, or an empty one) is only moved."""

    def __init__(self, normalize, randaug: RandAugment | None = None,
                 erasing: RandomErasing | None = None):
        self.normalize, self.randaug, self.erasing = normalize, randaug, erasing

    def __call__(self, batch, device: torch.device | str) -> torch.Tensor:
        if not isinstance(batch, DeferredBatch):
            return batch.to(device, non_blocking=True)
        if self.normalize is None:
            raise TypeError("this pipeline does not hand over deferred batches; build it with "
                            "defer=True to finish its batches on the device")
        x = batch.pixels.to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
        flipped = [i for i, flip in enumerate(batch.flips) if flip]
        if flipped:
            idx = torch.tensor(flipped, device=x.device)
            x[idx] = x[idx].flip(-1)
        if self.randaug is not None:
            x = apply_ops(x, batch.ops, self.randaug.fill)
        out = self.normalize.normalize_batch(x)
        if self.erasing is not None:
            self.erasing.erase_batch_(out, batch.boxes, batch.seeds)
        return out

    def __repr__(self) -> str:
        return f"DeviceStage({self.normalize!r}, {self.randaug!r}, {self.erasing!r})"


# ---------------------------------------------------------------------------------------------
# RandAugment, batched: ops grouped by kind, one call per kind and slot
# ---------------------------------------------------------------------------------------------

def apply_ops(x: torch.Tensor, ops: Sequence[Sequence[PlannedOp]],
              fill: Sequence[int]) -> torch.Tensor:
    """Apply sample ``i``'s planned ops, in order, to ``x[i]`` ((B, 3, H, W) uint8)."""
    for slot in range(max((len(o) for o in ops), default=0)):
        groups: dict[tuple, list[tuple[int, PlannedOp]]] = defaultdict(list)
        for i, planned in enumerate(ops):
            if slot < len(planned):
                op = planned[slot]
                kind = ("affine", op.interpolation) if _is_geometric(op.name) else (op.name,)
                groups[kind].append((i, op))
        for kind, members in groups.items():
            idx = torch.tensor([i for i, _ in members], device=x.device)
            args = [op.arg for _, op in members]
            if kind[0] == "affine":
                x[idx] = _affine_ops(x[idx], [op.name for _, op in members], args, fill, kind[1])
            else:
                x[idx] = _POINT_AND_BLEND_OPS[kind[0]](x[idx], args)
    return x


def _is_geometric(name: str) -> bool:
    return name == "Rotate" or name in AFFINE_COEFFS


# ---- point ops: a 256-entry lookup table per image and channel -----------------------------------

def _levels(x: torch.Tensor, dtype=torch.int64) -> torch.Tensor:
    return torch.arange(256, device=x.device, dtype=dtype)


def _lut(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``table[b, c, x[b, c, h, w]]``; ``table`` is (b, 1 or 3, 256), values in 0..255."""
    b, c = x.shape[:2]
    table = table.clamp(0, 255).to(torch.uint8).expand(b, c, 256).reshape(b * c, 256)
    return torch.gather(table, 1, x.reshape(b * c, -1).long()).view_as(x)


def _per_image(values, x: torch.Tensor, dtype=torch.int64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=x.device).view(-1, 1, 1)


def _histogram(x: torch.Tensor) -> torch.Tensor:
    """(b, c, 256) int64 pixel counts per image and channel."""
    b, c = x.shape[:2]
    flat = x.reshape(b * c, -1).long()
    hist = torch.zeros(b * c, 256, dtype=torch.int64, device=x.device)
    return hist.scatter_add_(1, flat, torch.ones_like(flat)).view(b, c, 256)


def _invert(x, args):
    return 255 - x


def _posterize(x, bits):
    # Pillow keeps the top `bits` bits (8 or more: unchanged; 0 or fewer: black).
    masks = [255 if b >= 8 else 0 if b <= 0 else (0xFF << (8 - b)) & 0xFF for b in bits]
    return _lut(x, _levels(x) & _per_image(masks, x))


def _solarize(x, thresholds):
    levels, t = _levels(x), _per_image(thresholds, x)
    return _lut(x, torch.where(levels < t, levels, 255 - levels))


def _solarize_add(x, adds, threshold=128):
    levels = _levels(x)
    return _lut(x, torch.where(levels < threshold, (levels + _per_image(adds, x)).clamp(max=255),
                               levels))


def _darkest_and_brightest(present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and last levels present, (b, c, 1) each, from a (b, c, 256) bool histogram."""
    return (present.int().argmax(-1, keepdim=True),
            255 - present.flip(-1).int().argmax(-1, keepdim=True))


def _auto_contrast(x, args):
    # ImageOps.autocontrast(cutoff=0): stretch [lo, hi] of each channel to [0, 255], truncating.
    lo, hi = (level.double() for level in _darkest_and_brightest(_histogram(x) > 0))
    # torch's `255.0 / t` is 255 * (1 / t), which rounds differently from Python's division.
    scale = torch.full_like(lo, 255.0).div_((hi - lo).clamp(min=1))
    levels = _levels(x, torch.float64)
    table = torch.trunc(levels * scale + (-lo * scale))
    return _lut(x, torch.where(hi <= lo, levels, table).long())


def _equalize(x, args):
    # ImageOps.equalize: table[i] = (step // 2 + pixels below i) // step, where
    # step = (pixels not of the brightest value) // 255; identity when step is 0 or one value.
    hist = _histogram(x)
    present = hist > 0
    _, brightest = _darkest_and_brightest(present)
    step = (hist.sum(-1, keepdim=True) - hist.gather(-1, brightest)) // 255
    below = hist.cumsum(-1) - hist
    table = (step // 2 + below) // step.clamp(min=1)
    identity = (present.sum(-1, keepdim=True) <= 1) | (step == 0)
    return _lut(x, torch.where(identity, _levels(x), table))


# ---- blends: ImageEnhance's Image.blend(degenerate, image, factor) -------------------------------

def _blend(degenerate: torch.Tensor, x: torch.Tensor, factors) -> torch.Tensor:
    # Pillow's ImagingBlend in float32: degenerate + factor * (image - degenerate), truncated
    # (clamped first when the factor extrapolates).
    alpha = torch.tensor(factors, dtype=torch.float32, device=x.device).view(-1, 1, 1, 1)
    deg = degenerate.to(torch.int32)
    out = deg.float() + alpha * (x.to(torch.int32) - deg).float()
    return out.clamp(0, 255).trunc().to(torch.uint8)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16, as (b, 1, H, W) int32."""
    r, g, b = x.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1)


def _color(x, factors):
    return _blend(_luma(x).expand_as(x), x, factors)


def _contrast(x, factors):
    luma = _luma(x)
    # ImageStat's mean of the L image, rounded half up.
    mean = (luma.sum((1, 2, 3), dtype=torch.float64) / luma[0].numel() + 0.5).floor()
    return _blend(mean.view(-1, 1, 1, 1).expand_as(x), x, factors)


def _brightness(x, factors):
    return _blend(torch.zeros_like(x), x, factors)


def _sharpness(x, factors):
    # ImageFilter.SMOOTH (1 1 1 / 1 5 1 / 1 1 1, / 13) in float32 as Pillow sums it, rounded by
    # a +0.5 offset and truncation; the outermost rows and columns stay as they are.
    f = x.float()
    k1, k5 = torch.tensor(1 / 13, dtype=torch.float32), torch.tensor(5 / 13, dtype=torch.float32)
    rows = []
    for dy in (1, 0, -1):  # Pillow's order: the row below, this row, the row above
        r = f[:, :, 1 + dy:f.shape[2] - 1 + dy]
        centre = k5 if dy == 0 else k1
        rows.append(r[..., :-2] * k1 + r[..., 1:-1] * centre + r[..., 2:] * k1)
    smooth = ((0.5 + rows[0]) + rows[1]) + rows[2]
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth.clamp(0, 255).trunc().to(torch.uint8)
    return _blend(degenerate, x, factors)


_POINT_AND_BLEND_OPS = {
    "AutoContrast": _auto_contrast, "Equalize": _equalize, "Invert": _invert,
    "Posterize": _posterize, "PosterizeIncreasing": _posterize,
    "Solarize": _solarize, "SolarizeIncreasing": _solarize, "SolarizeAdd": _solarize_add,
    "Color": _color, "ColorIncreasing": _color, "Contrast": _contrast,
    "ContrastIncreasing": _contrast, "Brightness": _brightness,
    "BrightnessIncreasing": _brightness, "Sharpness": _sharpness,
    "SharpnessIncreasing": _sharpness,
}


# ---- geometric ops: Pillow's affine sampler ------------------------------------------------------

def _affine_ops(x: torch.Tensor, names: list[str], args: list, fill: Sequence[int],
                interpolation: str) -> torch.Tensor:
    """Rotate / Shear / Translate images of one interpolation, each with its own matrix."""
    height, width = x.shape[2:]
    out = x.clone()
    coeffs, resampled = [], []
    for i, (name, arg) in enumerate(zip(names, args)):
        if name == "Rotate":
            matrix = rotate_coeffs(arg, (width, height))
            if matrix is None:  # 0, 180 or a quarter turn of a square: Pillow copies exactly
                quarter = round((arg % 360.0) / 90.0) % 4
                out[i] = torch.rot90(x[i], quarter, dims=(1, 2))  # counter-clockwise, as Pillow
                continue
        else:
            matrix = AFFINE_COEFFS[name](arg, (width, height))
        coeffs.append([float(c) for c in matrix])
        resampled.append(i)
    if resampled:
        idx = torch.tensor(resampled, device=x.device)
        out[idx] = affine_sample(x[idx], torch.tensor(coeffs, dtype=torch.float64,
                                                      device=x.device), fill, interpolation)
    return out


def affine_sample(x: torch.Tensor, coeffs: torch.Tensor, fill: Sequence[int],
                  interpolation: str) -> torch.Tensor:
    """Pillow's ``img.transform(size, AFFINE, coeffs, resample, fillcolor=fill)`` on a batch.

    x: (b, 3, H, W) uint8; coeffs: (b, 6) float64, one matrix per image."""
    b, c, height, width = x.shape
    dev = x.device
    a0, a1, a2, a3, a4, a5 = (coeffs[:, k].view(b, 1, 1) for k in range(6))
    ys = torch.arange(height, dtype=torch.float64, device=dev).view(1, height, 1)
    xs = torch.arange(width, dtype=torch.float64, device=dev).view(1, 1, width)
    flat = x.reshape(b, c, height * width)
    fill_px = torch.tensor(list(fill), dtype=torch.uint8, device=dev).view(1, c, 1, 1)

    if interpolation == "nearest":
        src_x, src_y, inside = _nearest_source(coeffs, xs, ys, width, height)
        idx = (src_y.clamp(0, height - 1) * width + src_x.clamp(0, width - 1)).view(b, 1, -1)
        out = flat.gather(2, idx.expand(b, c, -1)).view(b, c, height, width)
        return torch.where(inside.unsqueeze(1), out, fill_px)

    # Pillow's affine_transform: sample the pixel centre (x + 0.5, y + 0.5).
    xin = a0 * (xs + 0.5) + a1 * (ys + 0.5) + a2
    yin = a3 * (xs + 0.5) + a4 * (ys + 0.5) + a5
    inside = (xin >= 0) & (xin < width) & (yin >= 0) & (yin < height)
    xin, yin = xin - 0.5, yin - 0.5
    fx, fy = xin.floor(), yin.floor()
    dx, dy = (xin - fx).unsqueeze(1), (yin - fy).unsqueeze(1)
    fx, fy = fx.long(), fy.long()

    def taps(offsets_y, offsets_x):  # pixel values at the clamped neighbours, as taps[row][col]
        cols = [(fx + ox).clamp(0, width - 1) for ox in offsets_x]
        rows = [(fy + oy).clamp(0, height - 1) * width for oy in offsets_y]
        index = torch.stack([row + col for row in rows for col in cols], 1).view(b, 1, -1)
        gathered = flat.gather(2, index.expand(b, c, -1)).double()  # one gather, in uint8
        gathered = gathered.view(b, c, len(rows), len(cols), height, width)
        return [[gathered[:, :, r, k] for k in range(len(cols))] for r in range(len(rows))]

    if interpolation == "bilinear":
        t = taps((0, 1), (0, 1))
        v1 = t[0][0] + (t[0][1] - t[0][0]) * dx
        v2 = t[1][0] + (t[1][1] - t[1][0]) * dx
        v = v1 + (v2 - v1) * dy
    elif interpolation == "bicubic":
        t = taps((-1, 0, 1, 2), (-1, 0, 1, 2))
        v = _cubic(*(_cubic(*row, dx) for row in t), dy)
        v = v.clamp(0, 255)
    else:
        raise ValueError(f"affine resampling {interpolation!r}: expected nearest, bilinear or "
                         f"bicubic (what Pillow's transform takes)")
    out = v.trunc().to(torch.uint8)
    return torch.where(inside.unsqueeze(1), out, fill_px)


def _cubic(v1, v2, v3, v4, d):
    # Pillow's BICUBIC macro (Keys' cubic with a = -1), in its order of operations.
    p1 = v2
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return p1 + d * (p2 + d * (p3 + d * p4))


def _nearest_source(coeffs, xs, ys, width, height):
    """Pillow's nearest-neighbour affine: a pure scale/translation in float64, anything else in
    16.16 fixed point (ImagingScaleAffine / affine_fixed)."""
    b = coeffs.shape[0]
    a = [coeffs[:, k].view(b, 1, 1) for k in range(6)]
    scale_only = ((coeffs[:, 1] == 0) & (coeffs[:, 3] == 0)).view(b, 1, 1)
    sx = (a[2] + a[0] * 0.5 + xs * a[0]).expand(b, height, width)
    sy = (a[5] + a[4] * 0.5 + ys * a[4]).expand(b, height, width)
    float_x = torch.where(sx < 0, -1, sx.trunc()).long()
    float_y = torch.where(sy < 0, -1, sy.trunc()).long()

    def fix(v):
        return (v * 65536.0 + 0.5).floor().long()

    xi, yi = xs.long(), ys.long()
    fixed_x = torch.div(fix(a[2] + a[0] * 0.5 + a[1] * 0.5) + yi * fix(a[1]) + xi * fix(a[0]),
                        65536, rounding_mode="floor")
    fixed_y = torch.div(fix(a[5] + a[3] * 0.5 + a[4] * 0.5) + yi * fix(a[4]) + xi * fix(a[3]),
                        65536, rounding_mode="floor")
    src_x = torch.where(scale_only, float_x, fixed_x)
    src_y = torch.where(scale_only, float_y, fixed_y)
    inside = (src_x >= 0) & (src_x < width) & (src_y >= 0) & (src_y < height)
    return src_x, src_y, inside
