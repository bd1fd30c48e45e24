"""``bench throughput``: images per second of each model × batch size × mode, with FLOP utilisation.

Modes (``--modes``; ``authors*`` need ``--authors-code``):

==================  =============================================================================
eager               our model as a user runs it: fp32, eval, ``torch.no_grad``
eager-amp           the same under bf16 autocast
optimized           ``stvit.optimize(model, compile=False)``: the family's folding, channels-last
compiled            ``stvit.optimize(model)``: + ``torch.compile``; on CUDA + CUDA graphs
compiled-bf16       ``stvit.optimize(model, torch.bfloat16)``: + bf16 autocast
train               one fp32 training step: forward, cross-entropy, backward, AdamW
train-compiled      the same with every block compiled (``repeated_blocks()``, as ``train --compile``)
authors             the authors' STViT (same weights, output checked equal), fp32 eval
authors-amp         the authors' STViT under bf16 autocast (their AMP)
authors-train       the authors' STViT, one fp32 training step
==================  =============================================================================

FLOPs per image are 2 × the forward MACs (``stvit.count_macs``); a training step counts 3× the
forward (backward ≈ 2× forward). Utilisation (MFU) is achieved FLOP/s over the matmul peak
measured in the same run (fp32 peak for fp32 modes, bf16 peak for bf16 modes). On a CPU that
emulates bf16 (``stvit.precision.native_bf16``) the bf16 matmul peak means nothing — the model's bf16
convolutions may beat an emulated matmul — so bf16 rows are measured against the fp32 peak there,
and the run warns.

Any registered model runs in the ``eager``…``train-compiled`` modes; the ``authors*`` modes time the
authors' STViT code and take STViT models only.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import stvit
from stvit import precision
from stvit.optimize import optimize

from .authors import authors_config, load_authors_twin
from .common import (MEMORY_METHOD, BenchError, format_table, machine_info, matmul_peak_flops, mib, peak_memory,
                     pick_device, summarize, synchronize, write_json)

MODES = ("eager", "eager-amp", "optimized", "compiled", "compiled-bf16", "train", "train-compiled",
         "authors", "authors-amp", "authors-train")
BF16_MODES = {"eager-amp", "compiled-bf16", "authors-amp"}
TRAIN_MODES = {"train", "train-compiled", "authors-train"}
# Which authors' mode each of ours is compared with.
BASELINE = {"eager": "authors", "optimized": "authors", "compiled": "authors", "eager-amp": "authors-amp",
            "compiled-bf16": "authors-amp", "train": "authors-train", "train-compiled": "authors-train"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=["stvit_small"],
                   help="registered model names, side by side (default: stvit_small)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                   help="batch sizes (default: 8 on CPU, 256 on CUDA)")
    p.add_argument("--size", type=int, default=None, help="square input size (default: each model's own)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=None,
                   help="modes to run (default: eager compiled compiled-bf16 train, plus authors authors-amp "
                        "authors-train with --authors-code)")
    p.add_argument("--authors-code", metavar="PATH", help="the authors' models/stvit.py (github.com/hhb072/STViT)")
    p.add_argument("--runs", type=int, default=5, help="timed rounds; each round runs every mode once (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up calls, compilation included (default: 2)")
    p.add_argument("--min-time", type=float, default=0.0, help="keep timing rounds for at least this many seconds")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def default_modes(device: torch.device, authors: bool) -> list[str]:
    """eager, compiled, compiled-bf16 (where bf16 is native: emulated it is many times slower), train;
    with the authors' code their eval, AMP and training modes too."""
    modes = ["eager", "compiled"] + (["compiled-bf16"] if precision.native_bf16(device) else []) + ["train"]
    if authors:
        modes += ["authors", "authors-amp", "authors-train"]
    return modes


def run(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    modes = args.modes or default_modes(device, bool(args.authors_code))
    if any(m.startswith("authors") for m in modes) and not args.authors_code:
        raise BenchError("the authors* modes need --authors-code PATH/TO/models/stvit.py "
                         "(a checkout of github.com/hhb072/STViT)")
    batch_sizes = args.batch_sizes or ([256] if device.type == "cuda" else [8])
    names = [stvit.resolve_name(n) for n in args.models]
    authors = any(m.startswith("authors") for m in modes)
    if authors:
        for name in names:
            authors_config(name)  # before anything runs: their code is STViT's
    peaks = {torch.float32: matmul_peak_flops(device, torch.float32)}
    bf16_peak = BF16_MODES & set(modes) and precision.native_bf16(device)
    if bf16_peak:
        peaks[torch.bfloat16] = matmul_peak_flops(device, torch.bfloat16)
    elif BF16_MODES & set(modes):
        warnings.warn("bf16 is emulated on this CPU (no AVX512-BF16/AMX): bf16 modes run many times slower "
                      "than fp32 and their MFU is given against the fp32 matmul peak", precision.EmulatedBF16Warning)

    cases = []  # every (model, batch, mode) of the run, timed together below
    for canonical in names:
        torch.manual_seed(0)
        ours = stvit.create_model(canonical).to(device).eval()
        size = args.size or ours.pretrained_cfg["input_size"][-1]
        theirs = None
        if authors:
            theirs = load_authors_twin(args.authors_code, ours, authors_config(canonical)).to(device).eval()
        flops_per_image = 2 * stvit.count_macs(ours, (ours.in_chans, size, size))
        for batch in batch_sizes:
            x = torch.randn(batch, ours.in_chans, size, size, device=device)
            ours.check_input(x)  # a size the model cannot take: its message, before any timing
            for mode in modes:
                dtype = torch.bfloat16 if mode in BF16_MODES else torch.float32
                flops = flops_per_image * (3 if mode in TRAIN_MODES else 1)
                cases.append(dict(model=canonical, batch=batch, size=size, mode=mode, dtype=precision.name_of(dtype),
                                  gflop_per_img=flops / 1e9, step=build_step(mode, ours, theirs, x, device)))
    rows = []
    for case, timing in zip(cases, measure(cases, device, args)):
        row = {k: v for k, v in case.items() if k != "step"} | timing
        achieved = row["img_per_s"] * row["gflop_per_img"] * 1e9
        rows.append(dict(row, achieved_gflops=achieved / 1e9, mfu=achieved / peaks[_peak_dtype(row, peaks)]))
    add_speedups(rows)
    # The peak is measured again at the end and the better of the two kept: a busy moment during
    # one measurement must not make every utilisation look better than it is.
    for dtype in peaks:
        again = matmul_peak_flops(device, dtype)
        if again > peaks[dtype]:
            for r in rows:
                if _peak_dtype(r, peaks) == dtype:
                    r["mfu"] *= peaks[dtype] / again
            peaks[dtype] = again
    print(format_table(rows, COLUMNS))
    print(f"MFU against the measured matmul peak on {device.type} ({torch.get_num_threads()} threads): "
          + ", ".join(f"{precision.name_of(k)} {v / 1e9:.3g} GFLOP/s" for k, v in peaks.items()))
    result = dict(command="throughput", machine=machine_info(device), memory_method=MEMORY_METHOD[device.type],
                  matmul_peak_gflops={precision.name_of(k): v / 1e9 for k, v in peaks.items()},
                  rows=rows)
    if args.json:
        write_json(args.json, result)
    return result


def _peak_dtype(row: dict, peaks: dict) -> torch.dtype:
    """The matmul peak a row's MFU is measured against: its own dtype's, else (emulated bf16) fp32's."""
    dtype = precision.DTYPES[row["dtype"]]
    return dtype if dtype in peaks else torch.float32


COLUMNS = [("model", "model"), ("batch", "batch"), ("mode", "mode"), ("img_per_s", "img/s"),
           ("img_per_s_min", "img/s (slowest)"), ("img_per_s_max", "img/s (fastest)"), ("peak_mib", "peak MiB"),
           ("mfu", "MFU"), ("speedup", "× authors"), ("compile_s", "warm-up s")]


def add_speedups(rows: list[dict]) -> None:
    """Each row's throughput over its authors' counterpart (same model and batch), where measured."""
    index = {(r["model"], r["batch"], r["mode"]): r for r in rows}
    for r in rows:
        base = index.get((r["model"], r["batch"], BASELINE.get(r["mode"], "")))
        r["speedup"] = r["img_per_s"] / base["img_per_s"] if base else None


def measure(cases: list[dict], device: torch.device, args: argparse.Namespace) -> list[dict]:
    """Warm up every case (compiling where it compiles), then time all cases in turns — one call of
    each per round, models and modes alike — so that a change in the machine's load affects all of
    them alike; finally measure each case's peak memory in one more call."""
    warmup_s = []
    for case in cases:
        t0 = time.perf_counter()
        for _ in range(max(1, args.warmup)):
            case["step"]()
        synchronize(device)
        warmup_s.append(time.perf_counter() - t0)
    samples: list[list[float]] = [[] for _ in cases]
    start = time.perf_counter()
    while len(samples[-1]) < args.runs or time.perf_counter() - start < args.min_time:
        for case, times in zip(cases, samples):
            t0 = time.perf_counter()
            case["step"]()
            synchronize(device)
            times.append(time.perf_counter() - t0)
    results = []
    for case, times, warm in zip(cases, samples, warmup_s):
        with peak_memory(device) as mem:
            case["step"]()
        timing, batch = summarize(times), case["batch"]
        results.append(dict(img_per_s=batch / timing.median_s, img_per_s_min=batch / timing.max_s,
                            img_per_s_max=batch / timing.min_s, median_ms=timing.median_s * 1e3,
                            iqr_ms=timing.iqr_s * 1e3, runs=timing.runs, peak_mib=mib(mem["peak_bytes"]),
                            compile_s=warm,
                            cuda_graphs=device.type == "cuda" and case["mode"] in ("compiled", "compiled-bf16")))
    return results


def build_step(mode: str, ours: nn.Module, theirs: nn.Module | None, x: torch.Tensor,
               device: torch.device) -> Callable[[], object]:
    """A zero-argument callable running one batch in ``mode``; its ``.model`` is the module it runs."""
    if mode in ("eager", "authors", "eager-amp", "authors-amp"):
        model = ours if mode.startswith("eager") else theirs
        amp = precision.autocast(device, torch.bfloat16 if mode.endswith("-amp") else torch.float32)

        def step():
            with torch.no_grad(), amp:
                return model(x)
    elif mode in ("optimized", "compiled", "compiled-bf16"):
        fast = optimize(ours, "bf16" if mode == "compiled-bf16" else "fp32", compile=mode != "optimized")
        model = fast.model

        def step():
            return fast(x)
    elif mode in TRAIN_MODES:
        model = copy.deepcopy(theirs if mode == "authors-train" else ours).train()
        if mode == "train-compiled":
            for block in model.repeated_blocks():
                block.compile(dynamic=False)
        step = train_step(model, x)
    else:
        raise BenchError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    step.model = model
    return step


def train_step(model: nn.Module, x: torch.Tensor) -> Callable[[], float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    target = torch.randint(0, model.num_classes, (x.shape[0],), device=x.device,
                           generator=torch.Generator(x.device).manual_seed(0))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        return loss
    return step
