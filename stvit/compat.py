"""What differs between the torch releases stvit runs on, each difference in one place.

The floor is torch 2.6 (``pyproject.toml``: FSDP2's ``fully_shard`` is public from 2.6 on); the
releases tested are in the README's table, each by ``bash scripts/torch_matrix.sh VERSION``. Every
entry here names the releases it is for and why; where it can, it looks for the feature itself
rather than comparing version numbers, so it does nothing on a torch that has what is needed. The
rest of the project calls these and never tests a torch version itself.
"""

from __future__ import annotations

import contextlib
import functools
import re

import torch
import torch.nn.functional as F
from torch.utils import _python_dispatch

# (major, minor) of the running torch, for the shims that a release fixed without a feature to look for.
TORCH = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())

# torch._dynamo.config, by the names of current torch → the names torch 2.6 has. The names changed
# after 2.6; the releases since (2.11, 2.13, 2.15 checked) still take the old ones as aliases.
_DYNAMO_OLD_NAMES = {
    "recompile_limit": "cache_size_limit",
    "fail_on_recompile_limit_hit": "fail_on_cache_limit_hit",
}


def _dynamo_name(name: str) -> str:
    """``name`` of ``torch._dynamo.config`` as this torch spells it."""
    import torch._dynamo.config as config

    if name in _DYNAMO_OLD_NAMES and not hasattr(config, name):
        return _DYNAMO_OLD_NAMES[name]
    return name


def dynamo_config(**settings) -> contextlib.AbstractContextManager:
    """``torch._dynamo.config.patch(**settings)`` under today's names (``recompile_limit=64``), on
    every supported torch."""
    import torch._dynamo.config as config

    return config.patch(**{_dynamo_name(name): value for name, value in settings.items()})


def raise_recompile_limit(graphs: int) -> None:
    """Let dynamo keep at least ``graphs`` graphs per code object (a process-wide setting)."""
    import torch._dynamo.config as config

    name = _dynamo_name("recompile_limit")
    setattr(config, name, max(getattr(config, name), graphs))


# FSDP2 over CPU processes (gloo) trains correctly from torch 2.9 on. Measured with two processes
# against one (scripts/torch_matrix.sh, and one small model on two gloo processes, its weights after
# three steps): torch 2.6 stops, 2.7 and 2.8 train wrongly and silently, 2.9, 2.10 and 2.13 match.
# Why, read in torch's source: torch.cpu.Stream lacks the record_event and wait_event that FSDP2 calls
# (added in 2.7, pytorch/pytorch#145935); FSDP2's copy of the gathered parameters into their buffer
# counts, on a CPU, as an in-place change of tensors the backward still needs, so the backward stops
# (hidden from 2.7 on, pytorch/pytorch#133044); and gloo's reduce-scatter takes ReduceOp.AVG, which
# FSDP2 asks for, as a sum, so each process's gradient comes out multiplied by their number (up to
# 2.8). FSDP2 on GPUs has none of these (CUDA streams, CUDA's copy, NCCL's average), as read in torch
# 2.6's source; no GPU ran it here.
FSDP2_ON_CPU = (2, 9)


def fsdp2_cpu_problem() -> str | None:
    """Why FSDP2 cannot shard a model over CPU processes under this torch; None where it can."""
    if TORCH >= FSDP2_ON_CPU:
        return None
    return (f"FSDP2 on CPU processes needs torch {FSDP2_ON_CPU[0]}.{FSDP2_ON_CPU[1]} or newer; this is torch "
            f"{torch.__version__}, whose FSDP2 fails on a CPU or whose gloo reduce-scatter sums where FSDP2 "
            f"averages (stvit/compat.py says more). With this torch, train on GPUs, or on a CPU in one process "
            f"without torchrun (python -m train --precision fp32)")


# Whether torch.export is tracing (also for the dynamo ONNX exporter): True then, False eagerly and
# under torch.compile; STViT writes its padding in an export-safe form then, and takes its compiled
# fast paths only when False. Read from torch's own flag, not through torch.compiler.is_exporting():
# torch 2.11's dynamo folds that call to True under plain torch.compile too (it folds it like
# is_compiling; torch 2.13 reads the flag), which silently put compiled models on their export
# paths. Where torch has no flag (before pytorch/pytorch#142425, December 2024), the function if
# any, else False: such a torch runs the models as before (and exports them for the traced size's
# padding only).
_IS_EXPORTING_FUNCTION = getattr(torch.compiler, "is_exporting", None)


def is_exporting() -> bool:
    """True while torch.export traces; False eagerly and under torch.compile, on every torch."""
    if hasattr(torch.compiler, "_is_exporting_flag"):
        return bool(torch.compiler._is_exporting_flag)
    return _IS_EXPORTING_FUNCTION is not None and _IS_EXPORTING_FUNCTION()


@functools.cache
def onednn_conv_gelu_works() -> bool:
    """Whether this torch build runs oneDNN's convolution with GELU as its post-op
    (``torch.ops.mkldnn._convolution_pointwise``, the private kernel inductor's convolution fusion
    calls; x86 builds have it), checked once on a tiny fixed input against conv then GELU. Fixed, not
    random, inputs (float32 on the CPU whatever the defaults): the check must not move the caller's
    random number stream."""
    x = torch.linspace(-2, 2, 36, dtype=torch.float32, device="cpu").view(1, 4, 3, 3)
    w = torch.linspace(-1, 1, 16, dtype=torch.float32, device="cpu").view(4, 4, 1, 1)
    try:
        fused = torch.ops.mkldnn._convolution_pointwise(x, w, None, [0, 0], [1, 1], [1, 1], 1, "gelu", [], "none")
    except (AttributeError, RuntimeError, TypeError):
        return False
    return torch.allclose(fused, F.gelu(F.conv2d(x, w)), atol=1e-5)


# is_in_torch_dispatch_mode lives in a private module (there since torch 2.1): looked for, not assumed.
_is_in_dispatch_mode = getattr(_python_dispatch, "is_in_torch_dispatch_mode", None)


def in_dispatch_mode() -> bool:
    """Whether a TorchDispatchMode is active (``FlopCounterMode``, ``FakeTensorMode``, ...): such a
    mode knows torch's public ops, not a private fused kernel."""
    return _is_in_dispatch_mode is not None and _is_in_dispatch_mode()


def is_shape_guard_failure(error: Exception) -> bool:
    """Whether ``error`` is an exported program refusing an input's shape: from torch 2.9 on an
    ``AssertionError("Guard failed: ...")``, before it a ``RuntimeError("Expected input at
    *args[0].shape[2] to be >= 33, but got 32")`` (seen on 2.6 and 2.8)."""
    return isinstance(error, AssertionError) or (
        isinstance(error, RuntimeError) and str(error).startswith("Expected input at "))


# python -m stvit.export (torch.export with a dynamic batch and sizes, then the dynamo ONNX exporter):
# every family exports and matches eager from torch 2.8 on (tests/test_export.py through
# scripts/torch_matrix.sh, 2.8 to 2.15). Before: 2.7's dynamo cannot trace a set method inside
# torch.export (`symmetric_difference`, met tracing STViT; the tests stopped there); 2.6 rejects an
# unbounded dynamic batch (a guard `batch != 2**63 - 1`), and with a bounded one still fails on
# STViT's super-token padding arithmetic (a runtime assertion) and to convert SoT to ONNX.
EXPORT = (2, 8)


def export_problem() -> str | None:
    """Why ``python -m stvit.export`` cannot export the zoo under this torch; None where it can."""
    if TORCH >= EXPORT:
        return None
    return (f"exporting needs torch {EXPORT[0]}.{EXPORT[1]} or newer (torch.export with dynamic sizes, the "
            f"dynamo ONNX exporter); this is torch {torch.__version__}, whose exporter fails on these models "
            f"(stvit/compat.py says how). Export in another environment with torch {EXPORT[0]}.{EXPORT[1]} or "
            f"newer: the ONNX file it writes runs wherever onnxruntime does")


# torch.compile of a training graph: the backward's convolutions. From the release that brought
# inductor a lowering of its own for ``convolution_backward`` (pytorch/pytorch#178945; 2.13 has it),
# a backward graph — which holds ``convolution_backward`` but no forward ``convolution`` — is not
# given inductor's channels-last layout optimisation (its test counts forward convolutions only;
# pytorch/pytorch#188236 and #191306 propose counting the backward ones). The lowering then lays the
# convolution's input and output gradient out in the stride order of the *weight* gradient: for a
# depthwise 3×3 weight (C, 1, 3, 3) that is (N, H, C, W) order, neither channels-last nor contiguous.
# Both are copied into it and oneDNN's kernel runs slower on it: STViT-S's stage 1–2 blocks, forward +
# backward, took 16–26 % longer compiled than with the layout optimisation forced (bench/RESULTS.md).
# Forcing it is what the CPU forward graphs get anyway; the block gradients then come out
# channels-last, as eagerly on these channels-last models.
def _backward_conv_loses_layout() -> bool:
    try:
        from torch._inductor.kernel import conv
    except ImportError:  # a torch built without inductor: nothing to configure
        return False
    return hasattr(conv, "convolution_backward_lowering")


def training_compile_options(backend: str) -> dict | None:
    """``options`` for ``torch.compile(backend=backend)`` of a block that trains: inductor's layout
    optimisation forced on the torch releases above (None for other backends, or where not needed)."""
    if backend == "inductor" and _backward_conv_loses_layout():
        return {"force_layout_optimization": True}
    return None
