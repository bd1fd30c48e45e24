"""``bench data``: the input pipeline's images per second, per CPU core and with N DataLoader workers.

Pipelines (``--pipelines``), each through the real ``train.data.ImageFolder`` (JPEG decode included):

===========  ==================================================================================
paper        RandomResizedCrop 224 bicubic, flip, RandAugment rand-m9-mstd0.5-inc1, normalise,
             Random Erasing 0.25 (pixel) — the ImageNet recipe, on ImageNet-like JPEGs, all in
             the worker (what ``python -m train`` does on a CPU)
paper-defer  the same recipe split as ``python -m train`` runs it on a GPU: the worker decodes,
             crops and resizes and draws the rest; flip, RandAugment, normalisation and erasing
             run batched in the device stage, timed separately on ``--device``
demo         the demo preset: crop 32 (scale 0.5–1), flip, normalise — on the built-in demo set
eval         resize to cover 256, centre crop 224, normalise — on the ImageNet-like JPEGs
===========  ==================================================================================

``decode`` (``ImageFolder.load_rgb``: open, decode, RGB) is timed beside them on the same files.
With ``--baseline`` each pipeline also runs as today's step-by-step reference
(``build_*_transform(..., fast=False)``), interleaved with the fused one in the same process.

*Per core*: one process, ``torch.set_num_threads(1)``, samples ``dataset[(i, seed)]`` timed by
process CPU time (``time.process_time``, robust to other jobs on the machine) and by wall clock,
in ``--rounds`` interleaved rounds (every variant once per round); the median is reported.
*N workers*: ``torch.utils.data.DataLoader`` (``collate_skip_corrupt``, batch ``--batch-size``),
wall-clock img/s after the first batch, and the workers' CPU seconds per image (their rusage
once they have exited), i.e. img/s per busy core.

*Training feed* (``--train MODEL``): training steps of MODEL fed by the ``paper-defer`` loader
(the largest ``--workers``, pinned memory, the device stage on ``--device``, as ``python -m train``
feeds them) against the same steps on one synthetic batch already on the device, in one run.
The step is ``bench throughput``'s: ``train-bf16`` on CUDA (one-process FSDP2, compiled blocks,
as ``train`` runs on one GPU), the fp32 ``train`` step on a CPU. If the fed rate is well under
the synthetic one, the loader does not keep up.

Without ``--data-path`` a set of ImageNet-like JPEGs is generated once and cached
(``--cache-dir``): photo-like 1/f colour textures, ``--image-size`` (default 500×375, alternating
landscape and portrait), JPEG quality 90 (about 90 KB each at 500×375).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from .common import BenchError, device_label, format_table, machine_info, pick_device, synchronize, write_json

PIPELINES = ("paper", "paper-defer", "demo", "eval")
# The earlier implementation each is compared with (paper-defer replaces the same pipeline as paper).
TODAY = {"paper": "paper", "paper-defer": "paper", "demo": "demo", "eval": "eval"}
GENERATOR_VERSION = 1
JPEG_QUALITY = 90


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-path", default=None,
                   help="an ImageNet root (train/<class>/, val/<class>/) or one folder of class folders "
                        "(default: generated ImageNet-like JPEGs, cached)")
    p.add_argument("--images", type=int, default=256, help="images to generate / use (default 256)")
    p.add_argument("--image-size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"),
                   help="size of the generated images (default 500 375)")
    p.add_argument("--cache-dir", default=None,
                   help="where generated images go (default ${XDG_CACHE_HOME:-~/.cache}/stvit/bench-data)")
    p.add_argument("--pipelines", nargs="+", choices=PIPELINES, default=list(PIPELINES))
    p.add_argument("--input-size", type=int, default=224, help="paper/eval output size (default 224)")
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2],
                   help="DataLoader worker counts to time (default: 1 2; none: per-core only)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="interleaved per-core rounds (default 5)")
    p.add_argument("--baseline", action="store_true",
                   help="also run today's step-by-step pipelines (fast=False), interleaved")
    p.add_argument("--train", metavar="MODEL", default=None,
                   help="also time training steps of MODEL fed by the paper-defer loader against a synthetic "
                        "batch on the device (the training feed)")
    p.add_argument("--train-steps", type=int, default=20, help="timed steps of each feed (default 20)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")


# ---- data ----------------------------------------------------------------------------------------

def _photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like image: colour noise summed over octaves with a 1/f^0.3 falloff, plus grain."""
    acc = np.zeros((height, width, 3), np.float32)
    for octave, res in enumerate((3, 6, 12, 24, 48, 96, 192)):
        small = rng.standard_normal((res, max(2, res * width // height), 3)).astype(np.float32)
        up = np.stack([np.asarray(Image.fromarray(small[..., c]).resize((width, height), Image.BICUBIC))
                       for c in range(3)], -1)
        acc += up * (60.0 / 2 ** (0.3 * octave))
    acc += rng.standard_normal((height, width, 3)).astype(np.float32) * 8.0
    acc += 120 + rng.uniform(-40, 40, 3).astype(np.float32)
    return Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8))


def imagenet_like(root: Path, images: int, size: tuple[int, int], classes: int = 10) -> Path:
    """``root/train/<class>/*.JPEG``, generated once (in a temporary sibling, renamed into place)."""
    folder = root / f"v{GENERATOR_VERSION}-{images}-{size[0]}x{size[1]}-q{JPEG_QUALITY}"
    if (folder / "train").is_dir():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        rng = np.random.default_rng(0)
        for i in range(images):
            w, h = size if i % 2 == 0 else size[::-1]
            path = tmp / "train" / f"c{i % classes:02d}" / f"{i:05d}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            _photo(rng, w, h).save(path, quality=JPEG_QUALITY)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first
            if not (folder / "train").is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _splits(args) -> tuple[Path, Path]:
    """(train folder, eval folder) of class folders."""
    if args.data_path is None:
        cache = Path(args.cache_dir) if args.cache_dir else Path(
            os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stvit" / "bench-data"
        root = imagenet_like(cache, args.images, tuple(args.image_size))
        return root / "train", root / "train"
    root = Path(args.data_path)
    if not root.is_dir():
        raise BenchError(f"--data-path {root} is not a folder")
    if (root / "train").is_dir():
        return root / "train", (root / "val") if (root / "val").is_dir() else root / "train"
    return root, root


def _subset(dataset, n: int) -> list[int]:
    """``n`` indices spread evenly over the dataset (all of it when it is smaller)."""
    total = len(dataset)
    return list(range(total)) if total <= n else [round(i * total / n) for i in range(n)]


# ---- timing --------------------------------------------------------------------------------------

def _per_core(variants: dict, rounds: int) -> dict:
    """Median img/s of each variant over interleaved rounds: by process CPU time and wall clock."""
    cpu = {name: [] for name in variants}
    wall = {name: [] for name in variants}
    for r in range(rounds):
        for name, (fn, indices) in variants.items():
            c0, w0 = time.process_time(), time.perf_counter()
            for i in indices:
                fn(i, 1_000_003 * r + i)
            c1, w1 = time.process_time(), time.perf_counter()
            cpu[name].append(len(indices) / max(c1 - c0, 1e-9))
            wall[name].append(len(indices) / max(w1 - w0, 1e-9))
    return {name: dict(cpu_img_s=statistics.median(cpu[name]), wall_img_s=statistics.median(wall[name]),
                       cpu_img_s_runs=cpu[name], images_per_round=len(variants[name][1]))
            for name in variants}


def _loader_rate(dataset, indices: list[int], workers: int, batch_size: int, seed: int) -> dict:
    """Wall-clock img/s of a DataLoader pass after its first batch, and the workers' CPU s/img."""
    from train.data import collate_skip_corrupt

    # At least 8 batches per worker, so the first batch (worker start) is a small part of it.
    count = max(len(indices), 8 * batch_size * max(workers, 1))
    items = [(indices[k % len(indices)], seed + k) for k in range(count)]
    loader = DataLoader(dataset, batch_size=batch_size, sampler=items, num_workers=workers,
                        collate_fn=collate_skip_corrupt, drop_last=False)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    it = iter(loader)
    first = next(it)
    n, t0 = 0, time.perf_counter()
    for images, _, _ in it:
        n += images.shape[0]
    elapsed = time.perf_counter() - t0
    del it, loader  # workers exit; their CPU time then shows in RUSAGE_CHILDREN
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    total = n + first[0].shape[0]
    return dict(img_s=n / max(elapsed, 1e-9), worker_cpu_img_s=total / cpu_s if cpu_s > 0 else None,
                images=total)


def _device_stage_rate(dataset, indices: list[int], batch_size: int, rounds: int, device: torch.device) -> dict:
    """Images per second of a deferring pipeline's device stage (flip, RandAugment, normalise, erase) on
    collated batches already in memory: wall clock (synchronised on a GPU) and, on the CPU, process CPU
    time per image (all the process's threads)."""
    from train.data import collate_skip_corrupt

    batches = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        batches.append(collate_skip_corrupt([dataset[(i, 7 + i)] for i in chunk])[0])
    stage = dataset.transform.device_stage
    for batch in batches[:2]:  # warm-up: allocator, kernels
        stage(batch, device)
    synchronize(device)
    wall, cpu = [], []
    for _ in range(rounds):
        c0, w0 = time.process_time(), time.perf_counter()
        for batch in batches:
            stage(batch, device)
        synchronize(device)
        wall.append(len(indices) / (time.perf_counter() - w0))
        cpu.append(len(indices) / max(time.process_time() - c0, 1e-9))
    out = dict(device=device_label(device), wall_img_s=statistics.median(wall), threads=torch.get_num_threads())
    if device.type == "cpu":
        out["cpu_img_s"] = statistics.median(cpu)
    return out


def _training_feed(dataset, indices: list[int], args, device: torch.device) -> dict:
    """Training img/s of ``args.train`` fed by the loader against the same step on a synthetic batch
    already on the device (see the module docstring): synthetic, fed, synthetic again."""
    from stvit import compat
    from train.data import collate_skip_corrupt

    from .common import create_model
    from .throughput import COMPILE_LIMITS, build_step, process_group

    name, model = create_model(args.train)
    mode = "train-bf16" if device.type == "cuda" else "train"
    batch, workers, steps = args.batch_size, max(args.workers), args.train_steps
    x = torch.randn(batch, model.in_chans, args.input_size, args.input_size, device=device)
    warmup = 3  # compilation, the workers' start, the allocator

    def synthetic(step) -> float:
        for _ in range(warmup):
            step()
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        return steps * batch / (time.perf_counter() - t0)

    def fed(step) -> float:
        items = [(indices[k % len(indices)], 31 + k) for k in range((warmup + steps) * batch)]
        loader = DataLoader(dataset, batch_size=batch, sampler=items, num_workers=workers,
                            collate_fn=collate_skip_corrupt, pin_memory=device.type == "cuda", drop_last=True,
                            prefetch_factor=4 if workers else None)
        n = 0
        for k, (images, targets, _) in enumerate(loader):
            if k == warmup:
                synchronize(device)
                t0 = time.perf_counter()
            images = dataset.transform.device_stage(images, device)
            step(images, targets.to(device, non_blocking=True))
            n += images.shape[0] if k >= warmup else 0
        synchronize(device)
        return n / (time.perf_counter() - t0)

    with process_group(device, mode == "train-bf16") as env, compat.dynamo_config(**COMPILE_LIMITS):
        step = build_step(mode, model.to(device), None, x, device, env)
        rates = [synthetic(step), fed(step), synthetic(step)]
    best_synthetic = max(rates[0], rates[2])
    return dict(model=name, mode=mode, batch=batch, workers=workers, steps=steps,
                device=device_label(device), synthetic_img_s=rates[0::2], fed_img_s=rates[1],
                fed_fraction=rates[1] / best_synthetic)


# ---- the command ---------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    from train.data import ImageFolder
    from train.transforms import build_eval_transform, build_train_transform

    if args.images < 1 or args.rounds < 1 or args.batch_size < 1 or any(w < 0 for w in args.workers):
        raise BenchError("--images, --rounds and --batch-size must be positive, --workers >= 0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core: what a DataLoader worker runs with
    info = machine_info(torch.device("cpu"))
    train_dir, eval_dir = _splits(args)
    size = args.input_size
    builders = {
        "paper": lambda fast: ImageFolder(train_dir, build_train_transform(size, fast=fast)),
        "paper-defer": lambda fast: ImageFolder(train_dir, build_train_transform(
            size, fast=fast, defer=True)),
        "eval": lambda fast: ImageFolder(eval_dir, build_eval_transform(size, fast=fast)),
        "demo": lambda fast: ImageFolder(_demo_dir(), build_train_transform(
            32, aa="none", reprob=0.0, scale=(0.5, 1.0), fast=fast)),
    }
    datasets: dict[str, ImageFolder] = {}
    decode_sets: dict[str, ImageFolder] = {}
    for name in args.pipelines:
        datasets[name] = builders[name](True)
        if args.baseline and f"{TODAY[name]} (today)" not in datasets:
            datasets[f"{TODAY[name]} (today)"] = builders[TODAY[name]](False)
        source = "demo" if name == "demo" else ("imagenet-like" if args.data_path is None else "data")
        if name == "eval" and eval_dir != train_dir:
            source = "val"
        decode_sets.setdefault(f"decode ({source})", ImageFolder(datasets[name].root))

    n_demo = 4 * args.images  # 64² images: many more per round for a stable time
    variants = {}
    for name, ds in datasets.items():
        indices = _subset(ds, n_demo if name.startswith("demo") else args.images)
        variants[name] = ((lambda ds: lambda i, seed: ds[(i, seed)])(ds), indices)
    for name, ds in decode_sets.items():
        indices = _subset(ds, n_demo if "demo" in name else args.images)
        variants[name] = ((lambda ds: lambda i, seed: ds.load_rgb(i))(ds), indices)
    for name, (fn, indices) in variants.items():  # warm-up: caches, lazy imports
        for i in indices[:8]:
            fn(i, i)
    print(f"per core: {args.rounds} interleaved rounds, torch threads 1, "
          f"{args.images} ImageNet-like / {n_demo} demo images per round ...", flush=True)
    per_core = _per_core(variants, args.rounds)

    stage = feed = None
    if "paper-defer" in datasets or args.train:
        device = pick_device(args.device)  # the common --device: where the device stage and the feed run
        torch.set_num_threads(threads)  # both run in the training process
        deferred = datasets.get("paper-defer") or builders["paper-defer"](True)
        indices = _subset(deferred, args.images)
        if "paper-defer" in datasets:
            stage = _device_stage_rate(deferred, indices, args.batch_size, args.rounds, device)
        if args.train:
            feed = _training_feed(deferred, indices, args, device)
        torch.set_num_threads(1)

    loaders = []
    for workers in args.workers:
        for r in range(2):  # two interleaved passes per worker count
            for name, ds in datasets.items():
                indices = _subset(ds, n_demo if name.startswith("demo") else args.images)
                row = _loader_rate(ds, indices, workers, args.batch_size, seed=7919 * (r + 1))
                loaders.append(dict(pipeline=name, workers=workers, pass_=r, **row))
    torch.set_num_threads(threads)

    rows = []
    for name in variants:
        pc = per_core[name]
        row = dict(pipeline=name, cpu_img_s=pc["cpu_img_s"], wall_img_s=pc["wall_img_s"])
        base = per_core.get(f"{TODAY.get(name, name)} (today)")
        if base:
            row["speedup"] = pc["cpu_img_s"] / base["cpu_img_s"]
            ratios = [a / b for a, b in zip(pc["cpu_img_s_runs"], base["cpu_img_s_runs"])]
            row["speedup_range"] = (min(ratios), max(ratios))
        for workers in args.workers:
            passes = [x for x in loaders if x["pipeline"] == name and x["workers"] == workers]
            if passes:
                row[f"w{workers}_img_s"] = statistics.median(x["img_s"] for x in passes)
                cpu_rates = [x["worker_cpu_img_s"] for x in passes if x["worker_cpu_img_s"]]
                row[f"w{workers}_cpu_img_s"] = statistics.median(cpu_rates) if cpu_rates else None
        rows.append(row)
    if stage:
        rows.append(dict(pipeline=f"paper-defer device stage on {stage['device']} (batch {args.batch_size})",
                         cpu_img_s=stage.get("cpu_img_s"), wall_img_s=stage["wall_img_s"]))

    columns = [("pipeline", "pipeline"), ("cpu_img_s", "img/s per core (CPU time)"),
               ("wall_img_s", "img/s per core (wall)"), ("speedup", "× today")]
    for workers in args.workers:
        columns += [(f"w{workers}_img_s", f"{workers} workers img/s"),
                    (f"w{workers}_cpu_img_s", f"{workers}w img/s per busy core")]
    print(f"machine: {info['cpu']}, {info['cpu_count']} cores, torch {info['torch']}, "
          f"Python {info['python']}, {info['date']}")
    print(f"data: {train_dir} (train pipelines), {eval_dir} (eval)")
    print(format_table(rows, columns))
    if feed:
        print(f"training feed, {feed['model']} {feed['mode']} batch {feed['batch']} on {feed['device']}: "
              f"{feed['fed_img_s']:.1f} img/s from the loader ({feed['workers']} workers) against "
              f"{' / '.join(f'{r:.1f}' for r in feed['synthetic_img_s'])} img/s on a synthetic batch "
              f"(before / after): {100 * feed['fed_fraction']:.0f} % fed")
    result = dict(command="data", machine=info, data=dict(train=str(train_dir), eval=str(eval_dir)),
                  args={k: v for k, v in vars(args).items() if k != "func"}, rows=rows,
                  per_core=per_core, loaders=loaders, device_stage=stage, training_feed=feed)
    if args.json:
        write_json(args.json, result)
    return result


def _demo_dir() -> Path:
    """The trainer's demo dataset (built once, cached), its train split."""
    from train.synthetic import ensure_demo_dataset

    return ensure_demo_dataset(seed=0, num_classes=10, train_per_class=200, val_per_class=50,
                               image_size=64) / "train"
