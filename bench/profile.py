"""``bench profile``: ``torch.profiler`` traces of a model in one mode, and where the time goes.

Writes, under ``--out``:

- ``tensorboard/``: traces for ``tensorboard --logdir OUT/tensorboard`` with torch-tb-profiler
  (``torch.profiler.tensorboard_trace_handler``);
- ``trace.json``: the same trace as a Chrome trace (chrome://tracing, https://ui.perfetto.dev).

Prints the top operators by self time and the share of time in attention, convolutions, norms and
the rest. In the uncompiled modes, forward hooks wrap attention modules (any module whose class name
says ``Attention``, in every family), convolutions and norms in ``record_function`` labels
(``stvit::attention`` / ``stvit::conv`` / ``stvit::norm``), so every operator is attributed to the
module it ran in (convolutions inside an attention count as attention).
Backward operators and compiled (fused) kernels carry no labels and are classified by name, which
is approximate: a fused kernel may mix categories. On a CPU the compiled modes generate their kernels
with inductor's kernel profiling on, so each fused kernel is an event of its own (its name lists the
operators it fused) rather than part of one ``Call CompiledFxGraph``.
"""

from __future__ import annotations

import argparse
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function, schedule, tensorboard_trace_handler

import stvit
from stvit.files import atomic_path

from .common import BenchError, format_table, machine_info, pick_device, write_json
from .throughput import COMPILING_MODES, build_step, process_group

PROFILE_MODES = ("eager", "eager-amp", "optimized", "compiled", "compiled-bf16", "train", "train-compiled",
                 "train-bf16")
CATEGORIES = ("attention", "conv", "norm", "rest")
LABELS = {"stvit::attention": "attention", "stvit::conv": "conv", "stvit::norm": "norm"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="stvit_small", help="registered model name (default: stvit_small)")
    p.add_argument("--mode", choices=PROFILE_MODES, default="eager", help="mode (default: eager)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default: 8)")
    p.add_argument("--size", type=int, default=None, help="square input size (default: the model's own)")
    p.add_argument("--steps", type=int, default=2, help="profiled steps after 1 warm-up (default: 2)")
    p.add_argument("--out", default="profile", help="output folder (default: ./profile)")
    p.add_argument("--top", type=int, default=15, help="operators to list (default: 15)")
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON")


def label_modules(model: nn.Module) -> list:
    """Forward hooks wrapping attention, convolution and norm modules in record_function labels."""
    handles = []

    def kind(m: nn.Module) -> str | None:
        if "attention" in type(m).__name__.lower() or isinstance(m, nn.MultiheadAttention):
            return "stvit::attention"
        if isinstance(m, nn.modules.conv._ConvNd):
            return "stvit::conv"
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
            return "stvit::norm"
        return None

    for module in model.modules():
        label = kind(module)
        if label is None:
            continue
        stack: list = []

        def pre(mod, inputs, label=label, stack=stack):
            rf = record_function(label)
            rf.__enter__()
            stack.append(rf)

        def post(mod, inputs, output, stack=stack):
            stack.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def classify_name(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("attention", "softmax", "bmm", "baddbmm")):
        return "attention"
    if "conv" in n:
        return "conv"
    if "norm" in n:
        return "norm"
    return "rest"


def category_of(event) -> str:
    labels = []
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in LABELS:
            labels.append(LABELS[parent.name])
        parent = parent.cpu_parent
    if "attention" in labels:
        return "attention"
    return labels[0] if labels else classify_name(event.name)


def time_shares(events, use_device: bool) -> dict[str, float]:
    """Self time (ms) per category over all operator events (labels themselves excluded)."""
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for e in events:
        if e.name in LABELS or e.name.startswith("ProfilerStep"):
            continue
        t = e.self_device_time_total if use_device else e.self_cpu_time_total
        totals[category_of(e)] += t / 1e3
    return totals


def copy_latest_trace(tb_dir: Path, dest: Path, newer_than: float) -> Path:
    """Copy the newest trace the TensorBoard handler wrote to ``dest`` (atomically)."""
    traces = [p for p in tb_dir.glob("*.pt.trace.json") if p.stat().st_mtime >= newer_than - 1]
    if not traces:
        raise BenchError(f"the profiler wrote no trace into {tb_dir}")
    newest = max(traces, key=lambda p: p.stat().st_mtime)
    with atomic_path(dest) as tmp:
        shutil.copyfile(newest, tmp)
    return dest


def inductor_kernel_names(device: torch.device):
    """While compiling for a CPU: inductor's C++ kernels record themselves in the profile by name.
    It changes the generated code, so it must be on when the code is generated, not only when run.
    (GPU kernels are named in the profile already.)"""
    if device.type != "cpu":
        return nullcontext()
    from torch._inductor import config
    return config.patch({"cpp.enable_kernel_profile": True})


def run(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    with process_group(device, args.mode == "train-bf16") as env:  # train-bf16 shards in one (FSDP2)
        with inductor_kernel_names(device) if args.mode in COMPILING_MODES else nullcontext():
            return profile_mode(args, device, env)


def profile_mode(args: argparse.Namespace, device: torch.device, env) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = stvit.create_model(args.model).to(device).eval()
    size = args.size or model.pretrained_cfg["input_size"][-1]
    x = torch.randn(args.batch, model.in_chans, size, size, device=device)
    model.check_input(x)
    compiled = args.mode in COMPILING_MODES
    step = build_step(args.mode, model, None, x, device, env)
    if not compiled:
        handles = label_modules(step.model)  # the module that runs (train modes run a copy)
    step()  # untimed: compilation, allocator warm-up

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tb_dir = out / "tensorboard"
    started = time.time()
    # One export only: the TensorBoard handler writes a Chrome-format trace, which we then copy
    # (exporting the same profile twice crashes torch's profiler).
    with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=args.steps),
                 on_trace_ready=tensorboard_trace_handler(str(tb_dir)), record_shapes=True, acc_events=True) as prof:
        for _ in range(1 + args.steps):
            step()
            prof.step()
    trace_file = copy_latest_trace(tb_dir, out / "trace.json", newer_than=started)
    if not compiled:
        for h in handles:
            h.remove()

    use_device = device.type == "cuda"
    sort_key = "self_device_time_total" if use_device else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_key, row_limit=args.top))
    shares = time_shares(prof.events(), use_device)
    total = sum(shares.values()) or 1.0
    rows = [dict(category=c, ms_per_step=shares[c] / args.steps, share=shares[c] / total) for c in CATEGORIES]
    print(format_table(rows, [("category", "category"), ("ms_per_step", "ms / step"), ("share", "share")]))
    print(f"traces: {trace_file} (Chrome), {tb_dir}/ (tensorboard --logdir {tb_dir})")
    ops = [e for e in prof.key_averages() if e.key not in LABELS and not e.key.startswith("ProfilerStep")]
    top = sorted(ops, key=lambda e: -getattr(e, sort_key))[:args.top]
    result = dict(command="profile", machine=machine_info(device), model=stvit.resolve_name(args.model),
                  mode=args.mode, batch=args.batch, size=size, steps=args.steps,
                  trace=str(trace_file), tensorboard_dir=str(tb_dir), shares=rows,
                  top_ops=[dict(name=e.key, calls=e.count, self_ms=getattr(e, sort_key) / 1e3 / args.steps)
                           for e in top])
    if args.json:
        write_json(args.json, result)
    return result
