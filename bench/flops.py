"""``bench flops``: parameters and multiply-accumulates of the models beside the paper's numbers."""

from __future__ import annotations

import argparse

import stvit

from .common import format_table, write_json

# Paper (Huang et al., CVPR 2023), Table 2 / Table 8: parameters (M) and FLOPs (G, i.e. MACs) at 224².
# The paper's 384² fine-tuned figures were not available to us; those cells print "—".
PAPER = {
    ("stvit_small", 224): dict(params_m=25.0, macs_g=4.4),
    ("stvit_base", 224): dict(params_m=52.0, macs_g=9.9),
    ("stvit_large", 224): dict(params_m=95.0, macs_g=15.6),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=["small", "base", "large"], help="model names (default: S/B/L)")
    p.add_argument("--sizes", nargs="+", type=int, default=[224, 384], help="square input sizes (default: 224 384)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")


def run(args: argparse.Namespace) -> dict:
    rows = []
    for name in args.models:
        canonical = stvit.resolve_name(name)
        model = stvit.create_model(canonical).eval()
        params = stvit.count_params(model)
        for size in args.sizes:
            macs = stvit.count_macs(model, (model.in_chans, size, size))
            paper = PAPER.get((canonical, size), {})
            rows.append(dict(model=canonical, size=size, params_m=params / 1e6, macs_g=macs / 1e9,
                             paper_params_m=paper.get("params_m"), paper_macs_g=paper.get("macs_g")))
    print(format_table(rows, [("model", "model"), ("size", "input"), ("params_m", "params (M)"),
                              ("paper_params_m", "paper params (M)"), ("macs_g", "MACs (G)"),
                              ("paper_macs_g", "paper FLOPs (G)")]))
    print("MACs: torch.utils.flop_counter on one eval forward, FLOPs/2 (the paper's 'FLOPs' are MACs).")
    result = dict(command="flops", rows=rows)
    if args.json:
        write_json(args.json, result)
    return result
