"""Where a model's time goes, piece by piece: stem, each stage, head.

Inference (the default): each piece is compiled on its own as ``stvit.optimize`` compiles a whole
model (eval, BatchNorm folded where the family folds it, channels-last,
``stvit.optimize.cpu_inference_options``, bf16 autocast unless --fp32). Pieces compiled apart lose
the fusions across their borders, so the totals run a little below ``bench throughput``'s img/s.

``--train``: each piece's fp32 forward + backward in training mode, as ``bench throughput``'s
``train`` step runs it (a random gradient for the piece's output; the stem's input needs none);
with ``--compile-blocks`` the blocks compiled as ``train --compile`` compiles them.

The pieces of every model are timed in the same interleaved rounds; the comparison is between the
pieces (issue #19, bench/RESULTS.md).

    PYTHONPATH=tests/site python scripts/piece_times.py --models stvit_small timm:convnext_tiny \
        timm:swin_tiny_patch4_window7_224 [--train [--compile-blocks]]
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext

import torch
from torch import nn
from torch._inductor import config as inductor_config

import stvit
from bench.common import time_interleaved, tune_cpu_allocator
from stvit.optimize import cpu_inference_options
from train import distributed


def pieces(name: str, train: bool = False,
           compile_blocks: bool = False) -> tuple[nn.Module, list[tuple[str, nn.Module]]]:
    """The model, and its pieces in order."""
    if name.startswith("timm:"):
        import timm
        m = timm.create_model(name[5:])
        stem = m.stem if hasattr(m, "stem") else m.patch_embed
        stages = m.stages if hasattr(m, "stages") else m.layers
        head = m.head
    else:
        m = stvit.create_model(name)
        if not train:
            m.eval().prepare_inference()
        stem, stages, head = m.patch_embed, m.layers, nn.Sequential(m.proj, m.norm, m.act)
    m.train(train).requires_grad_(train).to(memory_format=torch.channels_last)
    if compile_blocks:  # in place: the pieces below are the model's own modules
        distributed.prepare_model(m, distributed.DistEnv(device=torch.device("cpu")), compile_blocks=True)
    return m, [("stem", stem)] + [(f"stage {i + 1}", s) for i, s in enumerate(stages)] + [("head", head)]


def forward_backward(piece: nn.Module, x: torch.Tensor, input_grad: bool):
    """A call running ``piece`` forward and backward on ``x``, and ``x``'s gradient with ``input_grad``."""
    x = x.detach().requires_grad_(input_grad)
    with torch.no_grad():
        grad = torch.randn_like(piece(x))

    def step():
        x.grad = None
        piece.zero_grad(set_to_none=True)
        piece(x).backward(grad)
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["stvit_small", "timm:convnext_tiny"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--fp32", action="store_true", help="inference in float32 instead of bf16 autocast")
    p.add_argument("--train", action="store_true", help="fp32 forward + backward in training mode")
    p.add_argument("--compile-blocks", action="store_true", help="with --train: the blocks compiled")
    args = p.parse_args()
    if args.compile_blocks and not args.train:
        p.error("--compile-blocks goes with --train")
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()  # as bench throughput runs
    amp = torch.autocast("cpu", torch.bfloat16, enabled=not (args.fp32 or args.train))
    cases = []  # (model, piece, the call timed)
    with (nullcontext() if args.train else torch.no_grad()), amp:
        for name in args.models:
            x = torch.randn(args.batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
            model, named = pieces(name, args.train, args.compile_blocks)
            options = {} if args.train else cpu_inference_options(model)  # training compiles as train does
            for piece, module in named:
                if args.train:
                    call = forward_backward(module, x, input_grad=piece != "stem")
                else:
                    compiled = torch.compile(module, dynamic=False)
                    call = lambda c=compiled, x=x: c(x)  # noqa: E731
                with inductor_config.patch(options):
                    call()  # compile, then warm up
                    call()
                cases.append((name, piece, call))
                with torch.no_grad():
                    x = module(x)
        timings = time_interleaved([call for _, _, call in cases], torch.device("cpu"), runs=args.rounds)
    for name in args.models:
        total = 0.0
        for (model, piece, _), t in zip(cases, timings):
            if model == name:
                total += t.median_s * 1e3
                print(f"{name:36s} {piece:8s} {t.median_s * 1e3:8.2f} ms  (fastest {t.min_s * 1e3:.2f})")
        print(f"{name:36s} {'total':8s} {total:8.2f} ms  = {args.batch / total * 1e3:.1f} img/s")


if __name__ == "__main__":
    main()
