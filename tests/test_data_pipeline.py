"""The fused train pipeline (train.transforms.TrainPipeline) against the step-by-step reference:
same random parameters for a seed, the same augmentations, pixels that differ only where the
crop + resize step says so (JPEG draft decoding, torch's resize at the crop border); the eval
pipeline and the tensor conversion unchanged; ``python -m bench data``."""

import io
import json
import pickle
import random
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from bench import __main__ as bench_cli
from bench.data import _photo
from train.augment import RandomErasing
from train.data import CorruptImageWarning, ImageFolder
from train.transforms import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Compose, RandomResizedCrop,
                              ToNormalizedTensor, TrainPipeline, build_eval_transform,
                              build_train_transform, draft_scale)
from stvit.images import to_tensor

STD_LEVELS = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1) * 255


def jpeg_bytes(img: Image.Image, quality=90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def opened(data: bytes) -> Image.Image:
    """A JPEG opened but not decoded: what ImageFolder hands the fused pipeline."""
    return Image.open(io.BytesIO(data))


def decoded(data: bytes) -> Image.Image:
    """What ImageFolder hands today's pipeline."""
    return Image.open(io.BytesIO(data)).convert("RGB")


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of two normalised images in uint8 levels."""
    return (a - b).abs() * STD_LEVELS


@pytest.fixture(scope="module")
def photo_jpeg() -> bytes:
    return jpeg_bytes(_photo(np.random.default_rng(3), 500, 375))


class Recorder(random.Random):
    """A random.Random that logs every draw (method name and result)."""

    def __init__(self, seed):
        self.log = []
        super().__init__(seed)

    def random(self):
        value = super().random()
        self.log.append(("random", value))
        return value

    def getrandbits(self, k):
        value = super().getrandbits(k)
        self.log.append(("getrandbits", value))
        return value


# ------------------------------------------------------------------- same random parameters


@pytest.mark.parametrize("kwargs", [dict(), dict(interpolation="random"), dict(reprob=1.0, recount=2),
                                    dict(aa="rand-m9-mstd0.5-inc1-n3-p0.9", hflip=0.3)])
@pytest.mark.parametrize("defer", [False, True], ids=["fused", "deferred"])
def test_fused_pipeline_makes_the_same_draws_as_the_reference(photo_jpeg, kwargs, defer):
    fused = build_train_transform(64, defer=defer, **kwargs)
    reference = build_train_transform(64, fast=False, **kwargs)
    assert isinstance(fused, TrainPipeline) and type(reference) is Compose
    for seed in range(40):
        a, b = Recorder(seed), Recorder(seed)
        fused(opened(photo_jpeg), a)
        reference(decoded(photo_jpeg), b)
        assert a.log == b.log, seed  # every draw, in order: crop, flip, ops, magnitudes, erasing


def test_crop_boxes_flips_ops_and_erasing_follow_the_recipe_over_many_seeds(photo_jpeg):
    pipeline = build_train_transform(224)
    crop, flip, randaug, _, erasing = pipeline.transforms
    img = opened(photo_jpeg)
    width, height = img.size
    areas, log_ratios, flips, ops, erased = [], [], 0, Counter(), 0
    for seed in range(2000):
        rng = random.Random(seed)
        top, left, h, w = crop.get_params(rng, width, height)
        areas.append(h * w / (width * height))
        log_ratios.append(np.log(w / h))
        flips += rng.random() < flip.prob
        ops.update(op.name for op in randaug.sample_plan(rng))
        erased += bool(erasing.sample_boxes(rng, 224, 224))
        # the fused pipeline draws exactly these: its load() returns the same box
        decoded_crop = pipeline.load(opened(photo_jpeg), random.Random(seed)) if seed < 50 else None
        if decoded_crop is not None:
            assert decoded_crop.box == (left, top, left + w, top + h) and decoded_crop.scale == 1
    areas = np.array(areas)
    assert 0.08 - 1e-3 <= areas.min() and areas.max() <= 1.0
    assert 0.38 < np.mean(areas) < 0.47  # U(0.08, 1), biased low: large boxes that do not fit are redrawn
    assert np.abs(log_ratios).max() <= np.log(4 / 3) + 0.02
    assert 0.46 < flips / 2000 < 0.54
    assert set(ops) == set(randaug.op_names) and sum(ops.values()) / 2000 == pytest.approx(1.0, abs=0.07)
    assert 0.22 < erased / 2000 < 0.28


# ------------------------------------------------------------------------ pixels vs reference


def test_fused_output_matches_the_reference_up_to_resize_rounding(photo_jpeg):
    """No draft at 500x375 -> 224: the only difference is torch's resize vs Pillow's at the crop
    border and in rounding; RandAugment, erasing and normalisation run the same code."""
    fused = build_train_transform(224)
    reference = build_train_transform(224, fast=False)
    diffs = []
    for seed in range(24):
        a = fused(opened(photo_jpeg), random.Random(seed))
        b = reference(decoded(photo_jpeg), random.Random(seed))
        assert a.shape == b.shape == (3, 224, 224) and a.dtype == b.dtype == torch.float32
        diffs.append(levels(a, b))
    d = torch.stack(diffs)
    assert d.mean() < 0.2  # levels: most pixels are identical
    assert (d > 1.5).float().mean() < 0.01


def test_resize_only_differs_at_the_border_and_by_rounding(photo_jpeg):
    fused = build_train_transform(224, aa=None, reprob=0)
    reference = build_train_transform(224, aa=None, reprob=0, fast=False)
    for seed in range(20):
        d = levels(fused(opened(photo_jpeg), random.Random(seed)),
                   reference(decoded(photo_jpeg), random.Random(seed)))
        interior = d[:, 3:-3, 3:-3]
        assert interior.max() <= 2.01  # rounding of the fixed-point filters (2 when upscaling)
        assert (interior > 0.5).float().mean() < 0.01


def test_small_outputs_use_pillow_and_equal_the_reference():
    """The 32² demo pipeline: Pillow's resize, bit-identical to the reference."""
    data = jpeg_bytes(_photo(np.random.default_rng(0), 64, 64))
    fused = build_train_transform(32, aa="none", reprob=0.0, scale=(0.5, 1.0))
    reference = build_train_transform(32, aa="none", reprob=0.0, scale=(0.5, 1.0), fast=False)
    for seed in range(20):
        assert torch.equal(fused(opened(data), random.Random(seed)),
                           reference(decoded(data), random.Random(seed)))


def test_already_decoded_images_of_any_mode_work():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    fused, reference = build_train_transform(48), build_train_transform(48, fast=False)
    for mode in ("RGB", "L", "RGBA", "P"):
        src = img.convert(mode)
        out = fused(src, random.Random(5))
        assert out.shape == (3, 48, 48)
        d = levels(out, reference(src.convert("RGB"), random.Random(5)))
        assert d.mean() < 0.5


# -------------------------------------------------------------------------- draft decoding


def coordinate_jpeg(width=1600, height=1200) -> bytes:
    """A smooth image whose colour encodes the position: red = x, green = y."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8)
    return jpeg_bytes(Image.fromarray(rgb), quality=95)


@pytest.mark.parametrize("crop,out,k", [((900, 1000), (224, 224), 4), ((448, 448), (224, 224), 2),
                                        ((447, 900), (224, 224), 1), ((1800, 1800), (224, 224), 8),
                                        ((100, 100), (32, 32), 2), ((300, 300), (224, 224), 1)])
def test_draft_scale_is_the_smallest_that_still_covers_the_output(crop, out, k):
    assert draft_scale(crop, out) == k


def test_draft_decoding_maps_the_crop_box_onto_the_same_region():
    data = coordinate_jpeg()
    fused = build_train_transform(224, aa=None, reprob=0, hflip=0)
    reference = build_train_transform(224, aa=None, reprob=0, hflip=0, fast=False)
    seen = Counter()
    for seed in range(40):
        rng = random.Random(seed)
        top, left, h, w = fused.crop.get_params(rng, 1600, 1200)
        loaded = fused.load(opened(data), random.Random(seed))
        k = loaded.scale
        seen[k] += 1
        assert k == draft_scale((h, w), (224, 224))
        assert loaded.image.size == (-(-1600 // k), -(-1200 // k))
        assert loaded.box == pytest.approx((left / k, top / k, (left + w) / k, (top + h) / k))
        d = levels(fused(opened(data), random.Random(seed)), reference(decoded(data), random.Random(seed)))
        # A box mapped wrongly by even one drafted pixel shifts the gradients by k levels or more.
        assert d[:2, 4:-4, 4:-4].mean() < 0.6, (seed, k)
    assert seen[2] and seen[4]  # the 1600x1200 image gets 1/2 and 1/4 decodes


def test_draft_changes_pixels_only_slightly_on_a_photo_like_image():
    data = jpeg_bytes(_photo(np.random.default_rng(1), 1600, 1200))
    fused = build_train_transform(224, aa=None, reprob=0)
    reference = build_train_transform(224, aa=None, reprob=0, fast=False)
    drafted = []
    for seed in range(30):
        if fused.load(opened(data), random.Random(seed)).scale > 1:
            drafted.append(levels(fused(opened(data), random.Random(seed)),
                                  reference(decoded(data), random.Random(seed))))
    d = torch.stack(drafted)
    assert len(drafted) > 10
    # DCT-domain downscale vs bicubic of the full image (measured about 0.9 levels mean)
    assert d.mean() < 1.5 and (d > 8).float().mean() < 1e-3


def test_draft_can_be_turned_off():
    data = coordinate_jpeg()
    plain = TrainPipeline(build_train_transform(224, aa=None, reprob=0).transforms, draft=False)
    assert plain.load(opened(data), random.Random(0)).scale == 1


# ------------------------------------------------------------------ erasing, tensors, eval


@pytest.mark.parametrize("mode,count", [("pixel", 1), ("rand", 1), ("const", 1), ("pixel", 3)])
def test_in_place_erasing_equals_random_erasing(mode, count):
    erase = RandomErasing(prob=0.7, mode=mode, count=count)
    tensor = torch.randn(3, 40, 56, generator=torch.Generator().manual_seed(0))
    hits = 0
    for seed in range(50):
        expected = erase(tensor, random.Random(seed))
        array = tensor.numpy().copy()
        out = erase.erase_(array, random.Random(seed))
        assert out is array and torch.equal(torch.from_numpy(array), expected)
        hits += not torch.equal(expected, tensor)
    assert 25 < hits < 45


def test_tensor_conversion_is_bit_identical_to_stvit_images_to_tensor():
    rng = np.random.default_rng(0)
    for shape in ((224, 224, 3), (31, 17, 3)):
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        for mean, std in ((IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), ((0.5,) * 3, (0.5,) * 3)):
            fast = ToNormalizedTensor(mean, std)(img, None)
            assert fast.is_contiguous() and torch.equal(fast, to_tensor(img, mean, std))
            assert torch.equal(ToNormalizedTensor(mean, std, fast=False)(img, None), fast)


def test_eval_pipeline_output_is_unchanged(tmp_path, photo_jpeg):
    root = tmp_path / "val"
    (root / "a").mkdir(parents=True)
    (root / "a" / "0.jpg").write_bytes(photo_jpeg)
    gray = Image.open(io.BytesIO(photo_jpeg)).convert("L")
    gray.save(root / "a" / "1.jpg", quality=90)
    Image.open(io.BytesIO(photo_jpeg)).convert("RGBA").save(root / "a" / "2.png")
    new = ImageFolder(root, build_eval_transform(224))
    old = ImageFolder(root, build_eval_transform(224, fast=False))
    for i in range(len(new)):
        a, b = new[i], old[i]
        assert torch.equal(a[0], b[0]) and a[1] == b[1]


# ------------------------------------------------------------------------------ ImageFolder


def test_image_folder_feeds_the_fused_pipeline_undecoded_files(tmp_path, photo_jpeg):
    root = tmp_path / "train"
    for cls in ("x", "y"):
        (root / cls).mkdir(parents=True)
        (root / cls / "0.JPEG").write_bytes(photo_jpeg)
    (root / "y" / "broken.JPEG").write_bytes(photo_jpeg[: len(photo_jpeg) // 3])
    fused = ImageFolder(root, build_train_transform(224))  # 500x375 -> 224: no draft
    reference = ImageFolder(root, build_train_transform(224, fast=False))
    for seed in range(5):
        a, b = fused[(0, seed)], reference[(0, seed)]
        assert a[1] == b[1] == 0 and levels(a[0], b[0]).mean() < 0.3
        assert torch.equal(a[0], fused[(0, seed)][0])  # same seed, same output
    broken = [i for i, (p, _) in enumerate(fused.samples) if "broken" in p][0]
    with pytest.warns(CorruptImageWarning, match="broken"):
        assert fused[(broken, 0)] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused[(broken, 1)] is None  # warned once per file


def test_fused_pipeline_pickles_and_rejects_other_orders():
    pipeline = build_train_transform(32)
    copy = pickle.loads(pickle.dumps(pipeline))
    data = jpeg_bytes(_photo(np.random.default_rng(0), 120, 90))
    assert torch.equal(copy(opened(data), random.Random(1)), pipeline(opened(data), random.Random(1)))
    assert "TrainPipeline" in repr(pipeline)
    parts = build_train_transform(32).transforms
    with pytest.raises(ValueError, match="fuses"):
        TrainPipeline(parts[::-1])
    with pytest.raises(ValueError, match="fuses"):
        TrainPipeline([RandomResizedCrop(32)])  # no tensor conversion


# ------------------------------------------------------------------------------ the bench


def test_bench_data_runs_and_writes_json(tmp_path, monkeypatch):
    monkeypatch.setattr("bench.data._demo_dir", lambda: _tiny_demo(tmp_path / "demo"))
    out = tmp_path / "data.json"
    bench_cli.main(["data", "--images", "6", "--image-size", "80", "60", "--rounds", "1", "--workers", "0",
                    "--batch-size", "4", "--baseline", "--cache-dir", str(tmp_path / "cache"),
                    "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["command"] == "data" and "cpu" in result["machine"]
    names = [row["pipeline"] for row in result["rows"]]
    assert {"paper", "paper (today)", "demo", "demo (today)", "eval", "eval (today)"} <= set(names)
    assert any(name.startswith("decode") for name in names)
    paper = next(row for row in result["rows"] if row["pipeline"] == "paper")
    assert paper["cpu_img_s"] > 0 and paper["speedup"] > 0 and paper["w0_img_s"] > 0
    # the split pipeline: the workers' share against today's pipeline, and the device stage beside it
    deferred = next(row for row in result["rows"] if row["pipeline"] == "paper-defer")
    assert deferred["cpu_img_s"] > 0 and deferred["speedup"] > 0 and deferred["w0_img_s"] > 0
    assert result["device_stage"]["device"] == "cpu" and result["device_stage"]["wall_img_s"] > 0
    assert any(name.startswith("paper-defer device stage") for name in names)


def _tiny_demo(root):
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            _photo(np.random.default_rng(i), 64, 64).save(root / cls / f"{i}.jpg", quality=90)
    return root


def test_bench_data_training_feed_against_a_synthetic_batch(tmp_path):
    out = tmp_path / "feed.json"
    bench_cli.main(["data", "--device", "cpu", "--pipelines", "paper-defer", "--images", "8", "--image-size", "80",
                    "60", "--input-size", "32", "--rounds", "1", "--workers", "0", "--batch-size", "4",
                    "--train", "tiny", "--train-steps", "2", "--cache-dir", str(tmp_path / "cache"),
                    "--json", str(out)])
    feed = json.loads(out.read_text())["training_feed"]
    assert (feed["model"], feed["mode"], feed["batch"], feed["workers"], feed["device"]) == (
        "stvit_tiny", "train", 4, 0, "cpu")
    assert feed["fed_img_s"] > 0 and len(feed["synthetic_img_s"]) == 2 and min(feed["synthetic_img_s"]) > 0
    assert feed["fed_fraction"] == pytest.approx(feed["fed_img_s"] / max(feed["synthetic_img_s"]))
