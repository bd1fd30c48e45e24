"""Datasets, samplers and the synthetic demo set (train.data, train.samplers, train.synthetic)."""

import glob
import os
import threading
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from train import synthetic
from train.data import (CorruptImageWarning, DataError, ImageFolder, build_datasets,
                        collate_skip_corrupt)
from train.samplers import (DistributedEvalSampler, DistributedTrainSampler, RepeatAugSampler,
                            build_train_sampler)
from train.synthetic import MARKER, ensure_demo_dataset
from train.transforms import build_eval_transform, build_train_transform


def save_image(path: Path, mode: str, size=(40, 30), seed=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3),
                                                  dtype=np.uint8)
    img = Image.fromarray(pixels, "RGB")
    img = img.convert("P", palette=Image.Palette.ADAPTIVE) if mode == "P" else img.convert(mode)
    img.save(path, format=fmt)


@pytest.fixture
def tiny_folder(tmp_path):
    """root/{cat,dog,eel}/ with RGB, grayscale, RGBA and palette images."""
    root = tmp_path / "root"
    save_image(root / "dog" / "a.jpg", "RGB", seed=1)
    save_image(root / "dog" / "b.JPEG", "L", seed=2, fmt="JPEG")
    save_image(root / "cat" / "c.png", "RGBA", seed=3)
    save_image(root / "cat" / "nested" / "d.png", "P", seed=4)
    save_image(root / "eel" / "e.png", "L", seed=5)
    (root / "eel" / "notes.txt").write_text("not an image")
    return root


# ------------------------------------------------------------------------------ ImageFolder


def test_image_folder_lists_classes_and_converts_to_rgb(tiny_folder):
    ds = ImageFolder(tiny_folder, transform=build_train_transform(16, reprob=0.5))
    assert ds.classes == ["cat", "dog", "eel"]
    assert ds.class_to_idx == {"cat": 0, "dog": 1, "eel": 2}
    assert [(Path(p).name, t) for p, t in ds.samples] == [
        ("c.png", 0), ("d.png", 0), ("a.jpg", 1), ("b.JPEG", 1), ("e.png", 2)]
    for i in range(len(ds)):
        assert ds.load_rgb(i).mode == "RGB"
        image, target = ds[(i, 1234)]
        assert image.shape == (3, 16, 16) and target == ds.samples[i][1]
        assert torch.equal(image, ds[(i, 1234)][0])  # same seed, same augmentation
    assert not torch.equal(ds[(0, 1)][0], ds[(0, 2)][0])
    plain = ImageFolder(tiny_folder)
    assert isinstance(plain[0][0], Image.Image)


def test_corrupt_images_become_none_and_are_counted(tiny_folder):
    (tiny_folder / "dog" / "garbage.jpg").write_bytes(b"this is not a jpeg")
    good = (tiny_folder / "dog" / "a.jpg").read_bytes()
    (tiny_folder / "dog" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    ds = ImageFolder(tiny_folder, transform=build_eval_transform(16))
    bad = [i for i, (p, _) in enumerate(ds.samples) if "garbage" in p or "truncated" in p]
    assert len(bad) == 2
    with pytest.warns(CorruptImageWarning, match="garbage"):
        assert ds[bad[0]] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second read of the same file must not warn again
        assert ds[bad[0]] is None

    loader = DataLoader(ds, batch_size=len(ds), collate_fn=collate_skip_corrupt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptImageWarning)
        images, targets, skipped = next(iter(loader))
    assert skipped == 2 and images.shape == (len(ds) - 2, 3, 16, 16)
    assert targets.dtype == torch.int64 and len(targets) == len(ds) - 2
    empty_images, empty_targets, skipped = collate_skip_corrupt([None, None])
    assert skipped == 2 and len(empty_images) == 0 and len(empty_targets) == 0


def test_missing_or_malformed_folders_raise_clear_errors(tmp_path, tiny_folder):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="no class folders"):
        ImageFolder(tmp_path / "flat")
    (tiny_folder / "fox").mkdir()
    with pytest.raises(DataError, match=r"class folder .*fox has no images"):
        ImageFolder(tiny_folder)


def test_build_datasets_checks_the_imagenet_layout(tmp_path):
    for split in ("train", "val"):
        for cls in ("ant", "bee"):
            save_image(tmp_path / "data" / split / cls / "0.png", "RGB")
    train_ds, val_ds = build_datasets(tmp_path / "data", 24, aa="rand-m9-mstd0.5-inc1",
                                      reprob=0.25)
    assert train_ds.classes == val_ds.classes == ["ant", "bee"]
    assert train_ds[(0, 5)][0].shape == val_ds[0][0].shape == (3, 24, 24)

    with pytest.raises(DataError, match="does not exist"):
        build_datasets(tmp_path / "missing", 24, None, 0)
    save_image(tmp_path / "data" / "val" / "cow" / "0.png", "RGB")
    with pytest.raises(DataError, match="only in val: cow"):
        build_datasets(tmp_path / "data", 24, None, 0)
    os.rename(tmp_path / "data" / "train", tmp_path / "data" / "training")
    with pytest.raises(DataError, match="no 'train' folder.*ImageNet layout"):
        build_datasets(tmp_path / "data", 24, None, 0)


# -------------------------------------------------------------------------------- samplers


def rank_lists(sampler_cls, world, dataset_len, epoch=0, **kwargs):
    lists = []
    for rank in range(world):
        sampler = sampler_cls(dataset_len, num_replicas=world, rank=rank, **kwargs)
        sampler.set_epoch(epoch)
        lists.append(list(sampler))
    return lists


def interleave(lists):
    """Rank lists back into global order (round-robin), i.e. what one process would see."""
    return [item for group in zip(*lists) for item in group]


def test_repeated_augmentation_sends_each_copy_to_a_different_rank():
    lists = rank_lists(RepeatAugSampler, 3, 30)
    for items in lists:  # fewer than 256 images: ceil(N / R) samples per rank
        assert len(items) == 10
    per_rank = [Counter(index for index, _ in items) for items in lists]
    assert per_rank[0] == per_rank[1] == per_rank[2]  # the same 10 images on every rank
    assert set(per_rank[0].values()) == {1}
    seeds = [seed for items in lists for _, seed in items]
    assert len(set(seeds)) == len(seeds)  # every copy is augmented differently


def test_repeated_augmentation_epoch_length_follows_deit():
    assert len(RepeatAugSampler(1000, num_replicas=2, rank=1)) == 768 // 2
    assert len(RepeatAugSampler(1000, num_replicas=3, rank=0)) == 768 // 3
    assert len(RepeatAugSampler(100, num_replicas=3, rank=0)) == 34  # small set: ceil(N / R)
    items = list(RepeatAugSampler(1000))
    counts = Counter(index for index, _ in items)
    assert len(items) == 768 and set(counts.values()) == {3}  # 256 images, 3 copies each


@pytest.mark.parametrize("sampler_cls,dataset_len", [(RepeatAugSampler, 1000),
                                                     (RepeatAugSampler, 61),
                                                     (DistributedTrainSampler, 61)])
def test_samples_and_seeds_do_not_depend_on_world_size(sampler_cls, dataset_len):
    single = rank_lists(sampler_cls, 1, dataset_len, epoch=3, seed=7)[0]
    for world in (2, 3, 4):
        merged = interleave(rank_lists(sampler_cls, world, dataset_len, epoch=3, seed=7))
        common = min(len(merged), len(single))
        assert common >= len(single) - world
        assert merged[:common] == single[:common]


def test_epochs_and_seeds_change_the_order():
    first = list(RepeatAugSampler(500, seed=0))
    sampler = RepeatAugSampler(500, seed=0)
    sampler.set_epoch(1)
    assert [i for i, _ in sampler] != [i for i, _ in first]
    assert [i for i, _ in RepeatAugSampler(500, seed=1)] != [i for i, _ in first]
    assert list(RepeatAugSampler(500, seed=0)) == first


@pytest.mark.parametrize("sampler_cls", [RepeatAugSampler, DistributedTrainSampler])
def test_set_start_resumes_where_an_uninterrupted_epoch_would_be(sampler_cls):
    for world in (1, 2, 3):
        for rank in range(world):
            sampler = sampler_cls(301, num_replicas=world, rank=rank, seed=5)
            sampler.set_epoch(2)
            full = list(sampler)
            for start in (0, 1, 17, len(full)):
                sampler.set_epoch(2)
                sampler.set_start(start)
                assert len(sampler) == len(full) - start
                assert list(sampler) == full[start:]
            sampler.set_epoch(3)  # a new epoch starts from its beginning again
            assert len(sampler) == len(full)
            with pytest.raises(ValueError, match="start position"):
                sampler.set_start(len(full) + 1)


def test_plain_train_sampler_covers_everything_with_padding():
    for world in (1, 2, 3, 4):
        lists = rank_lists(DistributedTrainSampler, world, 10)
        assert {len(items) for items in lists} == {-(-10 // world)}
        assert {index for items in lists for index, _ in items} == set(range(10))
    assert isinstance(build_train_sampler(10, num_repeats=1), DistributedTrainSampler)
    assert isinstance(build_train_sampler(10, num_repeats=3), RepeatAugSampler)


@pytest.mark.parametrize("dataset_len", [1, 2, 7, 10, 13])
def test_eval_sampler_covers_every_index_exactly_once(dataset_len):
    for world in (1, 2, 3, 4):
        shards = [list(DistributedEvalSampler(dataset_len, world, rank)) for rank in range(world)]
        assert sorted(i for shard in shards for i in shard) == list(range(dataset_len))
        sizes = [len(DistributedEvalSampler(dataset_len, world, r)) for r in range(world)]
        assert sizes == [len(s) for s in shards] and max(sizes) - min(sizes) <= 1


def test_samplers_reject_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        RepeatAugSampler(10, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="non-empty"):
        DistributedTrainSampler(0)
    with pytest.raises(ValueError, match="num_repeats"):
        RepeatAugSampler(10, num_repeats=0)


def test_loader_end_to_end_with_repeated_augmentation(tiny_folder):
    ds = ImageFolder(tiny_folder, transform=build_train_transform(16))
    sampler = RepeatAugSampler(len(ds), seed=3)
    loader = DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=collate_skip_corrupt)
    batches = list(loader)
    assert sum(len(t) for _, t, _ in batches) == len(sampler) == 5
    images, targets, skipped = batches[0]
    assert images.shape == (2, 3, 16, 16) and skipped == 0


# ---------------------------------------------------------------------------- demo dataset


def small_demo(root, **overrides):
    kwargs = dict(num_classes=10, train_per_class=3, val_per_class=1, image_size=24, seed=0)
    kwargs.update(overrides)
    return ensure_demo_dataset(root, **kwargs)


def test_demo_dataset_is_written_once_and_decodes(tmp_path):
    root = small_demo(tmp_path / "demo")
    assert (root / MARKER).is_file()
    train_ds, val_ds = build_datasets(root, 24, aa=None, reprob=0)
    assert len(train_ds.classes) >= 10 and len(train_ds) == 30 and len(val_ds) == 10
    for path, _ in train_ds.samples[::7]:
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.size == (24, 24)
    files = sorted(glob.glob(str(root / "*" / "*" / "*.jpg")))
    stamps = [os.stat(f).st_mtime_ns for f in files]
    assert small_demo(tmp_path / "demo") == root
    assert [os.stat(f).st_mtime_ns for f in files] == stamps  # reused, not rewritten
    with pytest.raises(DataError, match="other settings"):
        small_demo(tmp_path / "demo", seed=1)


def test_demo_dataset_is_the_same_every_time(tmp_path):
    def contents(root):
        return {Path(f).relative_to(root): Path(f).read_bytes()
                for f in glob.glob(str(root / "*" / "*" / "*.jpg"))}

    assert contents(small_demo(tmp_path / "a")) == contents(small_demo(tmp_path / "b"))
    assert contents(small_demo(tmp_path / "a")) != contents(small_demo(tmp_path / "c", seed=1))


def test_demo_dataset_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a complete demo dataset"):
        small_demo(tmp_path / "taken")


def test_concurrent_builders_share_one_complete_copy(tmp_path, monkeypatch):
    # Both builders get past the "already there?" check before either renames into place.
    barrier = threading.Barrier(2, timeout=30)
    write_split = synthetic._write_split

    def write_then_wait(folder, *args):
        write_split(folder, *args)
        if folder.name == "val":
            barrier.wait()

    monkeypatch.setattr(synthetic, "_write_split", write_then_wait)
    results, errors = [], []

    def build():
        try:
            results.append(small_demo(tmp_path / "demo"))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and results == [tmp_path / "demo"] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temp folders left
    assert len(ImageFolder(tmp_path / "demo" / "train").samples) == 30


def test_demo_classes_are_not_separable_by_mean_colour(tmp_path):
    root = small_demo(tmp_path / "demo", train_per_class=40, val_per_class=20, image_size=24)

    def mean_colours(split):
        ds = ImageFolder(root / split)
        feats = np.stack([np.asarray(ds.load_rgb(i), dtype=np.float32).mean((0, 1))
                          for i in range(len(ds))])
        return feats, np.array(ds.targets)

    train_x, train_y = mean_colours("train")
    val_x, val_y = mean_colours("val")
    centroids = np.stack([train_x[train_y == c].mean(0) for c in range(10)])
    predicted = np.argmin(((val_x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == val_y).mean() < 0.4  # chance is 0.1; a colour cue would score high
