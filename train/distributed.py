"""Process group, device mesh and FSDP2 wrapping.

* Launched by ``torchrun`` (``WORLD_SIZE`` set): a process group (NCCL on GPU, gloo on CPU), one
  device per process, the model sharded with FSDP2 — also when ``--nproc_per_node 1``.
* ``python -m train`` on a machine with a GPU: a one-process group (``one_process_group``: an
  in-memory store, no network) and the same FSDP2 path, so bf16 mixed precision comes from the
  same policy. ``bench throughput``'s ``train-bf16`` mode takes the same group, on CPU too.
* ``python -m train`` on a CPU: no process group, the plain module. FSDP2 has nothing to shard
  there and its per-block hooks cost about 30 % of the tiny demo model's step time.

Collective helpers below are no-ops without a process group.
"""

from __future__ import annotations

import datetime
import os
import secrets
import socket
import sys
import time
import types
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from stvit import compat
from stvit.contract import blocks_of
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


def init_distributed(timeout: float = 1800.0) -> DistEnv:
    """Join (or create) the process group this process belongs to; see the module docstring.

    ``timeout`` (seconds) bounds every collective and barrier of the run: a peer that died or hangs
    makes the others fail with an error after that long instead of waiting for ever."""
    cuda = torch.cuda.is_available()
    if launched_by_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        store = _fresh_store(rank, world, timeout)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout),
                                device_id=device if cuda else None, store=store,
                                **({"rank": rank, "world_size": world} if store is not None else {}))
    elif cuda:
        return one_process_group(torch.device("cuda", 0))
    else:
        return DistEnv()
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (world,))
    return DistEnv(rank, world, local_rank, device, mesh)


def one_process_group(device: torch.device) -> DistEnv:
    """A process group of this process alone (NCCL on CUDA, gloo on CPU; an in-memory store, no
    network) and its device mesh, for FSDP2 without a launcher. A group that already exists is
    reused as it is; ``shutdown()`` ends it."""
    from torch.distributed.device_mesh import init_device_mesh
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                device_id=device if cuda else None)
    world = dist.get_world_size()
    local_rank = device.index if device.type == "cuda" else 0
    return DistEnv(dist.get_rank(), world, local_rank, device, init_device_mesh(device.type, (world,)))


_STORE_KEY = "stvit/process-group-store"


def _fresh_store(rank: int, world: int, timeout: float):
    """A key-value store for the process group that no earlier launch has written to.

    torchrun's workers share the agent's store (``TORCHELASTIC_USE_AGENT_STORE=True``), which outlives
    a restart: workers restarted by ``--max-restarts`` found the addresses their dead predecessors
    had left there, and gloo failed to connect (NCCL can hang on a stale unique id). Here process 0
    starts a new store and publishes its address (with a random token) in the agent's store; the
    others connect once the published address answers with that token — a stale address belongs to
    a process that is gone, so they wait for the new one. None: not under torchrun's shared store
    (``env://`` then makes a new store per launch)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    span = datetime.timedelta(seconds=timeout)
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=span)
    if rank == 0:
        store = dist.TCPStore(_own_address(), 0, world, is_master=True, timeout=span, wait_for_workers=False)
        token = secrets.token_hex(8)
        store.set(_STORE_KEY, token)
        agent.set(_STORE_KEY, f"{_own_address()} {store.port} {token}")
        return store
    deadline = time.monotonic() + timeout
    while True:
        host, port, token = agent.get(_STORE_KEY).decode().split()
        try:
            socket.create_connection((host, int(port)), timeout=2).close()  # a stale address: refused, quietly
            store = dist.TCPStore(host, int(port), world, is_master=False, timeout=datetime.timedelta(seconds=10))
            if store.get(_STORE_KEY).decode() == token:
                store.set_timeout(span)
                return store
        except (RuntimeError, ValueError, OSError):  # DistStoreError is a RuntimeError
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"process 0's store at {host}:{port} did not answer within --dist-timeout {timeout:g} s")
        time.sleep(0.2)


def _own_address() -> str:
    """How the other processes reach this one: the launcher's address when that is a loopback one
    (all on this machine), else this host's name (as torchrun names hosts)."""
    master = os.environ.get("MASTER_ADDR", "")
    if master in ("localhost", "::1") or master.startswith("127."):
        return master
    return socket.getfqdn(socket.gethostname())


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End this process with ``code``. A worker of a multi-process torchrun run, once its work is
    over (files written, process group destroyed), leaves without interpreter finalisation: there,
    gloo's worker threads were torn down late and now and then aborted a run that had succeeded
    ("terminate called without an active exception")."""
    if world_size_hint() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def world_size_hint() -> int:
    """World size before the process group exists (for resolving the config)."""
    return int(os.environ.get("WORLD_SIZE", 1)) if launched_by_torchrun() else 1


# Graphs dynamo may keep per block code: 4 stage widths × (2 training + 2 evaluation shapes) × grad
# mode is 32; 64 leaves room for a family with more kinds of stage.
COMPILED_GRAPHS_PER_BLOCK = 64


def compile_block(block: nn.Module, backend: str = "inductor") -> None:
    """Compile one block as ``train --compile`` does, in place (``nn.Module.compile``).

    Static shapes: one graph per input shape (training batch, evaluation batch, last partial batch);
    dynamic-shape graphs of STViT's super-token padding arithmetic fail in inductor (torch 2.13). The
    options keep the backward's convolutions channels-last where this torch would not (stvit/compat.py).
    """
    block.compile(dynamic=False, backend=backend, options=compat.training_compile_options(backend))


def prepare_model(model: nn.Module, env: DistEnv, compile_blocks: bool = False, bf16: bool = False,
                  compile_backend: str = "inductor") -> nn.Module:
    """Move to the device, optionally compile each block, then FSDP2-shard each block and the root.

    Compiling per block before sharding (as torchtitan does) keeps graphs small and lets FSDP2's
    hooks stay outside the compiled regions.

    ``bf16``: FSDP2 mixed precision. Parameters are gathered in bf16 for compute; the sharded fp32
    parameters, the optimizer and the gradient reduction stay fp32. BatchNorm layers stay in their
    block's unit and normalise in fp32 (``batch_norm_with_fp32_affine``): their running statistics
    are fp32 buffers, and their kernels take a bf16 input with fp32 affine parameters, not bf16 ones.
    """
    if env.use_fsdp and env.device.type == "cpu" and (problem := compat.fsdp2_cpu_problem()):
        raise ConfigError(problem)
    model.to(env.device)
    own_units = []  # under bf16, BatchNorms with a forward of their own (SyncBatchNorm): fp32 FSDP2 units
    if bf16 and env.use_fsdp:
        for norm in model.modules():
            if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                if _normalises_in_its_unit(norm):
                    batch_norm_with_fp32_affine(norm)  # before compiling: the blocks trace this forward
                else:
                    own_units.append(norm)
    if compile_blocks:
        # Every block of a class shares one code object, and dynamo keeps at most recompile_limit (8)
        # graphs per code before running the rest eagerly, silently slow: each stage width × input
        # shape (training batch, evaluation batch, last partial batch) × train/eval mode is a graph.
        compat.raise_recompile_limit(COMPILED_GRAPHS_PER_BLOCK)
        for block in blocks_of(model):  # the model contract names its blocks
            compile_block(block, compile_backend)
    if not env.use_fsdp:
        if bf16:
            raise ConfigError("--precision bf16: mixed precision comes from FSDP2, which a single CPU process "
                              "does not use; run under torchrun (torchrun --nproc_per_node 1 -m train ...) or "
                              "use --precision fp32")
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    keep_fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                     cast_forward_inputs=False)
    for norm in own_units:
        fully_shard(norm, mesh=env.mesh, mp_policy=keep_fp32)
    mp_policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                 if bf16 else MixedPrecisionPolicy())
    for block in blocks_of(model):
        if bf16:
            _derived_buffers_to_bf16(block)
        fully_shard(block, mesh=env.mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=env.mesh, mp_policy=mp_policy)
    return model


def batch_norm_with_fp32_affine(norm: nn.modules.batchnorm._BatchNorm) -> None:
    """Make ``norm`` compute with fp32 copies of its weight and bias, whatever their dtype.

    Under bf16 FSDP2 a BatchNorm is gathered in bf16 with the rest of its block, and the batch norm
    kernels take bf16 parameters only beside bf16 running statistics; ours stay fp32. Only the weight
    and bias are rounded to bf16, as every other parameter (LayerNorm's too); the normalisation runs
    in fp32 as before. Before, each BatchNorm was an fp32 unit of its own, and FSDP2's hooks on it split
    the compiled block around it in two graphs with the norm run eagerly between them; STViT-S's
    ``train-bf16`` step is about 4 % faster this way (bench/RESULTS.md). The forward is bound to the module, so a
    ``copy.deepcopy`` of the model (an EMA) computes with its own parameters; the state dict is unchanged.
    """
    norm.forward = types.MethodType(_batch_norm_fp32_affine, norm)


def _normalises_in_its_unit(norm: nn.modules.batchnorm._BatchNorm) -> bool:
    # torch's BatchNorm1d/2d/3d, whose forward ``_batch_norm_fp32_affine`` repeats.
    return type(norm).forward is nn.modules.batchnorm._BatchNorm.forward


def _batch_norm_fp32_affine(norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    # torch's _BatchNorm.forward, with the affine parameters cast to fp32.
    norm._check_input_dim(x)
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:  # a cumulative moving average
            factor = 1.0 / float(norm.num_batches_tracked)
    batch_stats = norm.training or (norm.running_mean is None and norm.running_var is None)
    running = not norm.training or norm.track_running_stats
    weight, bias = (None if p is None else p.float() for p in (norm.weight, norm.bias))
    return F.batch_norm(x, norm.running_mean if running else None, norm.running_var if running else None,
                        weight, bias, batch_stats, factor, norm.eps)


def _derived_buffers_to_bf16(block: nn.Module) -> None:
    """Cast a block's non-persistent floating buffers to bf16, as its parameters are gathered.

    FSDP2 casts parameters and block inputs, not buffers (FSDP1's ``buffer_dtype`` did). A constant
    a block derives at build time and never saves — Swin's shifted-window attention mask — meets bf16
    activations in a matrix product, which needs one dtype. Persistent buffers (saved with the
    weights) and BatchNorm statistics stay fp32.
    """
    for module in block.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        for name in module._non_persistent_buffers_set:
            buf = module._buffers.get(name)
            if buf is not None and buf.is_floating_point():
                module._buffers[name] = buf.to(torch.bfloat16)


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


def broadcast_object(obj):
    """``obj`` of the main process, on every process (a picklable object; no-op without a group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every process's ``obj``, in rank order (``[obj]`` without a process group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``values`` over all processes (in place, also returned)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def local_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of this process's floating-point buffers (its own BatchNorm running statistics)."""
    return {name: buf.detach().clone() for name, buf in model.named_buffers() if buf.is_floating_point()}


def restore_buffers(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in saved.items():
            if name in buffers:
                buffers[name].copy_(value.to(buffers[name].device))
