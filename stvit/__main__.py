"""`python -m stvit [--model small] [--input-size 224]`: build a model, run one forward pass, and
print its output shape, parameter count and MACs."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from . import count_macs, count_params, create_model, list_models, load_checkpoint
from .checkpoint import CheckpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stvit", description=__doc__)
    parser.add_argument("--model", default="stvit_small", help=f"one of {', '.join(list_models())}")
    parser.add_argument("--input-size", type=int, default=None, help="square input size (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--checkpoint", help="optional weights to load (the authors' release files work)")
    args = parser.parse_args(argv)
    try:
        model = create_model(args.model).eval()
        if args.checkpoint:
            load_checkpoint(model, args.checkpoint)
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.input_size is None:
        args.input_size = model.pretrained_cfg["input_size"][-1]
    x = torch.randn(args.batch_size, model.in_chans, args.input_size, args.input_size)
    start = time.perf_counter()
    try:
        model.check_input(x)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with torch.no_grad():
        out = model(x)
    elapsed = time.perf_counter() - start
    size = (model.in_chans, args.input_size, args.input_size)
    print(f"model       {model.pretrained_cfg['architecture']}")
    print(f"input       {tuple(x.shape)}")
    print(f"output      {tuple(out.shape)}  ({elapsed * 1e3:.0f} ms, first call, eager fp32)")
    print(f"parameters  {count_params(model):,}")
    print(f"MACs        {count_macs(model, size) / 1e9:.2f} G per image at {args.input_size}²")
    return 0


if __name__ == "__main__":
    sys.exit(main())
