"""Segmentors on every family (stvit/segmentation/segmentor.py), the backbones' dynamic sizes they
rely on, MMSegmentation's loss, sliding windows and IoU metric on hand-checkable cases."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

import stvit
from stvit.segmentation import (IoUAccumulator, create_segmentor, evenly_spaced_blocks, intersect_and_union,
                                iou_metrics, segmentation_cross_entropy, slide_windows)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["stvit_tiny", "sgformer_tiny", "sovit_tiny", "sot_mini", "lvt_tiny"]


@pytest.mark.parametrize("name", TINY)
def test_a_segmentor_of_every_family_trains_a_step_and_infers(name):
    """Backbone features through the contract, UperNet head with its auxiliary head: one AdamW step
    changes the weights and keeps the loss finite; whole and sliding inference give logits at the
    image's size, also for a size the classifier could not take."""
    torch.manual_seed(0)
    seg = create_segmentor(name, head="upernet", num_classes=4, channels=8)
    assert seg.auxiliary_head is not None
    assert (seg.neck is not None) == (name in ("sovit_tiny", "sot_mini"))  # the single-scale ones
    x = torch.randn(2, 3, 72, 56)
    masks = torch.randint(0, 4, (2, 72, 56))
    masks[:, :8] = 255
    opt = torch.optim.AdamW(seg.parameters(), lr=1e-3)
    before = seg.decode_head.conv_seg.weight.detach().clone()
    seg.train()
    loss = seg.training_loss(x, masks, random.Random(0))
    loss.backward()
    opt.step()
    assert math.isfinite(loss.item()) and not torch.equal(before, seg.decode_head.conv_seg.weight)
    seg.eval()
    with torch.no_grad():
        whole = seg.inference(x, "whole")
        slide = seg.inference(x, "slide", crop_size=48, stride=32)
    assert whole.shape == slide.shape == (2, 4, 72, 56)
    assert torch.isfinite(slide).all()
    # the trainer's evaluation: labels at another size than the input, as after the eval resize
    from train.distributed import DistEnv
    from train.engine import evaluate_segmentation
    batches = [(x[:1], masks[:1, ::2, ::2], 0), (x[1:], masks[1:, ::2, ::2], 0)]
    result = evaluate_segmentation(seg, batches, DistEnv(), num_classes=4, mode="slide", crop_size=48, stride=32)
    assert result["val_images"] == 2 and 0 <= result["mIoU"] <= 100 and not seg.training


@pytest.mark.parametrize("name", ["stvit_tiny", "sovit_tiny"])
def test_segformer_head_on_hierarchical_and_single_scale_backbones(name):
    seg = create_segmentor(name, head="segformer", num_classes=3, channels=8).eval()
    assert seg.auxiliary_head is None
    with torch.no_grad():
        assert seg(torch.randn(1, 3, 64, 48)).shape == (1, 3, 64, 48)


def test_full_width_upernet_on_stvit_small_has_the_papers_head_size():
    """seghead.md: UperNet's decode and auxiliary heads on STViT-S: 30,487,852 parameters (meta device)."""
    with torch.device("meta"):
        seg = create_segmentor("stvit_small", num_classes=150)
        segformer = create_segmentor("stvit_small", head="segformer", num_classes=150)
    heads = sum(p.numel() for n, p in seg.named_parameters() if not n.startswith("backbone."))
    assert heads == 30_487_852
    assert sum(p.numel() for n, p in segformer.named_parameters() if not n.startswith("backbone.")) == 565_398
    keys = seg.state_dict()
    assert "decode_head.psp_modules.3.1.bn.running_var" in keys and "auxiliary_head.convs.0.conv.weight" in keys


def test_single_scale_backbones_use_four_evenly_spaced_blocks_and_the_vit_neck():
    assert evenly_spaced_blocks(12) == (2, 5, 8, 11)  # MMSegmentation's ViT-B
    assert evenly_spaced_blocks(14) == (3, 6, 9, 13)
    assert evenly_spaced_blocks(2) == (1,)             # too few blocks: the last one, used at every scale
    with torch.device("meta"):
        seg = create_segmentor("So_vit_14", num_classes=150)
    assert seg.backbone.out_indices == (3, 6, 9, 13)
    assert seg.neck.scales == [4.0, 2.0, 1.0, 0.5]     # stride 16 -> strides 4, 8, 16, 32
    assert seg.auxiliary_head.in_index == 3            # MMSegmentation's ViT UperNet: aux on the last map


def test_the_classification_checkpoint_loads_into_the_backbone():
    classifier = stvit.create_model("stvit_tiny", num_classes=10)
    seg = create_segmentor("stvit_tiny", num_classes=5, channels=8, pretrained=classifier.state_dict())
    ours = seg.backbone.state_dict()
    for key, value in classifier.state_dict().items():
        if key in ours:
            assert torch.equal(ours[key], value), key
    assert any(k.startswith("head.") for k in classifier.state_dict())  # ignored, not an error


def test_weight_decay_exemptions_include_position_tables_and_the_backbones_own():
    sgf = create_segmentor("sgformer_tiny", num_classes=3, channels=8)
    assert "backbone.pos_embed" in sgf.no_weight_decay()
    with torch.device("meta"):
        st = create_segmentor("stvit_large", num_classes=3, channels=8)  # layer-scale gammas
    gammas = {f"backbone.{n}" for n in st.backbone.no_weight_decay()}
    assert gammas and gammas <= st.no_weight_decay()
    assert not any("pos_embed" in n for n in st.no_weight_decay())  # STViT's is a conv, decayed


# ---- the backbones' dynamic sizes -------------------------------------------------------------------

def test_sgformer_dynamic_size_pads_to_the_smallest_size_it_takes_and_crops_back():
    dyn = stvit.create_model("sgformer_s", features_only=True, dynamic_img_size=True)
    assert dyn.padded_size(512, 512) == (672, 672)   # 112·p sides with p·q a multiple of 4
    assert dyn.padded_size(224, 224) == (224, 224)
    assert dyn.padded_size(512, 683) == (560, 896)
    for size in [(512, 512), (512, 683), (100, 37)]:
        padded = dyn.padded_size(*size)
        assert padded[0] >= size[0] and padded[1] >= size[1]
        assert not dyn.grid_problems(*padded, count_tokens=False)
    tiny = stvit.create_model("sgformer_tiny", features_only=True, dynamic_img_size=True).eval()
    fixed = stvit.create_model("sgformer_tiny", features_only=True).eval()
    fixed.load_state_dict(tiny.state_dict())
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        for a, b in zip(tiny(x), fixed(x)):  # at its own size nothing changes
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        maps = tiny(torch.randn(1, 3, 70, 90))
    assert [m.shape[2:] for m in maps] == [(18, 23), (9, 12), (5, 6), (3, 3)]
    with pytest.raises(ValueError, match="does not fit"):
        fixed(torch.randn(1, 3, 70, 90))


@pytest.mark.parametrize("name", ["sovit_tiny", "sot_mini"])
def test_second_order_vits_resample_their_position_table_for_other_sizes(name):
    dyn = stvit.create_model(name, features_only=True, dynamic_img_size=True).eval()
    fixed = stvit.create_model(name, features_only=True).eval()
    fixed.load_state_dict(dyn.state_dict())
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        for a, b in zip(dyn(x), fixed(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert dyn(torch.randn(1, 3, 128, 96))[0].shape[2:] == (16, 12)
    table = dyn.position_table((16, 12))
    assert table.shape == (1, 1 + 16 * 12, dyn.embed_dim)
    assert torch.equal(table[:, 0], dyn.pos_embed[:, 0])  # the class token's entry is kept


# ---- loss, windows, metric ---------------------------------------------------------------------------

def test_cross_entropy_divides_by_all_pixels_ignored_ones_included():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])  # (1, 2 classes, 1, 2)
    target = torch.tensor([[[0, 255]]])
    expected = -math.log(math.exp(2) / (math.exp(2) + 1)) / 2  # one counted pixel, two pixels
    assert segmentation_cross_entropy(logits, target).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="must be"):
        segmentation_cross_entropy(logits, torch.zeros(1, 2, 2, dtype=torch.long))


def test_slide_windows_are_mmsegmentations():
    # ADE20K's usual 512x683 image: two windows, the second moved back to end at the border
    assert slide_windows(512, 683, 512, 341) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    assert slide_windows(300, 200, 512, 341) == [(0, 300, 0, 200)]  # smaller than a crop: one window
    assert len(slide_windows(1024, 1024, 512, 341)) == 9


def test_slide_inference_averages_the_windows_where_they_overlap():
    seg = create_segmentor("stvit_tiny", num_classes=3, channels=8).eval()
    x = torch.randn(1, 3, 40, 64)
    with torch.no_grad():
        got = seg.inference(x, "slide", crop_size=40, stride=24)
        left, right = seg(x[:, :, :, 0:40]), seg(x[:, :, :, 24:64])
    expected = torch.zeros(1, 3, 40, 64)
    expected[..., :24] = left[..., :24]
    expected[..., 24:40] = (left[..., 24:] + right[..., :16]) / 2
    expected[..., 40:] = right[..., 16:]
    torch.testing.assert_close(got, expected)


def test_iou_metric_on_a_hand_checked_case():
    # labels:  0 0 1 255     predictions: 0 1 1 2
    label = torch.tensor([[0, 0, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 2]])
    areas = intersect_and_union(pred, label, num_classes=3)
    assert areas.tolist() == [[1, 1, 0],   # intersection
                              [2, 2, 0],   # union
                              [1, 2, 0],   # predicted (the ignored pixel's 2 is not counted)
                              [2, 1, 0]]   # labelled
    m = iou_metrics(areas)
    assert m["aAcc"] == pytest.approx(200 / 3)                  # 2 of 3 labelled pixels right
    assert m["mIoU"] == pytest.approx(50.0)                      # class 2: no union -> NaN, left out
    assert m["mAcc"] == pytest.approx((50 + 100) / 2)
    assert math.isnan(m["IoU"][2])
    # a class predicted but never present counts with IoU 0 (and no Acc)
    acc = IoUAccumulator(3)
    acc.update(torch.tensor([[0, 2]]), torch.tensor([[0, 0]]))
    m = acc.compute()
    assert m["IoU"][2] == 0 and m["mIoU"] == pytest.approx(25.0) and m["mAcc"] == pytest.approx(50.0)


# ---- the tools: bench throughput --task segment, python -m stvit.segment -------------------------------

def test_bench_times_segmentors_of_every_family_side_by_side(tmp_path):
    import json

    from bench import __main__ as cli
    out = tmp_path / "seg.json"
    cli.main(["throughput", "--default-allocator", "--device", "cpu", "--threads", "1", "--task", "segment",
              "--head", "segformer", "--models", *TINY, "--size", "64", "--batch-sizes", "2", "--modes", "eager",
              "train", "--runs", "1", "--warmup", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["mode"], r["size"]) for r in rows] == [
        (f"{name}+segformer", mode, 64) for name in TINY for mode in ("eager", "train")]
    assert all(r["img_per_s"] > 0 for r in rows)
    with pytest.raises(SystemExit, match="batch of at least 2"):
        cli.main(["throughput", "--default-allocator", "--task", "segment", "--models", "tiny", "--batch-sizes", "1",
                  "--modes", "train"])


def test_segment_writes_a_palette_mask_of_the_predicted_classes(tmp_path, capsys):
    from PIL import Image

    from stvit import segment
    torch.manual_seed(0)
    seg = create_segmentor("stvit_tiny", head="segformer", num_classes=3, channels=8)
    torch.save({"model": seg.state_dict()}, tmp_path / "seg.pt")
    Image.fromarray((torch.rand(40, 60, 3) * 255).byte().numpy()).save(tmp_path / "photo.jpg")
    (tmp_path / "names.txt").write_text("sky\nroad\ncar\n")
    argv = [str(tmp_path / "photo.jpg"), str(tmp_path / "missing.jpg"), "--model", "stvit_tiny", "--checkpoint",
            str(tmp_path / "seg.pt"), "--out", str(tmp_path / "masks"), "--class-names", str(tmp_path / "names.txt"),
            "--resize-scale", "96", "64", "--device", "cpu"]
    assert segment.main(argv) == 1  # the missing image is reported, the other written
    captured = capsys.readouterr()
    assert "error: image file not found" in captured.err and "Traceback" not in captured.err
    mask = Image.open(tmp_path / "masks" / "photo_mask.png")
    assert mask.mode == "P" and mask.size == (60, 40)
    seg.eval()
    labels = segment.segment_image(seg, Image.open(tmp_path / "photo.jpg").convert("RGB"), torch.device("cpu"),
                                   torch.float32, "whole", (96, 64))
    assert np.array_equal(np.asarray(mask), labels)
    assert any(name in captured.out for name in ("sky", "road", "car"))
    classifier = stvit.create_model("stvit_tiny", num_classes=3)
    torch.save(classifier.state_dict(), tmp_path / "cls.pt")
    assert segment.main([str(tmp_path / "photo.jpg"), "--model", "stvit_tiny", "--checkpoint",
                         str(tmp_path / "cls.pt")]) == 1
    assert "not a segmentor checkpoint" in capsys.readouterr().err
