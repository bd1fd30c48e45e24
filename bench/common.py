"""Shared benchmark plumbing: devices, timing statistics, peak memory, matmul peak, output files."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

import stvit
from stvit.files import atomic_path


class BenchError(ValueError):
    """A benchmark cannot run as asked; the message says why and what to change."""


# ---- device --------------------------------------------------------------------------------------

def pick_device(name: str | None = None) -> torch.device:
    """``name`` if given, else CUDA when available, else CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def device_label(device: torch.device) -> str:
    """A device as results name it: the GPU's name on CUDA, else its type (``cpu``)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# How the CPU allocator was set up for this run (see tune_cpu_allocator); reported with the results.
ALLOCATOR = {"setting": "default"}


def tune_cpu_allocator() -> bool:
    """Make glibc keep freed memory for reuse instead of unmapping it (large mmap and trim thresholds).

    By default glibc serves big blocks with fresh mmaps and returns them on free, so every large
    temporary tensor costs page faults and kernel page zeroing. How much a model suffers from that
    depends on its temporaries, and the allocator's adaptive threshold changes during a run (e.g.
    after a training step), making timings depend on what ran before. Fixing the thresholds up front
    gives every implementation the same, steady, production-like allocator (like jemalloc or tcmalloc
    would). Returns False where this is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
    if ok:
        ALLOCATOR["setting"] = "glibc mallopt: M_MMAP_THRESHOLD=1 GiB, M_TRIM_THRESHOLD=2 GiB"
    return ok


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on; ``device_name`` is the GPU's name on CUDA, the CPU's on a CPU."""
    cpu = _cpu_name()
    device_name = device_label(device) if device.type == "cuda" else cpu
    return dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), torch=torch.__version__,
                python=platform.python_version(), device=device.type, device_name=device_name,
                threads=torch.get_num_threads(), cpu=cpu, cpu_count=os.cpu_count(), allocator=ALLOCATOR["setting"])


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---- models --------------------------------------------------------------------------------------

TIMM_PREFIX = "timm:"


SEGMENT_CLASSES = 150  # ADE20K's


def create_model(name: str, task: str = "classify", head: str = "upernet") -> tuple[str, nn.Module]:
    """(name for the results, untrained model): a registered model (``stvit_small``, ``small``), or with
    ``timm:NAME`` timm's model of that name, to time peers beside ours (timm is not a dependency).
    ``task="segment"``: the registered backbone in a segmentor with ``head`` and ADE20K's 150 classes
    (``stvit.create_segmentor``), named ``<model>+<head>``. Seeded: the same weights in every run."""
    torch.manual_seed(0)
    if task == "segment":
        if name.startswith(TIMM_PREFIX):
            raise BenchError(f"{name}: --task segment builds segmentors on registered backbones only")
        canonical = stvit.resolve_name(name)
        return f"{canonical}+{head}", stvit.create_segmentor(canonical, head=head, num_classes=SEGMENT_CLASSES)
    if not name.startswith(TIMM_PREFIX):
        canonical = stvit.resolve_name(name)
        return canonical, stvit.create_model(canonical)
    try:
        import timm
    except ImportError as e:
        raise BenchError(f"{name} needs timm, which does not import here ({e}): pip install timm (a version "
                         f"made for this torch), or drop the timm: models") from e
    try:
        return name, timm.create_model(name.removeprefix(TIMM_PREFIX), pretrained=False, num_classes=1000)
    except RuntimeError as e:  # timm's "Unknown model (...)"
        raise BenchError(f"{name}: {e}; timm.list_models('*part*') lists timm's names") from e


def input_shape(model: nn.Module, size: int | None = None) -> tuple[int, int, int]:
    """(channels, size, size) a model is timed at: ``size``, else its ``pretrained_cfg`` input size
    (ours and timm's carry one), else 224."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels, _, side = cfg.get("input_size", (3, 224, 224))
    side = size or side
    return getattr(model, "in_chans", channels), side, side


# ---- timing --------------------------------------------------------------------------------------

@dataclass
class Timing:
    """Seconds per call over repeated timed runs (after warm-up): median and spread."""

    median_s: float
    min_s: float
    max_s: float
    iqr_s: float  # interquartile range: the spread less sensitive to a single disturbed run
    runs: int


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, runs: int = 5,
            min_time_s: float = 0.0) -> Timing:
    """Time ``fn()`` ``runs`` times (at least ``min_time_s`` in total) after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    return time_interleaved([fn], device, runs=runs, min_time_s=min_time_s)[0]


def time_interleaved(fns: Sequence[Callable[[], object]], device: torch.device, *, runs: int = 5,
                     min_time_s: float = 0.0, each_round: Callable[[int, float], None] | None = None) -> list[Timing]:
    """Time ``fns`` in turns, one call of each per round, for ``runs`` rounds (at least ``min_time_s``
    in total), so that a change in the machine's load hits all of them alike (warm-up is the caller's).
    ``each_round(rounds done, seconds so far)`` is called after every round."""
    samples: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while len(samples[-1]) < runs or time.perf_counter() - start < min_time_s:
        for fn, times in zip(fns, samples):
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - t0)
        if each_round is not None:
            each_round(len(samples[-1]), time.perf_counter() - start)
    return [summarize(times) for times in samples]


def summarize(samples: Sequence[float]) -> Timing:
    if not samples:
        raise ValueError("no timing samples")
    s = sorted(samples)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
    return Timing(median_s=statistics.median(s), min_s=s[0], max_s=s[-1], iqr_s=q[2] - q[0], runs=len(s))


# ---- memory --------------------------------------------------------------------------------------

MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated() during the call minus the memory allocated before it: the extra "
            "memory a call needs beyond what is held (weights, inputs, CUDA-graph pools are held)",
    "cpu": "peak of the bytes allocated through torch's CPU allocator during the call and still live, "
           "from torch.profiler memory events ('Total Allocated'); memory held before the call (weights, "
           "inputs) is not counted, nor oneDNN's private scratch buffers",
}


@contextmanager
def peak_memory(device: torch.device):
    """Context yielding a dict whose ``"peak_bytes"`` is set on exit (see ``MEMORY_METHOD``)."""
    result: dict = {"peak_bytes": None}
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        synchronize(device)
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield result
    result["peak_bytes"] = _peak_allocated(prof)


def _peak_allocated(prof) -> int:
    """Largest 'Total Allocated' among the profile's memory events (it counts only allocations made
    while profiling, so it is the peak of what the profiled code allocated)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    totals = [e["args"].get("Total Allocated", 0) for e in events if e.get("name") == "[memory]" and "args" in e]
    return max([0] + totals)


# ---- matmul peak ---------------------------------------------------------------------------------

def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int | None = None,
                      runs: int = 5) -> float:
    """Best FLOP/s of a large square matmul: the practical peak FLOP utilisation is measured against."""
    if size is None:
        size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    timing = time_fn(lambda: torch.mm(a, b), device, warmup=1, runs=runs)
    return 2 * size ** 3 / timing.min_s


# ---- output --------------------------------------------------------------------------------------

_STARTED = time.perf_counter()


def progress(message: str) -> None:
    """One line on stderr saying what a long run is doing now (stdout keeps the tables, --json the
    results), with the seconds since the bench started."""
    print(f"[{time.perf_counter() - _STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` as JSON atomically (temp file in the same folder, then rename)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """Plain-text table: ``columns`` are (key, header) pairs; missing values print as "—"."""
    cells = [[header for _, header in columns]]
    for row in rows:
        cells.append([_fmt(row.get(key)) for key, _ in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def mib(n_bytes: int | None) -> float | None:
    return None if n_bytes is None else n_bytes / 2 ** 20
