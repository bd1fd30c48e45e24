"""Safe and clear I/O: bad checkpoints and images get a message that names the problem, never
a deep torch/Pillow traceback; pickled code is never run; odd image modes are converted."""

from __future__ import annotations

import argparse
import pathlib
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

import stvit
from stvit import predict, visualize
from stvit.checkpoint import CheckpointError, read_checkpoint
from stvit.images import EvalTransform, ImageError, load_image, to_rgb


class CreatesMarkerWhenUnpickled:
    """Unpickling this runs ``Path(marker).touch()``: a stand-in for arbitrary code."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture(scope="module")
def tiny_state():
    torch.manual_seed(0)
    return stvit.create_model("stvit_tiny").state_dict()


@pytest.fixture
def tiny_file(tmp_path, tiny_state):
    path = tmp_path / "tiny.pth"
    torch.save(tiny_state, path)
    return path


# ---- checkpoints ------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_checkpoint(tiny_file, keep):
    data = tiny_file.read_bytes()
    tiny_file.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"cannot read .*tiny\.pth: the file is truncated, corrupt"):
        read_checkpoint(tiny_file)


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty"),
    (b"model weights go here\n", "is a text file"),
    (b"\x00\x01\x02\x03binary junk" * 4, "is not a PyTorch checkpoint"),
    (b"\x40\x00\x00\x00\x00\x00\x00\x00{\"w\": {}}", "the safetensors file is truncated or corrupt"),
])
def test_files_that_are_not_checkpoints(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


# ---- safetensors ------------------------------------------------------------------------------

def test_safetensors_round_trip_is_exact_and_strict(tmp_path, tiny_state):
    path = tmp_path / "tiny.safetensors"
    stvit.save_state_dict(tiny_state, path, metadata={"model": "stvit_tiny"})
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "model": "stvit_tiny"}
    model = stvit.create_model("tiny")
    stvit.load_checkpoint(model, path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tiny_state.items())
    assert stvit.create_model("tiny", pretrained=str(path)) is not None

    # Still strict, filters still applied: another architecture gets the same table as a .pth would.
    with pytest.raises(CheckpointError, match=r"does not match the model architecture: \d+ missing, 0 unexpected"):
        stvit.load_checkpoint(stvit.create_model("small"), path)
    with pytest.raises(CheckpointError, match=r"this is a checkpoint of stvit_tiny \(a stvit checkpoint, not lvt\)"):
        stvit.load_checkpoint(stvit.create_model("lvt_tiny"), path)
    # A DataParallel-prefixed file under any name, found by its contents.
    stvit.save_state_dict({f"module.{k}": v for k, v in tiny_state.items()}, tmp_path / "w.safetensors")
    (tmp_path / "w.safetensors").rename(tmp_path / "w.bin")
    assert read_checkpoint(tmp_path / "w.bin").keys() == tiny_state.keys()


def test_safetensors_writes_shared_tensors_and_refuses_other_objects(tmp_path):
    weight = torch.randn(4, 4)
    stvit.save_state_dict({"a": weight, "tied": weight, "view": weight[0]}, tmp_path / "t.safetensors")
    state = read_checkpoint(tmp_path / "t.safetensors")
    assert torch.equal(state["tied"], weight) and torch.equal(state["view"], weight[0])
    with pytest.raises(ValueError, match="safetensors holds tensors only: 'epoch' is a int"):
        stvit.save_state_dict({"w": weight, "epoch": 3}, tmp_path / "x.safetensors")
    assert not list(tmp_path.glob("x*")) and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("damage", ["truncated", "header garbled", "header length too large"])
def test_damaged_safetensors_file_gets_one_line(tmp_path, tiny_state, damage):
    path = tmp_path / "tiny.safetensors"
    stvit.save_state_dict(tiny_state, path)
    data = path.read_bytes()
    data = {"truncated": data[: len(data) // 2], "header garbled": data[:8] + b"{not json" + data[17:],
            "header length too large": b"\xff" * 8 + data[8:]}[damage]
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"cannot read {path}: the safetensors file is truncated or corrupt (SafetensorError")
    assert message.endswith("; download or save it again")


def test_without_safetensors_it_says_how_to_install_it(tmp_path, tiny_state, monkeypatch):
    stvit.save_state_dict(tiny_state, tmp_path / "tiny.safetensors")
    monkeypatch.setitem(__import__("sys").modules, "safetensors", None)
    monkeypatch.setitem(__import__("sys").modules, "safetensors.torch", None)
    install = r'need the safetensors package, which is not installed: pip install "stvit\[safetensors\]"'
    with pytest.raises(CheckpointError, match=install):
        read_checkpoint(tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match=install):
        stvit.save_state_dict(tiny_state, tmp_path / "again.safetensors")
    stvit.save_state_dict(tiny_state, tmp_path / "tiny.pt")  # torch files need nothing more


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        read_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="is a directory"):
        read_checkpoint(tmp_path)


def test_checkpoint_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        read_checkpoint(tmp_path / "list.pth")
    torch.save({"model": {"w": torch.zeros(1), "name": "x"}}, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match="'name' is a str, not a tensor"):
        read_checkpoint(tmp_path / "mixed.pth")


@pytest.mark.parametrize("writer", ["torch.save", "pickle protocol 2", "pickle protocol 5"])
def test_pickled_objects_are_refused_and_never_executed(tmp_path, tiny_state, writer):
    marker = tmp_path / "code-ran"
    payload = {"model": dict(tiny_state), "extra": CreatesMarkerWhenUnpickled(marker)}
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=int(writer[-1]))
    with pytest.raises(CheckpointError, match="It was NOT loaded: unpickling such objects can run arbitrary code"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError):
        stvit.create_model("tiny", pretrained=str(path))
    assert not marker.exists()
    pickle.loads(pickle.dumps(CreatesMarkerWhenUnpickled(marker)))  # the payload does work when unpickled
    assert marker.exists()


def test_training_checkpoint_with_argparse_options_loads(tmp_path, tiny_state):
    args = argparse.Namespace(model="stvit_tiny", lr=1e-3, epochs=300)
    torch.save({"model": tiny_state, "args": args, "epoch": 299}, tmp_path / "train.pth")
    state = read_checkpoint(tmp_path / "train.pth")
    assert state.keys() == tiny_state.keys()


def test_architecture_mismatch_is_a_readable_table(tiny_file):
    with pytest.raises(CheckpointError) as err:
        stvit.load_checkpoint(stvit.create_model("small"), tiny_file)
    lines = str(err.value).splitlines()
    assert re.match(r"checkpoint does not match the model architecture: \d+ missing, 0 unexpected, "
                    r"\d+ mis-shaped keys", lines[0])
    tiny = stvit.create_model("tiny").state_dict()
    values = sum(t.numel() for t in tiny.values()) / 1e6
    assert lines[1] == f"  checkpoint: {len(tiny)} tensors, {values:.2f} M values, 1000 classes (stvit_tiny, family stvit)"
    assert lines[2].startswith("  model:") and "(stvit_small, family stvit)" in lines[2]
    assert "stvit.create_model('stvit_tiny', num_classes=1000)" in lines[3]
    header, rows = lines[4], lines[5:-1]
    assert header.split() == ["key", "problem", "checkpoint", "model"]
    stem = next(r for r in rows if r.split()[0] == "patch_embed.proj.0.weight")
    assert stem.split()[-2:] == ["16×3×3×3", "32×3×3×3"] and "shape differs" in stem
    # Columns line up: every row ends its shape columns where the header does.
    assert {len(r) for r in rows} == {len(header)}
    assert re.fullmatch(r"  \.\.\. and \d+ more", lines[-1])


def test_head_only_mismatch_says_how_to_fix_it(tiny_file):
    with pytest.raises(CheckpointError, match=r"only the classifier differs: the checkpoint has 1000 classes"):
        stvit.load_checkpoint(stvit.create_model("tiny", num_classes=10), tiny_file)


# ---- images -----------------------------------------------------------------------------------

def test_undecodable_and_truncated_images(tmp_path):
    (tmp_path / "fake.jpg").write_bytes(b"GIF89a but then nothing sensible")
    with pytest.raises(ImageError, match=r"cannot decode .*fake\.jpg: not an image format"):
        load_image(tmp_path / "fake.jpg")
    (tmp_path / "notes.png").write_text("just text")
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(tmp_path / "notes.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.png: the file is truncated or corrupt"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(ImageError, match="image file not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


def test_oversized_image_is_refused(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="too large to open safely"):
        load_image(tmp_path / "big.png")


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = np.arange(48 * 32, dtype=np.uint8).reshape(32, 48)
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert img.mode == "RGB" and img.size == (48, 32)
    np.testing.assert_array_equal(np.asarray(img), np.repeat(gray[..., None], 3, -1))


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    deep = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "deep.png"))[0, :, 0], [0, 100, 255])


def test_transparency_is_flattened_onto_white(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 10, 30, 255)   # opaque: kept
    rgba[0, 1] = (200, 10, 30, 0)     # transparent: white
    rgba[1, 0] = (0, 0, 0, 128)       # half-transparent black: mid grey
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(load_image(tmp_path / "a.png")).astype(int)
    assert out[0, 0].tolist() == [200, 10, 30]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert np.abs(out[1, 0] - 127).max() <= 1
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    assert to_rgb(la).getpixel((1, 0)) == (255, 255, 255)
    palette = Image.fromarray(rgba[..., :3]).convert("P")
    palette.info["transparency"] = palette.getpixel((1, 0))
    assert to_rgb(palette).mode == "RGB"


def test_cmyk_and_exif_rotation(tmp_path):
    Image.new("CMYK", (8, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    img = load_image(tmp_path / "c.jpg")
    assert img.mode == "RGB" and img.size == (8, 4)
    r, g, b = img.getpixel((4, 2))
    assert r > 200 and g < 60 and b < 60  # cyan/magenta/yellow ink 0/100/100% is red
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    Image.new("RGB", (40, 20), (0, 128, 0)).save(tmp_path / "phone.jpg", exif=exif)
    assert load_image(tmp_path / "phone.jpg").size == (20, 40)


# ---- evaluation transform ---------------------------------------------------------------------

def test_eval_transform_resizes_crops_and_normalises():
    cfg = stvit.create_model("tiny").pretrained_cfg
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)  # H 200 × W 300
    img = Image.fromarray(pixels)
    got = EvalTransform(cfg)(img)
    # By hand: shorter side 200 -> int(224 / 0.875) = 256, longer 300 -> 384, center 224 crop.
    resized = np.asarray(img.resize((384, 256), Image.Resampling.BICUBIC), dtype=np.float64)
    top, left = (256 - 224) // 2, (384 - 224) // 2
    crop = resized[top: top + 224, left: left + 224] / 255.0
    want = (crop - np.array(cfg["mean"])) / np.array(cfg["std"])
    assert got.shape == (3, 224, 224) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want.transpose(2, 0, 1), atol=1e-5)


@pytest.mark.parametrize("size", [(10, 7), (500, 90), (224, 224), (1, 1)])
def test_eval_transform_output_size_for_any_input(size):
    cfg = {**stvit.create_model("tiny").pretrained_cfg, "input_size": (3, 96, 128)}
    x = EvalTransform(cfg)(Image.new("L", size, 100))
    assert x.shape == (3, 96, 128)
    expected = (100 / 255 - np.array(cfg["mean"])) / np.array(cfg["std"])
    np.testing.assert_allclose(x.mean((1, 2)).numpy(), expected, atol=1e-5)


# ---- the command-line tools print one error line -------------------------------------------

def test_cli_reports_bad_checkpoint_without_traceback(tmp_path, capsys, tiny_state):
    marker = tmp_path / "code-ran"
    torch.save({"model": tiny_state, "x": CreatesMarkerWhenUnpickled(marker)}, tmp_path / "evil.pth")
    Image.new("RGB", (40, 40)).save(tmp_path / "img.png")
    code = predict.main([str(tmp_path / "img.png"), "--model", "tiny", "--checkpoint", str(tmp_path / "evil.pth"),
                         "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.startswith("error: ") and "NOT loaded" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


def test_cli_reports_architecture_mismatch(tmp_path, capsys, tiny_file):
    Image.new("RGB", (40, 40)).save(tmp_path / "img.png")
    code = predict.main([str(tmp_path / "img.png"), "--model", "small", "--checkpoint", str(tiny_file),
                         "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: checkpoint does not match the model architecture")
    assert "stvit.create_model('stvit_tiny', num_classes=1000)" in err and "Traceback" not in err
    assert err.rstrip().endswith("on the command line: --model stvit_tiny")  # the CLI's own fix
    code = visualize.main([str(tmp_path / "img.png"), "--model", "small", "--checkpoint", str(tiny_file),
                           "--device", "cpu", "--out", str(tmp_path / "vis")])
    err = capsys.readouterr().err
    assert code == 1 and err.rstrip().endswith("on the command line: --model stvit_tiny")


def test_checkpoint_error_names_the_flag_only_when_it_differs():
    e = CheckpointError("does not match", matching_model="stvit_tiny")
    assert e.command_line_message("tiny") == "does not match"  # already the right model
    assert e.command_line_message("small").endswith("--model stvit_tiny")
    assert CheckpointError("truncated").command_line_message("small") == "truncated"


# ---- atomic writes ----------------------------------------------------------------------------

def test_atomic_path_replaces_whole_files_with_ordinary_permissions(tmp_path):
    import os

    from stvit.files import atomic_path

    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert not target.exists()  # nothing visible until the block succeeds
    assert target.read_text() == "new"
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]  # no temp file left
