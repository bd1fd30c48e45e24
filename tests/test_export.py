"""`python -m stvit.export`: every family exported to ONNX and checked in onnxruntime, with a dynamic
batch and, where the family takes any size, dynamic height and width; the torch.export program (pt2)
of STViT, as loaded; the command's output and errors.

The dynamo ONNX exporter is slow: each family is traced once (module fixture), the models are the
tiny variants, and the checks run on small inputs."""

import functools

import onnx
import pytest
import torch

import stvit
from conftest import needs_export
from stvit import compat, export

FAMILIES = ["stvit_tiny", "sgformer_tiny", "sovit_tiny", "sot_mini", "lvt_tiny"]
TOLERANCE = 1e-4  # float32 graphs regrouped by the exporters: observed ≤ 2e-5 (SG-Former), ~5e-7 (the others)


# Any-size families are traced at 64² (their checks then run at 64² and at a second size, cheaply).
TRACE_SIZE = 64


@functools.cache  # one trace per family for the whole module
def trace(name: str):
    torch.manual_seed(0)
    model = stvit.create_model(name).eval()
    any_size = export.takes_any_size(model)
    size = (TRACE_SIZE, TRACE_SIZE) if any_size else tuple(model.pretrained_cfg["input_size"][-2:])
    program = export.export_program(model, size)
    return model, program, size, export.side_range(program, size) if any_size else None


@pytest.fixture(params=FAMILIES)
def traced(request):
    return trace(request.param)


def sizes_checked(size, sides):
    """What the command checks, and for a model that takes any size also its smallest side."""
    return export.check_sizes(size, sides) + ([(1, sides[0], sides[0])] if sides else [])


@needs_export
def test_onnx_matches_eager_at_two_batches_and_two_sizes(traced, tmp_path):
    model, program, size, sides = traced
    path = tmp_path / "model.onnx"
    export.save_onnx(program, path, model)
    graph = onnx.load(str(path)).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    any_size = not model.pretrained_cfg["fixed_input_size"]
    assert [graph.input[0].name, graph.output[0].name] == ["image", "logits"]
    assert dims == (["batch", 3, "height", "width"] if any_size else ["batch", 3, *size])

    sizes = sizes_checked(size, sides)
    assert {b for b, _, _ in sizes} == {1, 3} and len({(h, w) for _, h, w in sizes}) >= (2 if any_size else 1)
    rows = export.compare(model, export.onnx_runner(path), sizes)
    assert max(r["rel_error"] for r in rows) < TOLERANCE, rows


@needs_export
def test_exported_program_takes_batch_1_and_any_size_down_to_its_smallest_side(tmp_path):
    """The pt2 file as loaded: batch sizes 1 and 3 and three sizes of STViT (whose super token grids
    pad sizes that are not whole cells), and one side below the smallest refused by its shape guards."""
    model, program, size, sides = trace("stvit_tiny")
    assert sides == (33, None)  # 32 would make the last stage's map 1×1, which torch.export specialises
    path = tmp_path / "model.pt2"
    torch.export.save(program, str(path))
    run = export.pt2_runner(path)
    rows = export.compare(model, run, sizes_checked(size, sides))
    assert max(r["rel_error"] for r in rows) < TOLERANCE, rows
    with pytest.raises((AssertionError, RuntimeError)) as refused:  # the exception differs by torch release
        run(torch.randn(1, 3, sides[0] - 1, sides[0] + 10))
    assert compat.is_shape_guard_failure(refused.value), refused.value


def test_the_range_of_sides_is_searched_both_ways():
    """Traced where a stage map is 1 wide the program keeps it so and has a largest side too."""
    assert export.search_sides(lambda side: 17 <= side <= 32, 32) == (17, 32)
    assert export.search_sides(lambda side: side >= 57, 224) == (57, None)
    assert export.search_sides(lambda side: 5 <= side <= 100, 64) == (5, 100)
    assert export.check_sizes((32, 32), (17, 32)) == [(1, 32, 32), (3, 32, 32), (1, 25, 23), (3, 25, 23)]
    assert export.check_sizes((224, 224), (57, None))[2:] == [(1, 169, 143), (3, 169, 143)]
    assert export.check_sizes((64, 64), (57, None))[2:] == [(1, 57, 57), (3, 57, 57)]
    assert export.check_sizes((56, 56), None) == [(1, 56, 56), (3, 56, 56)]


@needs_export
def test_the_command_writes_a_checked_onnx_file(tmp_path, capsys):
    """With a safetensors checkpoint of 10 classes: the model is sized to it, and the file says so."""
    weights = tmp_path / "sovit.safetensors"
    stvit.save_state_dict(stvit.create_model("sovit_tiny", num_classes=10).state_dict(), weights)
    out = tmp_path / "sovit.onnx"
    assert export.main(["--model", "sovit_tiny", "--checkpoint", str(weights), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (onnx" in printed and f"sovit_tiny, weights of {weights}" in printed
    assert "any batch size; 112×112 only" in printed and "checked in onnxruntime" in printed
    output = onnx.load(str(out)).graph.output[0]
    assert [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim] == ["batch", 10]
    checks = [line.split() for line in printed.splitlines() if line.strip().endswith(tuple("0123456789"))
              and "×" in line and not line.startswith("inputs")]
    assert [(c[0], c[1]) for c in checks] == [("1", "112×112"), ("3", "112×112")]
    assert all(float(c[2]) < TOLERANCE for c in checks)
    onnx.checker.check_model(str(out))
    assert not list(tmp_path.glob(".*"))  # no temporary file left beside it


@needs_export
def test_a_file_that_does_not_match_is_not_written(tmp_path, capsys, monkeypatch):
    """A broken export (here: the exported copy's classifier weights changed) fails the check: no file."""
    inference_copy = export.inference_copy

    def broken(model):
        model = inference_copy(model)
        with torch.no_grad():
            for p in model.get_classifier().parameters():
                p.add_(1.0)
        return model

    monkeypatch.setattr(export, "inference_copy", broken)
    out = tmp_path / "sovit.pt2"  # the format from the extension
    assert export.main(["--model", "sovit_tiny", "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "error: the exported model differs from the eager model by" in err and "no file was written" in err
    assert not out.exists() and not list(tmp_path.iterdir())


def _fails(argv, capsys, code=1) -> str:
    """stderr of a command that fails with exit status ``code``: ``error: ...`` lines, no traceback."""
    if code == 2:  # argparse's usage errors
        with pytest.raises(SystemExit) as exit_:
            export.main(argv)
        assert exit_.value.code == 2
    else:
        assert export.main(argv) == code
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    return err


@needs_export
def test_command_line_errors(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "m.onnx")
    assert "unknown model 'nope'" in _fails(["--model", "nope", "--output", out], capsys, 2)
    assert "give --format onnx or pt2" in _fails(["--model", "tiny", "--output", str(tmp_path / "m.bin")], capsys, 2)
    assert "expected a positive integer, got '0'" in _fails(["--model", "tiny", "--output", out,
                                                            "--input-size", "0"], capsys, 2)
    assert "HEIGHT [WIDTH]" in _fails(["--model", "tiny", "--output", out, "--input-size", "1", "2", "3"], capsys, 2)
    assert "is a directory" in _fails(["--model", "tiny", "--output", str(tmp_path)], capsys, 2)

    # A size the model cannot take: the model's own message, before anything is traced.
    err = _fails(["--model", "sgformer_tiny", "--output", out, "--input-size", "64"], capsys)
    assert err.startswith("error: input 64x64 does not fit this SG-Former") and "56x56" in err

    # A checkpoint of another model: the table, and the flag that fixes it.
    ckpt = tmp_path / "tiny.pt"
    torch.save(stvit.create_model("stvit_tiny").state_dict(), ckpt)
    err = _fails(["--model", "lvt_tiny", "--checkpoint", str(ckpt), "--output", out], capsys)
    assert err.startswith("error: checkpoint does not match the model architecture")
    assert err.splitlines()[-1] == "  on the command line: --model stvit_tiny"
    assert not list(tmp_path.glob("*.onnx"))

    # Without the onnx extra: how to install it (pt2 needs nothing more).
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
    err = _fails(["--model", "tiny", "--output", out], capsys)
    assert err.startswith('error: ONNX export needs onnx, onnxscript and onnxruntime: pip install "stvit[onnx]"')


def test_a_torch_too_old_to_export_is_named_before_anything_is_built(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compat, "TORCH", (2, 7))
    err = _fails(["--model", "tiny", "--output", str(tmp_path / "m.onnx")], capsys)
    assert err.startswith("error: exporting needs torch 2.8 or newer") and torch.__version__ in err
    with pytest.raises(export.ExportError, match=r"exporting needs torch 2\.8 or newer"):
        export.export_program(stvit.create_model("stvit_tiny").eval(), (64, 64))
    assert not list(tmp_path.iterdir())


class ExportingProbe(torch.nn.Module):
    def forward(self, x):
        return x + 1 if compat.is_exporting() else x - 1


def test_is_exporting_is_false_eagerly_and_under_torch_compile():
    """``compat.is_exporting`` is False under torch.compile on every torch. torch 2.11's dynamo folded
    ``torch.compiler.is_exporting()`` to True under plain torch.compile, which put every compiled model
    on its export paths (STViT's "cells" form, its export-safe padding) and off its compiled training
    paths."""
    probe, x = ExportingProbe(), torch.zeros(2)
    assert probe(x).tolist() == [-1, -1]
    assert torch.compile(probe, backend="eager", fullgraph=True)(x).tolist() == [-1, -1]


@needs_export
def test_is_exporting_is_true_under_torch_export():
    """...and True while torch.export traces, on a torch that exports the models (torch 2.6 cannot
    tell: it runs them as it always did)."""
    x = torch.zeros(2)
    assert torch.export.export(ExportingProbe(), (x,)).module()(x).tolist() == [1, 1]
