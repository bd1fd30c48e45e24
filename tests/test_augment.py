"""Augmentation: Mixup/CutMix, RandAugment, Random Erasing, crop/flip and the transform
pipelines (train.mixup, train.augment, train.transforms)."""

import math
import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import stvit
from stvit.images import EvalTransform
from train.augment import (RAND_INCREASING_OPS, RAND_OPS, RandAugment, RandomErasing,
                           parse_rand_config)
from stvit.contract import soft_target_cross_entropy
from train.mixup import Mixup, smooth_one_hot
from train.transforms import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, RandomHorizontalFlip,
                              RandomResizedCrop, ResizeToCover, build_eval_transform,
                              build_train_transform)


def noise_image(width=96, height=80, seed=0, mode="RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


# ------------------------------------------------------------------------------------ mixup


def batch_with_distinct_images(batch=6, classes=10, size=16):
    # Image i is the constant i, so every output pixel says which source it came from.
    images = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1).expand(
        batch, 3, size, size).clone()
    targets = torch.arange(batch) % classes
    return images, targets


def lam_from_targets(soft, targets, smoothing, classes):
    off = smoothing / classes
    on = 1 - smoothing + off
    return ((soft[0, targets[0]] - off) / (on - off)).item()


def test_mixup_is_a_convex_combination_with_matching_targets():
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=10)
    images, targets = batch_with_distinct_images()
    images = images + torch.randn_like(images)
    for seed in range(5):
        mixed, soft = mixup(images, targets, torch.Generator().manual_seed(seed))
        lam = lam_from_targets(soft, targets, 0.1, 10)
        assert 0.0 <= lam <= 1.0
        torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.flip(0))
        torch.testing.assert_close(soft.sum(1), torch.ones(len(targets)))
        expected = (lam * smooth_one_hot(targets, 10, 0.1)
                    + (1 - lam) * smooth_one_hot(targets.flip(0), 10, 0.1))
        torch.testing.assert_close(soft, expected)


def test_cutmix_lam_equals_the_pasted_area_fraction():
    mixup = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=10)
    images, targets = batch_with_distinct_images(size=20)
    seen_partial_box = False
    for seed in range(20):
        mixed, soft = mixup(images, targets, random.Random(seed))
        lam = lam_from_targets(soft, targets, 0.0, 10)
        pasted = mixed[0, 0] == images[-1, 0, 0, 0]  # pixels taken from the partner image
        assert pasted.float().mean().item() == pytest.approx(1 - lam, abs=1e-6)
        if pasted.any():
            rows, cols = pasted.any(1).nonzero(), pasted.any(0).nonzero()
            box = pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert box.all(), "the pasted region must be one rectangle"
            seen_partial_box |= not pasted.all()
        torch.testing.assert_close(soft.sum(1), torch.ones(len(targets)))
    assert seen_partial_box


def test_mixup_switches_between_mixup_and_cutmix_and_is_reproducible():
    mixup = Mixup(num_classes=10)  # DeiT defaults: both enabled, switch_prob 0.5
    images, targets = batch_with_distinct_images()
    kinds = set()
    for seed in range(20):
        mixed, soft = mixup(images, targets, torch.Generator().manual_seed(seed))
        again, soft_again = mixup(images, targets, torch.Generator().manual_seed(seed))
        assert torch.equal(mixed, again) and torch.equal(soft, soft_again)
        values = set(mixed[0].unique().tolist())
        kinds.add("cutmix" if values <= {0.0, 5.0} else "mixup")
    assert kinds == {"cutmix", "mixup"}
    assert torch.equal(images, batch_with_distinct_images()[0]), "inputs must not be modified"


def test_inactive_mixup_only_smooths_and_odd_batches_work():
    off = Mixup(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=5)
    assert not off.active and Mixup().active
    images, targets = batch_with_distinct_images(batch=5, classes=5)
    mixed, soft = off(images, targets, random.Random(0))
    assert torch.equal(mixed, images)
    torch.testing.assert_close(soft, smooth_one_hot(targets, 5, 0.1))
    assert soft[0, targets[0]].item() == pytest.approx(1 - 0.1 + 0.1 / 5)
    mixed, soft = Mixup(num_classes=5)(images, targets, random.Random(1))
    assert mixed.shape == images.shape and soft.shape == (5, 5)


def test_soft_target_loss_matches_label_smoothed_cross_entropy():
    logits = torch.randn(8, 7, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0])
    soft = smooth_one_hot(targets, 7, 0.1)
    expected = F.cross_entropy(logits, targets, label_smoothing=0.1)
    # The trainer's soft targets without Mixup are smooth_one_hot: the same loss as torch's label smoothing.
    torch.testing.assert_close(soft_target_cross_entropy(logits, soft), expected)


@pytest.mark.parametrize("kwargs", [dict(mixup_alpha=-1), dict(prob=1.5),
                                    dict(label_smoothing=1.0), dict(mode="elem")])
def test_mixup_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        Mixup(**kwargs)


def test_smooth_one_hot_rejects_out_of_range_classes():
    with pytest.raises(ValueError, match="num_classes"):
        smooth_one_hot(torch.tensor([0, 10]), 10)


# ------------------------------------------------------------------------------ RandAugment


def test_parse_deit_rand_string():
    cfg = parse_rand_config("rand-m9-mstd0.5-inc1")
    assert (cfg.magnitude, cfg.num_ops, cfg.magnitude_std, cfg.prob) == (9, 2, 0.5, 0.5)
    assert cfg.increasing and cfg.op_names == RAND_INCREASING_OPS
    assert {"PosterizeIncreasing", "SolarizeIncreasing", "SharpnessIncreasing"} <= set(
        cfg.op_names)
    assert not {"Posterize", "Solarize", "Sharpness"} & set(cfg.op_names)
    cfg = parse_rand_config("rand-m5-n3-mstdinf-p1.0")
    assert (cfg.magnitude, cfg.num_ops, cfg.magnitude_std, cfg.prob) == (5, 3, math.inf, 1.0)
    assert not cfg.increasing and cfg.op_names == RAND_OPS


@pytest.mark.parametrize("config", ["", "rnd-m9", "augmix-m5", "rand-m9-foo1", "rand-mX",
                                    "rand-m11", "rand-inc2", "rand-n1.5", "rand-p2", "rand-m-1"])
def test_parse_rejects_bad_strings(config):
    with pytest.raises(ValueError, match="config"):
        parse_rand_config(config)


@pytest.mark.parametrize("magnitude", [2, 5, 9])
def test_op_parameters_follow_the_configured_magnitude(magnitude):
    aug = RandAugment(f"rand-m{magnitude}-n4-mstd0-inc1-p1")
    m = magnitude / 10
    expected = {  # |parameter| as a function of the magnitude, per op
        "Rotate": 30 * m, "ShearX": 0.3 * m, "ShearY": 0.3 * m, "TranslateXRel": 0.45 * m,
        "TranslateYRel": 0.45 * m, "PosterizeIncreasing": 4 - int(4 * m),
        "SolarizeIncreasing": 256 - int(256 * m), "SolarizeAdd": int(110 * m),
    }
    rng, seen = random.Random(magnitude), set()
    for _ in range(60):
        plan = aug.sample_plan(rng)
        assert len(plan) == 4  # p1: every drawn op is applied
        for op in plan:
            assert op.name in RAND_INCREASING_OPS
            assert op.magnitude == magnitude  # mstd0: exactly m
            seen.add(op.name)
            if op.name in expected:
                assert abs(op.arg) == pytest.approx(expected[op.name])
            elif op.name.endswith("Increasing"):  # enhance factor 1 +- 0.9 m
                assert abs(op.arg - 1.0) == pytest.approx(0.9 * m)
    assert len(seen) >= 12


def test_every_op_runs_at_the_extreme_magnitudes():
    img = noise_image(40, 30)
    for magnitude in (0, 10):
        for increasing in (0, 1):
            aug = RandAugment(f"rand-m{magnitude}-n30-mstd0-inc{increasing}-p1")
            plan = aug.sample_plan(random.Random(0))
            for op in plan:
                out = aug.apply_plan(img, [op])
                assert out.size == img.size and out.mode == "RGB", op
            if magnitude == 10 and increasing:
                posterize = [op for op in plan if op.name == "PosterizeIncreasing"]
                assert posterize and posterize[0].arg == 0  # keeps no bits: black
                assert not np.asarray(aug.apply_plan(img, posterize[:1])).any()


def test_magnitude_noise_and_op_probability():
    aug = RandAugment("rand-m9-mstd0.5-inc1")
    rng = random.Random(0)
    plans = [aug.sample_plan(rng) for _ in range(400)]
    magnitudes = [op.magnitude for plan in plans for op in plan]
    assert all(0 <= m <= 10 for m in magnitudes)
    assert np.mean(magnitudes) == pytest.approx(9, abs=0.15)
    assert 0.3 < np.std(magnitudes) < 0.6
    applied = len(magnitudes) / (2 * len(plans))  # each of the 2 ops kept with p = 0.5
    assert 0.42 < applied < 0.58


def test_increasing_ops_change_the_image_more_at_higher_magnitude():
    # A smooth image spanning the full 0..255 range (shifts change it gradually).
    ramp = np.linspace(0, 255, 64, dtype=np.float32)
    rgb = np.stack([np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64)),
                    np.full((64, 64), 128.0)], axis=-1)
    img = Image.fromarray(rgb.astype(np.uint8), "RGB")
    pixels = np.asarray(img, dtype=np.float32)

    def change(magnitude, name):
        aug = RandAugment(f"rand-m{magnitude}-n1-mstd0-inc1-p1")
        rng = random.Random(0)
        while True:
            plan = aug.sample_plan(rng)
            if plan[0].name == name:
                out = np.asarray(aug.apply_plan(img, plan), dtype=np.float32)
                return np.abs(out - pixels).mean()

    for name in ["PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd", "Rotate",
                 "ShearX", "TranslateYRel", "ContrastIncreasing", "BrightnessIncreasing"]:
        assert change(8, name) > change(2, name) > 0, name


def test_randaugment_output_is_a_same_size_rgb_image_and_seeded():
    aug = RandAugment("rand-m9-mstd0.5-inc1")
    img = noise_image()
    outputs = []
    for seed in range(8):
        out = aug(img, random.Random(seed))
        assert isinstance(out, Image.Image) and out.size == img.size and out.mode == "RGB"
        again = aug(img, random.Random(seed))
        assert out.tobytes() == again.tobytes()
        outputs.append(out.tobytes())
    assert len(set(outputs)) > 4


# ---------------------------------------------------------------------------- Random Erasing


def test_random_erasing_touches_one_rectangle_only():
    erase = RandomErasing(prob=1.0)
    tensor = torch.randn(3, 40, 48, generator=torch.Generator().manual_seed(0))
    for seed in range(10):
        (top, left, h, w), = erase.sample_boxes(random.Random(seed), 40, 48)
        assert 0.015 <= h * w / (40 * 48) <= 0.34
        out = erase(tensor, random.Random(seed))
        assert out.shape == tensor.shape and out.dtype == tensor.dtype
        changed = (out != tensor).any(0)
        inside = torch.zeros_like(changed)
        inside[top:top + h, left:left + w] = True
        assert not changed[~inside].any()
        assert changed[inside].float().mean() > 0.99  # per-pixel noise replaced the box
        assert torch.equal(out, erase(tensor, random.Random(seed)))


def test_random_erasing_probability_and_modes():
    tensor = torch.zeros(3, 32, 32)
    assert torch.equal(RandomErasing(prob=0.0)(tensor, random.Random(0)), tensor)
    hits = sum(bool(RandomErasing(0.25).sample_boxes(random.Random(s), 32, 32))
               for s in range(400))
    assert 70 < hits < 130
    out = RandomErasing(prob=1.0, mode="rand")(tensor + 5, random.Random(0))
    erased = out[:, (out[0] != 5)]
    assert erased.shape[1] > 0 and (erased == erased[:, :1]).all()  # one colour per channel
    with pytest.raises(ValueError, match="mode"):
        RandomErasing(mode="blur")


# ------------------------------------------------------------------------- crop / flip / pipes


def test_random_resized_crop_boxes_stay_inside_and_fall_back_to_center():
    crop = RandomResizedCrop(32)
    rng = random.Random(0)
    for width, height in [(100, 50), (50, 100), (33, 33), (500, 375)]:
        for _ in range(50):
            top, left, h, w = crop.get_params(rng, width, height)
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
            assert h > 0 and w > 0
    # Area 100 % at aspect 1 cannot fit a 2:1 image: 10 tries fail, then the centred square.
    square = RandomResizedCrop(32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert square.get_params(random.Random(0), 100, 50) == (0, 25, 50, 50)


def test_flip_mirrors_the_image():
    img = noise_image()
    flipped = RandomHorizontalFlip(1.0)(img, random.Random(0))
    assert np.array_equal(np.asarray(flipped), np.asarray(img)[:, ::-1])
    assert RandomHorizontalFlip(0.0)(img, random.Random(0)) is img


@pytest.mark.parametrize("size", [32, 64])
def test_train_transform_shape_range_and_determinism(size):
    img = noise_image(120, 90)
    plain = build_train_transform(size, reprob=0.0)
    low = (0 - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(IMAGENET_DEFAULT_STD)
    high = (1 - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(IMAGENET_DEFAULT_STD)
    outputs = []
    for seed in range(4):
        out = plain(img, random.Random(seed))
        assert out.shape == (3, size, size) and out.dtype == torch.float32
        assert (out >= low.view(3, 1, 1) - 1e-5).all() and (out <= high.view(3, 1, 1) + 1e-5).all()
        outputs.append(out)
    assert not torch.equal(outputs[0], outputs[1])

    full = build_train_transform(size)  # with Random Erasing
    random.seed(123)  # the global RNGs must not matter
    torch.manual_seed(123)
    first = full(img, random.Random(7))
    random.seed(456)
    torch.manual_seed(456)
    assert torch.equal(first, full(img, random.Random(7)))
    assert first.shape == (3, size, size)


def test_train_transform_parts_can_be_disabled():
    names = [type(t).__name__ for t in build_train_transform(32, aa="none", reprob=0).transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToNormalizedTensor"]
    names = [type(t).__name__ for t in build_train_transform(32, aa=None).transforms]
    assert "RandAugment" not in names and "RandomErasing" in names
    with pytest.raises(ValueError, match="interpolation"):
        build_train_transform(32, interpolation="cubic")
    with pytest.raises(ValueError, match="RandAugment"):
        build_train_transform(32, aa="v0")


def test_eval_transform_resizes_shorter_side_then_center_crops():
    assert ResizeToCover(73)(noise_image(100, 50), None).size == (146, 73)
    img = noise_image(500, 375)
    out = build_eval_transform(224)(img, random.Random(0))
    assert out.shape == (3, 224, 224)
    assert torch.equal(out, build_eval_transform((3, 224, 224))(img, random.Random(1)))
    small = build_eval_transform(64, crop_pct=0.875)
    assert small.transforms[0].size == (int(64 / 0.875),) * 2
    assert small(noise_image(64, 64), None).shape == (3, 64, 64)
    with pytest.raises(ValueError, match="crop_pct"):
        build_eval_transform(224, crop_pct=1.5)


@pytest.mark.parametrize("input_size", [(3, 96, 128), (3, 128, 96), (3, 64, 64)])
def test_training_eval_transform_equals_the_inference_one(input_size):
    """One evaluation geometry: train's (img, rng) pipeline and stvit.images.EvalTransform agree."""
    cfg = {**stvit.create_model("tiny").pretrained_cfg, "input_size": input_size, "crop_pct": 0.9}
    pipeline = build_eval_transform(input_size, crop_pct=0.9, interpolation=cfg["interpolation"],
                                    mean=cfg["mean"], std=cfg["std"])
    for img in (noise_image(300, 200), noise_image(90, 140)):
        assert torch.equal(pipeline(img, None), EvalTransform(cfg)(img))


def test_pipelines_pickle_for_spawned_loader_workers():
    img = noise_image()
    for transform in (build_train_transform(32), build_eval_transform(32)):
        copy = pickle.loads(pickle.dumps(transform))
        assert torch.equal(copy(img, random.Random(3)), transform(img, random.Random(3)))
