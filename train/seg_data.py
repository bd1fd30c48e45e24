"""Semantic-segmentation data: the ADE20K layout, MMSegmentation's ADE20K pipeline, and a generated
demo set.

**Layout** (ADEChallengeData2016 as downloaded)::

    ROOT/images/training/*.jpg        ROOT/annotations/training/*.png    (20,210 pairs)
    ROOT/images/validation/*.jpg      ROOT/annotations/validation/*.png  (2,000 pairs)

Annotations are single-channel PNGs of class indices; ADE20K's label 0 ("other") is ignored and
the rest shift down by one (``reduce_zero_label``: 0 → 255, k → k − 1), giving 150 classes. A
``ROOT/stvit-segmentation.json`` (``{"classes": [...], "reduce_zero_label": true}``) describes
another dataset in the same layout; the demo set writes one.

**Training pipeline** (MMSegmentation's ``configs/_base_/datasets/ade20k.py``, mmcv 2.1 transforms),
every draw from the sample's own ``random.Random`` (the samplers' per-sample seed):

1. ``RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True)``: a ratio r drawn
   uniformly, then the image rescaled by min(2048r / long side, 512r / short side), each side
   ``int(side · s + 0.5)``; bilinear for the image (half-pixel centres, no antialiasing, as cv2),
   nearest for the label;
2. ``RandomCrop(512, cat_max_ratio=0.75)``: a random window (the whole side where the image is
   smaller), redrawn up to 10 times while one class covers 75 % or more of its labelled pixels
   or fewer than two classes are present;
3. ``RandomFlip(0.5)``, horizontal;
4. ``PhotoMetricDistortion``: brightness ±32, then contrast ×[0.5, 1.5] either first or last,
   saturation ×[0.5, 1.5] and hue ±18 (of 180) in 8-bit HSV, each with probability ½, with
   uint8 clipping after every step (cv2's HSV arithmetic, written in NumPy);
5. normalise with the ImageNet mean and std, pad to 512² on the right and bottom (image 0,
   label 255).

**Evaluation**: ``Resize(scale=(2048, 512), keep_ratio=True)`` for the image, the label at its
original size; the prediction is resized back to it (``train.engine.evaluate_segmentation``).

Bad data gets a :class:`SegmentationDataError` naming the file and the fix: a folder that is not
this layout, images without annotations (or the reverse), an annotation that is not a
single-channel class-index image, of another size than its image, or with labels beyond the
classes. An image that cannot be decoded is skipped and counted, as in classification.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from stvit.segmentation import IGNORE_INDEX, ade20k_class_names
from stvit.segmentation.resize import rescale_size, resize_image, to_normalized_tensor
from train.data import DataError

SPLITS = {"train": "training", "val": "validation"}
META_FILE = "stvit-segmentation.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SCALE = (2048, 512)  # RandomResize's and the eval Resize's scale (long, short)
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class SegmentationDataError(DataError):
    """A dataset problem found while reading one sample; the message names the file and the fix.

    Raised in a data-loader worker, torch re-raises it in the main process as
    ``SegmentationDataError("Caught SegmentationDataError in DataLoader worker ... Original
    Traceback ...")``; the message is cut back to the original one here, so the run ends with
    the one line that says what to fix."""

    def __init__(self, message: str):
        if "Original Traceback" in message:
            found = re.findall(rf"{type(self).__name__}: (.*)", message)
            message = found[-1].strip() if found else message
        super().__init__(message)


# ---- the dataset --------------------------------------------------------------------------------------

def _layout_help(root: Path) -> str:
    return (f"expected the ADE20K layout {root}/images/training/*.jpg with {root}/annotations/training/*.png "
            f"(and validation/ beside training/), as in ADEChallengeData2016.zip")


def read_metadata(root: str | os.PathLike) -> dict:
    """Class names and ``reduce_zero_label`` of the dataset at ``root``: its ``stvit-segmentation.json``,
    else ADE20K's."""
    path = Path(root) / META_FILE
    if not path.is_file():
        return {"classes": ade20k_class_names(), "reduce_zero_label": True}
    try:
        meta = json.loads(path.read_text())
        classes = [str(c) for c in meta["classes"]]
        reduce_zero_label = bool(meta.get("reduce_zero_label", False))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not readable as {{\"classes\": [...], \"reduce_zero_label\": bool}} ({e}); "
                        f"fix or delete it (without it the dataset is taken for ADE20K)") from None
    if len(classes) < 2 or len(classes) >= IGNORE_INDEX:
        raise DataError(f"{path} lists {len(classes)} classes; a segmentation dataset needs 2 to {IGNORE_INDEX - 1}")
    return {"classes": classes, "reduce_zero_label": reduce_zero_label}


def find_pairs(root: str | os.PathLike, split: str) -> list[tuple[str, str]]:
    """(image, annotation) paths of ``split`` ("train" or "val"), paired by file name, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data path {root} does not exist or is not a folder; {_layout_help(root)}")
    folder = SPLITS[split]
    images_dir, labels_dir = root / "images" / folder, root / "annotations" / folder
    for path in (images_dir, labels_dir):
        if not path.is_dir():
            nested = [p for p in root.iterdir() if p.is_dir() and (p / "images" / folder).is_dir()]
            hint = f"; did you mean --data-path {nested[0]}?" if nested else ""
            if (root / "train").is_dir() and not nested:
                hint = "; this looks like an ImageNet-style folder (train/<class>/), which is for --task classify"
            raise DataError(f"{root} is not an ADE20K-layout folder: {path} is missing; {_layout_help(root)}{hint}")
    images = {p.stem: p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")}
    labels = {p.stem: p for p in labels_dir.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith(".")}
    if not images:
        raise DataError(f"{images_dir} holds no images (.jpg, .jpeg, .png); {_layout_help(root)}")
    unlabelled, orphans = sorted(set(images) - set(labels)), sorted(set(labels) - set(images))
    if unlabelled or orphans:
        def listing(names, folder, ext):
            shown = ", ".join(f"{folder}/{n}{ext}" for n in names[:3])
            return shown + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
        parts = []
        if unlabelled:
            parts.append(f"{len(unlabelled)} image(s) without an annotation: {listing(unlabelled, images_dir, '.*')}")
        if orphans:
            parts.append(f"{len(orphans)} annotation(s) without an image: {listing(orphans, labels_dir, '.png')}")
        raise DataError(f"{root}: every image needs an annotation PNG of the same name and vice versa; "
                        f"{'; '.join(parts)}. Add the missing files or remove the unpaired ones")
    return [(str(images[s]), str(labels[s])) for s in sorted(images)]


class SegmentationDataset(torch.utils.data.Dataset):
    """Image / annotation pairs of one split; ``dataset[(i, seed)]`` gives ``transform(image, label,
    random.Random(seed))`` (a plain ``i`` seeds with ``i``), or None for an undecodable image."""

    def __init__(self, root: str | os.PathLike, split: str, transform):
        self.root, self.split, self.transform = Path(root), split, transform
        meta = read_metadata(root)
        self.classes, self.reduce_zero_label = meta["classes"], meta["reduce_zero_label"]
        self.samples = find_pairs(root, split)
        self._warned: set[str] = set()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(H, W, 3) uint8 RGB image and (H, W) uint8 label (reduce_zero_label applied), checked."""
        image_path, label_path = self.samples[index]
        try:
            with Image.open(image_path) as img:
                image = np.array(img.convert("RGB"))
        except _UNREADABLE as e:
            if image_path not in self._warned:
                self._warned.add(image_path)
                import warnings

                from train.data import CorruptImageWarning
                warnings.warn(f"skipping unreadable image {image_path}: {e}", CorruptImageWarning, stacklevel=2)
            return None
        try:
            with Image.open(label_path) as lab:
                mode = lab.mode
                if mode not in ("L", "P", "I", "I;16"):
                    raise SegmentationDataError(
                        f"{label_path} is a {mode} image; an annotation must be a single-channel PNG of class indices "
                        f"(a colour-coded mask must be converted to indices first)")
                label = np.array(lab)
        except _UNREADABLE as e:
            raise SegmentationDataError(f"cannot read annotation {label_path} ({e}); replace the file") from None
        if label.shape != image.shape[:2]:
            raise SegmentationDataError(
                f"{label_path} is {label.shape[1]}x{label.shape[0]} but its image {image_path} is "
                f"{image.shape[1]}x{image.shape[0]}; an annotation must have its image's size (re-export it, or "
                f"resize it with nearest-neighbour interpolation)")
        return image, self.encode_label(label, label_path)

    def encode_label(self, label: np.ndarray, path: str) -> np.ndarray:
        """``reduce_zero_label`` if set; every other value must be a class index or 255 (ignored)."""
        label = label.astype(np.int64)
        if self.reduce_zero_label:
            label = np.where(label == 0, IGNORE_INDEX + 1, label) - 1  # 0 -> 255, k -> k - 1
        bad = (label != IGNORE_INDEX) & ((label < 0) | (label >= self.num_classes))
        if bad.any():
            worst = int(label[bad].max() + (1 if self.reduce_zero_label else 0))
            shift = " (0 is 'other', ignored; 1..N are the classes)" if self.reduce_zero_label else ""
            raise SegmentationDataError(
                f"{path} has label {worst} but the dataset has {self.num_classes} classes{shift}; labels must be "
                f"class indices or 255 (ignored). Check that it is this dataset's annotation, or list the classes in "
                f"{self.root / META_FILE}")
        return label.astype(np.uint8)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, (tuple, list)) else (item, item)
        loaded = self.load(index)
        if loaded is None:
            return None
        return self.transform(*loaded, random.Random(seed))


# ---- the pipeline ---------------------------------------------------------------------------------------

def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest neighbour, source index floor(dst · in / out) (cv2's INTER_NEAREST)."""
    if label.shape == tuple(size):
        return label
    rows = (np.arange(size[0]) * label.shape[0] // size[0]).clip(0, label.shape[0] - 1)
    cols = (np.arange(size[1]) * label.shape[1] // size[1]).clip(0, label.shape[1] - 1)
    return label[rows[:, None], cols[None, :]]


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """8-bit HSV as cv2's: H in [0, 180) (degrees / 2), S and V in [0, 255], rounded."""
    rgb = image.astype(np.float32)
    v = rgb.max(axis=2)
    delta = v - rgb.min(axis=2)
    s = np.where(v > 0, 255.0 * delta / np.maximum(v, 1e-6), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(delta, 1e-6)
    h = np.where(v == r, 60.0 * (g - b) / safe,
                 np.where(v == g, 120.0 + 60.0 * (b - r) / safe, 240.0 + 60.0 * (r - g) / safe))
    h = np.where(delta > 0, np.where(h < 0, h + 360.0, h), 0.0)
    hsv = np.stack([np.round(h / 2.0) % 180, np.round(s), v], axis=2)
    return hsv.astype(np.uint8)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """The inverse of :func:`rgb_to_hsv` (8-bit), rounded to uint8."""
    h = hsv[..., 0].astype(np.float32) * 2.0 / 60.0
    s = hsv[..., 1].astype(np.float32) / 255.0
    v = hsv[..., 2].astype(np.float32)
    sector = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(hsv.shape, dtype=np.float32)
    for k, (r, g, b) in enumerate(choices):
        mask = sector == k
        out[mask] = np.stack([r, g, b], axis=-1)[mask]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: random.Random, brightness_delta: int = 32,
                           contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """MMSegmentation's ``PhotoMetricDistortion`` (see the module docstring)."""
    def contrast(img):
        return _convert(img, alpha=rng.uniform(*contrast_range)) if rng.randrange(2) else img

    if rng.randrange(2):
        image = _convert(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = rng.randrange(2) == 1
    if contrast_first:
        image = contrast(image)
    if rng.randrange(2):
        hsv = rgb_to_hsv(image)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        image = hsv_to_rgb(hsv)
    if rng.randrange(2):
        hsv = rgb_to_hsv(image)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.randrange(-hue_delta, hue_delta)) % 180
        image = hsv_to_rgb(hsv)
    if not contrast_first:
        image = contrast(image)
    return image


def crop_box(label: np.ndarray, crop: int, rng: random.Random, cat_max_ratio: float) -> tuple[int, int, int, int]:
    """MMSegmentation's ``RandomCrop.crop_bbox`` with ``cat_max_ratio``: (y1, y2, x1, x2)."""
    def draw():
        y = rng.randint(0, max(label.shape[0] - crop, 0))
        x = rng.randint(0, max(label.shape[1] - crop, 0))
        return y, y + crop, x, x + crop

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            y1, y2, x1, x2 = box
            counts = np.bincount(label[y1:y2, x1:x2].ravel(), minlength=256)
            counts[IGNORE_INDEX] = 0
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = draw()
    return box


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The pipelines' ``device_stage``: the batch is finished in the workers; it only moves."""
    return images.to(device, non_blocking=True)


class SegTrainTransform:
    """The training pipeline of the module docstring: ``(image, label, rng) -> (image (3, crop,
    crop) normalised, label (crop, crop) int64, 255 where padded or ignored)``."""

    defer = False  # everything runs in the data-loader workers

    def __init__(self, crop_size: int = 512, scale: tuple[int, int] = SCALE, ratio_range=(0.5, 2.0),
                 cat_max_ratio: float = 0.75, flip: float = 0.5, photometric: bool = True,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        self.crop_size, self.scale, self.ratio_range = int(crop_size), tuple(scale), tuple(ratio_range)
        self.cat_max_ratio, self.flip, self.photometric = cat_max_ratio, flip, photometric
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: random.Random):
        ratio = rng.uniform(*self.ratio_range)
        scale = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        size = rescale_size(*image.shape[:2], scale)
        image, label = resize_image(image, size), resize_label(label, size)
        y1, y2, x1, x2 = crop_box(label, self.crop_size, rng, self.cat_max_ratio)
        image, label = image[y1:y2, x1:x2], label[y1:y2, x1:x2]
        if rng.random() < self.flip:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = photometric_distortion(image, rng)
        x = to_normalized_tensor(image, self.mean, self.std)
        y = torch.from_numpy(np.ascontiguousarray(label)).long()
        pad_h, pad_w = self.crop_size - x.shape[1], self.crop_size - x.shape[2]
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)
            y = F.pad(y, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        return x, y

    device_stage = staticmethod(to_device)


class SegEvalTransform:
    """``(image, label, rng) -> (image resized to fit (2048, 512) and normalised, label at its
    original size, int64)``."""

    defer = False

    def __init__(self, scale: tuple[int, int] = SCALE, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        self.scale, self.mean, self.std = tuple(scale), tuple(mean), tuple(std)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: random.Random | None = None):
        image = resize_image(image, rescale_size(*image.shape[:2], self.scale))
        return to_normalized_tensor(image, self.mean, self.std), torch.from_numpy(label.astype(np.int64))

    device_stage = staticmethod(to_device)


def build_segmentation_datasets(data_path: str | os.PathLike, crop_size: int, scale: tuple[int, int] = SCALE,
                                mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                                ) -> tuple[SegmentationDataset, SegmentationDataset]:
    """The training and validation splits with MMSegmentation's ADE20K pipelines."""
    train = SegmentationDataset(data_path, "train", SegTrainTransform(crop_size, scale, mean=mean, std=std))
    val = SegmentationDataset(data_path, "val", SegEvalTransform(scale, mean=mean, std=std))
    return train, val


# ---- the generated demo set -------------------------------------------------------------------------------

DEMO_VERSION = 2
DEMO_SHAPES = ("disc", "ring", "square", "triangle", "cross", "star", "stripes_horizontal", "stripes_vertical",
               "checkerboard", "dot_grid")


def render_scene(image_size: int, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """One demo scene: the classification demo's background (gradient, clutter lines), one or two
    of its shapes and textures at random places, sizes, rotations and colours, and noise. The
    annotation (ADE20K's convention) is 1 for background, 2 + k for shape k, and 0 ("other",
    ignored) on each object's anti-aliased rim, where coverage is between ¼ and ¾."""
    from train import synthetic as syn

    size = image_size * syn.SUPERSAMPLE
    x, y = syn._pixel_grid(size)
    bg_a, bg_b = syn._random_color(rng), syn._random_color(rng)
    angle = float(rng.uniform(0, 2 * math.pi))
    small_x, small_y = syn._pixel_grid(image_size)
    ramp = small_x * np.float32(math.cos(angle)) + small_y * np.float32(math.sin(angle))
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    img = bg_a + (bg_b - bg_a) * ramp[..., None]
    bg_mean = (bg_a + bg_b) / 2
    clutter = Image.new("L", (size, size), 0)
    from PIL import ImageDraw
    draw = ImageDraw.Draw(clutter)
    for _ in range(int(rng.integers(0, 3))):
        draw.line([float(e) for e in rng.uniform(0, size, size=4)], fill=255, width=max(1, syn.SUPERSAMPLE))
    syn._blend(img, syn._random_color(rng), np.asarray(clutter.reduce(syn.SUPERSAMPLE), dtype=np.float32) / 255.0)

    label = np.ones((image_size, image_size), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 3))):
        k = int(rng.integers(len(DEMO_SHAPES)))
        family = DEMO_SHAPES[k]
        r = float(rng.uniform(0.2, 0.35)) * size
        cx, cy = (float(c) for c in rng.uniform(r * 0.8, size - r * 0.8, size=2))
        theta = float(rng.uniform(0, 2 * math.pi))
        fg = syn._contrasting_color(rng, bg_mean)
        if family in syn.TEXTURES:
            patch, pattern = syn.TEXTURES[family](x, y, cx, cy, r, theta, rng)
            coverage = syn._downsample(patch)
            syn._blend(img, syn._contrasting_color(rng, fg), coverage)
            syn._blend(img, fg, syn._downsample(patch * pattern))
        else:
            coverage = syn._downsample(syn.SHAPES[family](x, y, cx, cy, r, theta, rng))
            syn._blend(img, fg, coverage)
        label[coverage >= 0.75] = 2 + k
        label[(coverage > 0.25) & (coverage < 0.75)] = 0
    img += rng.normal(0.0, rng.uniform(3, 8), size=img.shape).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8), "RGB"), label


def ensure_demo_segmentation(root: str | os.PathLike | None = None, train_images: int = 2000, val_images: int = 200,
                             image_size: int = 64, seed: int = 0) -> Path:
    """The generated demo set in the ADE20K layout (JPEG images, PNG annotations, a
    ``stvit-segmentation.json`` naming background and the ten shapes), built once in a cache
    folder (``${XDG_CACHE_HOME:-~/.cache}/stvit``) and renamed into place atomically."""
    params = {"version": DEMO_VERSION, "train_images": train_images, "val_images": val_images,
              "image_size": image_size, "seed": seed}
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stvit"
    root = Path(root) if root is not None else cache / (
        f"demo-seg-v{DEMO_VERSION}-n{train_images}-{val_images}-s{image_size}-seed{seed}")
    marker = root / "stvit-demo.json"
    try:
        if json.loads(marker.read_text()) == params:
            return root
    except (OSError, ValueError):
        pass
    if root.exists() and any(root.iterdir()):
        raise DataError(f"{root} exists but is not a complete demo segmentation set; delete it or choose another folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        os.chmod(build, 0o755)
        for split_id, (split, count) in enumerate((("training", train_images), ("validation", val_images))):
            (build / "images" / split).mkdir(parents=True)
            (build / "annotations" / split).mkdir(parents=True)
            for i in range(count):
                image, label = render_scene(image_size, np.random.default_rng([seed, split_id, i]))
                image.save(build / "images" / split / f"{i:05d}.jpg", quality=90)
                Image.fromarray(label, "L").save(build / "annotations" / split / f"{i:05d}.png")
        (build / META_FILE).write_text(json.dumps({"classes": ["background", *DEMO_SHAPES],
                                                   "reduce_zero_label": True}, indent=1) + "\n")
        (build / "stvit-demo.json").write_text(json.dumps(params, indent=1) + "\n")
        try:
            os.rename(build, root)
        except OSError:
            if not marker.is_file():  # another process won the race: use its copy
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return root


if __name__ == "__main__":
    start = time.perf_counter()
    print(f"demo segmentation set ready at {ensure_demo_segmentation()} ({time.perf_counter() - start:.1f} s)")
