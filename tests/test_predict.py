"""``python -m stvit.predict``: top-k classes with probabilities, names, and the eval transform."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import stvit
from stvit import predict

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^  (\d\.\d{4})  +(\d+)  (.+)$")


def parse(stdout: str) -> dict[str, list[tuple[float, int, str]]]:
    """{image: [(probability, index, name), ...]} from the tool's output."""
    results: dict[str, list] = {}
    current = None
    for line in stdout.splitlines():
        found = LINE.match(line)
        if found:
            results[current].append((float(found.group(1)), int(found.group(2)), found.group(3)))
        else:
            assert line.endswith(":"), f"unexpected output line {line!r}"
            current = line[:-1]
            results[current] = []
    return results


def photo(seed: int, size=(300, 200)) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)


def reference_probabilities(model: stvit.STViT, img: Image.Image) -> torch.Tensor:
    """Eval transform written out here: shorter side to int(224 / 0.875) = 256 (bicubic),
    center crop 224, ImageNet normalisation; then the model's softmax."""
    w, h = img.size
    new_size = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    resized = img.convert("RGB").resize(new_size, Image.Resampling.BICUBIC)
    left, top = round((resized.width - 224) / 2), round((resized.height - 224) / 2)
    crop = np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=np.float64) / 255
    x = (crop - stvit.IMAGENET_MEAN) / stvit.IMAGENET_STD
    with torch.no_grad():
        return model(torch.from_numpy(x.transpose(2, 0, 1)).float()[None]).softmax(-1)[0]


@pytest.fixture(scope="module")
def trained_like(tmp_path_factory):
    """A tiny 1000-class model with a spread-out head, so its top-5 is well separated."""
    torch.manual_seed(0)
    model = stvit.create_model("stvit_tiny").eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 1.0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    stvit.save_state_dict(model.state_dict(), path)
    return model, path


def test_bundled_imagenet_class_names():
    names = predict.imagenet_class_names()
    assert len(names) == 1000 and all(n and n == n.strip() for n in names)
    spot = {0: "tench", 1: "goldfish", 207: "golden retriever", 281: "tabby", 285: "Egyptian cat",
            409: "analog clock", 530: "digital clock", 817: "sports car", 948: "Granny Smith", 999: "toilet tissue"}
    assert {i: names[i] for i in spot} == spot
    assert len(set(names)) == 998  # "crane" and "maillot" name two synsets each
    assert names[134] == names[517] == "crane" and names[638] == names[639] == "maillot"


def test_command_line_top5(tmp_path, trained_like):
    model, ckpt = trained_like
    images = {"a.png": photo(1), "b.jpg": photo(2, (180, 260)).convert("L")}
    for name, img in images.items():
        img.save(tmp_path / name)
    run = subprocess.run([sys.executable, "-m", "stvit.predict", *(str(tmp_path / n) for n in images),
                          "--model", "tiny", "--checkpoint", str(ckpt), "--device", "cpu"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "RANDOM" not in run.stderr
    results = parse(run.stdout)
    assert list(results) == [str(tmp_path / n) for n in images]
    names = predict.imagenet_class_names()
    for name, img in images.items():
        top = results[str(tmp_path / name)]
        probs = [p for p, _, _ in top]
        assert len(top) == 5
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 5e-4
        assert all(label == names[index] for _, index, label in top)
        want = reference_probabilities(model, img)
        assert [i for _, i, _ in top] == want.topk(5).indices.tolist()
        np.testing.assert_allclose(probs, want.topk(5).values.numpy(), atol=6e-5)


def test_other_class_counts_are_named_by_index(tmp_path, capsys):
    torch.manual_seed(0)
    stvit.save_state_dict(stvit.create_model("tiny", num_classes=3).state_dict(), tmp_path / "three.pth")
    photo(0).save(tmp_path / "x.png")
    code = predict.main([str(tmp_path / "x.png"), "--model", "tiny", "--checkpoint", str(tmp_path / "three.pth"),
                         "--device", "cpu"])
    top = parse(capsys.readouterr().out)[str(tmp_path / "x.png")]
    assert code == 0
    assert sorted(i for _, i, _ in top) == [0, 1, 2]  # top-5 of 3 classes is all 3
    assert all(label == f"class {i}" for _, i, label in top)
    assert abs(sum(p for p, _, _ in top) - 1) < 5e-4

    (tmp_path / "names.txt").write_text("cat\ndog\nbird\n")
    predict.main([str(tmp_path / "x.png"), "--model", "tiny", "--checkpoint", str(tmp_path / "three.pth"),
                  "--class-names", str(tmp_path / "names.txt"), "--topk", "2", "--device", "cpu"])
    top = parse(capsys.readouterr().out)[str(tmp_path / "x.png")]
    assert len(top) == 2 and all(label == ["cat", "dog", "bird"][i] for _, i, label in top)


def test_without_checkpoint_it_warns_loudly(tmp_path, capsys):
    photo(0).save(tmp_path / "x.png")
    code = predict.main([str(tmp_path / "x.png"), "--model", "tiny", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "RANDOM weights" in err and "meaningless" in err
    assert len(parse(out)[str(tmp_path / "x.png")]) == 5


def test_a_bad_image_does_not_stop_the_others(tmp_path, capsys, trained_like):
    _, ckpt = trained_like
    photo(0).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n then garbage")
    code = predict.main([str(tmp_path / "bad.png"), str(tmp_path / "good.png"), "--model", "tiny",
                         "--checkpoint", str(ckpt), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 1
    assert err.startswith("error: cannot decode") and "bad.png" in err and "Traceback" not in err
    assert list(parse(out)) == [str(tmp_path / "good.png")]


def test_usage_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        predict.main(["x.png", "--model", "stvit_huge"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unknown model 'stvit_huge'" in err and "stvit: stvit_tiny, stvit_small" in err
    with pytest.raises(SystemExit) as exit_:
        predict.main(["x.png", "--topk", "0"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("command", ["predict", "segment", "visualize"])
def test_a_bad_device_is_named_with_the_fix(command, capsys, monkeypatch):
    import importlib
    main = importlib.import_module(f"stvit.{command}").main
    assert main(["x.png", "--device", "gpu0"]) == 2
    assert "error: unknown device 'gpu0'; use cpu, cuda or cuda:N" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["x.png", "--device", "cuda:1"]) == 2
    assert "--device cuda:1 was asked for but no CUDA GPU is available; use --device cpu" in capsys.readouterr().err


def test_backbone_checkpoint_and_wrong_names_file(tmp_path, capsys):
    torch.manual_seed(0)
    backbone = stvit.create_model("tiny", features_only=True)
    stvit.save_state_dict(backbone.state_dict(), tmp_path / "backbone.pth")
    photo(0).save(tmp_path / "x.png")
    code = predict.main([str(tmp_path / "x.png"), "--model", "tiny", "--checkpoint", str(tmp_path / "backbone.pth")])
    assert code == 1 and "has no classifier head" in capsys.readouterr().err
    assert predict.load_model("tiny", tmp_path / "backbone.pth").features_only

    (tmp_path / "names.txt").write_text("cat\ndog\n")
    code = predict.main([str(tmp_path / "x.png"), "--model", "tiny", "--class-names", str(tmp_path / "names.txt")])
    err = capsys.readouterr().err
    assert code == 1 and "has 2 lines but the model has 1000 classes" in err


@pytest.mark.parametrize("name", ["sgformer_tiny", "lvt_tiny", "sovit_tiny"])
def test_any_family_predicts_through_the_contract(tmp_path, capsys, name):
    """predict speaks only to the model contract: another family's checkpoint (here a 7-class one, its
    classifier size read from the file) classifies at that model's own input size and crop."""
    torch.manual_seed(0)
    model = stvit.create_model(name, num_classes=7).eval()
    stvit.save_state_dict(model.state_dict(), tmp_path / "w.pt")
    photo(1, (150, 120)).save(tmp_path / "a.png")
    assert predict.main([str(tmp_path / "a.png"), "--model", name, "--checkpoint", str(tmp_path / "w.pt"),
                         "--topk", "3", "--device", "cpu"]) == 0
    (rows,) = parse(capsys.readouterr().out).values()
    x = stvit.images.EvalTransform(model.pretrained_cfg)(Image.open(tmp_path / "a.png"))
    with torch.no_grad():
        expected = model(x[None]).softmax(-1)[0]
    assert [index for _, index, _ in rows] == expected.topk(3).indices.tolist()
    assert [p for p, _, _ in rows] == pytest.approx(expected.topk(3).values.tolist(), abs=1e-4)
    assert all(label == f"class {i}" for _, i, label in rows)
