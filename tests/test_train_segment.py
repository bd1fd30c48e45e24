"""``python -m train --task segment``: the segmentation task in the same loop (iteration schedule,
evaluation, resume, FSDP2, eval-only), MMSegmentation's ADE20K pipeline piece by piece, and the
errors for bad data — on a tiny generated set in the ADE20K layout (32 px)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import stvit
from conftest import needs_cpu_fsdp2
from train.__main__ import main
from train.config import parse_config
from train.schedule import build_schedule
from train.seg_data import (SegEvalTransform, SegmentationDataError, SegmentationDataset, SegTrainTransform,
                            crop_box, ensure_demo_segmentation, find_pairs, photometric_distortion, rescale_size,
                            resize_label)

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--task", "segment", "--model", "tiny", "--input-size", "32", "--num-workers", "0", "--log-every", "1000",
        "--head-channels", "8", "--resize-scale", "64", "32", "--seed", "1"]
KEYS = ("step", "train_loss", "mIoU", "mAcc", "aAcc", "lr", "train_images", "val_images", "global_step")

pytestmark = pytest.mark.usefixtures("one_thread")


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights(run: Path) -> dict:
    return torch.load(run / "model_final.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # 5 validation images: two processes get 3 and 2, so one runs a throw-away forward pass
    return ensure_demo_segmentation(tmp_path_factory.mktemp("seg") / "shapes", train_images=16, val_images=5,
                                    image_size=32)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """6 iterations, 2 accumulated micro-batches of 2, evaluated at steps 3 and 6."""
    out = tmp_path_factory.mktemp("segrun")
    assert main(FAST + ["--data-path", str(data), "--iters", "6", "--warmup-iters", "2", "--eval-every", "3",
                        "--batch-size", "2", "--accum-steps", "2", "--output-dir", str(out)]) == 0
    return out


def test_a_segmentation_run_evaluates_on_its_schedule_and_writes_what_classification_does(reference, data):
    records = metrics(reference)
    assert [r["step"] for r in records] == [3, 6]
    assert all(0 <= r["mIoU"] <= 100 and r["val_images"] == 5 and r["train_images"] == 12 for r in records)
    config = json.loads((reference / "config.json").read_text())
    assert config["task"] == "segment" and config["head"] == "upernet" and config["num_classes"] == 11
    assert (reference / "tensorboard").is_dir() and (reference / "latest").is_file()
    # model_final.pt is a segmentor state dict: MMSegmentation's key names, loadable strictly
    seg = stvit.create_segmentor("stvit_tiny", num_classes=11, channels=8)
    stvit.load_checkpoint(seg, reference / "model_final.pt")
    assert any(k.startswith("auxiliary_head.") for k in final_weights(reference))


def test_eval_only_reproduces_the_last_evaluation(reference, data, capsys):
    checkpoint = ["--eval", "--checkpoint", str(reference / "model_final.pt")]
    assert main(FAST + ["--data-path", str(data), *checkpoint]) == 0
    last = metrics(reference)[-1]
    assert f"mIoU {last['mIoU']:.2f}" in capsys.readouterr().out
    # sliding windows of the 32² crop over the 32² images: one window each, the same prediction
    assert main(FAST + ["--data-path", str(data), *checkpoint, "--eval-mode", "slide"]) == 0
    out = capsys.readouterr().out
    assert "(slide)" in out and f"mIoU {last['mIoU']:.2f}" in out


def test_max_steps_evaluates_and_the_same_command_resumes_bit_identically(reference, data, tmp_path):
    out = tmp_path / "stopped"
    args = FAST + ["--data-path", str(data), "--iters", "6", "--warmup-iters", "2", "--eval-every", "3",
                   "--batch-size", "2", "--accum-steps", "2", "--output-dir", str(out)]
    assert main(args + ["--max-steps", "2"]) == 0
    assert [r["step"] for r in metrics(out)] == [2]  # stopped at --max-steps: evaluated there
    assert main(args) == 0  # --resume auto continues the run
    ours, ref = metrics(out), metrics(reference)
    assert [r["step"] for r in ours] == [2, 3, 6]
    for key in KEYS:
        assert ours[-1][key] == ref[-1][key], key
    for name, value in final_weights(reference).items():
        assert torch.equal(final_weights(out)[name], value), name


@needs_cpu_fsdp2
def test_fsdp_two_processes_train_and_evaluate_like_one(reference, data, tmp_path):
    """2 processes × 2 images = 1 process × 2 accumulated micro-batches of 2 (drop path and BN per
    micro-batch, as in classification); every validation image counted once."""
    out = tmp_path / "fsdp"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train",
           *FAST, "--data-path", str(data), "--iters", "6", "--warmup-iters", "2", "--eval-every", "3",
           "--batch-size", "2", "--output-dir", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) (cpu, FSDP2)" in result.stdout
    ours, ref = metrics(out), metrics(reference)
    assert [r["val_images"] for r in ours] == [5, 5]
    assert [r["train_loss"] for r in ours] == pytest.approx([r["train_loss"] for r in ref], rel=1e-5)
    weights, single = final_weights(out), final_weights(reference)
    for name, _ in stvit.create_segmentor("stvit_tiny", num_classes=11, channels=8).named_parameters():
        torch.testing.assert_close(weights[name], single[name], msg=name)


def test_the_segmentation_presets():
    ade = parse_config(["--task", "segment", "--data-path", "/ade", "--model", "small"], world_size=8)
    assert (ade.preset, ade.global_batch, ade.lr, ade.weight_decay, ade.opt_betas) == ("segment", 16, 6e-5, 0.01,
                                                                                       (0.9, 0.999))
    assert (ade.iters, ade.warmup_iters, ade.eval_every, ade.input_size, ade.head) == (160_000, 1500, 16_000, 512,
                                                                                        "upernet")
    schedule = build_schedule(ade, steps_per_epoch=1263)
    assert schedule(0) == pytest.approx(6e-11)                       # LinearLR start_factor 1e-6
    assert schedule(750) == pytest.approx(3e-5, rel=1e-5)            # half-way through the warm-up
    assert schedule(1500) == pytest.approx(6e-5)
    assert schedule(1500 + 158_500 // 2) == pytest.approx(3e-5)      # poly, power 1
    assert schedule(159_999) == pytest.approx(6e-5 / 158_500)
    demo = parse_config(["--task", "segment"])
    assert (demo.preset, demo.model, demo.data_path) == ("segment-demo", "stvit_tiny", None)


@pytest.mark.parametrize("argv, message", [
    (["--head", "upernet"], "only for semantic segmentation"),
    (["--task", "segment", "--finetune", "x.pt"], "--pretrained FILE"),
    (["--task", "segment", "--iters", "10", "--warmup-iters", "10"], "--warmup-iters"),
])
def test_segmentation_options_are_checked(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


# ---- bad data --------------------------------------------------------------------------------------

def write_pair(root: Path, split: str, name: str, image: np.ndarray, label: np.ndarray) -> None:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / split / f"{name}.jpg")
    Image.fromarray(label).save(root / "annotations" / split / f"{name}.png")


def ade_like(tmp_path: Path) -> Path:
    root = tmp_path / "ade"
    for split in ("training", "validation"):
        write_pair(root, split, "a", np.zeros((20, 30, 3), np.uint8), np.full((20, 30), 3, np.uint8))
    return root


def test_a_folder_that_is_not_the_ade20k_layout_is_named_with_the_fix(tmp_path, data, capsys):
    (tmp_path / "imagenet" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(Exception, match="images/training is missing.*ImageNet-style"):
        find_pairs(tmp_path / "imagenet", "train")
    with pytest.raises(Exception, match=r"did you mean --data-path .*shapes"):
        find_pairs(data.parent, "train")  # the folder above the dataset
    root = ade_like(tmp_path)
    (root / "annotations" / "training" / "a.png").unlink()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "annotations" / "training" / "b.png")
    with pytest.raises(Exception, match=r"1 image\(s\) without an annotation: .*images/training/a.*1 annotation"):
        find_pairs(root, "train")
    assert main(["--task", "segment", "--data-path", str(tmp_path / "imagenet"), "--num-workers", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_labels_beyond_the_classes_name_the_file(tmp_path):
    root = ade_like(tmp_path)
    write_pair(root, "training", "b", np.zeros((20, 30, 3), np.uint8), np.full((20, 30), 160, np.uint8))
    ds = SegmentationDataset(root, "train", SegEvalTransform())
    ds[0]  # labels 3 -> class 2: fine
    with pytest.raises(SegmentationDataError, match=r"annotations/training/b\.png has label 160 but the dataset has "
                                                    r"150 classes"):
        ds[1]


def test_an_image_and_mask_of_different_sizes_name_both_files_even_from_a_worker(tmp_path):
    root = ade_like(tmp_path)
    write_pair(root, "training", "b", np.zeros((20, 30, 3), np.uint8), np.zeros((10, 30), np.uint8))
    ds = SegmentationDataset(root, "train", SegEvalTransform())
    with pytest.raises(SegmentationDataError, match=r"b\.png is 30x10 but its image .*b\.jpg is 30x20"):
        ds[1]
    from train.data import collate_skip_corrupt
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1, collate_fn=collate_skip_corrupt)
    with pytest.raises(SegmentationDataError) as caught:
        list(loader)
    assert str(caught.value).startswith(str(root / "annotations" / "training" / "b.png"))  # no worker traceback
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(root / "annotations" / "training" / "b.png")
    with pytest.raises(SegmentationDataError, match="RGB image; an annotation must be a single-channel PNG"):
        ds[1]


# ---- the pipeline ------------------------------------------------------------------------------------

def test_random_resize_keeps_the_ratio_as_mmcv():
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)        # ADE20K's usual size fits as it is
    assert rescale_size(512, 683, (1024, 256)) == (256, 342)        # ratio 0.5: int(683 / 2 + 0.5)
    assert rescale_size(300, 2000, (2048, 512)) == (307, 2048)      # the long side binds


def test_nearest_label_resize_takes_floor_of_the_scaled_index():
    label = np.arange(4, dtype=np.uint8)[None].repeat(2, 0)
    assert resize_label(label, (2, 6)).tolist()[0] == [0, 0, 1, 2, 2, 3]


def test_crop_redraws_until_no_class_covers_cat_max_ratio():
    label = np.zeros((10, 20), np.uint8)
    label[:, 10:] = 1  # a 10-wide crop has x1 columns of class 1: below 75 % for x1 in 3..7
    redrawn = 0
    for seed in range(20):
        y1, y2, x1, x2 = crop_box(label, 10, random.Random(seed), 0.75)
        assert 3 <= x1 <= 7, seed
        redrawn += crop_box(label, 10, random.Random(seed), 1.0) != (y1, y2, x1, x2)  # without the rule
    assert redrawn > 0
    ignored = np.full((10, 20), 255, np.uint8)  # nothing but ignored pixels: 10 redraws, the 11th box kept
    assert crop_box(ignored, 10, random.Random(0), 0.75)[1] == 10


def test_train_transform_pads_the_label_with_255_and_keeps_labels_and_pixels_aligned():
    image = np.zeros((20, 24, 3), np.uint8)
    image[:, 12:] = 255
    label = np.zeros((20, 24), np.uint8)
    label[:, 12:] = 1
    t = SegTrainTransform(crop_size=64, scale=(24, 20), ratio_range=(1.0, 1.0), photometric=False)
    x, y = t(image, label, random.Random(0))
    assert x.shape == (3, 64, 64) and y.shape == (64, 64)
    assert (y[20:] == 255).all() and (y[:, 24:] == 255).all() and (x[:, 20:] == 0).all()
    bright = x[0, :20, :24] > 0  # white pixels are the label-1 ones, flipped or not
    assert torch.equal(bright, y[:20, :24] == 1)


def test_photometric_distortion_is_a_function_of_the_seed_and_keeps_uint8():
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    a, b = photometric_distortion(image, random.Random(3)), photometric_distortion(image, random.Random(3))
    assert a.dtype == np.uint8 and np.array_equal(a, b)
    assert any(not np.array_equal(photometric_distortion(image, random.Random(s)), image) for s in range(4))


def test_eval_transform_keeps_the_label_at_its_original_size(tmp_path):
    root = ade_like(tmp_path)
    ds = SegmentationDataset(root, "val", SegEvalTransform(scale=(64, 40)))
    x, y = ds[0]
    assert x.shape == (3, 40, 60) and y.shape == (20, 30)
    assert (y == 2).all()  # reduce_zero_label: 3 -> 2
