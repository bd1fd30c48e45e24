"""``bench scaling``: super token attention against global self-attention as the token grid grows.

Three attentions over the same (B, C, n, n) token map, C channels and heads (by default those of the
first stage of ``--model``, an STViT: stvit_small's is C=64, 1 head, 8×8 super-token cells):

- ``super-token``: :class:`stvit.SuperTokenAttention` (sparse association + MHSA on n²/64 super tokens);
- ``global``: self-attention over all n² tokens with the N×N attention matrix materialised
  (softmax(QKᵀ)V as the authors' ``Attention`` and ViT compute it); its memory grows as N²;
- ``global-fused``: the same attention through ``F.scaled_dot_product_attention`` (a fused, blocked
  kernel that never stores the N×N matrix): memory grows as N, time still as N².

Each is timed forward (no grad) and forward + backward. A measurement is skipped, and said so, when
its estimated memory exceeds ``--memory-budget-gib`` (the N×N matrices: 4 bytes × B × heads × N²,
×2 forward, ×4 forward + backward), or when the previous size's time, scaled by the growth of the
work, predicts more than ``--time-budget`` seconds. Out-of-memory errors are caught and reported.
"""

from __future__ import annotations

import argparse
import torch
from einops import rearrange
from torch import nn

import stvit
from stvit.models.stvit import STVIT_CONFIGS, MultiHeadSelfAttention, SuperTokenAttention

from .common import (MEMORY_METHOD, BenchError, format_table, machine_info, mib, peak_memory, pick_device, progress,
                     synchronize, time_fn, write_json)
from .plot import Panel, Series, save_loglog

METHODS = ("super-token", "global", "global-fused")


class DenseGlobalAttention(nn.Module):
    """Global MHSA with the attention matrix materialised; same parameters as MultiHeadSelfAttention."""

    def __init__(self, mhsa: MultiHeadSelfAttention):
        super().__init__()
        self.mhsa = mhsa

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        m = self.mhsa
        q, k, v = rearrange(m.qkv(x), "b (h three d) y x -> three b h (y x) d", h=m.num_heads, three=3)
        attn = (q @ k.transpose(-1, -2) * m.scale).softmax(-1)  # (B, heads, N, N)
        out = rearrange(attn @ v, "b h (y x) d -> b (h d) y x", y=H, x=W)
        return m.proj(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sides", nargs="+", type=int, default=[28, 56, 112, 224],
                   help="token grid sides n (n×n tokens; default: 28 56 112 224)")
    p.add_argument("--model", default="stvit_small",
                   help="the STViT whose first stage sets the defaults of --dim, --heads, --stoken-size "
                        "(default: stvit_small; super tokens exist only in STViT models)")
    p.add_argument("--dim", type=int, default=None, help="channels C (default: the model's stage 1, 64 for S)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default: the model's stage 1)")
    p.add_argument("--stoken-size", type=int, default=None, help="super-token cell side (default: the model's stage 1)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--memory-budget-gib", type=float, default=None,
                   help="skip measurements estimated above this (default: 2 on CPU, 80%% of free GPU memory)")
    p.add_argument("--time-budget", type=float, default=60.0,
                   help="skip measurements predicted to take longer than this many seconds (default: 60)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per measurement (default: 3)")
    p.add_argument("--plot", metavar="PNG", default="scaling.png", help="plot file (default: scaling.png)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def build(method: str, dim: int, heads: int, stoken: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    if method == "super-token":
        module = SuperTokenAttention(dim, (stoken, stoken), 1, heads)
    elif method == "global":
        module = DenseGlobalAttention(MultiHeadSelfAttention(dim, heads))
    else:
        module = MultiHeadSelfAttention(dim, heads)
    return module.to(device)


def estimated_bytes(method: str, tokens: int, args, backward: bool) -> int:
    """Memory the N×N matrices need (dense global only); other methods are linear in N."""
    if method != "global":
        return 0
    return 4 * args.batch * args.heads * tokens ** 2 * (4 if backward else 2)


def work(method: str, tokens: int) -> float:
    """Relative amount of work, to extrapolate times from one size to the next."""
    return float(tokens) if method == "super-token" else float(tokens) ** 2


def stage_one(model: str) -> dict:
    """Stage-1 width, heads and cell side of a registered STViT; a clear error for other families."""
    name = stvit.resolve_name(model)
    family = stvit.model_entry(name).family
    if name not in STVIT_CONFIGS:
        raise BenchError(f"bench scaling measures super token attention, which only STViT models have; {name} "
                         f"is a {family} model. Use --model with one of {', '.join(stvit.list_models('stvit'))}")
    cfg = STVIT_CONFIGS[name]
    return dict(dim=cfg["embed_dim"][0], heads=cfg["num_heads"][0], stoken_size=cfg["stoken_size"][0])


def run(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    for key, value in stage_one(args.model).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    budget = args.memory_budget_gib
    if budget is None:
        budget = 0.8 * torch.cuda.mem_get_info(device)[0] / 2 ** 30 if device.type == "cuda" else 2.0
    rows, last = [], {}
    for side in args.sides:
        tokens = side * side
        x = torch.randn(args.batch, args.dim, side, side, device=device).contiguous(memory_format=torch.channels_last)
        for method in args.methods:
            module = build(method, args.dim, args.heads, args.stoken_size, device)
            for backward in (False, True):
                key = (method, backward)
                row = {"method": method, "pass": "forward+backward" if backward else "forward", "side": side,
                       "tokens": tokens, "ms": None, "peak_mib": None, "status": "ok"}
                need = estimated_bytes(method, tokens, args, backward)
                predicted = (last[key][1] * work(method, tokens) / work(method, last[key][0])) if key in last else 0
                if need > budget * 2 ** 30:
                    row["status"] = f"skipped: needs ~{need / 2 ** 30:.2g} GiB > budget {budget:.2g} GiB"
                elif predicted > args.time_budget:
                    row["status"] = f"skipped: predicted {predicted:.0f} s > time budget {args.time_budget:.0f} s"
                else:
                    progress(f"{method} {row['pass']} at {side}×{side} tokens: timing ...")
                    measure(module, x, backward, device, args.runs, row)
                    if row["ms"] is not None:
                        last[key] = (tokens, row["ms"] / 1e3)
                rows.append(row)
    print(format_table(rows, [("method", "method"), ("pass", "pass"), ("side", "n"), ("tokens", "tokens"),
                              ("ms", "ms"), ("peak_mib", "peak MiB"), ("status", "status")]))
    title = (f"attention over n x n tokens: C={args.dim}, heads={args.heads}, batch={args.batch}, "
             f"super-token cells {args.stoken_size}x{args.stoken_size}, {device.type}")
    plot(rows, args.plot, title)
    print(f"plot: {args.plot}")
    result = dict(command="scaling", machine=machine_info(device), memory_method=MEMORY_METHOD[device.type],
                  memory_budget_gib=budget, time_budget_s=args.time_budget,
                  config=dict(dim=args.dim, heads=args.heads, stoken_size=args.stoken_size, batch=args.batch),
                  plot=str(args.plot), rows=rows)
    if args.json:
        write_json(args.json, result)
    return result


def measure(module: nn.Module, x: torch.Tensor, backward: bool, device: torch.device, runs: int, row: dict) -> None:
    """Fill ``row`` with the median time (ms) and peak memory (MiB) of one pass; catch out-of-memory."""
    if backward:
        inp = x.detach().clone().requires_grad_()

        def fn():
            module.zero_grad(set_to_none=True)
            inp.grad = None
            module(inp).sum().backward()
    else:
        def fn():
            with torch.no_grad():
                module(x)
    try:
        timing = time_fn(fn, device, warmup=1, runs=runs)
        with peak_memory(device) as mem:
            fn()
            synchronize(device)
    except (torch.OutOfMemoryError, RuntimeError) as e:  # CPU allocators raise RuntimeError
        if "memory" not in str(e).lower():
            raise
        row["status"] = "out of memory"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return
    row["ms"] = timing.median_s * 1e3
    row["peak_mib"] = mib(mem["peak_bytes"])


def plot(rows: list[dict], path: str, title: str) -> None:
    def series(metric: str) -> list[Series]:
        out = []
        for colour, method in enumerate(METHODS):  # one colour per method; forward dashed
            for pass_ in ("forward", "forward+backward"):
                pts = [(r["tokens"], r[metric]) for r in rows
                       if r["method"] == method and r["pass"] == pass_ and r[metric]]
                if pts:
                    out.append(Series(f"{method} {pass_}", pts, dashed=pass_ == "forward", colour=colour))
        return out
    save_loglog([Panel("time per pass", "tokens N = n^2", "ms", series("ms")),
                 Panel("peak memory", "tokens N = n^2", "MiB", series("peak_mib"))], path, title)
