"""Mixup / CutMix on whole batches and label smoothing (the soft-target cross-entropy they feed is
``stvit.contract.soft_target_cross_entropy``, part of the model contract's default objective).

Batch mode (DeiT's recipe): one ``lam`` and one mixup-or-cutmix decision per batch; every
sample is mixed with its partner in the *reversed* batch (``images.flip(0)``). Targets become
smoothed one-hot vectors mixed with the same ``lam``, so they always sum to 1.
"""

from __future__ import annotations

import math
import random

import torch


def smooth_one_hot(targets: torch.Tensor, num_classes: int,
                   smoothing: float = 0.0) -> torch.Tensor:
    """Class indices (B,) -> float32 (B, num_classes) with ``off = smoothing / num_classes`` and
    ``on = 1 - smoothing + off`` (each row sums to 1)."""
    if targets.dim() != 1:
        raise ValueError(f"targets must be a 1-D tensor of class indices, got shape "
                         f"{tuple(targets.shape)}")
    if targets.device.type == "cpu" and targets.numel() and (
            int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(f"class indices must be in [0, {num_classes}), got values in "
                         f"[{int(targets.min())}, {int(targets.max())}]; check num_classes")
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    out = torch.full((targets.shape[0], num_classes), off, dtype=torch.float32,
                     device=targets.device)
    return out.scatter_(1, targets.long().view(-1, 1), on)


def _as_rng(generator) -> random.Random:
    """A ``random.Random`` driven by ``generator`` (a Random, a torch.Generator or None for
    torch's global generator), so all of one call's draws come from one reproducible stream."""
    if isinstance(generator, random.Random):
        return generator
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else "cpu"
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=device)
        return random.Random(int(seed))
    raise TypeError(f"generator must be a random.Random, a torch.Generator or None, "
                    f"got {type(generator).__name__}")


class Mixup:
    """Batch Mixup/CutMix with label smoothing, ``mixup(images, targets, generator)``.

    Args:
        mixup_alpha: Beta(alpha, alpha) for the mixup ``lam``; 0 disables mixup.
        cutmix_alpha: Beta(alpha, alpha) for the cutmix ``lam``; 0 disables cutmix.
        switch_prob: when both are enabled, the chance a batch uses cutmix instead of mixup.
        prob: chance a batch is mixed at all.
        label_smoothing: smoothing applied to the one-hot targets.
        num_classes: width of the soft targets.
        correct_lam: recompute the cutmix ``lam`` from the box actually pasted after clipping
            it to the image, so targets match the pixels exactly.

    ``.active`` is False when both alphas (or ``prob``) are 0; calling it then only smooths the
    targets. Batches of any size work (the middle sample of an odd batch mixes with itself).
    Returns new tensors; the inputs are not modified.
    """

    def __init__(self, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5, prob: float = 1.0, label_smoothing: float = 0.1,
                 num_classes: int = 1000, mode: str = "batch", correct_lam: bool = True):
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup/cutmix alphas must be >= 0 (0 disables), got "
                             f"{mixup_alpha}, {cutmix_alpha}")
        for name, value in (("switch_prob", switch_prob), ("prob", prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if mode != "batch":
            raise ValueError(f"only mode='batch' is implemented (DeiT's default), got {mode!r}")
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.switch_prob, self.prob = switch_prob, prob
        self.label_smoothing, self.num_classes = label_smoothing, num_classes
        self.correct_lam = correct_lam

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def sample_params(self, rng: random.Random) -> tuple[float, bool]:
        """Draw ``(lam, use_cutmix)`` for one batch; ``lam == 1`` means leave it unmixed."""
        if not self.active or rng.random() >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = rng.random() < self.switch_prob
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return rng.betavariate(alpha, alpha), use_cutmix

    def cutmix_box(self, rng: random.Random, height: int, width: int,
                   lam: float) -> tuple[tuple[int, int, int, int], float]:
        """A box ``(top, bottom, left, right)`` covering about ``1 - lam`` of the image with a
        uniformly random centre, clipped to the image, and the lam it really leaves."""
        cut_ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * cut_ratio), int(width * cut_ratio)
        cy, cx = rng.randrange(height), rng.randrange(width)
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        if self.correct_lam:
            lam = 1.0 - (bottom - top) * (right - left) / float(height * width)
        return (top, bottom, left, right), lam

    def __call__(self, images: torch.Tensor, targets: torch.Tensor,
                 generator: torch.Generator | random.Random | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dim() != 4 or images.shape[0] != targets.shape[0]:
            raise ValueError(f"expected images (B, C, H, W) and targets (B,), got "
                             f"{tuple(images.shape)} and {tuple(targets.shape)}")
        rng = _as_rng(generator)
        lam, use_cutmix = self.sample_params(rng)
        if lam >= 1.0:
            mixed = images
        elif use_cutmix:
            (top, bottom, left, right), lam = self.cutmix_box(rng, *images.shape[-2:], lam)
            mixed = images.clone()
            mixed[:, :, top:bottom, left:right] = images.flip(0)[:, :, top:bottom, left:right]
        else:
            mixed = images * lam + images.flip(0) * (1.0 - lam)
        soft = smooth_one_hot(targets, self.num_classes, self.label_smoothing)
        soft = soft * lam + soft.flip(0) * (1.0 - lam)
        return mixed, soft

    def __repr__(self) -> str:
        return (f"Mixup(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, "
                f"switch_prob={self.switch_prob}, prob={self.prob}, "
                f"label_smoothing={self.label_smoothing}, num_classes={self.num_classes})")
