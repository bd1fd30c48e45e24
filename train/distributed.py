"""Process group, device mesh and FSDP2 wrapping.

* Launched by ``torchrun`` (``WORLD_SIZE`` set): a process group (NCCL on GPU, gloo on CPU), one
  device per process, the model sharded with FSDP2 — also when ``--nproc_per_node 1``.
* ``python -m train`` on a machine with a GPU: a one-process group (in-memory store, no network)
  and the same FSDP2 path, so bf16 mixed precision comes from the same policy.
* ``python -m train`` on a CPU: no process group, the plain module. FSDP2 has nothing to shard
  there and its per-block hooks cost about 30 % of the tiny demo model's step time.

Collective helpers below are no-ops without a process group.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from train.config import ConfigError


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: object | None = None  # DeviceMesh when FSDP2 is used

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def use_fsdp(self) -> bool:
        return self.mesh is not None


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed() -> DistEnv:
    """Join (or create) the process group this process belongs to; see the module docstring."""
    cuda = torch.cuda.is_available()
    if launched_by_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30),
                                device_id=device if cuda else None)
    elif cuda:
        rank, world, local_rank, device = 0, 1, 0, torch.device("cuda", 0)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=device)
    else:
        return DistEnv()
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (world,))
    return DistEnv(rank, world, local_rank, device, mesh)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size_hint() -> int:
    """World size before the process group exists (for resolving the config)."""
    return int(os.environ.get("WORLD_SIZE", 1)) if launched_by_torchrun() else 1


def prepare_model(model: nn.Module, env: DistEnv, compile_blocks: bool = False, bf16: bool = False) -> nn.Module:
    """Move to the device, optionally compile each block, then FSDP2-shard each block and the root.

    Compiling per block before sharding (as torchtitan does) keeps graphs small and lets FSDP2's
    hooks stay outside the compiled regions.

    ``bf16``: FSDP2 mixed precision. Parameters are gathered in bf16 for compute; the sharded fp32
    parameters, the optimizer and the gradient reduction stay fp32. BatchNorm layers are their own
    FSDP2 units that keep fp32 parameters. Their kernels take a bf16 input with fp32 affine
    parameters and fp32 running statistics, but not bf16 parameters with fp32 statistics. Keeping
    them fp32 is also the usual choice for statistics.
    """
    model.to(env.device)
    if compile_blocks:
        for block in model.repeated_blocks():  # the model contract names its blocks
            # Static shapes: one graph per input shape (training batch, evaluation batch, last partial
            # batch). Dynamic-shape graphs of STViT's super-token padding arithmetic fail in inductor (torch 2.13).
            block.compile(dynamic=False)
    if not env.use_fsdp:
        if bf16:
            raise ConfigError("--precision bf16: mixed precision comes from FSDP2, which a single CPU process "
                              "does not use; run under torchrun (torchrun --nproc_per_node 1 -m train ...) or "
                              "use --precision fp32")
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if bf16:
        keep_fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                         cast_forward_inputs=False)
        for norm in model.modules():
            if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                fully_shard(norm, mesh=env.mesh, mp_policy=keep_fp32)
    mp_policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                 if bf16 else MixedPrecisionPolicy())
    for block in model.repeated_blocks():
        fully_shard(block, mesh=env.mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=env.mesh, mp_policy=mp_policy)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip FSDP2's reduce-scatter on all but the last micro-batch of an accumulated step."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over all processes (in place, also returned)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def average_buffers(model: nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over processes.

    FSDP2 shards parameters but leaves buffers replicated, and each process updates its own
    BatchNorm statistics from its own batches; averaging before evaluation and checkpointing makes
    every process evaluate — and save — the same model.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    world = dist.get_world_size()
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
