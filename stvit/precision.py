"""One notion of numeric precision for the whole project: ``train --precision``, ``stvit.optimize(dtype=...)``,
the bench modes and ``python -m stvit.predict`` all resolve a name here.

* ``fp32``: float32 throughout.
* ``bf16``: matrix products and convolutions in bfloat16 (autocast, or FSDP2's mixed precision in
  training); softmax, norms, losses and the master weights stay float32.
* ``auto``: bf16 on a CUDA GPU, fp32 on a CPU.

On a CPU without native bf16 instructions (no AVX512-BF16 or AMX) bf16 is emulated and many times
slower than fp32 (the issue that asked for this warning reports STViT-S at 0.9 img/s against 15 img/s
in fp32), so asking for it there warns.
"""

from __future__ import annotations

import functools
import warnings
from contextlib import AbstractContextManager
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# fp16 is no precision of ours (it needs loss scaling; bf16 does not), only a name for what others'
# code runs: the authors' AMP is fp16 autocast on CUDA (``bench throughput``'s authors-amp modes).
NAMES = {**DTYPES, "fp16": torch.float16}


class EmulatedBF16Warning(UserWarning):
    """bf16 was asked for on a CPU that emulates it."""


def resolve(precision: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """The compute dtype a precision name (or dtype) means on ``device``; warns when bf16 is emulated."""
    device = torch.device(device)
    if isinstance(precision, torch.dtype):
        dtype = precision
    elif precision == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif precision in DTYPES:
        dtype = DTYPES[precision]
    else:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype {dtype} is not supported; use torch.float32 or torch.bfloat16 (fp32 / bf16)")
    if dtype == torch.bfloat16 and not native_bf16(device):
        warnings.warn(f"bf16 on this {device.type} is emulated (no native bf16 instructions: "
                      f"{_bf16_detail(device)}), typically more than 10x slower than fp32; use fp32 here",
                      EmulatedBF16Warning, stacklevel=2)
    return dtype


def name_of(dtype: torch.dtype) -> str:
    return {v: k for k, v in NAMES.items()}[dtype]


def autocast(device: torch.device | str, dtype: torch.dtype) -> AbstractContextManager:
    """Autocast to ``dtype`` (bf16, or fp16 for the authors' AMP), a no-op context for float32."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively (CUDA: compute capability 8.0+; CPU: AVX512-BF16 or AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(_cpu_bf16_flags())
    return True


@functools.lru_cache(maxsize=1)
def _cpu_bf16_flags() -> tuple[str, ...]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume emulated rather than promise speed
        return ()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return tuple(f for f in ("avx512_bf16", "amx_bf16") if f in flags)


def _bf16_detail(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} predates compute capability 8.0"
    return "the CPU flags list neither avx512_bf16 nor amx_bf16"
