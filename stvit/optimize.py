"""Inference fast path: ``optimize(model)`` folds what eval mode makes foldable, picks the layout,
compiles, and on CUDA replays CUDA graphs. It works on any model of the zoo through the contract:
the family's ``prepare_inference()`` does the folding (STViT folds its BatchNorms and residual
depthwise identities), everything else here is generic.

The BatchNorm algebra the families use lives here: eval-mode BatchNorm is a per-channel affine
map y = s·x + t, s = γ/√(σ²+ε), t = β − μ·s, so it merges exactly into an adjacent linear map
(:func:`fold_conv_bn` backward into a conv, :func:`fold_bn_conv` forward into an unpadded conv).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import nn

from . import precision


# ---- BatchNorm folding --------------------------------------------------------------------------

def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) with bn(x) = s·x + t per channel in eval mode, computed in float64."""
    if bn.running_mean is None:
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    var = bn.running_var.double()
    s = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.double()
    t = -bn.running_mean.double() * s
    if bn.bias is not None:
        t = t + bn.bias.double()
    return s, t


def _new_conv_like(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    out = copy.deepcopy(conv)
    dtype = conv.weight.dtype
    out.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    out.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    return out


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv equal to ``bn(conv(x))`` with ``bn`` in eval mode (any kernel, padding, groups)."""
    s, t = _bn_affine(bn)
    w = conv.weight.double() * s.view(-1, 1, 1, 1)
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(s)
    return _new_conv_like(conv, w, s * b + t)


def fold_bn_conv(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> nn.Conv2d:
    """A conv equal to ``conv(bn(x))`` with ``bn`` in eval mode; only for unpadded, ungrouped convs,
    where every output sees no padding and the per-channel shift moves exactly into the bias."""
    if conv.groups != 1 or any(p != 0 for p in conv.padding) or conv.padding_mode != "zeros":
        raise ValueError("folding a BatchNorm forward is exact only into an unpadded, ungrouped conv")
    s, t = _bn_affine(bn)
    w = conv.weight.double()
    b = conv.bias.double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return _new_conv_like(conv, w * s.view(1, -1, 1, 1), b + w.sum((2, 3)) @ t)


# ---- the optimized inference model ---------------------------------------------------------------

# How optimize() has inductor compile for a CPU:
# - freezing: weights become constants, so inductor prepacks them for oneDNN, fuses bias/GELU/residual
#   adds into the convolutions and folds the autocast weight casts;
# - cpp_wrapper: the generated code calls its kernels (about 260 per STViT-S forward, with some 180
#   buffer allocations) from C++, not from Python: 2.3 ms of STViT-S's 33 ms at batch 1 in bf16
#   (bench/RESULTS.md).
# A family adds its own in ``inference_compile_options`` (the model contract; LVT's).
CPU_INFERENCE_OPTIONS = {"freezing": True, "cpp_wrapper": True}


def cpu_inference_options(model: nn.Module) -> dict:
    """Inductor's options for compiling ``model`` for CPU inference: CPU_INFERENCE_OPTIONS and the
    model's ``inference_compile_options``, which win."""
    return {**CPU_INFERENCE_OPTIONS, **getattr(model, "inference_compile_options", {})}


class OptimizedModel(nn.Module):
    """What :func:`optimize` returns: a frozen inference copy of a model, called like the original.

    Inputs may be any float dtype and layout; they are converted to the model's device and
    channels-last layout. Outputs (logits, or the list of stage maps of a ``features_only``
    model) are float32 whatever the compute dtype, and are fresh tensors (never a CUDA graph's
    reused output buffer).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, compiled: bool, cuda_graphs: bool,
                 folded: list[str]):
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.compiled = compiled
        self.cuda_graphs = cuda_graphs
        self.folded = folded  # what the family's prepare_inference() folded
        self.device = next(model.parameters()).device
        # Set past nn.Module's bookkeeping: the compiled wrapper is not a second submodule (it would
        # duplicate every state-dict key); it only wraps self.model.
        object.__setattr__(self, "_run", _compile(model, cuda_graphs) if compiled else model)
        # CPU: inductor's options for inference (CPU_INFERENCE_OPTIONS and the family's), on whenever a call may
        # (re)compile; torch.compile(options=...) does not reach freezing, so patch.
        self._cpu_inductor = compiled and not cuda_graphs and self.device.type == "cpu"
        super().train(False)

    def forward(self, x: torch.Tensor):
        if hasattr(self.model, "check_input"):
            self.model.check_input(x)  # clear errors before tracing/compiling, not from deep inside
        x = x.to(self.device, torch.float32).contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), precision.autocast(self.device, self.dtype):
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # each call is a new step: earlier outputs are ours
            if self._cpu_inductor:
                from torch._inductor import config as inductor_config  # imported only when compiling

                with inductor_config.patch(cpu_inference_options(self.model)):
                    out = self._run(x)
            else:
                out = self._run(x)
        # Clone: CUDA graph replays overwrite their output buffers; float: one output dtype for callers.
        if isinstance(out, (list, tuple)):
            return [o.float().clone() if self.cuda_graphs else o.float() for o in out]
        return out.float().clone() if self.cuda_graphs else out.float()

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError("an optimized model is for inference only (BatchNorm is folded, weights are "
                               "frozen); train the original model and call stvit.optimize() again")
        return super().train(False)

    def extra_repr(self) -> str:
        return (f"dtype={self.dtype}, compiled={self.compiled}, cuda_graphs={self.cuda_graphs}, "
                f"folded={len(self.folded)}")


def _compile(model: nn.Module, cuda_graphs: bool) -> Callable:
    # dynamic=False: every new input shape gets its own static-shape compilation (the fastest
    # kernels, never a kernel specialised for another shape); past torch._dynamo's recompile
    # limit the model runs eagerly, still correct. "reduce-overhead" records one CUDA graph per shape.
    if cuda_graphs:
        return torch.compile(model, mode="reduce-overhead", dynamic=False)
    return torch.compile(model, dynamic=False)


def optimize(model: nn.Module, dtype: torch.dtype | str = torch.float32, *, compile: bool = True,
             cuda_graphs: bool | None = None, fold: bool = True) -> OptimizedModel:
    """A fast inference copy of ``model`` (the caller's model is not modified).

    - eval mode, no gradients; ``fold``: the family's exact eval-mode folding (``prepare_inference``);
    - channels-last weights and inputs (for the convolutions: several times faster on CPU with
      oneDNN, and the tensor-core layout of cuDNN);
    - ``dtype`` (a dtype or a precision name of :mod:`stvit.precision`: ``fp32``, ``bf16``, ``auto``):
      bf16 runs matmuls and convolutions in bf16 autocast, softmax and norms in float32; outputs are
      float32 either way. A CPU without native bf16 warns (:class:`stvit.precision.EmulatedBF16Warning`);
    - ``compile``: ``torch.compile`` with inductor (on CPU with weight freezing); a new input
      shape recompiles;
    - ``cuda_graphs`` (default: on when compiling on a CUDA device): the compiled model is replayed
      as CUDA graphs ("reduce-overhead"), one per input shape, removing per-kernel launch costs.

    Outputs match the eager float32 model within float32 rounding (bf16: about 1e-2 relative).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize() takes an nn.Module, got {type(model).__name__}")
    if isinstance(model, OptimizedModel):
        raise ValueError("the model is already optimized; pass the original model")
    params = list(model.parameters())
    if not params:
        raise ValueError("the model has no parameters; expected a model of the zoo (stvit.create_model)")
    device = params[0].device
    dtype = precision.resolve(dtype, device)
    if cuda_graphs is None:
        cuda_graphs = compile and device.type == "cuda"
    if cuda_graphs and (device.type != "cuda" or not compile):
        raise ValueError("cuda_graphs=True needs a model on a CUDA device and compile=True")

    model = copy.deepcopy(model).eval()
    model.requires_grad_(False)
    folded = model.prepare_inference() if fold and hasattr(model, "prepare_inference") else []
    model = model.to(memory_format=torch.channels_last)
    if params[0].dtype != torch.float32:
        warnings.warn(f"the model's parameters are {params[0].dtype}; optimize() computes in float32 "
                      f"(or bf16 autocast), converting a copy", stacklevel=2)
        model = model.float()
    return OptimizedModel(model, dtype, compile, cuda_graphs, folded)
