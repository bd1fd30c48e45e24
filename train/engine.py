"""One optimizer step and one evaluation pass.

Reproducibility across world sizes and resumes: all model-side randomness of a step (drop path,
dropout, Mixup/CutMix) is drawn from generators seeded by ``(seed, step, slot)``, where the
*slot* ``rank + world_size * micro_batch`` names a micro-batch within the global batch. The
samplers deal global positions round-robin to the ranks and each process splits its batch into
micro-batches by stride, so slot ``g`` holds the same images whether it runs as rank ``g`` of
``G`` processes or as micro-batch ``g`` of one process accumulating ``G`` micro-batches.
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from train import distributed
from train.mixup import Mixup, smooth_one_hot


class StepStats(NamedTuple):
    """One optimizer step, summed over processes."""

    loss_sum: float  # sum of per-image losses
    images: float
    skipped: float  # unreadable images dropped from the batch


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def derive_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from a few integers (stable across platforms and runs)."""
    packed = struct.pack(f"<{len(values)}q", *values)
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8, person=b"stvit-step").digest(), "little") >> 1


def micro_batches(images: torch.Tensor, targets: torch.Tensor, accum_steps: int):
    """Strided split: micro-batch ``m`` takes rows ``m, m + A, m + 2A, ...`` (see module docstring)."""
    return [(images[m::accum_steps], targets[m::accum_steps]) for m in range(accum_steps)]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, targets: torch.Tensor,
               *, env, cfg, mixup: Mixup | None, step: int, skipped: int = 0,
               fault_nan: bool = False) -> StepStats:
    """Forward/backward over the micro-batches of this process, then one optimizer update.

    Returns the step's :class:`StepStats`, summed over processes (float64). Raises
    :class:`NonFiniteLossError` on every process alike (the check uses the all-reduced sum) before
    the weights are updated.
    """
    device = env.device
    accum = cfg.accum_steps
    stats = torch.zeros(3, dtype=torch.float64, device=device)
    stats[2] = skipped
    for m, (x, y) in enumerate(micro_batches(images, targets, accum)):
        slot = env.rank + env.world_size * m
        torch.manual_seed(derive_seed(cfg.seed, step, slot, 0))  # drop path / dropout masks
        distributed.set_gradient_sync(model, m == accum - 1)
        n = x.shape[0]
        segment = getattr(cfg, "task", "classify") == "segment"
        if n == 0:  # every image of this micro-batch was unreadable: keep collectives in step
            x = torch.zeros((2, 3, cfg.input_size, cfg.input_size))
            y = (torch.full((2, cfg.input_size, cfg.input_size), 255, dtype=torch.long) if segment  # all ignored
                 else torch.zeros(2, dtype=torch.long))
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        # One stream per slot for the batch's draws: Mixup/CutMix first, then the model's own (MixToken).
        rng = random.Random(derive_seed(cfg.seed, step, slot, 1))
        if segment:
            target = y  # (B, H, W) class masks, 255 ignored
        elif mixup is not None:
            x, target = mixup(x, y, rng)
        else:
            target = smooth_one_hot(y, cfg.num_classes, cfg.smoothing)
        # The model's objective (the contract's training_loss): soft-target cross-entropy of its
        # logits, a family's own (LVT: MixToken with the auxiliary token loss), or a segmentor's.
        loss = model.training_loss(x, target, rng)
        if fault_nan:
            loss = loss * float("nan")
        weight = 0.0 if n == 0 else 1.0
        (loss * (weight / accum)).backward()
        stats[0] += loss.detach().double() * n
        stats[1] += n
    distributed.all_reduce_sum(stats)
    loss_sum, count, skipped = stats.tolist()
    if not math.isfinite(loss_sum):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"the training loss is {loss_sum} at step {step}")
    if cfg.clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss_sum, count, skipped)


def _as_many_batches_as_any_process(loader, env):
    """This process's (images, targets, skipped) batches, then empty ones up to the count of the
    process with the most: FSDP2 gathers parameters in every forward pass, so all must run as many."""
    num_batches = torch.tensor([len(loader)], dtype=torch.float64, device=env.device)
    if distributed.dist.is_initialized() and env.world_size > 1:
        distributed.dist.all_reduce(num_batches, op=distributed.dist.ReduceOp.MAX)
    batches = iter(loader)
    for _ in range(int(num_batches.item())):
        yield next(batches, (torch.empty(0), torch.empty(0, dtype=torch.long), 0))


@torch.no_grad()
def evaluate(model: nn.Module, loader, env, input_size: int, finish=None) -> dict:
    """Top-1/top-5 accuracy (percent) and mean cross-entropy over the whole validation split.

    Every process runs the same number of forward passes (FSDP2 gathers parameters in each), so a
    process with fewer or emptied batches runs throw-away passes; sums, not means, are reduced, so
    each image counts exactly once. ``finish(images, device)`` moves a batch to the device (the
    val pipeline's ``device_stage``: it normalises uint8 batches there).
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=env.device)  # loss, top1, top5, images, skipped
    for images, targets, skipped in _as_many_batches_as_any_process(loader, env):
        sums[4] += skipped
        if images.shape[0] == 0:
            model(torch.zeros((1, 3, input_size, input_size), device=env.device))
            continue
        images = finish(images, env.device) if finish else images.to(env.device, non_blocking=True)
        targets = targets.to(env.device, non_blocking=True)
        logits = model(images).float()
        sums[0] += F.cross_entropy(logits, targets, reduction="sum").double()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == targets[:, None]
        sums[1] += hits[:, 0].sum()
        sums[2] += hits.any(dim=1).sum()
        sums[3] += images.shape[0]
    distributed.all_reduce_sum(sums)
    model.train(was_training)
    loss, top1, top5, count, skipped = sums.tolist()
    count = max(count, 1.0)
    return {"val_loss": loss / count, "val_acc1": 100.0 * top1 / count, "val_acc5": 100.0 * top5 / count,
            "val_images": int(sums[3].item()), "val_skipped": int(skipped)}


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader, env, *, num_classes: int, mode: str = "whole",
                          crop_size: int = 512, stride: int = 341, finish=None) -> dict:
    """MMSegmentation's ``IoUMetric`` over the whole validation split: mIoU, mAcc, aAcc (percent).

    Each batch is predicted ``whole`` or ``slide`` (``model.inference``, one forward pass either way),
    the logits resized to the label's original size (bilinear) and argmaxed; per-class areas are
    summed on every process and all-reduced, so each image counts once. As in :func:`evaluate`,
    every process runs the same number of forward passes (throw-away ones where it has fewer).
    """
    from stvit.segmentation import IoUAccumulator

    was_training = model.training
    model.eval()
    ignore_index = getattr(model, "ignore_index", 255)
    metric = IoUAccumulator(num_classes, ignore_index, device=env.device)
    counts = torch.zeros(2, dtype=torch.float64, device=env.device)  # images, skipped
    for images, labels, skipped in _as_many_batches_as_any_process(loader, env):
        counts[1] += skipped
        if images.shape[0] == 0:
            model(torch.zeros((1, 3, crop_size, crop_size), device=env.device))
            continue
        images = finish(images, env.device) if finish else images.to(env.device, non_blocking=True)
        logits = model.inference(images, mode, crop_size, stride)
        for i in range(images.shape[0]):
            label = labels[i].to(env.device, non_blocking=True)
            scaled = F.interpolate(logits[i:i + 1].float(), size=tuple(label.shape), mode="bilinear",
                                   align_corners=False)
            metric.update(scaled.argmax(1)[0], label)
        counts[0] += images.shape[0]
    distributed.all_reduce_sum(metric.areas)
    distributed.all_reduce_sum(counts)
    model.train(was_training)
    result = metric.compute()
    return {"mIoU": result["mIoU"], "mAcc": result["mAcc"], "aAcc": result["aAcc"], "IoU": result["IoU"],
            "val_images": int(counts[0].item()), "val_skipped": int(counts[1].item())}
