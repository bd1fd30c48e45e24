"""Class names and colours for segmentation masks."""

from __future__ import annotations

import colorsys
from importlib import resources

ADE20K_NUM_CLASSES = 150


def ade20k_class_names() -> list[str]:
    """The 150 ADE20K (SceneParsing) classes in label order after ``reduce_zero_label`` (label 0,
    "other", is ignored): MMSegmentation's ``ADE20KDataset`` names, bundled as ``ade20k_classes.txt``."""
    text = resources.files("stvit.segmentation").joinpath("ade20k_classes.txt").read_text(encoding="utf-8")
    names = text.splitlines()
    if len(names) != ADE20K_NUM_CLASSES:
        raise RuntimeError(f"the bundled ade20k_classes.txt has {len(names)} lines, expected 150")
    return names


def palette(num_classes: int) -> list[tuple[int, int, int]]:
    """One distinct RGB colour per class: hues spread by the golden ratio, alternating brightness
    and saturation, so that neighbouring class indices differ visibly."""
    colours = []
    for c in range(num_classes):
        hue = (c * 0.618033988749895) % 1.0
        sat = (0.55, 0.85, 0.7)[c % 3]
        val = (0.95, 0.7, 0.85)[(c // 3) % 3]
        colours.append(tuple(int(round(255 * v)) for v in colorsys.hsv_to_rgb(hue, sat, val)))
    return colours
