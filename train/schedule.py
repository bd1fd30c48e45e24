"""Learning-rate schedule, evaluated per optimizer step (a pure function of the step).

Linear warm-up from ``warmup_lr`` at step 0 to the peak ``lr`` at step ``warmup_steps``, then a
half cosine from ``lr`` down to ``min_lr``, reached exactly at the last step; or (``poly``,
MMSegmentation's ``PolyLR``) ``min_lr + (lr - min_lr) · (1 - t / T)^power`` with t the steps since
the warm-up and T = total − warm-up steps. Being a function of the step, the schedule needs no
state of its own to resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    lr: float  # peak
    total_steps: int
    warmup_steps: int = 0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    kind: str = "cosine"  # or "constant", "poly"
    power: float = 1.0  # poly's

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"the schedule needs at least one step, got total_steps={self.total_steps}")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"warm-up ({self.warmup_steps} steps) must be shorter than training "
                             f"({self.total_steps} steps); lower --warmup-epochs")
        if self.kind not in ("cosine", "constant", "poly"):
            raise ValueError(f"unknown schedule {self.kind!r}; use cosine, constant or poly")

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return self.lr
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        if self.kind == "poly":
            progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
            return self.min_lr + (self.lr - self.min_lr) * (1.0 - progress) ** self.power
        decay_steps = max(1, self.total_steps - 1 - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_schedule(cfg, steps_per_epoch: int) -> LRSchedule:
    """The schedule of a config (``TrainConfig``) for a loader of ``steps_per_epoch`` steps; an
    iteration-based config (``cfg.iters``, segmentation) counts iterations instead of epochs."""
    if getattr(cfg, "iters", None):
        total, warmup = cfg.iters, cfg.warmup_iters
    else:
        total, warmup = cfg.epochs * steps_per_epoch, int(round(cfg.warmup_epochs * steps_per_epoch))
    return LRSchedule(lr=cfg.lr, total_steps=total, warmup_steps=warmup, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
                      kind=cfg.sched)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
