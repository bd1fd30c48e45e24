"""``bench flops``: parameters and multiply-accumulates of every registered model beside its paper's numbers.

The paper columns come from each variant's registration (``stvit/models/<family>.py``); a model of
ours (the ``*_tiny`` demo variants) has none. A fixed-size model (``pretrained_cfg["fixed_input_size"]``)
is counted only at its own input size.
"""

from __future__ import annotations

import argparse

import stvit

from .common import format_table, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=None,
                   help="model names (default: every registered model, family by family)")
    p.add_argument("--sizes", nargs="+", type=int, default=[224], help="square input sizes (default: 224)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")


def run(args: argparse.Namespace) -> dict:
    names = [stvit.resolve_name(n) for n in args.models] if args.models else stvit.list_models()
    rows = []
    for name in names:
        entry = stvit.model_entry(name)
        model = stvit.create_model(name).eval()
        params = stvit.count_params(model)
        cfg = model.pretrained_cfg
        sizes = [cfg["input_size"][-1]] if cfg.get("fixed_input_size") else args.sizes
        for size in sizes:
            macs = stvit.count_macs(model, (model.in_chans, size, size))
            paper = entry.paper if size == 224 else {}
            rows.append(dict(model=name, family=entry.family, size=size, params_m=params / 1e6, macs_g=macs / 1e9,
                             paper_params_m=paper.get("params_m"), paper_macs_g=paper.get("macs_g"),
                             paper_top1=paper.get("top1")))
        del model
    print(format_table(rows, [("family", "family"), ("model", "model"), ("size", "input"),
                              ("params_m", "params (M)"), ("paper_params_m", "paper params (M)"),
                              ("macs_g", "MACs (G)"), ("paper_macs_g", "paper FLOPs (G)"),
                              ("paper_top1", "paper top-1 (%)")]))
    backbone_only = [n for n in names if stvit.model_entry(n).paper.get("params_of") == "backbone"]
    if backbone_only:
        print(f"paper params of {', '.join(backbone_only)}: the backbone only (its features_only model)")
    print("MACs: torch.utils.flop_counter on one eval forward, FLOPs/2 (the papers' 'FLOPs' are MACs); it counts "
          "convolutions and matrix products (bmm included), not norms, activations or softmax.")
    result = dict(command="flops", rows=rows)
    if args.json:
        write_json(args.json, result)
    return result
