"""The built-in demo dataset: procedurally drawn shapes and textures, written once as JPEGs.

Each class is a shape or texture family (disc, ring, square, triangle, cross, star, horizontal
stripes, vertical stripes, checkerboard, dot grid, ...). Every image draws its object with a
random position, size, rotation and colours over a random two-colour gradient background with
clutter lines and pixel noise. Foreground and background colours come from the same
distribution for every class, so colour statistics say nothing about the class: it has to be
read from shape and texture.

The set is written once per parameter set into a cache folder (default
``${XDG_CACHE_HOME:-~/.cache}/stvit/demo-v2``) as ``root/{train,val}/<class>/*.jpg`` plus a
marker file. It is built in a temporary sibling folder and renamed into place, so concurrent
processes (several torchrun ranks) never see a half-written set: the first rename wins and the
others use its copy.

``python -m train.synthetic [root]`` builds it and prints the path.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from train.data import DataError

DEMO_VERSION = 2  # bump whenever the rendered images change: caches are keyed on it
MARKER = "stvit-demo.json"
SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges
JPEG_QUALITY = 90


# ---------------------------------------------------------------------------------------------
# Shape masks. Each returns an (R, R) float mask in [0, 1] for an object centred at (cx, cy)
# with radius r and rotation theta, given the pixel grid (x, y) of an R x R canvas.
# ---------------------------------------------------------------------------------------------


def _local(x, y, cx, cy, theta):
    """Coordinates in the object's rotated frame."""
    c, s = math.cos(theta), math.sin(theta)
    dx, dy = x - cx, y - cy
    return c * dx + s * dy, -s * dx + c * dy


def _polygon_mask(size, vertices) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon([(float(a), float(b)) for a, b in vertices], fill=255)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _regular_vertices(cx, cy, radii, theta):
    """Vertices at equal angular steps with the given radii (a star alternates two radii)."""
    n = len(radii)
    return [(cx + rad * math.cos(theta + 2 * math.pi * k / n),
             cy + rad * math.sin(theta + 2 * math.pi * k / n)) for k, rad in enumerate(radii)]


def _disc(x, y, cx, cy, r, theta, rng):
    return ((x - cx) ** 2 + (y - cy) ** 2 < r * r).astype(np.float32)


def _ring(x, y, cx, cy, r, theta, rng):
    d2 = (x - cx) ** 2 + (y - cy) ** 2
    return ((d2 < r * r) & (d2 > (0.55 * r) ** 2)).astype(np.float32)


def _square(x, y, cx, cy, r, theta, rng):
    u, v = _local(x, y, cx, cy, theta)
    return (np.maximum(abs(u), abs(v)) < 0.8 * r).astype(np.float32)


def _square_outline(x, y, cx, cy, r, theta, rng):
    u, v = _local(x, y, cx, cy, theta)
    m = np.maximum(abs(u), abs(v))
    return ((m < 0.85 * r) & (m > 0.55 * r)).astype(np.float32)


def _triangle(x, y, cx, cy, r, theta, rng):
    return _polygon_mask(x.shape[0], _regular_vertices(cx, cy, [r] * 3, theta))


def _star(x, y, cx, cy, r, theta, rng):
    return _polygon_mask(x.shape[0], _regular_vertices(cx, cy, [r, 0.42 * r] * 5, theta))


def _cross(x, y, cx, cy, r, theta, rng):
    u, v = _local(x, y, cx, cy, theta)
    arm = 0.28 * r
    return (((abs(u) < arm) & (abs(v) < r)) | ((abs(v) < arm) & (abs(u) < r))).astype(np.float32)


def _crescent(x, y, cx, cy, r, theta, rng):
    u, v = _local(x, y, cx, cy, theta)
    outer = u * u + v * v < r * r
    bite = (u - 0.45 * r) ** 2 + v * v < (0.8 * r) ** 2
    return (outer & ~bite).astype(np.float32)


# Textures: a square patch whose inside alternates between the object colour (pattern = 1)
# and a second colour (pattern = 0). They return (patch mask, pattern).


def _patch(x, y, cx, cy, r, theta):
    u, v = _local(x, y, cx, cy, theta)
    return u, v, (np.maximum(abs(u), abs(v)) < 0.85 * r).astype(np.float32)


def _stripes(along_x: bool):
    def texture(x, y, cx, cy, r, theta, rng):
        # Near-horizontal or near-vertical bands: the orientation *is* the class.
        theta = float(rng.uniform(-math.pi / 12, math.pi / 12))
        u, v, patch = _patch(x, y, cx, cy, r, theta)
        period = r * float(rng.uniform(0.35, 0.5))
        coord = v if along_x else u
        return patch, (np.floor(coord / period) % 2).astype(np.float32)

    return texture


def _checkerboard(x, y, cx, cy, r, theta, rng):
    u, v, patch = _patch(x, y, cx, cy, r, theta)
    period = r * float(rng.uniform(0.35, 0.5))
    return patch, ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)


def _dot_grid(x, y, cx, cy, r, theta, rng):
    u, v, patch = _patch(x, y, cx, cy, r, theta)
    period = r * float(rng.uniform(0.4, 0.55))
    du, dv = (u % period) - period / 2, (v % period) - period / 2
    return patch, (du * du + dv * dv < (0.3 * period) ** 2).astype(np.float32)


SHAPES = {
    "disc": _disc, "ring": _ring, "square": _square, "triangle": _triangle, "cross": _cross,
    "star": _star,
}
TEXTURES = {
    "stripes_horizontal": _stripes(along_x=True), "stripes_vertical": _stripes(along_x=False),
    "checkerboard": _checkerboard, "dot_grid": _dot_grid,
}
EXTRA_SHAPES = {"crescent": _crescent, "square_outline": _square_outline}
FAMILIES = [*SHAPES, *TEXTURES, *EXTRA_SHAPES]
"""Class families in class order; ``num_classes`` takes the first ones."""


def class_names(num_classes: int) -> list[str]:
    if not 2 <= num_classes <= len(FAMILIES):
        raise ValueError(f"the demo dataset has 2..{len(FAMILIES)} classes, got {num_classes}")
    # The numeric prefix keeps the class order (sorted folder names) equal to FAMILIES order.
    return [f"{k:02d}_{name}" for k, name in enumerate(FAMILIES[:num_classes])]


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3).astype(np.float32)


def _contrasting_color(rng: np.random.Generator, other: np.ndarray) -> np.ndarray:
    """A random colour clearly distinct from ``other`` (so the object is visible)."""
    for _ in range(100):
        color = _random_color(rng)
        if np.linalg.norm(color - other) > 120:
            return color
    return 255.0 - other


@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) of a size x size canvas, float32."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    return (np.broadcast_to(coords[None, :], (size, size)),
            np.broadcast_to(coords[:, None], (size, size)))


def _downsample(mask: np.ndarray) -> np.ndarray:
    """Box-average SUPERSAMPLE x SUPERSAMPLE blocks: a coverage fraction per output pixel."""
    k = SUPERSAMPLE
    return sum(mask[i::k, j::k] for i in range(k) for j in range(k)) * np.float32(1 / k**2)


def _blend(img: np.ndarray, color: np.ndarray, coverage: np.ndarray) -> None:
    """In place: ``img = img * (1 - coverage) + color * coverage``."""
    img += (color - img) * coverage[..., None]


def render_image(family: str, image_size: int, rng: np.random.Generator) -> Image.Image:
    """One ``image_size`` x ``image_size`` RGB image of class ``family``.

    Shapes are drawn at SUPERSAMPLE x resolution as masks and averaged down to coverage
    fractions (anti-aliased edges); colours are composited at the output resolution."""
    size = image_size * SUPERSAMPLE
    x, y = _pixel_grid(size)

    # Background: a linear gradient between two random colours at a random angle.
    bg_a, bg_b = _random_color(rng), _random_color(rng)
    angle = float(rng.uniform(0, 2 * math.pi))
    small_x, small_y = _pixel_grid(image_size)
    ramp = small_x * np.float32(math.cos(angle)) + small_y * np.float32(math.sin(angle))
    ramp -= ramp.min()
    ramp /= max(float(ramp.max()), 1e-6)
    img = bg_a + (bg_b - bg_a) * ramp[..., None]
    bg_mean = (bg_a + bg_b) / 2

    # Clutter: a few thin random lines, drawn before the object so they pass behind it.
    clutter = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(clutter)
    for _ in range(int(rng.integers(0, 3))):
        ends = rng.uniform(0, size, size=4)
        draw.line([float(e) for e in ends], fill=255, width=max(1, SUPERSAMPLE))
    lines = np.asarray(clutter.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0
    _blend(img, _random_color(rng), lines)

    # The object: random centre, radius and rotation.
    # (Python floats, not numpy float64 scalars, keep the float32 arrays float32.)
    r = float(rng.uniform(0.25, 0.38)) * size
    cx, cy = (float(c) for c in rng.uniform(r * 0.9, size - r * 0.9, size=2))
    theta = float(rng.uniform(0, 2 * math.pi))
    fg = _contrasting_color(rng, bg_mean)
    if family in TEXTURES:
        patch, pattern = TEXTURES[family](x, y, cx, cy, r, theta, rng)
        second = _contrasting_color(rng, fg)
        _blend(img, second, _downsample(patch))
        _blend(img, fg, _downsample(patch * pattern))  # the pattern part of the patch
    else:
        shape = {**SHAPES, **EXTRA_SHAPES}[family]
        _blend(img, fg, _downsample(shape(x, y, cx, cy, r, theta, rng)))

    # Sensor-like noise.
    img += rng.normal(0.0, rng.uniform(3, 8), size=img.shape).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------
# Writing the dataset once, atomically
# ---------------------------------------------------------------------------------------------


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def _params(num_classes, train_per_class, val_per_class, image_size, seed) -> dict:
    return {"version": DEMO_VERSION, "num_classes": num_classes,
            "train_per_class": train_per_class, "val_per_class": val_per_class,
            "image_size": image_size, "seed": seed}


_DEFAULTS = _params(10, 300, 50, 64, 0)


def default_demo_root(params: dict | None = None) -> Path:
    """``<cache>/stvit/demo-v<DEMO_VERSION>`` for the default parameters, a suffixed sibling
    otherwise."""
    params = params or _DEFAULTS
    name = f"demo-v{DEMO_VERSION}"
    if params != _DEFAULTS:
        name += (f"-c{params['num_classes']}-n{params['train_per_class']}"
                 f"-{params['val_per_class']}-s{params['image_size']}-seed{params['seed']}")
    return _cache_home() / "stvit" / name


def read_marker(root: Path) -> dict | None:
    """The parameters recorded in a complete demo dataset at ``root``, else None."""
    try:
        return json.loads((Path(root) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _write_split(folder: Path, names: list[str], per_class: int, image_size: int,
                 seed: int, split_id: int) -> None:
    for class_id, name in enumerate(names):
        family = name.split("_", 1)[1]
        class_dir = folder / name
        class_dir.mkdir(parents=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, split_id, class_id, i])
            render_image(family, image_size, rng).save(class_dir / f"{i:04d}.jpg",
                                                       quality=JPEG_QUALITY)


def _remove_stale_builds(parent: Path, name: str, max_age_s: float = 3600.0) -> None:
    """Delete temp folders left by builds that crashed more than ``max_age_s`` ago."""
    for stale in parent.glob(f".{name}.building-*"):
        try:
            if time.time() - stale.stat().st_mtime > max_age_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def ensure_demo_dataset(root: str | os.PathLike | None = None, num_classes: int = 10,
                        train_per_class: int = 300, val_per_class: int = 50,
                        image_size: int = 64, seed: int = 0) -> Path:
    """Return the folder of the demo dataset, generating it first if needed.

    The result is an ImageNet-style layout usable as ``--data-path``:
    ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``. Generation is seeded (the same
    files every time) and happens once: a complete folder (marker file present, same
    parameters) is reused as is.
    """
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError(f"the demo dataset needs >= 1 image per class and split, got "
                         f"train_per_class={train_per_class}, val_per_class={val_per_class}")
    if image_size < 8:
        raise ValueError(f"demo image_size must be >= 8 pixels, got {image_size}")
    names = class_names(num_classes)
    params = _params(num_classes, train_per_class, val_per_class, image_size, seed)
    root = Path(root) if root is not None else default_demo_root(params)

    def check_existing() -> bool:
        found = read_marker(root)
        if found == params:
            return True
        if found is not None:
            raise DataError(f"{root} holds a demo dataset built with other settings {found}; "
                            f"pass another folder or delete it to build {params}")
        if root.exists() and any(root.iterdir()):
            raise DataError(f"{root} exists but is not a complete demo dataset (no {MARKER}); "
                            f"delete it or choose another folder")
        return False

    if check_existing():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(root.parent, root.name)
    build = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        os.chmod(build, 0o755)
        _write_split(build / "train", names, train_per_class, image_size, seed, 0)
        _write_split(build / "val", names, val_per_class, image_size, seed, 1)
        (build / MARKER).write_text(json.dumps(params, indent=1) + "\n")
        try:
            os.rename(build, root)  # atomic; replaces an empty folder, fails on a full one
        except OSError:
            if not check_existing():  # another process won the race: use its copy
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return root


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else None
    start = time.perf_counter()
    path = ensure_demo_dataset(root)
    print(f"demo dataset ready at {path} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
