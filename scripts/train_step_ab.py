"""A/B of one change to the step (training, inference), both ways timed in the same interleaved rounds.

    python scripts/train_step_ab.py --change neighbours   # index ops vs nine shifted views (STViT)
    python scripts/train_step_ab.py --change adamw        # fused AdamW vs torch's per-tensor loop
    python scripts/train_step_ab.py --change slots        # the association's softmax slot-major vs token-major
    python scripts/train_step_ab.py --change adjoint      # compiled: the neighbours' explicit adjoints vs autograd's
    python scripts/train_step_ab.py --change linear       # training: small maps' 1×1 convs as Linear vs as convolutions
    python scripts/train_step_ab.py --change bn-units     # bf16 FSDP2: BatchNorms in their blocks' units vs their own

``neighbours``: STViT's super token neighbours gathered and scattered with one index op each way
(the eager CPU default) against the nine shifted views (what compiled, exported and CUDA runs use);
it times a super token attention module of stages 1 and 2 forward + backward, the whole eager
training step, and the eager inference forward. ``adamw``: the bench's training step with train's
fused AdamW against torch's default on a CPU (a loop over the tensors), and the optimizer step alone.
``slots``: STViT's eager association (``CellTokens.assign``) with its 9-way softmax computed
slot-major, (…, 9, n), against token-major, (…, n, 9), over the last dim; it times the softmax
alone at stage 1's shape, a super token attention module of stages 1 and 2 forward, the eager
inference forward and the training step. ``adjoint`` (compiled training): STViT's neighbour gather
and scatter carrying each other as their backward (``_GatherNeighbours``, the default under
torch.compile) against autograd differentiating the nine shifted views. ``linear`` (training,
eager and compiled): the blocks' 1×1 convs on maps of at most 14×14 positions run as Linear layers
(``pointwise_conv``) against as convolutions. Both time one block of each stage compiled as
``train --compile`` compiles it, forward + backward in float32 and under bf16 autocast, and the
bench's ``train``, ``train-compiled`` and ``train-bf16`` steps. ``bn-units`` (``train --precision
bf16``): each BatchNorm in its block's FSDP2 unit, computing with fp32 copies of its bf16-gathered
affine parameters (``train.distributed.batch_norm_with_fp32_affine``), against each BatchNorm its own
fp32 unit; it times the bench's ``train-bf16`` step.
Batch 8, 224², the bench's allocator setting; issue #19, bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
from contextlib import nullcontext
from unittest import mock

import torch

import stvit
from bench.common import time_interleaved, tune_cpu_allocator
from bench.throughput import train_step
from piece_times import forward_backward  # scripts/, beside this one
from stvit.models import stvit as stvit_module


def neighbours_cases(model: torch.nn.Module, x: torch.Tensor) -> dict:
    cases = {}
    for way, one_op in (("index", True), ("views", False)):
        # Each call sets the way it runs; the functions read the flag when called.
        def way_of(fn, one_op=one_op):
            def call():
                with mock.patch.object(stvit_module, "_one_index_op", lambda t: one_op):
                    return fn()
            return call
        for stage, (dim, size) in enumerate(((64, 56), (128, 28))):
            attn = copy.deepcopy(model.layers[stage].blocks[0].attn)
            xs = torch.randn(x.shape[0], dim, size, size).to(memory_format=torch.channels_last)
            cases[f"{way}: stage-{stage + 1} attention fwd+bwd"] = way_of(forward_backward(attn, xs, input_grad=True))
        cases[f"{way}: train step"] = way_of(train_step(copy.deepcopy(model).train(), x, nullcontext()))
        evaluated = copy.deepcopy(model).eval()
        cases[f"{way}: eager forward"] = way_of(torch.no_grad()(lambda m=evaluated: m(x)))
    return cases


class TokenMajorCells(stvit_module.CellTokens):
    """The eager form as it was: the softmax over a contiguous last dim of 9."""

    def assign(self, neighbours: torch.Tensor) -> torch.Tensor:
        return (self.tokens @ neighbours.transpose(-1, -2)).softmax(-1)


def slots_cases(model: torch.nn.Module, x: torch.Tensor) -> dict:
    cases = {}
    scores = torch.randn(x.shape[0], 7, 7, 64, 9)  # stage 1: 7×7 cells of 64 tokens
    for way, form in (("slot-major", stvit_module.CellTokens), ("token-major", TokenMajorCells)):
        def way_of(fn, form=form):
            def call():
                with mock.patch.dict(stvit_module.TOKEN_FORMS, cells=form):
                    return fn()
            return call
        laid_out, slot_dim = (scores.transpose(-1, -2).contiguous(), -2) if form is stvit_module.CellTokens else (scores, -1)
        cases[f"{way}: softmax alone, stage 1"] = lambda s=laid_out, d=slot_dim: s.softmax(d)
        for stage, (dim, size) in enumerate(((64, 56), (128, 28))):
            attn = copy.deepcopy(model.layers[stage].blocks[0].attn).eval()
            xs = torch.randn(x.shape[0], dim, size, size).to(memory_format=torch.channels_last)
            cases[f"{way}: stage-{stage + 1} attention forward"] = way_of(torch.no_grad()(lambda a=attn, xs=xs: a(xs)))
        evaluated = copy.deepcopy(model).eval()
        cases[f"{way}: eager forward"] = way_of(torch.no_grad()(lambda m=evaluated: m(x)))
        cases[f"{way}: train step"] = way_of(train_step(copy.deepcopy(model).train(), x, nullcontext()))
    return cases


def training_cases(model: torch.nn.Module, x: torch.Tensor, switch: str, ways: tuple[str, str]) -> dict:
    """The change behind ``stvit.models.stvit.<switch>`` (a predicate) on, and off (the predicate
    always False), in training: one block of each stage compiled as ``train --compile`` compiles
    it, forward + backward in float32 and under bf16 autocast, and the bench's ``train``,
    ``train-compiled`` and ``train-bf16`` steps."""
    from bench.throughput import build_step
    from stvit import compat
    from train import distributed

    compat.raise_recompile_limit(64)  # both ways x stages x precisions share STTBlock.forward's code
    env = distributed.one_process_group(torch.device("cpu"))  # what train-bf16 shards in
    off = lambda *args: False  # noqa: E731  one object: dynamo guards on it, so each way keeps its graphs
    # The bench's training steps take the model and the batch as a user's (contiguous) are.
    plain, x_plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format), x.contiguous()
    cases = {}
    for way, pick in zip(ways, (getattr(stvit_module, switch), off)):
        def way_of(fn, pick=pick):
            def call():
                with mock.patch.object(stvit_module, switch, pick):
                    return fn()
            return call
        for stage, (dim, size) in enumerate(((64, 56), (128, 28), (320, 14), (512, 7))):
            block = copy.deepcopy(model.layers[stage].blocks[0]).train()
            distributed.compile_block(block)
            xs = torch.randn(x.shape[0], dim, size, size).to(memory_format=torch.channels_last)
            fp32 = forward_backward(block, xs, input_grad=True)
            cases[f"{way}: stage-{stage + 1} block fwd+bwd, fp32"] = way_of(fp32)
            cases[f"{way}: stage-{stage + 1} block fwd+bwd, bf16 autocast"] = way_of(
                torch.autocast("cpu", torch.bfloat16)(forward_backward(block, xs, input_grad=True)))
        for mode in ("train", "train-compiled", "train-bf16"):
            with mock.patch.object(stvit_module, switch, pick):
                cases[f"{way}: {mode} step"] = way_of(build_step(mode, plain, None, x_plain, torch.device("cpu"), env))
    return cases


def bn_units_cases(model: torch.nn.Module, x: torch.Tensor) -> dict:
    # Each way twice, in the order A B B A: each way is then timed once after itself and once after the
    # other, and from two copies (the change is about 4 %, within a plain A/B run's spread here).
    from bench.throughput import build_step
    from train import distributed

    env = distributed.one_process_group(torch.device("cpu"))  # what train-bf16 shards in
    cases = {}
    for n, (way, own) in enumerate((("in block units", False), ("own fp32 units", True),
                                    ("own fp32 units", True), ("in block units", False))):
        # prepare_model reads the predicate once, when build_step shards the copy
        with mock.patch.object(distributed, "_normalises_in_its_unit", lambda norm, own=own: not own):
            plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format)  # as a user's model
            cases[f"{way}: train-bf16 step ({'first' if n in (0, 1) else 'second'})"] = build_step(
                "train-bf16", plain, None, x.contiguous(), torch.device("cpu"), env)
    return cases


def adamw_cases(model: torch.nn.Module, x: torch.Tensor) -> dict:
    cases = {}
    for way, fused in (("fused", True), ("loop", False)):
        with mock.patch("bench.throughput.fused_adamw", lambda params, fused=fused: fused):
            cases[f"{way}: train step"] = train_step(copy.deepcopy(model).train(), x, nullcontext())
        params = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
        for p in params:
            p.grad = torch.randn_like(p)
        cases[f"{way}: optimizer step ({len(params)} tensors)"] = torch.optim.AdamW(params, fused=fused).step
    return cases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--change", choices=("neighbours", "adamw", "slots", "adjoint", "linear", "bn-units"), required=True)
    p.add_argument("--model", default="stvit_small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    model = stvit.create_model(args.model).to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    cases = {"neighbours": neighbours_cases, "adamw": adamw_cases, "slots": slots_cases,
             "adjoint": lambda m, x: training_cases(m, x, "_compiled_with_grad", ("adjoint", "autograd")),
             "linear": lambda m, x: training_cases(m, x, "_linear_for_training", ("linear", "conv")),
             "bn-units": bn_units_cases,
             }[args.change](model, x)
    for call in cases.values():  # warm up
        call()
        call()
    timings = time_interleaved(list(cases.values()), torch.device("cpu"), runs=args.rounds)
    for name, t in sorted(zip(cases, timings), key=lambda kv: kv[0].split(": ")[1]):
        print(f"{name:46s} {t.median_s * 1e3:9.2f} ms  (fastest {t.min_s * 1e3:.2f}, slowest {t.max_s * 1e3:.2f})")


if __name__ == "__main__":
    main()
