"""Semantic segmentation on the zoo's backbones: MMSegmentation's heads (UPerHead, FCNHead,
SegformerHead, MultiLevelNeck) with its semantics and state-dict keys.

    head = stvit.segmentation.UPerHead.from_mmseg_config(config)   # a head as MMSegmentation builds it
"""

from .heads import ConvModule, DecodeHead, FCNHead, MultiLevelNeck, SegformerHead, UPerHead, build_head

__all__ = ["UPerHead", "FCNHead", "SegformerHead", "MultiLevelNeck", "ConvModule", "DecodeHead", "build_head"]
