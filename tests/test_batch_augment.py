"""The paper pipeline split between workers and the device (train.batch_augment): the batched
RandAugment ops against Pillow pixel for pixel, the deferred pipeline against the fused one, and a
training run with --augment-on device against the same run with everything in the workers."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from train.augment import (_OPS, RAND_INCREASING_OPS, RAND_OPS, PlannedOp, RandAugment,
                           RandomErasing)
from train.batch_augment import DeferredBatch, DeferredSample, DeviceStage, apply_ops
from train.config import augment_on_device
from train.data import ImageFolder, collate_skip_corrupt
from train.transforms import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ToNormalizedTensor,
                              TrainPipeline, build_eval_transform, build_train_transform)
from stvit.images import PIL_RESAMPLE

FILL = (124, 116, 104)
ALL_OPS = sorted(set(RAND_OPS) | set(RAND_INCREASING_OPS))


def photo(seed: int, width: int = 40, height: int = 32) -> Image.Image:
    """Smooth colour structure plus grain; every fourth one has only a few grey levels (where
    Equalize and AutoContrast take their special cases)."""
    rng = np.random.default_rng(seed)
    cell = int(rng.integers(2, 12))
    base = rng.integers(0, 256, (height // cell + 2, width // cell + 2, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC)).astype(int)
    pixels = smooth + rng.integers(-20, 20, (height, width, 3))
    if seed % 4 == 0:
        pixels = pixels // 64 * 10 + 100
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def as_batch(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()


def as_arrays(batch: torch.Tensor) -> np.ndarray:
    return batch.permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------ every op, pixel for pixel

@pytest.mark.parametrize("name", ALL_OPS)
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_each_batched_op_equals_pillow_exactly(name, interpolation):
    rng = random.Random(hash((name, interpolation)) % 10_000)
    images = [photo(seed) for seed in range(12)]
    magnitudes = [0.0, 10.0] + [rng.uniform(0, 10) for _ in range(10)]  # the ends of the range too
    plans = [(PlannedOp(name, m, _OPS[name].level_to_arg(m, rng), interpolation),)
             for m in magnitudes]
    expected = np.stack([np.asarray(_OPS[name].apply(img, plan[0].arg, FILL,
                                                     PIL_RESAMPLE[interpolation]))
                         for img, plan in zip(images, plans)])
    out = as_arrays(apply_ops(as_batch(images), plans, FILL))
    np.testing.assert_array_equal(out, expected, err_msg=f"{name} ({interpolation})")


@pytest.mark.parametrize("degrees", [0.0, 90.0, 180.0, -90.0, 45.0, 360.0 + 12.5])
@pytest.mark.parametrize("size", [(32, 32), (40, 32)])
def test_rotations_pillow_copies_or_resamples_agree(degrees, size):
    images = [photo(seed, *size) for seed in (1, 2)]
    plans = [(PlannedOp("Rotate", 0.0, degrees, "bicubic"),)] * 2
    expected = np.stack([np.asarray(img.rotate(degrees, resample=Image.BICUBIC, fillcolor=FILL))
                         for img in images])
    np.testing.assert_array_equal(as_arrays(apply_ops(as_batch(images), plans, FILL)), expected)


@pytest.mark.parametrize("config", ["rand-m9-mstd0.5-inc1", "rand-m10-mstd100-n3-p1",
                                    "rand-m10-mmax30-inc1-p0.9"])
def test_randaugment_plans_of_several_ops_equal_pillow(config):
    randaug = RandAugment(config, fill=FILL, interpolation="random")
    rng = random.Random(5)
    images = [photo(seed) for seed in range(48)]
    plans = [randaug.sample_plan(rng) for _ in images]
    assert sum(len(p) > 1 for p in plans) > 5  # chained ops are exercised
    expected = np.stack([np.asarray(randaug.apply_plan(img, plan))
                         for img, plan in zip(images, plans)])
    np.testing.assert_array_equal(as_arrays(apply_ops(as_batch(images), plans, FILL)), expected)


def test_an_unknown_affine_resampling_is_refused():
    plans = [(PlannedOp("ShearX", 5.0, 0.1, "lanczos"),)]
    with pytest.raises(ValueError, match="nearest, bilinear or bicubic"):
        apply_ops(as_batch([photo(0)]), plans, FILL)


# ---------------------------------------------------------- the deferred pipeline, end to end

@pytest.fixture(scope="module")
def jpeg() -> bytes:
    buf = io.BytesIO()
    photo(3, 160, 120).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def opened(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize("interpolation", ["bicubic", "random"])
def test_deferred_pipeline_and_device_stage_equal_the_fused_pipeline(jpeg, interpolation):
    kwargs = dict(interpolation=interpolation, reprob=0.0,
                  aa="rand-m9-mstd0.5-inc1-p0.9")  # ops in most samples
    fused = build_train_transform(96, **kwargs)
    deferred = build_train_transform(96, defer=True, **kwargs)
    assert isinstance(deferred, TrainPipeline) and deferred.defer
    expected = torch.stack([fused(opened(jpeg), random.Random(seed)) for seed in range(32)])
    samples = [deferred(opened(jpeg), random.Random(seed)) for seed in range(32)]
    assert all(isinstance(s, DeferredSample) and s.pixels.dtype == torch.uint8 for s in samples)
    assert sum(bool(s.ops) for s in samples) > 16 and sum(s.flip for s in samples) > 4
    batch, targets, skipped = collate_skip_corrupt([(s, 1) for s in samples] + [None])
    assert isinstance(batch, DeferredBatch) and batch.shape == expected.shape and skipped == 1
    torch.testing.assert_close(deferred.device_stage(batch, "cpu"), expected, rtol=0, atol=0)


def test_deferred_erasing_has_the_same_boxes_and_standard_normal_noise(jpeg):
    fused = build_train_transform(96, aa="none", reprob=1.0, recount=2)
    deferred = build_train_transform(96, aa="none", reprob=1.0, recount=2, defer=True)
    expected = torch.stack([fused(opened(jpeg), random.Random(seed)) for seed in range(16)])
    samples = [deferred(opened(jpeg), random.Random(seed)) for seed in range(16)]
    out = deferred.device_stage(collate_skip_corrupt([(s, 0) for s in samples])[0], "cpu")
    erased = torch.zeros_like(out, dtype=torch.bool)
    for i, sample in enumerate(samples):
        assert sample.boxes and sample.noise_seed is not None
        for top, left, h, w in sample.boxes:
            erased[i, :, top:top + h, left:left + w] = True
    assert torch.equal(out[~erased], expected[~erased])  # everything else is the same pixels
    noise = out[erased]
    assert noise.numel() > 10_000 and abs(noise.mean().item()) < 0.05
    assert abs(noise.std().item() - 1.0) < 0.05
    again = deferred.device_stage(collate_skip_corrupt([(s, 0) for s in samples])[0], "cpu")
    assert torch.equal(out, again)  # the noise is a function of the worker's seed


def test_device_erasing_modes():
    batch = torch.zeros(2, 3, 20, 20)
    boxes, seeds = [[(2, 3, 5, 6)], []], [11, None]
    for mode in RandomErasing.MODES:
        out = RandomErasing(1.0, mode=mode).erase_batch_(batch.clone() + 7, boxes, seeds)
        region = out[0, :, 2:7, 3:9]
        assert torch.equal(out[1], torch.full((3, 20, 20), 7.0))
        assert (out[0] == 7).sum() == 3 * (400 - 30)
        if mode == "const":
            assert torch.equal(region, torch.zeros_like(region))
        elif mode == "rand":  # one value per channel
            assert torch.equal(region, region[:, :1, :1].expand_as(region))
        else:
            assert region.unique().numel() == region.numel()


def test_eval_pipeline_deferred_is_bit_identical(jpeg):
    expected = build_eval_transform(96)(opened(jpeg), None)
    deferred = build_eval_transform(96, defer=True)
    sample = deferred(opened(jpeg), None)
    assert isinstance(sample, DeferredSample) and not sample.flip and not sample.ops
    out = deferred.device_stage(collate_skip_corrupt([(sample, 0)])[0], "cpu")
    assert torch.equal(out[0], expected)


def test_normalize_batch_is_the_workers_normalisation():
    pixels = torch.randint(0, 256, (3, 3, 17, 9), dtype=torch.uint8)
    to_tensor = ToNormalizedTensor(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    expected = torch.stack([torch.from_numpy(to_tensor.normalize(p.permute(1, 2, 0).numpy()))
                            for p in pixels])
    assert torch.equal(to_tensor.normalize_batch(pixels), expected)


def test_device_stage_moves_finished_batches_and_refuses_a_deferred_one_it_cannot_finish():
    finished = torch.randn(2, 3, 8, 8)
    assert torch.equal(DeviceStage(None)(finished, "cpu"), finished)
    batch = DeferredBatch.stack([DeferredSample(torch.zeros(8, 8, 3, dtype=torch.uint8))])
    with pytest.raises(TypeError, match="defer=True"):
        DeviceStage(None)(batch, "cpu")
    assert build_train_transform(32).device_stage(finished, "cpu") is not None


def test_image_folder_workers_hand_over_uint8(tmp_path, jpeg):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(jpeg)
    ds = ImageFolder(tmp_path, build_train_transform(64, defer=True))
    sample, target = ds[(0, 3)]
    assert isinstance(sample, DeferredSample) and sample.pixels.shape == (64, 64, 3)
    assert sample.pixels.is_contiguous() and target == 0


def test_auto_defers_on_a_gpu_only():
    assert augment_on_device("auto", torch.device("cuda")) is True
    assert augment_on_device("auto", torch.device("cpu")) is False
    assert augment_on_device("device", torch.device("cpu")) is True
    assert augment_on_device("workers", torch.device("cuda")) is False
