"""STViT's (and LVT's) convolutions on a CPU: where their time goes, and rewrites timed against oneDNN's
kernels (issue #19; of the rewrites the GELU post-op and LVT's padded map are kept).

``census``: every convolution of each model (STViT-S and ConvNeXt-T by default), eager bf16 in
channels-last as the compiled model runs them, timed alone at its input shape; totals by kind
(depthwise, 1×1, dense k×k).

``floor``: for each model, its compiled bf16 forward (``stvit.optimize``, as ``bench throughput``'s
``compiled-bf16``) against the same model's convolutions and Linear layers alone: every one called
once on an input of its shape in the model, bf16, in the layout the compiled model gives it, both
eagerly and compiled as ``optimize`` compiles (weight freezing: prepacked oneDNN weights), all timed
in the same interleaved rounds. What is left is the rest of the forward (norms, attention products and
softmax, association, element-wise work). STViT-S's convolutions alone against ConvNeXt-T's whole
forward is the question of issue #19's compiled-bf16 column.

``depthwise``: the residual depthwise 3×3 conv, compiled as ``stvit.optimize`` compiles (weight
freezing, bf16), by oneDNN against nine shifted multiply-adds that inductor fuses into one loop
(the taps stored tap-major, so each loads contiguous channels).

``pointwise``: the 1×1 convs, eager forward + backward in fp32 and under bf16 autocast, as
``nn.Conv2d`` against ``F.linear`` on the channels-last map's NHWC view (how ConvNeXt runs its MLP).

``linear-model``: the whole STViT-S compiled bf16 by ``stvit.optimize``, its 1×1 convs as they are
against ``F.linear`` on the NHWC view.

``dilated``: LVT's RASA query conv (a depthwise 3×3 at dilation and padding 1, 3, 5, shared kernel),
fp32: each rate's conv with its padding inside the conv (the only way before) against the map padded
beforehand; then the whole ``lvt_cls`` eager and compiled by ``stvit.optimize`` with each form (now:
the map padded beforehand from rate ``PAD_EXPLICITLY_FROM_RATE`` on, on a CPU; kept). Run it also
as an AVX2-only CPU computes it (``ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
ATEN_CPU_CAPABILITY=avx2``, bench/RESULTS.md), where oneDNN falls back to im2col + GEMM for padding 5.

``gelu-postop``: the whole STViT-S eager fp32 (eval, no_grad) as a user runs it, each conv -> GELU
(the ConvFFN's fc1 and the stem's) as one oneDNN convolution with GELU as its post-op
(``stvit.models.stvit.conv_gelu``, kept) against the two ops it replaced.

Batch 8, 2 threads, the bench's allocator setting; each pair timed in the same interleaved rounds.

    python scripts/conv_forms_ab.py depthwise|pointwise|linear-model|dilated|gelu-postop [--rounds 9]
    PYTHONPATH=tests/site python scripts/conv_forms_ab.py census|floor [--models stvit_small timm:convnext_tiny]
"""

from __future__ import annotations

import argparse
import copy
import types
from collections import Counter
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor import config as inductor_config

import stvit
from bench.common import create_model, time_interleaved, tune_cpu_allocator
from stvit.models import lvt as lvt_family
from stvit.models import stvit as stvit_family
from stvit.optimize import CPU_INFERENCE_OPTIONS, cpu_inference_options, optimize

CPU = torch.device("cpu")


def stencil_depthwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a depthwise 3×3 conv with padding 1, as nine shifted multiply-adds."""
    C, H, W = x.shape[1:]
    taps = conv.weight.reshape(C, 9).t().contiguous().to(x.dtype)  # (9, C): contiguous per tap
    padded = F.pad(x, (1, 1, 1, 1))
    out = conv.bias.to(x.dtype).view(1, C, 1, 1)
    for t in range(9):
        i, j = divmod(t, 3)
        out = out + taps[t].view(1, C, 1, 1) * padded[:, :, i:i + H, j:j + W]
    return out


class Stencil(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stencil_depthwise(self.conv, x)


def depthwise(rounds: int) -> None:
    def compiled(module: nn.Module):
        fn = torch.compile(module.eval().requires_grad_(False), dynamic=False)

        def call(x):
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), inductor_config.patch(CPU_INFERENCE_OPTIONS):
                return fn(x)
        return call

    for C, H in ((64, 56), (256, 56), (512, 28), (1280, 14)):  # the pos_embed and ConvFFN ones of stage 1-3
        conv = nn.Conv2d(C, C, 3, 1, 1, groups=C)
        x = torch.randn(8, C, H, H).to(torch.bfloat16, memory_format=torch.channels_last)
        onednn, stencil = compiled(conv), compiled(Stencil(conv))
        diff = (onednn(x).float() - stencil(x).float()).abs().max().item()
        for _ in range(2):
            onednn(x), stencil(x)
        a, b = time_interleaved([lambda: onednn(x), lambda: stencil(x)], CPU, runs=rounds)
        print(f"depthwise {C:5d} ch @ {H:2d}²  oneDNN {a.median_s * 1e3:6.2f} ms  stencil {b.median_s * 1e3:6.2f} ms"
              f"  ratio {b.median_s / a.median_s:.2f}  (max diff {diff:.1e}, bf16)")


def pointwise(rounds: int) -> None:
    shapes = ((64, 256, 56), (256, 64, 56), (128, 512, 28), (512, 128, 28), (320, 960, 14), (320, 1280, 14),
              (1280, 320, 14), (512, 2048, 7))  # (in, out, side): STViT-S's MLP and qkv convs per stage
    for dtype in (torch.float32, torch.bfloat16):
        for cin, cout, side in shapes:
            conv = nn.Conv2d(cin, cout, 1).to(memory_format=torch.channels_last)
            x = torch.randn(8, cin, side, side).to(memory_format=torch.channels_last).requires_grad_()
            grad = torch.randn(8, cout, side, side).to(memory_format=torch.channels_last)

            def step(as_linear: bool):
                x.grad = None
                conv.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
                    if as_linear:
                        y = F.linear(x.permute(0, 2, 3, 1), conv.weight.view(cout, cin), conv.bias).permute(0, 3, 1, 2)
                    else:
                        y = conv(x)
                y.backward(grad)

            for _ in range(2):
                step(False), step(True)
            a, b = time_interleaved([lambda: step(False), lambda: step(True)], CPU, runs=rounds)
            print(f"pointwise {str(dtype)[6:]:8s} {cin:4d}->{cout:4d} @ {side:2d}²  conv {a.median_s * 1e3:6.2f} ms  "
                  f"linear {b.median_s * 1e3:6.2f} ms  ratio {b.median_s / a.median_s:.2f}")


def prepared(name: str) -> nn.Module:
    """The model in eval mode, folded as ``optimize()`` folds it (BatchNorms) where the family can."""
    _, model = create_model(name)
    model.eval()
    if hasattr(model, "prepare_inference"):
        model.prepare_inference()
    return model


def library_layers(model: nn.Module, x: torch.Tensor, types: tuple = (nn.Conv2d, nn.Linear)) -> list:
    """Every call of a layer of ``types`` in ``model(x)``, in order, as (a bf16 copy of the layer, a
    fresh bf16 input of the shape it got), channels-last for the convs as the compiled model runs them."""
    seen: list = []
    hooks = [m.register_forward_hook(lambda layer, inputs, _out: seen.append((layer, inputs[0].shape)))
             for m in model.modules() if isinstance(m, types)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()  # before the copies below, which would carry the hooks with them
    calls = []
    for layer, shape in seen:
        layer, inp = copy.deepcopy(layer).to(torch.bfloat16), torch.randn(shape, dtype=torch.bfloat16)
        if isinstance(layer, nn.Conv2d):
            layer, inp = layer.to(memory_format=torch.channels_last), inp.contiguous(memory_format=torch.channels_last)
        calls.append((layer, inp))
    return calls


def census(rounds: int, models: list[str]) -> None:
    for name in models:
        # One timed call per distinct convolution (channels, kernel, stride, groups, input size), and
        # how many times the model calls it.
        distinct: dict = {}
        for conv, x in library_layers(prepared(name), torch.randn(8, 3, 224, 224), (nn.Conv2d,)):
            key = (conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.groups, x.shape[-1])
            distinct.setdefault(key, [conv, x, 0])[2] += 1
        calls = [lambda conv=conv, x=x: conv(x) for conv, x, _ in distinct.values()]
        with torch.no_grad():
            for call in calls:
                call(), call()
            timings = time_interleaved(calls, CPU, runs=rounds)
        kinds: Counter = Counter()
        print(f"{name}: every convolution, bf16, batch 8, ms")
        for (key, (_, _, n)), t in zip(distinct.items(), timings):
            cin, cout, k, stride, groups, side = key
            kind = "depthwise" if groups == cin == cout and groups > 1 else ("1x1" if k == 1 else f"dense {k}x{k}")
            kinds[kind] += n * t.median_s * 1e3
            gflops = 2 * 8 * (side // stride) ** 2 * cout * cin // groups * k * k / t.median_s / 1e9
            print(f"  {kind:10s} {cin:5d}->{cout:5d} stride {stride} @ {side:3d}²  x{n:2d}  "
                  f"{t.median_s * 1e3:6.3f} each  {n * t.median_s * 1e3:6.2f} in all  {gflops:6.0f} GFLOP/s")
        print("  by kind: " + ", ".join(f"{k} {v:.1f}" for k, v in kinds.items())
              + f"; all {sum(kinds.values()):.1f}")


class LayersAlone(nn.Module):
    """The layers of :func:`library_layers`, each called on its own input (inputs, not buffers: weight
    freezing would fold a layer of constants away)."""

    def __init__(self, layers: list):
        super().__init__()
        self.layers = nn.ModuleList(layer for layer, _ in layers)

    def forward(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        return [layer(x) for layer, x in zip(self.layers, xs)]


def floor(rounds: int, models: list[str]) -> None:
    x = torch.randn(8, 3, 224, 224)
    cases, labels = [], []
    for name in models:
        model = prepared(name)
        layers = library_layers(model, x)
        inputs = [inp for _, inp in layers]
        alone = LayersAlone(layers).requires_grad_(False)
        with inductor_config.patch(cpu_inference_options(model)):  # as optimize() compiles the model
            compiled = torch.compile(alone, dynamic=False)
            with torch.no_grad():
                compiled(*inputs)  # compiled here, under the options
        fast = optimize(copy.deepcopy(model), torch.bfloat16)
        cases += [lambda fast=fast: fast(x), lambda alone=alone, inputs=inputs: alone(*inputs),
                  lambda compiled=compiled, inputs=inputs: compiled(*inputs)]
        labels += [f"{name}: compiled bf16 forward", f"{name}: its {len(layers)} convolutions and Linear layers, eager",
                   f"{name}: the same layers compiled (prepacked weights)"]
    with torch.no_grad():
        for case in cases:
            case(), case()
        timings = time_interleaved(cases, CPU, runs=rounds)
    print(f"batch 8, 224², median of {rounds} interleaved rounds, ms (fastest-slowest)")
    for label, t in zip(labels, timings):
        print(f"  {label:72s} {t.median_s * 1e3:7.1f} ({t.min_s * 1e3:.1f}-{t.max_s * 1e3:.1f})")
    for name, whole, compiled in zip(models, timings[::3], timings[2::3]):
        print(f"  {name}: the rest of the forward (compiled forward - compiled layers) "
              f"{(whole.median_s - compiled.median_s) * 1e3:.1f}")


class PointwiseAsLinear(nn.Module):
    """A 1×1 conv as ``F.linear`` on the channels-last map's NHWC view (ConvNeXt's MLP layout)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().flatten(1), requires_grad=False)
        self.bias = nn.Parameter(conv.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.permute(0, 2, 3, 1), self.weight, self.bias).permute(0, 3, 1, 2)


def _compare(label_a: str, a, label_b: str, b, x: torch.Tensor, rounds: int) -> None:
    with torch.no_grad():
        ya, yb = a(x), b(x)
        for _ in range(2):
            a(x), b(x)
        ta, tb = time_interleaved([lambda: a(x), lambda: b(x)], CPU, runs=rounds)
    print(f"{label_a} {ta.median_s * 1e3:.1f} ms ({ta.min_s * 1e3:.1f}-{ta.max_s * 1e3:.1f}), {label_b} "
          f"{tb.median_s * 1e3:.1f} ms ({tb.min_s * 1e3:.1f}-{tb.max_s * 1e3:.1f}); max |difference| "
          f"{(ya.float() - yb.float()).abs().max().item():.1e} of max |logit| {ya.abs().max().item():.2f}")


def linear_model(rounds: int) -> None:
    model = stvit.create_model("stvit_small").eval()
    rewritten = copy.deepcopy(model)
    rewritten.prepare_inference()  # optimize() folds the BatchNorms into the convs before they are swapped
    swapped = 0
    for parent in list(rewritten.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d) and child.kernel_size == (1, 1) and child.groups == 1 and child.stride == (1, 1):
                setattr(parent, name, PointwiseAsLinear(child))
                swapped += 1
    print(f"STViT-S compiled bf16, batch 8: {swapped} 1x1 convs as F.linear")
    _compare("convs", stvit.optimize(model, "bf16"), "linear", stvit.optimize(rewritten, "bf16", fold=False),
             torch.randn(8, 3, 224, 224), rounds)


def dilated(rounds: int) -> None:
    for C, H in ((64, 28), (160, 14), (256, 7)):  # lvt_cls's RASA stages
        x = torch.randn(8, C, H, H).to(memory_format=torch.channels_last)
        weight = torch.randn(C, 1, 3, 3)
        calls = []
        for rate in (1, 3, 5):
            calls += [lambda r=rate: F.conv2d(x, weight, None, 1, r, r, C),
                      lambda r=rate: F.conv2d(F.pad(x, (r, r, r, r)), weight, None, 1, 0, r, C)]
        with torch.no_grad():
            for call in calls:
                call(), call()
            timings = time_interleaved(calls, CPU, runs=rounds)
        for rate, (inside, before) in zip((1, 3, 5), zip(timings[::2], timings[1::2])):
            print(f"dilated depthwise {C:4d} ch @ {H:2d}² rate {rate}  padding in the conv "
                  f"{inside.median_s * 1e3:6.3f} ms  map padded before {before.median_s * 1e3:6.3f} ms")
    model = stvit.create_model("lvt_cls").eval()
    before = copy.deepcopy(model)
    for module in before.modules():
        if isinstance(module, lvt_family.DilatedQueryConv):
            module.conv = types.MethodType(_padding_in_the_conv, module)
    x = torch.randn(8, 3, 224, 224)
    print("lvt_cls fp32, batch 8: eager")
    _compare("padding in the conv", before, "map padded from rate 5 (now)", model, x, rounds)
    print("lvt_cls fp32, batch 8: compiled (stvit.optimize)")
    _compare("padding in the conv", stvit.optimize(before), "map padded from rate 5 (now)", stvit.optimize(model),
             x, rounds)


def _padding_in_the_conv(self, q: torch.Tensor, rate: int) -> torch.Tensor:
    return F.conv2d(q, self.weight, self.bias, padding=rate, dilation=rate, groups=self.dim)


def gelu_postop(rounds: int) -> None:
    model = stvit.create_model("stvit_small").eval()

    def unfused(x: torch.Tensor) -> torch.Tensor:
        with mock.patch.object(stvit_family.compat, "onednn_conv_gelu_works", lambda: False):
            return model(x)

    print("STViT-S eager fp32, eval, no_grad, batch 8 (NCHW input, as a user calls it)")
    _compare("conv then GELU", unfused, "conv with GELU post-op (now)", model, torch.randn(8, 3, 224, 224), rounds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("census", "floor", "depthwise", "pointwise", "linear-model", "dilated", "gelu-postop"))
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", nargs="+", default=["stvit_small", "timm:convnext_tiny"], help="for census and floor")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    if args.what in ("census", "floor"):
        {"census": census, "floor": floor}[args.what](args.rounds, args.models)
    else:
        {"depthwise": depthwise, "pointwise": pointwise, "linear-model": linear_model, "dilated": dilated,
         "gelu-postop": gelu_postop}[args.what](args.rounds)


if __name__ == "__main__":
    main()
