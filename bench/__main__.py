"""``python -m bench``: one command per benchmark; see ``python -m bench SUBCOMMAND --help``."""

from __future__ import annotations

import argparse
import sys

import torch

from . import data, flops, profile, scaling, throughput
from .authors import AuthorsCodeError
from .common import BenchError, tune_cpu_allocator

COMMANDS = {
    "flops": (flops, "parameters and MACs of the models beside the paper's numbers"),
    "throughput": (throughput, "img/s, peak memory and FLOP utilisation per model, batch size and mode"),
    "scaling": (scaling, "super token attention vs global self-attention as the token grid grows (+ PNG plot)"),
    "profile": (profile, "torch.profiler traces (TensorBoard + Chrome) and the time per op category"),
    "data": (data, "input pipeline img/s per CPU core and with N DataLoader workers (paper, demo, eval; --baseline)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
        p.add_argument("--threads", type=int, default=None,
                       help="CPU threads for torch (torch.set_num_threads; default: torch's choice)")
        p.add_argument("--default-allocator", action="store_true",
                       help="leave glibc's allocator as it is (default: keep freed memory for reuse, "
                            "see bench/common.py tune_cpu_allocator; matters a lot for CPU timings)")
        module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads {args.threads}: expected a positive number of threads")
        torch.set_num_threads(args.threads)
    if not args.default_allocator:
        tune_cpu_allocator()
    try:
        return COMMANDS[args.command][0].run(args)
    except (BenchError, AuthorsCodeError, ValueError) as e:
        raise SystemExit(f"bench {args.command}: {e}") from e


if __name__ == "__main__":
    main(sys.argv[1:])
