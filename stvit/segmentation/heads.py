"""Decode heads for semantic segmentation, with MMSegmentation's semantics and state-dict keys.

Written anew from MMSegmentation v1.2.2 (``mmseg/models/decode_heads``: ``uper_head.py``,
``psp_head.py``, ``fcn_head.py``, ``segformer_head.py``, ``decode_head.py``) and mmcv 2.1.0's
``ConvModule``; float64 parity with tensors recorded from that code is tested
(``tests/test_segmentation.py``, goldens described in ``../shared/golden/seghead.md``). A head
takes the backbone's list of NCHW feature maps and returns logits at the resolution of its
first selected map (stride 4 for UPerHead and SegformerHead); the segmentor resizes them to the
image.

What the goldens pin down:

- **ConvModule** is conv → BatchNorm → ReLU; its conv has no bias whenever a norm follows
  (mmcv's ``bias='auto'``), so the only bias of a head is ``conv_seg.bias``. Keys are
  ``<name>.conv.weight`` and ``<name>.bn.*``; the activation has no state.
- **resize** is ``F.interpolate`` with an explicit output size, bilinear, ``align_corners=False``
  (MultiLevelNeck alone resizes by a scale factor).
- **cls_seg**: ``Dropout2d`` (only when ``dropout_ratio > 0``; ``dropout`` is then None) and a
  1×1 ``conv_seg`` with bias. ``conv_seg`` is registered first, so it leads the state dict.
- **UPerHead**: a pyramid pooling module (adaptive average pools to 1, 2, 3, 6 bins, each a 1×1
  ConvModule, upsampled back) on the last map, concatenated after the map itself and fused by a
  3×3 ``bottleneck``; 1×1 laterals for the other maps; a *sequential* top-down path
  (``lat[i-1] + resize(lat[i])`` for i = 3, 2, 1, each using the already-updated level above);
  3×3 ``fpn_convs`` on levels 0-2 but **not** on the pooled level 3; every level resized straight
  to level 0; a 3×3 ``fpn_bottleneck`` over their concatenation.
- **FCNHead** (UperNet's auxiliary head): ``num_convs`` 3×3 ConvModules on one map, optionally
  ``conv_cat`` over ``[x, convs(x)]``.
- **SegformerHead**: a 1×1 ConvModule per level, each resized to level 0, a 1×1
  ``fusion_conv`` over their concatenation — conv, BN and always ReLU (MMSegmentation does not
  pass the head's ``act_cfg`` to it).

Initialisation is MMSegmentation's (what its runner applies before training): Kaiming-normal
(fan-out, ReLU gain) convolutions with zero bias, unit BatchNorm, ``conv_seg`` N(0, 0.01²) with
zero bias.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# MMSegmentation's defaults for the config keys every head has (BaseDecodeHead's signature).
_COMMON_DEFAULTS = dict(
    out_channels=None, threshold=None, dropout_ratio=0.1, conv_cfg=None, norm_cfg=None,
    act_cfg={"type": "ReLU"}, ignore_index=255, sampler=None, align_corners=False,
    loss_decode={"type": "CrossEntropyLoss", "use_sigmoid": False, "loss_weight": 1.0},
    init_cfg={"type": "Normal", "std": 0.01, "override": {"name": "conv_seg"}},
)


def resize(x: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize to ``size`` (MMSegmentation's ``resize`` as its heads call it)."""
    return F.interpolate(x, size=tuple(int(s) for s in size), mode="bilinear", align_corners=align_corners)


class ConvModule(nn.Module):
    """mmcv's ConvModule in the order conv → norm → activation.

    ``norm``: ``"BN"`` (BatchNorm2d, eps 1e-5, momentum 0.1) or None; ``act``: ReLU or not.
    The conv carries a bias only without a norm (mmcv's ``bias='auto'``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, padding: int = 0,
                 dilation: int = 1, norm: str | None = "BN", act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                              bias=norm is None)
        self.bn = nn.BatchNorm2d(out_channels) if norm is not None else None
        self.activate = nn.ReLU(inplace=True) if act else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # mmcv ConvModule.init_weights: kaiming_init(mode='fan_out', nonlinearity='relu'), BN 1 / 0
        nn.init.kaiming_normal_(self.conv.weight, a=0, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)
        if self.bn is not None:
            nn.init.ones_(self.bn.weight)
            nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.activate(x) if self.activate is not None else x


class DecodeHead(nn.Module):
    """What every head shares (MMSegmentation's ``BaseDecodeHead``): ``conv_seg``, ``cls_seg``,
    the choice of input maps, and the settings the segmentor reads (``num_classes``,
    ``align_corners``, ``ignore_index``, ``loss_weight``)."""

    def __init__(self, in_channels, channels: int, num_classes: int, in_index, *, dropout_ratio: float = 0.1,
                 align_corners: bool = False, ignore_index: int = 255, loss_weight: float = 1.0):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: a segmentation head needs at least 2 classes")
        if channels < 1:
            raise ValueError(f"channels={channels}: expected a positive width")
        if not 0 <= dropout_ratio < 1:
            raise ValueError(f"dropout_ratio={dropout_ratio}: expected a value in [0, 1)")
        self.in_channels, self.in_index = in_channels, in_index
        self.channels, self.num_classes = channels, num_classes
        self.dropout_ratio = dropout_ratio
        self.align_corners, self.ignore_index, self.loss_weight = align_corners, ignore_index, loss_weight
        # Registered before the head's own modules, as MMSegmentation does (state-dict order).
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None
        nn.init.normal_(self.conv_seg.weight, 0.0, 0.01)  # init_cfg Normal(std=0.01) on conv_seg
        nn.init.zeros_(self.conv_seg.bias)

    def select(self, inputs: Sequence[torch.Tensor]):
        """The maps this head reads: a list for a list of indices, one map for one index."""
        if isinstance(self.in_index, int):
            return inputs[self.in_index]
        return [inputs[i] for i in self.in_index]

    def cls_seg(self, feat: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            feat = self.dropout(feat)
        return self.conv_seg(feat)

    def reset_classifier(self, num_classes: int) -> None:
        """A new ``conv_seg`` for ``num_classes`` (freshly initialised; everything else kept)."""
        like = self.conv_seg.weight
        self.num_classes = num_classes
        self.conv_seg = nn.Conv2d(self.channels, num_classes, 1).to(like.device, like.dtype)
        nn.init.normal_(self.conv_seg.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    # ---- building from MMSegmentation's config ---------------------------------------------------
    @classmethod
    def _read_config(cls, config: Mapping, own: Mapping) -> dict:
        """Check a recorded MMSegmentation config against what this head implements; return the
        values (``own``: the head's own keys and their defaults)."""
        config = dict(config)
        kind = config.pop("type", cls.__name__)
        if kind != cls.__name__:
            raise ValueError(f"config type {kind!r}: this is {cls.__name__}; build it with "
                             f"stvit.segmentation.{kind}.from_mmseg_config")
        known = {"in_channels", "channels", "num_classes", "in_index", *_COMMON_DEFAULTS, *own}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} config has keys it does not take: {unknown}")
        for key in ("in_channels", "channels", "num_classes"):
            if key not in config:
                raise ValueError(f"{cls.__name__} config needs {key!r}")
        values = {**_COMMON_DEFAULTS, **own, **config}

        def only(key, allowed, why):
            if values[key] not in allowed:
                raise NotImplementedError(f"{cls.__name__} {key}={values[key]!r}: only {why} is implemented")

        only("conv_cfg", (None,), "None (plain Conv2d)")
        only("out_channels", (None, values["num_classes"]), "out_channels = num_classes")
        only("threshold", (None,), "None (multi-class softmax)")
        only("sampler", (None,), "None (no pixel sampler)")
        only("act_cfg", ({"type": "ReLU"}, {"type": "ReLU", "inplace": True}), "ReLU")
        norm = values["norm_cfg"]
        if not (isinstance(norm, Mapping) and norm.get("type") in ("BN", "SyncBN")
                and norm.get("requires_grad", True) and set(norm) <= {"type", "requires_grad"}):
            raise NotImplementedError(f"{cls.__name__} norm_cfg={norm!r}: only BatchNorm (BN, or SyncBN, which is "
                                      f"BN with statistics over all processes) with requires_grad=True is implemented")
        loss = dict(values["loss_decode"])
        if loss.get("type") != "CrossEntropyLoss" or loss.get("use_sigmoid", False) or loss.get("class_weight") \
                or loss.get("avg_non_ignore", False):
            raise NotImplementedError(f"{cls.__name__} loss_decode={loss!r}: only the plain softmax CrossEntropyLoss "
                                      f"is implemented")
        values["loss_weight"] = float(loss.get("loss_weight", 1.0))
        init = values["init_cfg"]
        if init not in (None, _COMMON_DEFAULTS["init_cfg"]):
            raise NotImplementedError(f"{cls.__name__} init_cfg={init!r}: only MMSegmentation's default is implemented")
        return values

    @staticmethod
    def _common(values: dict) -> dict:
        return dict(dropout_ratio=float(values["dropout_ratio"]), align_corners=bool(values["align_corners"]),
                    ignore_index=int(values["ignore_index"]), loss_weight=values["loss_weight"])


class UPerHead(DecodeHead):
    """UperNet's head (Xiao et al., ECCV 2018): pyramid pooling on the last map, an FPN over the rest."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 in_index: Sequence[int] | None = None, pool_scales: Sequence[int] = (1, 2, 3, 6), **common):
        in_channels = [int(c) for c in in_channels]
        in_index = list(range(len(in_channels))) if in_index is None else [int(i) for i in in_index]
        if len(in_channels) != len(in_index) or len(in_channels) < 2:
            raise ValueError(f"UPerHead needs as many in_channels as in_index (at least 2), got {in_channels} "
                             f"and {in_index}")
        super().__init__(in_channels, channels, num_classes, in_index, **common)
        self.pool_scales = tuple(int(s) for s in pool_scales)
        top = in_channels[-1]
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(top, channels, 1)) for s in self.pool_scales)
        self.bottleneck = ConvModule(top + len(self.pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1)

    @classmethod
    def from_mmseg_config(cls, config: Mapping) -> UPerHead:
        v = cls._read_config(config, {"pool_scales": (1, 2, 3, 6)})
        return cls(v["in_channels"], v["channels"], v["num_classes"], v.get("in_index"), v["pool_scales"],
                   **cls._common(v))

    def pyramid_pooling(self, x: torch.Tensor) -> torch.Tensor:
        """``bottleneck(cat([x, up(pool_1(x)), up(pool_2(x)), ...]))`` (PSPNet's module)."""
        pooled = [resize(branch(x), x.shape[2:], self.align_corners) for branch in self.psp_modules]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        xs = self.select(inputs)
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, xs)]
        laterals.append(self.pyramid_pooling(xs[-1]))
        # Top-down, one level at a time: each level receives the already-updated level above it.
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:], self.align_corners)
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)]
        outs.append(laterals[-1])  # the pooled level has no fpn conv
        size = outs[0].shape[2:]
        outs = [outs[0]] + [resize(o, size, self.align_corners) for o in outs[1:]]
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(DecodeHead):
    """The fully convolutional head (Long et al.), UperNet's auxiliary head on one map."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, in_index: int = -1, num_convs: int = 2,
                 kernel_size: int = 3, concat_input: bool = True, dilation: int = 1, **common):
        if num_convs < 0 or dilation < 1:
            raise ValueError(f"FCNHead num_convs={num_convs}, dilation={dilation}: expected num_convs >= 0, "
                             f"dilation >= 1")
        if num_convs == 0 and in_channels != channels:
            raise ValueError(f"FCNHead with num_convs=0 needs in_channels == channels, got {in_channels} and {channels}")
        super().__init__(int(in_channels), channels, num_classes, int(in_index), **common)
        self.num_convs, self.concat_input, self.kernel_size = num_convs, concat_input, kernel_size
        padding = (kernel_size // 2) * dilation
        convs = [ConvModule(in_channels if i == 0 else channels, channels, kernel_size, padding=padding,
                            dilation=dilation) for i in range(num_convs)]
        self.convs = nn.Sequential(*convs) if convs else nn.Identity()
        if concat_input:
            self.conv_cat = ConvModule(in_channels + channels, channels, kernel_size, padding=kernel_size // 2)

    @classmethod
    def from_mmseg_config(cls, config: Mapping) -> FCNHead:
        v = cls._read_config(config, {"num_convs": 2, "kernel_size": 3, "concat_input": True, "dilation": 1,
                                      "input_transform": None, "in_index": -1})
        if v["input_transform"] is not None:
            raise NotImplementedError(f"FCNHead input_transform={v['input_transform']!r}: only None (one map) "
                                      f"is implemented")
        return cls(v["in_channels"], v["channels"], v["num_classes"], v["in_index"], v["num_convs"],
                   v["kernel_size"], v["concat_input"], v["dilation"], **cls._common(v))

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.select(inputs)
        feat = self.convs(x)
        if self.concat_input:
            feat = self.conv_cat(torch.cat([x, feat], dim=1))
        return self.cls_seg(feat)


class SegformerHead(DecodeHead):
    """SegFormer's all-MLP head (Xie et al., NeurIPS 2021): per-level 1×1 projections, upsampled to
    the finest level, fused by a 1×1 ConvModule."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 in_index: Sequence[int] | None = None, interpolate_mode: str = "bilinear", **common):
        in_channels = [int(c) for c in in_channels]
        in_index = list(range(len(in_channels))) if in_index is None else [int(i) for i in in_index]
        if len(in_channels) != len(in_index):
            raise ValueError(f"SegformerHead needs as many in_channels as in_index, got {in_channels} and {in_index}")
        if interpolate_mode != "bilinear":
            raise NotImplementedError(f"SegformerHead interpolate_mode={interpolate_mode!r}: only bilinear")
        super().__init__(in_channels, channels, num_classes, in_index, **common)
        self.convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels)
        self.fusion_conv = ConvModule(channels * len(in_channels), channels, 1)

    @classmethod
    def from_mmseg_config(cls, config: Mapping) -> SegformerHead:
        v = cls._read_config(config, {"interpolate_mode": "bilinear"})
        return cls(v["in_channels"], v["channels"], v["num_classes"], v.get("in_index"), v["interpolate_mode"],
                   **cls._common(v))

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        xs = self.select(inputs)
        size = xs[0].shape[2:]
        outs = [resize(conv(x), size, self.align_corners) for conv, x in zip(self.convs, xs)]
        return self.cls_seg(self.fusion_conv(torch.cat(outs, dim=1)))


class MultiLevelNeck(nn.Module):
    """MMSegmentation's ``MultiLevelNeck``, how it builds UperNet on a plain ViT: a 1×1 conv per
    input map, each resized by ``scales[i]`` (bilinear, by scale factor) and refined by a 3×3
    conv. With one input map it is used for every scale. As configured for ViT
    (``norm_cfg=None``, ``act_cfg=None``): plain convolutions with bias, Xavier-uniform init."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, scales: Sequence[float] = (0.5, 1, 2, 4)):
        super().__init__()
        self.in_channels, self.out_channels = [int(c) for c in in_channels], int(out_channels)
        self.scales = [float(s) for s in scales]
        if len(self.in_channels) not in (1, len(self.scales)):
            raise ValueError(f"MultiLevelNeck takes one input map or one per scale: {len(self.in_channels)} "
                             f"inputs for {len(self.scales)} scales")
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1, norm=None, act=False)
                                           for c in self.in_channels)
        self.convs = nn.ModuleList(ConvModule(out_channels, out_channels, 3, padding=1, norm=None, act=False)
                                   for _ in self.scales)
        for m in self.modules():  # MultiLevelNeck.init_weights: xavier_init(distribution='uniform'), bias 0
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"MultiLevelNeck built for {len(self.in_channels)} maps got {len(inputs)}")
        xs = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        if len(xs) == 1:
            xs = xs * len(self.scales)
        # By scale factor, not size: the output side is floor(side * scale), sampled at 1/scale.
        return [conv(F.interpolate(x, scale_factor=s, mode="bilinear")) for conv, x, s in zip(self.convs, xs, self.scales)]


HEADS = {"UPerHead": UPerHead, "FCNHead": FCNHead, "SegformerHead": SegformerHead}


def build_head(config: Mapping) -> DecodeHead:
    """Any of the heads from its MMSegmentation config (``type`` names the head)."""
    kind = dict(config).get("type")
    if kind not in HEADS:
        raise ValueError(f"unknown head type {kind!r}; implemented: {', '.join(HEADS)}")
    return HEADS[kind].from_mmseg_config(config)
