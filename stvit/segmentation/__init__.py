"""Semantic segmentation on the zoo's backbones: MMSegmentation's heads (UPerHead, FCNHead,
SegformerHead, MultiLevelNeck) with its semantics and state-dict keys, a segmentor for every
family (:func:`create_segmentor`), and MMSegmentation's IoU metric.

    import stvit
    seg = stvit.create_segmentor("stvit_small", head="upernet", num_classes=150,
                                 pretrained="stvit-small-224.pth")
    head = stvit.segmentation.UPerHead.from_mmseg_config(config)   # a head as MMSegmentation builds it
"""

from .heads import ConvModule, DecodeHead, FCNHead, MultiLevelNeck, SegformerHead, UPerHead, build_head
from .metric import IoUAccumulator, intersect_and_union, iou_metrics
from .segmentor import (CROP_SIZE, HEADS, IGNORE_INDEX, SLIDE_STRIDE, Segmentor, create_segmentor,
                        evenly_spaced_blocks, segmentation_cross_entropy, slide_windows)
from .classes import ade20k_class_names, palette

__all__ = ["UPerHead", "FCNHead", "SegformerHead", "MultiLevelNeck", "ConvModule", "DecodeHead", "build_head",
           "Segmentor", "create_segmentor", "segmentation_cross_entropy", "slide_windows", "evenly_spaced_blocks",
           "IoUAccumulator", "intersect_and_union", "iou_metrics", "ade20k_class_names", "palette", "HEADS",
           "CROP_SIZE", "SLIDE_STRIDE", "IGNORE_INDEX"]
