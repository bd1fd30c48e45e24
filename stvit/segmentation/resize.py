"""The evaluation resize of MMSegmentation's pipeline, shared by ``train`` and ``python -m stvit.segment``:
the image rescaled to fit a (long, short) scale keeping its ratio (mmcv's ``imrescale``), bilinear
without antialiasing as cv2 resizes, then normalised."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's ``rescale_size`` for ``keep_ratio``: as large as fits ``scale`` = (long, short) edges."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear, half-pixel centres, no antialiasing (cv2's INTER_LINEAR), uint8 in and out."""
    if image.shape[:2] == tuple(size):
        return image
    x = torch.tensor(image).permute(2, 0, 1)[None].float()  # a copy: decoded arrays may be read-only
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def to_normalized_tensor(image: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
