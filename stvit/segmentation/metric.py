"""MMSegmentation's ``IoUMetric``: per-class intersection and union summed over the whole
validation set, then aAcc, mIoU and mAcc.

For each image, pixels labelled ``ignore_index`` are dropped; per class c, *intersection* counts
pixels predicted c and labelled c, *union* = predicted c + labelled c − intersection. Over the set:

- ``aAcc`` = Σ intersection / Σ labelled pixels (pixel accuracy);
- ``IoU[c]`` = intersection[c] / union[c], ``Acc[c]`` = intersection[c] / labelled[c];
- ``mIoU`` / ``mAcc``: their means over the classes where they are defined (NaN — a class neither
  predicted nor present for IoU, a class never present for Acc — is left out, as ``np.nanmean``).
  A class that is predicted but never present has IoU 0 and counts.

Reported in percent. Counts are exact integers here (MMSegmentation counts with float32
``histc`` per image, exact below 2²⁴ pixels).
"""

from __future__ import annotations

import math

import torch


def intersect_and_union(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                        ignore_index: int = 255) -> torch.Tensor:
    """(4, num_classes) int64: intersection, union, predicted and labelled pixels per class of one
    prediction / label pair of the same shape. Labels outside 0..num_classes-1 (other than
    ``ignore_index``) are not counted, as MMSegmentation's ``histc`` does not."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} must have the same shape")
    keep = label != ignore_index
    pred, label = pred[keep].long(), label[keep].long()

    def counts(values: torch.Tensor) -> torch.Tensor:
        values = values[(values >= 0) & (values < num_classes)]
        return torch.bincount(values, minlength=num_classes)[:num_classes]

    intersect = counts(pred[pred == label])
    area_pred, area_label = counts(pred), counts(label)
    return torch.stack([intersect, area_pred + area_label - intersect, area_pred, area_label])


def iou_metrics(areas: torch.Tensor) -> dict:
    """aAcc, mIoU, mAcc (percent) and the per-class IoU and Acc lists (percent, NaN where undefined)
    from summed (4, num_classes) areas."""
    areas = areas.double().cpu()
    intersect, union, _, label = areas
    with torch.no_grad():
        iou = intersect / union
        acc = intersect / label
    total = float(label.sum())

    def nanmean(values: torch.Tensor) -> float:
        kept = values[~torch.isnan(values)]
        return float(kept.mean()) * 100 if kept.numel() else math.nan

    return {"aAcc": float(intersect.sum()) / total * 100 if total else math.nan,
            "mIoU": nanmean(iou), "mAcc": nanmean(acc),
            "IoU": [float(v) * 100 for v in iou], "Acc": [float(v) * 100 for v in acc]}


class IoUAccumulator:
    """Sums :func:`intersect_and_union` over images (on the device of the predictions); the sums are
    one (4, num_classes) tensor, so processes add theirs with one all-reduce before :meth:`compute`."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu"):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.areas = torch.zeros(4, num_classes, dtype=torch.float64, device=device)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        self.areas += intersect_and_union(pred, label.to(pred.device), self.num_classes, self.ignore_index).to(
            self.areas.device, torch.float64)

    def compute(self) -> dict:
        return iou_metrics(self.areas)
