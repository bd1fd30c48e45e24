"""Two rewrites of STViT's convolutions, timed against oneDNN's kernels (issue #19; neither is kept).

``depthwise``: the residual depthwise 3×3 conv, compiled as ``stvit.optimize`` compiles (weight
freezing, bf16), by oneDNN against nine shifted multiply-adds that inductor fuses into one loop
(the taps stored tap-major, so each loads contiguous channels).

``pointwise``: the 1×1 convs, eager forward + backward in fp32 and under bf16 autocast, as
``nn.Conv2d`` against ``F.linear`` on the channels-last map's NHWC view (how ConvNeXt runs its MLP).

Batch 8, 2 threads, the bench's allocator setting; each pair timed in the same interleaved rounds.

    python scripts/conv_forms_ab.py depthwise|pointwise [--rounds 9]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor import config as inductor_config

from bench.common import time_interleaved, tune_cpu_allocator
from stvit.optimize import CPU_INFERENCE_OPTIONS

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("depthwise", "pointwise"))
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    (depthwise if args.what == "depthwise" else pointwise)(args.rounds)


if __name__ == "__main__":
    main()
