"""``bench throughput``: images per second of each model × batch size × mode, with FLOP utilisation.

Modes (``--modes``; ``authors*`` need ``--authors-code``):

==================  =============================================================================
eager               our model as a user runs it: fp32, eval, ``torch.no_grad``
eager-amp           the same under bf16 autocast
optimized           ``stvit.optimize(model, compile=False)``: the family's folding, channels-last
compiled            ``stvit.optimize(model)``: + ``torch.compile``; on CUDA + CUDA graphs
compiled-bf16       ``stvit.optimize(model, torch.bfloat16)``: + bf16 autocast
train               one fp32 training step: forward, cross-entropy, backward, AdamW (fused, as train's)
train-compiled      the same with every block compiled, as ``train --compile`` on one process
train-bf16          one step as ``train --precision bf16 --compile`` runs it on one GPU: every block
                    compiled, then FSDP2 per block and root (bf16 parameters, fp32 reduction and
                    BatchNorm) on a one-process group (NCCL on CUDA, gloo on CPU)
authors             the authors' STViT (same weights, output checked equal), fp32 eval
authors-amp         the authors' STViT under their AMP: their ``engine.py`` runs the model in
                    ``torch.cuda.amp.autocast()``, fp16 on CUDA. On a CPU that autocast does
                    nothing; we run bf16 autocast there, so both sides are mixed precision
authors-train       the authors' STViT, one fp32 training step
authors-train-amp   their AMP training step: autocast as above, then on CUDA a ``GradScaler``
                    (their ``NativeScaler``) scales the loss, unscales and steps AdamW
onnx                the model as ``python -m stvit.export --format onnx`` writes it (dynamic batch and
                    sizes), run in onnxruntime's CPU execution provider with torch's thread count,
                    its idle threads not spinning (they would take the cores from the next case)
                    (CPU only; ``pip install "stvit[onnx]"``). Its peak memory is onnxruntime's own,
                    which torch's profiler does not see: not reported
==================  =============================================================================

The ``dtype`` field of a row says what ran: ``fp16`` for the authors' AMP on CUDA. "× authors" is a
row's throughput over the authors' mode of the same kind: fp32 over ``authors`` / ``authors-train``,
our bf16 over their AMP (``compiled-bf16`` over ``authors-amp``, ``train-bf16`` over
``authors-train-amp``).

FLOPs per image are 2 × the forward MACs (``stvit.count_macs``); a training step counts 3× the
forward (backward ≈ 2× forward). Utilisation (MFU) is achieved FLOP/s over the matmul peak
measured in the same run, in the row's own dtype (fp32, bf16, fp16: an fp16 matmul is timed
rather than assuming its peak equals bf16's). On a CPU that emulates bf16
(``stvit.precision.native_bf16``) the bf16 matmul peak means nothing — the model's bf16
convolutions may beat an emulated matmul — so bf16 rows are measured against the fp32 peak there,
and the run warns.

``--task segment`` times segmentors instead (``stvit.create_segmentor``: the model as backbone,
``--head`` upernet or segformer, 150 classes), at 512² unless ``--size`` says otherwise; their
training step is ``training_loss`` on random masks (decode + auxiliary cross-entropy). The same
modes run, the authors' ones aside.

Any registered model runs in the non-``authors`` modes, and so does a timm model named
``timm:NAME`` (``timm:convnext_tiny``; built untrained with 1000 classes, at its own input size,
when timm is installed): the same precision, compilation and batch, its blocks found by
``stvit.contract.blocks_of``. The ``authors*`` modes time the authors' STViT code: they run for the
STViT models of a run and are left out for the others (at least one model must be STViT's).

Progress goes to stderr, one line as each case's warm-up (compilation, export) starts and ends and
one per timing round, so a long run says what it is doing; stdout has the table, ``--json`` the rows.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import stvit
from stvit import compat, precision
from stvit.optimize import optimize
from train import distributed
from train.optim import fused_adamw

from .authors import authors_config, has_authors_twin, load_authors_twin
from .common import (MEMORY_METHOD, BenchError, create_model, format_table, input_shape, machine_info,
                     matmul_peak_flops, mib, peak_memory, pick_device, progress, synchronize, time_interleaved,
                     write_json)

MODES = ("eager", "eager-amp", "optimized", "compiled", "compiled-bf16", "train", "train-compiled", "train-bf16",
         "onnx", "authors", "authors-amp", "authors-train", "authors-train-amp")
BF16_MODES = {"eager-amp", "compiled-bf16", "train-bf16"}
AUTHORS_AMP_MODES = {"authors-amp", "authors-train-amp"}  # fp16 on CUDA, bf16 on a CPU
TRAIN_MODES = {"train", "train-compiled", "train-bf16", "authors-train", "authors-train-amp"}
COMPILING_MODES = {"compiled", "compiled-bf16", "train-compiled", "train-bf16"}
OUTSIDE_TORCH_MODES = {"onnx"}  # their memory is not torch's: the profiler cannot measure it
# Each mode × batch × dtype × stage width is its own static-shape graph of the same block code. Past
# dynamo's default of 8 graphs per code the rest would run eagerly, timed as if compiled: allow them
# all, and fail rather than time an eager fallback.
COMPILE_LIMITS = dict(recompile_limit=256, fail_on_recompile_limit_hit=True)
# Which authors' mode each of ours is compared with.
BASELINE = {"eager": "authors", "optimized": "authors", "compiled": "authors", "onnx": "authors",
            "eager-amp": "authors-amp",
            "compiled-bf16": "authors-amp", "train": "authors-train", "train-compiled": "authors-train",
            "train-bf16": "authors-train-amp"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=["stvit_small"],
                   help="registered model names, or timm:NAME for a timm model (timm installed), side by side "
                        "(default: stvit_small)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                   help="batch sizes (default: 8 on CPU, 256 on CUDA)")
    p.add_argument("--train-batch-sizes", nargs="+", type=int, default=None,
                   help="batch sizes of the training modes, when they differ (default: --batch-sizes)")
    p.add_argument("--size", type=int, default=None, help="square input size (default: each model's own)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=None,
                   help="modes to run (default: eager compiled compiled-bf16 train train-bf16, plus authors "
                        "authors-amp authors-train authors-train-amp with --authors-code; the bf16 and "
                        "authors-train-amp modes only where bf16 is native)")
    p.add_argument("--authors-code", metavar="PATH", help="the authors' models/stvit.py (github.com/hhb072/STViT)")
    p.add_argument("--runs", type=int, default=5, help="timed rounds; each round runs every mode once (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up calls, compilation included (default: 2)")
    p.add_argument("--min-time", type=float, default=0.0, help="keep timing rounds for at least this many seconds")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--task", choices=("classify", "segment"), default="classify",
                   help="segment: time each model as the backbone of a segmentor (--head) at 512², side by side")
    p.add_argument("--head", choices=("upernet", "segformer"), default="upernet",
                   help="the segmentor's decode head with --task segment (default upernet, with its auxiliary head)")


def default_modes(device: torch.device, authors: bool) -> list[str]:
    """eager, compiled, train, and where bf16 is native (emulated it is many times slower) compiled-bf16
    and train-bf16; with the authors' code their eval, AMP and training modes too."""
    native = precision.native_bf16(device)
    modes = ["eager", "compiled", "compiled-bf16", "train", "train-bf16"]
    if authors:
        modes += ["authors", "authors-amp", "authors-train", "authors-train-amp"]
    slow_when_emulated = {"compiled-bf16", "train-bf16", "authors-train-amp"}
    return [m for m in modes if native or m not in slow_when_emulated]


def mode_dtype(mode: str, device: torch.device) -> torch.dtype:
    """The dtype ``mode`` computes in on ``device``: the authors' AMP is fp16 on CUDA, as their
    ``torch.cuda.amp.autocast()`` is; on a CPU, where that autocast does nothing, bf16 autocast."""
    if mode in AUTHORS_AMP_MODES:
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.bfloat16 if mode in BF16_MODES else torch.float32


def run(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    modes = args.modes or default_modes(device, bool(args.authors_code))
    if any(m.startswith("authors") for m in modes) and not args.authors_code:
        raise BenchError("the authors* modes need --authors-code PATH/TO/models/stvit.py "
                         "(a checkout of github.com/hhb072/STViT)")
    segment = getattr(args, "task", "classify") == "segment"
    if segment and any(m.startswith("authors") for m in modes):
        raise BenchError("the authors* modes time the authors' classifier; drop them with --task segment")
    batch_sizes = args.batch_sizes or ([(16 if segment else 256)] if device.type == "cuda" else [(2 if segment else 8)])
    train_batch_sizes = args.train_batch_sizes or batch_sizes
    if segment and any(m in TRAIN_MODES for m in modes) and min(train_batch_sizes) < 2:
        raise BenchError("a segmentor's training step needs a batch of at least 2 (BatchNorm over the pyramid "
                         "pooling's 1×1 bin); raise --train-batch-sizes or drop the train modes")
    models = [create_model(name, getattr(args, "task", "classify"), getattr(args, "head", "upernet"))
              for name in args.models]
    # Their code is STViT's: the authors* modes time the STViT models of the run, the others (a peer
    # family, a timm model) run without them, and a run with no STViT model is refused before anything runs.
    wants_authors = any(m.startswith("authors") for m in modes)
    twins = {name for name, _ in models if wants_authors and has_authors_twin(name)}
    if wants_authors and not twins:
        authors_config(models[0][0])  # its message: not an STViT model, drop it or the authors* modes
    peaks = measure_peaks(device, {mode_dtype(m, device) for m in modes})

    with process_group(device, "train-bf16" in modes) as env, compat.dynamo_config(**COMPILE_LIMITS):
        cases = []  # every (model, batch, mode) of the run, timed together below
        for name, ours in models:
            ours = ours.to(device).eval()
            shape = input_shape(ours, args.size)
            theirs = None
            if name in twins:
                theirs = load_authors_twin(args.authors_code, ours, authors_config(name)).to(device).eval()
            flops_per_image = 2 * stvit.count_macs(ours, shape)
            for batch in dict.fromkeys(batch_sizes + train_batch_sizes):
                x = torch.randn(batch, *shape, device=device)
                if hasattr(ours, "check_input"):
                    ours.check_input(x)  # a size the model cannot take: its message, before any timing
                for mode in modes:
                    if batch not in (train_batch_sizes if mode in TRAIN_MODES else batch_sizes):
                        continue
                    if mode.startswith("authors") and theirs is None:
                        continue
                    flops = flops_per_image * (3 if mode in TRAIN_MODES else 1)
                    if mode == "onnx":  # the export takes a while (minutes for a large model)
                        progress(f"{name} batch {batch} onnx: exporting to ONNX, checking it in onnxruntime ...")
                    cases.append(dict(model=name, batch=batch, size=shape[-1], mode=mode,
                                      dtype=precision.name_of(mode_dtype(mode, device)), gflop_per_img=flops / 1e9,
                                      step=build_step(mode, ours, theirs, x, device, env)))
        timings = measure(cases, device, args)
    rows = []
    for case, timing in zip(cases, timings):
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


def measure_peaks(device: torch.device, dtypes: set[torch.dtype]) -> dict[torch.dtype, float]:
    """The matmul peak of fp32 and of each other dtype the run computes in, except emulated bf16."""
    peaks = {torch.float32: matmul_peak_flops(device, torch.float32)}
    for dtype in (torch.bfloat16, torch.float16):
        if dtype not in dtypes:
            continue
        if dtype == torch.bfloat16 and not precision.native_bf16(device):
            warnings.warn("bf16 is emulated on this CPU (no AVX512-BF16/AMX): bf16 modes run many times slower "
                          "than fp32 and their MFU is given against the fp32 matmul peak",
                          precision.EmulatedBF16Warning)
            continue
        peaks[dtype] = matmul_peak_flops(device, dtype)
    return peaks


def _peak_dtype(row: dict, peaks: dict) -> torch.dtype:
    """The matmul peak a row's MFU is measured against: its own dtype's, else (emulated bf16) fp32's."""
    dtype = precision.NAMES[row["dtype"]]
    return dtype if dtype in peaks else torch.float32


@contextmanager
def process_group(device: torch.device, needed: bool):
    """The one-process group ``train-bf16`` shards in (as ``train`` makes on one GPU), ended after the
    run if this run started it; yields its ``DistEnv`` (None when not ``needed``)."""
    if not needed:
        yield None
        return
    started = not dist.is_initialized()
    try:
        yield distributed.one_process_group(device)
    finally:
        if started:
            distributed.shutdown()


COLUMNS = [("model", "model"), ("batch", "batch"), ("mode", "mode"), ("dtype", "dtype"), ("img_per_s", "img/s"),
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
        what = "compiling" if case["mode"] in COMPILING_MODES else "warming up"
        progress(f"{_label(case)}: {what} ({max(1, args.warmup)} untimed calls) ...")
        t0 = time.perf_counter()
        for _ in range(max(1, args.warmup)):
            case["step"]()
        synchronize(device)
        warmup_s.append(time.perf_counter() - t0)
        progress(f"{_label(case)}: {what} done in {warmup_s[-1]:.1f} s")
    progress(f"timing {len(cases)} cases in interleaved rounds (at least {args.runs}"
             + (f", and {args.min_time:g} s" if args.min_time else "") + ") ...")
    timings = time_interleaved([case["step"] for case in cases], device, runs=args.runs, min_time_s=args.min_time,
                               each_round=lambda done, s: progress(f"round {done} timed ({s:.1f} s so far)"))
    progress(f"measuring the peak memory of {len(cases)} cases ...")
    results = []
    for case, timing, warm in zip(cases, timings, warmup_s):
        with peak_memory(device) as mem:
            case["step"]()
        batch = case["batch"]
        peak = None if case["mode"] in OUTSIDE_TORCH_MODES else mib(mem["peak_bytes"])
        results.append(dict(img_per_s=batch / timing.median_s, img_per_s_min=batch / timing.max_s,
                            img_per_s_max=batch / timing.min_s, median_ms=timing.median_s * 1e3,
                            iqr_ms=timing.iqr_s * 1e3, runs=timing.runs, peak_mib=peak,
                            compile_s=warm,
                            cuda_graphs=device.type == "cuda" and case["mode"] in ("compiled", "compiled-bf16")))
    return results


def _label(case: dict) -> str:
    return f"{case['model']} batch {case['batch']} {case['mode']}"


def build_step(mode: str, ours: nn.Module, theirs: nn.Module | None, x: torch.Tensor, device: torch.device,
               env: distributed.DistEnv | None = None) -> Callable[[], object]:
    """A zero-argument callable running one batch in ``mode``; its ``.model`` is the module it runs.
    ``env``: the process group ``train-bf16`` shards in (``process_group``)."""
    dtype = mode_dtype(mode, device)
    if mode in ("eager", "authors", "eager-amp", "authors-amp"):
        model = theirs if mode.startswith("authors") else ours
        amp = precision.autocast(device, dtype)

        def step():
            with torch.no_grad(), amp:
                return model(x)
    elif mode in ("optimized", "compiled", "compiled-bf16"):
        fast = optimize(ours, dtype, compile=mode != "optimized")
        model = fast.model

        def step():
            return fast(x)
    elif mode == "onnx":
        model = ours
        step = onnx_step(ours, x, device)
    elif mode in TRAIN_MODES:
        model = copy.deepcopy(theirs if mode.startswith("authors") else ours).train()
        if mode == "train-compiled":  # train's own wrapping, one process without FSDP2
            model = distributed.prepare_model(model, distributed.DistEnv(device=device), compile_blocks=True)
        elif mode == "train-bf16":
            if env is None:
                raise BenchError("train-bf16 needs the process group of process_group(device, True)")
            model = distributed.prepare_model(model, env, compile_blocks=True, bf16=True)
        # train-bf16 computes in bf16 through FSDP2's policy, not autocast; the others autocast to their dtype
        amp = nullcontext() if mode == "train-bf16" else precision.autocast(device, dtype)
        # fp16 underflows without loss scaling: their NativeScaler is torch's GradScaler (bf16 needs none)
        scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        step = train_step(model, x, amp, scaler)
    else:
        raise BenchError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    step.model = model
    return step


def onnx_step(model: nn.Module, x: torch.Tensor, device: torch.device) -> Callable[[], list[torch.Tensor]]:
    """``model`` exported as ``python -m stvit.export`` exports it, run in onnxruntime on ``x``."""
    from stvit import export

    if device.type != "cpu":
        raise BenchError("the onnx mode runs onnxruntime's CPU execution provider: use it with --device cpu")
    try:
        export.require_onnx()
        with tempfile.TemporaryDirectory() as tmp:  # the session keeps the model; the file can go
            path = f"{tmp}/model.onnx"
            export.save_onnx(export.export_program(model, tuple(x.shape[-2:])), path, model)
            run = export.onnx_runner(path, threads=torch.get_num_threads(), spinning=False)
        # As for the authors' twin: timings must compare the same computation.
        error = export.compare(model, run, [tuple(x.shape[:1]) + tuple(x.shape[-2:])])[0]["rel_error"]
    except export.ExportError as e:
        raise BenchError(f"the onnx mode: {e}") from e
    if not error <= export.DEFAULT_TOLERANCE:
        raise BenchError(f"the onnx mode: onnxruntime's output differs from the model's by {error:.3g} (relative)")
    x = x.cpu()
    return lambda: run(x)


def train_step(model: nn.Module, x: torch.Tensor, amp: AbstractContextManager,
               scaler: torch.amp.GradScaler | None = None) -> Callable[..., torch.Tensor]:
    """One step: forward and loss under ``amp``, backward, AdamW (fused where train's is,
    ``train.optim.fused_adamw``); with ``scaler`` the loss is scaled and the gradients unscaled
    before the step, as their engine's NativeScaler does. It trains on
    ``x`` and fixed targets, or on the ``(images, targets)`` it is given (``bench data``'s feed)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05,
                                  fused=fused_adamw(model.parameters()))
    # A segmentor (pretrained_cfg task "segment") trains on (B, H, W) masks with its own objective.
    segment = (getattr(model, "pretrained_cfg", None) or {}).get("task") == "segment"
    target = torch.randint(0, model.num_classes, (x.shape[0], *x.shape[2:]) if segment else (x.shape[0],),
                           device=x.device, generator=torch.Generator(x.device).manual_seed(0))

    def step(images: torch.Tensor = x, targets: torch.Tensor = target):
        optimizer.zero_grad(set_to_none=True)
        with amp:
            if segment:
                loss = model.training_loss(images, targets)
            else:
                loss = F.cross_entropy(model(images).float(), targets)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return loss
    return step
