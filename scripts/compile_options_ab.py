"""The project's inductor options, on and off, in one process (issue #19, bench/RESULTS.md).

Times ``bench throughput``'s ``train-compiled`` step (every block compiled by
``train.distributed.compile_block``, one process) with ``stvit.compat.training_compile_options`` as
it is and with no options (torch's defaults); with ``--blocks``, instead, one block per stage
(the first block of each input shape), forward + backward, eager and compiled both ways; with
``--inference fp32|bf16``, ``stvit.optimize``'s model on a CPU with ``CPU_INFERENCE_OPTIONS`` as they
are, without the C++ wrapper, with inductor's layout optimisation on (torch's default), and with
inductor's max-autotune (its C++ GEMM templates, AMX
micro-kernels where the CPU has them, tried against ATen's kernel for every matrix product).
Every model × variant is timed in the same interleaved rounds.

    PYTHONPATH=tests/site python scripts/compile_options_ab.py --models stvit_small timm:convnext_tiny \
        timm:swin_tiny_patch4_window7_224
    python scripts/compile_options_ab.py --models stvit_small --blocks
    python scripts/compile_options_ab.py --models stvit_small --inference bf16 --batch 1
    python scripts/compile_options_ab.py --models lvt_cls stvit_small --inference fp32 --variants options "layout optimisation"
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from contextlib import nullcontext
from unittest import mock

import torch
from torch import nn

import stvit
from bench.common import create_model, time_interleaved, tune_cpu_allocator
from bench.throughput import train_step
from stvit import compat
from stvit.contract import blocks_of
from train import distributed


OURS = compat.training_compile_options
VARIANTS = {"options": OURS, "torch defaults": lambda backend: None}


def compiled(module: nn.Module, variant: str) -> nn.Module:
    with mock.patch.object(compat, "training_compile_options", VARIANTS[variant]):  # what compile_block reads
        distributed.compile_block(module)
    return module


def step_cases(name: str, batch: int) -> list[tuple[str, Callable]]:
    cases = []
    for variant in VARIANTS:
        model = create_model(name)[1].train()  # seeded: the same weights for both variants
        for block in blocks_of(model):
            compiled(block, variant)
        cases.append((variant, train_step(model, torch.randn(batch, 3, 224, 224), nullcontext())))
    return cases


def block_cases(name: str, batch: int) -> list[tuple[str, Callable]]:
    """Blocks called with one map and returning one (STViT's, ConvNeXt's, Swin's)."""
    model = create_model(name)[1].train()
    inputs: dict[int, torch.Tensor] = {}
    blocks = blocks_of(model)

    def keep(k: int, args: tuple) -> None:  # returns nothing, so the block's output stays as it is
        if len(args) != 1:
            raise SystemExit(f"{name}: its blocks take {len(args)} arguments; --blocks times one-map blocks")
        inputs.setdefault(k, args[0].detach())

    hooks = [b.register_forward_hook(lambda m, args, out, k=k: keep(k, args)) for k, b in enumerate(blocks)]
    with torch.no_grad():
        model(torch.randn(batch, 3, 224, 224))
    for hook in hooks:
        hook.remove()
    cases, shapes = [], set()
    for k, x in inputs.items():
        if x.shape in shapes:
            continue
        shapes.add(x.shape)
        x = x.clone().requires_grad_()
        grad = torch.randn_like(x)
        for variant in ("eager", *VARIANTS):
            block = copy.deepcopy(blocks[k])
            if variant != "eager":
                compiled(block, variant)
            cases.append((f"block {k} {tuple(x.shape)} {variant}",
                          lambda block=block, x=x, grad=grad: block(x).backward(grad)))
    return cases


# ``--inference``: CPU_INFERENCE_OPTIONS (and the family's inference_compile_options) with these changed.
INFERENCE_VARIANTS = {
    "options": {},
    "python wrapper": {"cpp_wrapper": False},
    "layout optimisation": {"layout_optimization": True},  # inductor's default
    "max autotune": {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"},
}


def inference_cases(name: str, batch: int, dtype: str, variants: list[str]) -> list[tuple[str, Callable]]:
    model = create_model(name)[1].eval()
    x = torch.randn(batch, 3, 224, 224)
    cases = []
    for variant in variants:
        fast = stvit.optimize(model, dtype)
        # optimize adds a model's inference_compile_options to CPU_INFERENCE_OPTIONS, over them and
        # over the family's own (LVT's): the variant, on this copy only.
        fast.model.inference_compile_options = {**getattr(fast.model, "inference_compile_options", {}),
                                                **INFERENCE_VARIANTS[variant]}
        fast(x)  # compiles
        cases.append((f"{variant} {dtype}", lambda fast=fast: fast(x)))
    return cases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["stvit_small", "timm:convnext_tiny"])
    p.add_argument("--blocks", action="store_true", help="time one block per stage instead of the whole step")
    p.add_argument("--inference", choices=("fp32", "bf16"),
                   help="time stvit.optimize's inference model (this precision) instead of training")
    p.add_argument("--variants", nargs="+", choices=list(INFERENCE_VARIANTS), default=list(INFERENCE_VARIANTS),
                   help="with --inference: which (default: all)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    tune_cpu_allocator()  # as bench throughput does
    torch.set_num_threads(args.threads)
    compat.raise_recompile_limit(256)  # every model × variant is its own graph of shared block code
    cases = []
    for name in args.models:
        if args.inference:
            named = inference_cases(name, args.batch, args.inference, args.variants)
        else:
            named = (block_cases if args.blocks else step_cases)(name, args.batch)
        for label, run in named:
            run(), run()  # compiles forward and backward, then warms up
            cases.append((name, label, run))
    timings = time_interleaved([run for _, _, run in cases], torch.device("cpu"), runs=args.rounds)
    for (name, label, _), t in zip(cases, timings):
        if args.blocks:
            print(f"{name:36s} {label:44s} {t.median_s * 1e3:7.2f} ms ({t.min_s * 1e3:.2f}-{t.max_s * 1e3:.2f})")
        else:
            print(f"{name:36s} {label:20s} {args.batch / t.median_s:6.2f} img/s "
                  f"({args.batch / t.max_s:.2f}-{args.batch / t.min_s:.2f}), {t.median_s * 1e3:.1f} ms")

if __name__ == "__main__":
    main()
