"""Where a model's compiled inference time goes, piece by piece: stem, each stage, head.

Each piece is compiled on its own as ``stvit.optimize`` compiles a whole model (eval, BatchNorm
folded where the family folds it, channels-last, ``stvit.optimize.CPU_INFERENCE_OPTIONS``, bf16
autocast unless --fp32), and the pieces of every model are timed in the same interleaved rounds.
Pieces compiled apart lose the fusions across their borders, so the totals run a little below
``bench throughput``'s img/s; the comparison is between the pieces (issue #19, bench/RESULTS.md).

    PYTHONPATH=tests/site python scripts/piece_times.py --models stvit_small timm:convnext_tiny \
        timm:swin_tiny_patch4_window7_224
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch._inductor import config as inductor_config

import stvit
from bench.common import time_interleaved
from stvit.optimize import CPU_INFERENCE_OPTIONS


def pieces(name: str) -> list[tuple[str, nn.Module]]:
    if name.startswith("timm:"):
        import timm
        m = timm.create_model(name[5:]).eval()
        stem = m.stem if hasattr(m, "stem") else m.patch_embed
        stages = m.stages if hasattr(m, "stages") else m.layers
        head = m.head
    else:
        m = stvit.create_model(name).eval()
        m.prepare_inference()
        stem, stages, head = m.patch_embed, m.layers, nn.Sequential(m.proj, m.norm, m.act)
    m.requires_grad_(False).to(memory_format=torch.channels_last)
    return [("stem", stem)] + [(f"stage {i + 1}", s) for i, s in enumerate(stages)] + [("head", head)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["stvit_small", "timm:convnext_tiny"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--fp32", action="store_true", help="float32 instead of bf16 autocast")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    amp = torch.autocast("cpu", torch.bfloat16, enabled=not args.fp32)
    cases = []  # (model, piece, compiled piece, its input)
    with torch.no_grad(), amp, inductor_config.patch(CPU_INFERENCE_OPTIONS):
        for name in args.models:
            x = torch.randn(args.batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
            for piece, module in pieces(name):
                compiled = torch.compile(module, dynamic=False)
                compiled(x)  # compile, then warm up
                y = compiled(x)
                cases.append((name, piece, compiled, x))
                x = y
        timings = time_interleaved([lambda c=compiled, x=x: c(x) for _, _, compiled, x in cases],
                                   torch.device("cpu"), runs=args.rounds)
    for name in args.models:
        total = 0.0
        for (model, piece, _, _), t in zip(cases, timings):
            if model == name:
                total += t.median_s * 1e3
                print(f"{name:36s} {piece:8s} {t.median_s * 1e3:8.2f} ms  (fastest {t.min_s * 1e3:.2f})")
        print(f"{name:36s} {'total':8s} {total:8.2f} ms  = {args.batch / total * 1e3:.1f} img/s")


if __name__ == "__main__":
    main()
