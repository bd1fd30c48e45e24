"""A segmentor on any backbone of the zoo: MMSegmentation's ``EncoderDecoder``, read through the
model contract.

    seg = stvit.create_segmentor("stvit_small", head="upernet", num_classes=150,
                                 pretrained="stvit-small-224.pth")   # the ImageNet classifier's weights
    logits = seg(images)                                              # (B, 150, H, W), at the image size
    loss = seg.training_loss(images, masks, rng)                     # decode + 0.4 × auxiliary CE

The backbone is ``stvit.create_model(name, features_only=True, out_indices=...)``; nothing here
knows a family:

- **Hierarchical backbones** (STViT, SG-Former, LVT: four maps at strides 4, 8, 16, 32) feed the
  head directly.
- **Single-scale backbones** (So-ViT, SoT: every block at one stride, a plain ViT's layout) go
  through :class:`~stvit.segmentation.heads.MultiLevelNeck`, as MMSegmentation builds UperNet on a
  ViT: four evenly spaced blocks (ViT-B's 2, 5, 8, 11 for 12 blocks), resized by 4, 2, 1 and 0.5 at
  stride 16 (in general stride/4 … stride/32), so the head sees strides 4-32 again.
- **Fixed-size backbones** (``pretrained_cfg["fixed_input_size"]``) are built with
  ``dynamic_img_size=True``: So-ViT/SoT resample their position table to the input's token grid,
  SG-Former pads to the next size its windows take and resamples ``pos_embed``.

``head="upernet"``: UPerHead (channels 512, pool scales 1/2/3/6) with an auxiliary FCNHead
(channels 256, one 3×3 conv, loss weight 0.4) on the stride-16 map (the neck's stride-32 map on a
ViT), MMSegmentation's UperNet configs for Swin and ViT. ``head="segformer"``: SegformerHead
(channels 256), no auxiliary head. ``channels`` narrows a head (the demo's).

The logits of every head are resized to the image (bilinear, ``align_corners=False``). The loss is
MMSegmentation's ``CrossEntropyLoss`` with ``ignore_index=255``: summed over the pixels and divided
by **all** of them, ignored ones included (its ``avg_non_ignore=False`` default), per head, weighted
1.0 (decode) and 0.4 (auxiliary). Inference is ``whole`` (the image at once) or ``slide`` (crops of
``crop_size`` every ``stride`` pixels, logits averaged where they overlap), as its ``test_cfg``.

State-dict keys are MMSegmentation's: ``backbone.*`` (the family's own keys), ``neck.*``,
``decode_head.*``, ``auxiliary_head.*``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_checkpoint
from ..contract import ModelBase, check_image_batch
from ..models import create_model
from ..registry import model_entry
from .heads import DecodeHead, FCNHead, MultiLevelNeck, SegformerHead, UPerHead, resize

HEADS = ("upernet", "segformer")
CROP_SIZE = 512          # MMSegmentation's ADE20K crop (and the slide window)
SLIDE_STRIDE = 341       # its slide stride for 512² windows
IGNORE_INDEX = 255
# Names of learned position tables (Swin's recipe exempts them from weight decay, as norms).
POSITION_TABLES = ("pos_embed", "absolute_pos_embed", "relative_position_bias_table")


def segmentation_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                               ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """MMSegmentation's ``CrossEntropyLoss``: per-pixel cross-entropy (float32), pixels labelled
    ``ignore_index`` contribute 0, divided by the number of *all* pixels."""
    if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
        raise ValueError(f"targets {tuple(target.shape)} must be (B, H, W) masks matching logits "
                         f"{tuple(logits.shape)}")
    total = F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index, reduction="sum")
    return total / target.numel()


def slide_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of MMSegmentation's sliding windows: a grid of ``stride`` steps, the last
    window of each row and column moved back to end at the border; a side smaller than ``crop``
    is one window of that side. Every window has the same size."""
    def starts(side: int) -> list[tuple[int, int]]:
        count = max(side - crop + stride - 1, 0) // stride + 1
        spans = []
        for k in range(count):
            end = min(k * stride + crop, side)
            spans.append((max(end - crop, 0), end))
        return spans

    return [(y1, y2, x1, x2) for y1, y2 in starts(height) for x1, x2 in starts(width)]


class Segmentor(ModelBase):
    """Backbone (+ neck) + decode head (+ auxiliary head); see the module docstring."""

    def __init__(self, backbone: nn.Module, decode_head: DecodeHead, auxiliary_head: FCNHead | None = None,
                 neck: MultiLevelNeck | None = None, *, pretrained_cfg: Mapping | None = None):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.num_classes = decode_head.num_classes
        self.in_chans = getattr(backbone, "in_chans", 3)
        self.num_features = decode_head.channels
        self.ignore_index = decode_head.ignore_index
        cfg = dict(getattr(backbone, "pretrained_cfg", {}))
        self.pretrained_cfg = {**cfg, "input_size": (self.in_chans, CROP_SIZE, CROP_SIZE), "fixed_input_size": False,
                               "num_classes": self.num_classes, "classifier": "decode_head.conv_seg",
                               "task": "segment", **(pretrained_cfg or {})}

    # ---- forward ------------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        check_image_batch(x, self.in_chans)
        self.backbone.check_input(x)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The maps the heads read: the backbone's, through the neck if there is one."""
        feats = self.backbone(x)
        return self.neck(feats) if self.neck is not None else list(feats)

    def forward_head(self, feats: Sequence[torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        """The decode head's logits at its own resolution (stride 4), before the resize to the image."""
        if pre_logits:
            raise ValueError("a segmentor's head has no pre-logits output; call decode_head's parts directly")
        return self.decode_head(feats)

    def forward(self, x: torch.Tensor, with_aux: bool = False):
        """Logits (B, num_classes, H, W) at the image's size; ``with_aux=True``: (logits, auxiliary
        logits or None), what :meth:`training_loss` needs from one forward pass."""
        feats = self.forward_features(x)
        size = x.shape[2:]
        logits = resize(self.decode_head(feats), size, self.decode_head.align_corners)
        if not with_aux:
            return logits
        aux = None
        if self.auxiliary_head is not None:
            aux = resize(self.auxiliary_head(feats), size, self.auxiliary_head.align_corners)
        return logits, aux

    def training_loss(self, x: torch.Tensor, targets: torch.Tensor, rng: random.Random | None = None) -> torch.Tensor:
        """The objective for (B, H, W) integer masks (255 = ignore): the decode head's cross-entropy
        plus ``loss_weight`` (0.4) × the auxiliary head's."""
        logits, aux = self(x, with_aux=True)
        loss = self.decode_head.loss_weight * segmentation_cross_entropy(logits, targets, self.ignore_index)
        if aux is not None:
            loss = loss + self.auxiliary_head.loss_weight * segmentation_cross_entropy(aux, targets, self.ignore_index)
        return loss

    @torch.no_grad()
    def inference(self, x: torch.Tensor, mode: str = "whole", crop_size: int = CROP_SIZE,
                  stride: int = SLIDE_STRIDE) -> torch.Tensor:
        """Logits at the image's size, ``whole`` or ``slide`` (MMSegmentation's ``test_cfg``). A slide
        runs all windows of the batch in one forward pass (the same results as one at a time in eval
        mode, and the same number of passes per image on every process)."""
        if mode == "whole":
            return self(x)
        if mode != "slide":
            raise ValueError(f"inference mode {mode!r}: use 'whole' or 'slide'")
        B, _, H, W = x.shape
        windows = slide_windows(H, W, crop_size, stride)
        crops = torch.cat([x[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in windows])
        logits = self(crops).float()
        preds = logits.new_zeros((B, logits.shape[1], H, W))
        count = logits.new_zeros((1, 1, H, W))
        for k, (y1, y2, x1, x2) in enumerate(windows):
            preds[:, :, y1:y2, x1:x2] += logits[k * B:(k + 1) * B]
            count[:, :, y1:y2, x1:x2] += 1
        return preds / count

    # ---- the contract ---------------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.decode_head.conv_seg

    def reset_classifier(self, num_classes: int) -> None:
        """New ``conv_seg`` layers (decode and auxiliary) for ``num_classes``."""
        for head in (self.decode_head, self.auxiliary_head):
            if head is not None:
                head.reset_classifier(num_classes)
        self.num_classes = num_classes
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}

    def no_weight_decay(self) -> set[str]:
        """The backbone's exemptions and the learned position tables (Swin's segmentation recipe
        exempts norms, which the trainer's 1-D rule covers, and position tables)."""
        names = {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
        return names | {n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1] in POSITION_TABLES}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def repeated_blocks(self) -> list[nn.Module]:
        return self.backbone.repeated_blocks()

    def prepare_inference(self) -> list[str]:
        return [f"backbone.{n}" for n in self.backbone.prepare_inference()]


# ---- building --------------------------------------------------------------------------------------

def evenly_spaced_blocks(depth: int, count: int = 4) -> tuple[int, ...]:
    """``count`` block indices spread over ``depth`` blocks, ending with the last (MMSegmentation's
    ViT-B choice 2, 5, 8, 11 for 12 blocks); the last block alone when there are too few."""
    picks = tuple(sorted({max(0, round(depth * (k + 1) / count) - 1) for k in range(count)}))
    return picks if len(picks) == count else (depth - 1,)


def _backbone(name: str, drop_path_rate: float, overrides: dict):
    """The features_only backbone and, for a single-scale one, its neck."""
    with torch.device("meta"):  # what the backbone gives, without building it for real
        probe = create_model(name, features_only=True, **overrides)
    kwargs = dict(overrides)
    if probe.pretrained_cfg.get("fixed_input_size"):
        kwargs["dynamic_img_size"] = True
    reductions = probe.feature_info.reduction()
    if len(set(reductions)) > 1:  # hierarchical: every stage (the default out_indices)
        return create_model(name, features_only=True, drop_path_rate=drop_path_rate, **kwargs), None
    indices = evenly_spaced_blocks(len(probe.repeated_blocks()))
    backbone = create_model(name, features_only=True, out_indices=indices, drop_path_rate=drop_path_rate, **kwargs)
    stride, width = reductions[0], backbone.feature_info.channels()[0]
    neck = MultiLevelNeck([width] * len(indices), width, [stride / 4, stride / 8, stride / 16, stride / 32])
    return backbone, neck


def create_segmentor(name: str, head: str = "upernet", num_classes: int = 150, *, aux: bool | None = None,
                     pretrained: str | os.PathLike | Mapping | None = None, channels: int | None = None,
                     aux_channels: int | None = None, dropout_ratio: float = 0.1, drop_path_rate: float = 0.0,
                     **backbone_overrides) -> Segmentor:
    """A segmentor on the registered backbone ``name`` (see the module docstring).

    ``aux``: the auxiliary FCN head (default: with UperNet, not with SegFormer's head).
    ``pretrained``: the backbone's classification checkpoint (a path or state dict; the authors'
    release files too), loaded strictly into the backbone, its classifier keys ignored.
    ``channels`` / ``aux_channels``: head widths (default 512 / 256 for UperNet, 256 for SegFormer's).
    """
    if head not in HEADS:
        raise ValueError(f"head={head!r}: choose one of {', '.join(HEADS)}")
    entry = model_entry(name)
    backbone, neck = _backbone(entry.name, drop_path_rate, backbone_overrides)
    if pretrained is not None:
        load_checkpoint(backbone, pretrained)
    maps = neck.out_channels if neck is not None else None
    in_channels = [maps] * len(neck.scales) if neck is not None else backbone.feature_info.channels()
    levels = list(range(len(in_channels)))
    if head == "upernet":
        decode = UPerHead(in_channels, channels or 512, num_classes, levels, dropout_ratio=dropout_ratio)
    else:
        decode = SegformerHead(in_channels, channels or 256, num_classes, levels, dropout_ratio=dropout_ratio)
    auxiliary = None
    if aux if aux is not None else head == "upernet":
        at = 3 if neck is not None else min(2, len(in_channels) - 1)  # ViT: the 0.5-scale map; else stride 16
        width = aux_channels or max(1, (channels or 512) // 2)
        auxiliary = FCNHead(in_channels[at], width, num_classes, at, num_convs=1, concat_input=False,
                            dropout_ratio=dropout_ratio, loss_weight=0.4)
    seg = Segmentor(backbone, decode, auxiliary, neck,
                    pretrained_cfg={"architecture": entry.name, "family": entry.family, "head": head})
    return seg
