"""Image-folder datasets (``root/<class>/<images>``), the ImageNet layout check and a collate
function that drops unreadable images instead of crashing a long run."""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from train.batch_augment import DeferredBatch, DeferredSample
from train.transforms import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, TrainPipeline,
                              build_eval_transform, build_train_transform)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# What Pillow raises for truncated, garbled or absurdly large files.
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class DataError(ValueError):
    """The dataset on disk is missing or not laid out as expected."""


class CorruptImageWarning(UserWarning):
    """An image could not be decoded and was skipped."""


def _list_images(folder: str, extensions: tuple[str, ...]) -> list[str]:
    """Image files under ``folder`` (recursively, hidden entries skipped), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, name) for name in filenames
                     if not name.startswith(".") and name.lower().endswith(extensions))
    return sorted(found)


class ImageFolder(Dataset):
    """Images in ``root/<class>/...``, classes numbered in sorted folder-name order.

    ``dataset[i]`` or ``dataset[(i, sample_seed)]`` (what the training samplers yield) returns
    ``(transform(rgb_image, random.Random(sample_seed)), target)``; a plain ``i`` uses ``i`` as
    the seed. An image that cannot be decoded yields ``None`` (with one warning per file per
    process); :func:`collate_skip_corrupt` drops and counts those.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 extensions: Sequence[str] = IMG_EXTENSIONS):
        self.root = Path(root)
        self.transform = transform
        self.extensions = tuple(e.lower() for e in extensions)
        if not self.root.exists():
            raise DataError(f"dataset folder {self.root} does not exist; expected "
                            f"{self.root}/<class name>/<images>")
        if not self.root.is_dir():
            raise DataError(f"dataset path {self.root} is a file, not a folder of class folders")
        self.classes = sorted(entry.name for entry in os.scandir(self.root)
                              if entry.is_dir() and not entry.name.startswith("."))
        if not self.classes:
            raise DataError(f"{self.root} has no class folders; expected one sub-folder per "
                            f"class holding its images, e.g. {self.root}/<class name>/0001.jpg")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for name in self.classes:
            images = _list_images(str(self.root / name), self.extensions)
            if not images:
                raise DataError(f"class folder {self.root / name} has no images; every class "
                                f"folder needs at least one file ending in "
                                f"{', '.join(self.extensions)} (remove the folder if the class "
                                f"is not used)")
            self.samples.extend((path, self.class_to_idx[name]) for path in images)
        self.targets = [target for _, target in self.samples]
        self._warned: set[str] = set()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def load_rgb(self, index: int) -> Image.Image | None:
        """Decode sample ``index`` as RGB (grayscale, RGBA, palette, CMYK... converted); None if
        the file is unreadable."""
        return self._decode(index, _to_rgb)

    def _decode(self, index: int, decode: Callable[[Image.Image], object]):
        """``decode(opened image)`` for sample ``index``; None (one warning per file) if
        Pillow cannot read it."""
        path = self.samples[index][0]
        try:
            with Image.open(path) as img:
                return decode(img)
        except _UNREADABLE as err:
            if path not in self._warned:
                self._warned.add(path)
                warnings.warn(f"skipping unreadable image {path}: {err}", CorruptImageWarning,
                              stacklevel=3)
            return None

    def __getitem__(self, item):
        index, seed = item if isinstance(item, (tuple, list)) else (item, item)
        transform, rng = self.transform, random.Random(seed)
        if isinstance(transform, TrainPipeline):
            # Two phases: the pipeline sees the header before decoding (JPEG draft decoding);
            # only decoding errors count as an unreadable file.
            decoded = self._decode(index, lambda img: transform.load(img, rng))
            if decoded is None:
                return None
            return transform.apply(decoded, rng), self.samples[index][1]
        reference = getattr(transform, "fast", True) is False  # today's decode, for benchmarks
        img = self._decode(index, _to_rgb_copy if reference else _to_rgb)
        if img is None:
            return None
        if transform is not None:
            img = transform(img, rng)
        return img, self.samples[index][1]

    def __repr__(self) -> str:
        return (f"ImageFolder(root={str(self.root)!r}, classes={len(self.classes)}, "
                f"images={len(self.samples)}, transform={self.transform!r})")


def _to_rgb(img: Image.Image) -> Image.Image:
    img.load()  # decodes the whole file, still inside the caller's error handling
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_rgb_copy(img: Image.Image) -> Image.Image:
    return img.convert("RGB")  # the reference decode: convert() decodes and copies


def collate_skip_corrupt(batch) -> tuple[torch.Tensor | DeferredBatch, torch.Tensor, int]:
    """Stack ``(tensor, target)`` items, dropping ``None`` (unreadable) ones.

    Returns ``(images (B, C, H, W), targets (B,) int64, n_skipped)``; when every item was
    unreadable, images and targets are empty (B = 0) and the loop should skip the step. Items
    from a deferring pipeline (``DeferredSample``) become one ``DeferredBatch``, which the
    pipeline's ``device_stage`` finishes on the device. Tensor targets (segmentation masks) are
    stacked: (B, H, W)."""
    kept = [item for item in batch if item is not None]
    n_skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), n_skipped
    if isinstance(kept[0][1], torch.Tensor):
        targets = torch.stack([target for _, target in kept])
    else:
        targets = torch.tensor([target for _, target in kept], dtype=torch.long)
    if isinstance(kept[0][0], DeferredSample):
        return DeferredBatch.stack([image for image, _ in kept]), targets, n_skipped
    if not isinstance(kept[0][0], torch.Tensor):
        raise TypeError(f"collate_skip_corrupt needs tensors; the dataset returned "
                        f"{type(kept[0][0]).__name__} (give ImageFolder a transform)")
    return torch.stack([image for image, _ in kept]), targets, n_skipped


def _describe_difference(train: list[str], val: list[str]) -> str:
    def show(names: set[str]) -> str:
        listed = ", ".join(sorted(names)[:5])
        return listed + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")

    missing, extra = set(train) - set(val), set(val) - set(train)
    parts = []
    if missing:
        parts.append(f"missing from val: {show(missing)}")
    if extra:
        parts.append(f"only in val: {show(extra)}")
    return "; ".join(parts)


def build_datasets(data_path: str | os.PathLike, input_size,
                   aa: str | None = "rand-m9-mstd0.5-inc1", reprob: float = 0.25,
                   interpolation: str = "bicubic", crop_pct: float = 0.875,
                   mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                   std: Sequence[float] = IMAGENET_DEFAULT_STD, hflip: float = 0.5,
                   scale: tuple[float, float] = (0.08, 1.0),
                   defer: bool = False) -> tuple[ImageFolder, ImageFolder]:
    """Train and val datasets from the ImageNet layout ``data_path/{train,val}/<class>/<images>``
    with DeiT's train and eval transforms. Raises :class:`DataError` on a wrong layout or when
    val's classes differ from train's. ``defer=True``: the workers hand over uint8 images and
    each dataset's ``transform.device_stage`` finishes the batches on the device."""
    root = Path(data_path)
    layout = (f"expected the ImageNet layout {root}/train/<class>/<images> and "
              f"{root}/val/<class>/<images> (val images sorted into the same class folders)")
    if not root.is_dir():
        raise DataError(f"data path {root} does not exist or is not a folder; {layout}")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"data path {root} has no '{split}' folder; {layout}")
    train_ds = ImageFolder(root / "train", build_train_transform(
        input_size, aa=aa, reprob=reprob, interpolation=interpolation, mean=mean, std=std,
        hflip=hflip, scale=scale, defer=defer))
    val_ds = ImageFolder(root / "val", build_eval_transform(
        input_size, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std,
        defer=defer))
    if train_ds.classes != val_ds.classes:
        raise DataError(f"the class folders of {root}/val do not match {root}/train "
                        f"({len(val_ds.classes)} vs {len(train_ds.classes)} classes; "
                        f"{_describe_difference(train_ds.classes, val_ds.classes)}); "
                        f"both splits need the same class folder names")
    return train_ds, val_ds
