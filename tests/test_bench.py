"""`python -m bench`: every subcommand runs on a tiny configuration and writes the documented JSON."""

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import stvit
from stvit.models.stvit import STVIT_CONFIGS
from bench import __main__ as cli
from bench.authors import AuthorsCodeError, check_same_output, import_authors_module, load_authors_twin
from bench.common import format_table, peak_memory, summarize, write_json
from bench.plot import Panel, Series, save_loglog

# The authors' models/stvit.py is not part of this project; these tests use a local copy if there is one.
AUTHORS_CODE = Path(os.environ.get("STVIT_AUTHORS_CODE", "/tmp/stvit-authors/models/stvit.py"))
needs_authors = pytest.mark.skipif(not AUTHORS_CODE.is_file(),
                                   reason=f"the authors' models/stvit.py is not at {AUTHORS_CODE} "
                                          f"(set STVIT_AUTHORS_CODE)")


@pytest.fixture(autouse=True)
def _restore_threads():  # --threads changes torch's global thread count
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_flops_json_has_paper_columns(tmp_path):
    out = tmp_path / "flops.json"
    cli.main(["flops", "--default-allocator", "--models", "tiny", "small", "--sizes", "64", "224",
              "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["command"] == "flops"
    rows = {(r["model"], r["size"]): r for r in result["rows"]}
    assert set(rows) == {(m, s) for m in ("stvit_tiny", "stvit_small") for s in (64, 224)}
    row = rows[("stvit_tiny", 64)]
    assert set(row) == {"model", "family", "size", "params_m", "macs_g", "paper_params_m", "paper_macs_g",
                        "paper_top1"}
    model = stvit.create_model("tiny")
    assert row["params_m"] == pytest.approx(stvit.count_params(model) / 1e6)
    assert row["macs_g"] == pytest.approx(stvit.count_macs(model, (3, 64, 64)) / 1e9)
    assert row["paper_macs_g"] is None  # the paper has no tiny model
    small = rows[("stvit_small", 224)]
    paper = stvit.model_entry("stvit_small").paper
    assert (small["paper_params_m"], small["paper_macs_g"], small["paper_top1"]) == (
        paper["params_m"], paper["macs_g"], paper["top1"])
    assert small["macs_g"] == pytest.approx(paper["macs_g"], rel=0.02)  # the count agrees with the paper
    assert rows[("stvit_small", 64)]["paper_macs_g"] is None  # the paper's figures are at 224² only


def test_registered_paper_numbers_fit_the_models():
    """Every paper figure a registration carries is within rounding of what the model has: a typo or a
    figure copied to the wrong variant fails here."""
    checked = 0
    for name in stvit.list_models():
        paper = stvit.model_entry(name).paper
        if paper.get("params_m") is None:
            continue
        backbone = paper.get("params_of") == "backbone"  # LVT's paper counts its backbone only
        with torch.device("meta"):  # parameter counts without allocating or initialising weights
            params = stvit.count_params(stvit.create_model(name, features_only=backbone)) / 1e6
        # 5 %: the papers round, and SoT's README gives SoT-Tiny 7.7 M for the 7.98 M its own code builds
        assert params == pytest.approx(paper["params_m"], rel=0.05, abs=0.06), name
        checked += 1
    assert checked >= 3


THROUGHPUT_FIELDS = {"model", "batch", "size", "mode", "img_per_s", "img_per_s_min", "img_per_s_max", "median_ms",
                     "iqr_ms", "runs", "peak_mib", "compile_s", "dtype", "gflop_per_img", "achieved_gflops", "mfu",
                     "speedup", "cuda_graphs"}


def test_throughput_json_fields(tmp_path):
    out = tmp_path / "tp.json"
    cli.main(["throughput", "--default-allocator", "--device", "cpu", "--threads", "2", "--models", "tiny",
              "sgformer_tiny", "--batch-sizes", "2", "--modes", "eager", "optimized", "train", "--runs", "2",
              "--warmup", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert {"command", "machine", "memory_method", "matmul_peak_gflops", "rows"} <= set(result)
    assert result["machine"]["threads"] == 2
    # Two families side by side, each at its own input size (SG-Former's is fixed).
    assert [(r["model"], r["size"]) for r in result["rows"]] == [("stvit_tiny", 224)] * 3 + [("sgformer_tiny", 56)] * 3
    assert [r["mode"] for r in result["rows"]] == ["eager", "optimized", "train"] * 2
    assert all(r["runs"] == 2 for r in result["rows"])  # every case timed in the same rounds
    result["rows"] = result["rows"][:3]
    for r in result["rows"]:
        assert set(r) == THROUGHPUT_FIELDS
        assert r["img_per_s_min"] <= r["img_per_s"] <= r["img_per_s_max"]
        assert 0 < r["mfu"] < 1.5
        assert r["peak_mib"] > 0
        assert r["speedup"] is None  # no authors' rows to compare with
    eager, _, train = result["rows"]
    assert train["gflop_per_img"] == pytest.approx(3 * eager["gflop_per_img"])  # backward ≈ 2× forward


def test_throughput_authors_modes_need_the_code():
    with pytest.raises(SystemExit, match="--authors-code"):
        cli.main(["throughput", "--default-allocator", "--models", "tiny", "--modes", "authors"])
    with pytest.raises(SystemExit, match="sgformer_tiny is not an STViT model"):
        cli.main(["throughput", "--default-allocator", "--models", "tiny", "sgformer_tiny", "--modes", "authors",
                  "--authors-code", "/nonexistent/stvit.py"])


def test_stvit_only_benchmarks_say_so():
    with pytest.raises(SystemExit, match="only STViT models have; sgformer_s is a sgformer model"):
        cli.main(["scaling", "--default-allocator", "--model", "sgformer_s"])


@needs_authors
def test_throughput_against_the_authors(tmp_path):
    out = tmp_path / "tp.json"
    cli.main(["throughput", "--default-allocator", "--device", "cpu", "--models", "tiny", "--size", "32",
              "--batch-sizes", "2", "--modes", "eager", "authors", "--runs", "2", "--warmup", "1",
              "--authors-code", str(AUTHORS_CODE), "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    eager, authors = rows
    assert eager["speedup"] == pytest.approx(eager["img_per_s"] / authors["img_per_s"])


@needs_authors
def test_authors_twin_gives_our_output():
    torch.manual_seed(0)
    ours = stvit.create_model("tiny").eval()
    for m in ours.modules():  # non-trivial BatchNorm statistics, so the check means something
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    theirs = load_authors_twin(AUTHORS_CODE, ours, STVIT_CONFIGS["stvit_tiny"])
    assert check_same_output(ours, theirs) < 1e-4
    with torch.no_grad():  # a different weight must be caught
        next(theirs.parameters()).add_(0.5)
    with pytest.raises(AuthorsCodeError, match="disagree"):
        check_same_output(ours, theirs)


def test_authors_code_errors_are_clear(tmp_path):
    with pytest.raises(AuthorsCodeError, match="no such file"):
        import_authors_module(tmp_path / "missing.py")
    bogus = tmp_path / "stvit.py"
    bogus.write_text("x = 1\n")
    with pytest.raises(AuthorsCodeError, match="defines no STViT"):
        import_authors_module(bogus)


def test_scaling_json_plot_and_budget_skip(tmp_path):
    out, png = tmp_path / "scaling.json", tmp_path / "scaling.png"
    cli.main(["scaling", "--default-allocator", "--device", "cpu", "--sides", "8", "16", "--dim", "16", "--heads", "2",
              "--stoken-size", "4", "--runs", "1", "--memory-budget-gib", "0.0003", "--plot", str(png),
              "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["config"] == dict(dim=16, heads=2, stoken_size=4, batch=1)
    rows = {(r["method"], r["pass"], r["side"]): r for r in result["rows"]}
    assert len(rows) == 3 * 2 * 2
    ok = rows[("super-token", "forward+backward", 16)]
    assert ok["status"] == "ok" and ok["ms"] > 0 and ok["peak_mib"] > 0
    # dense global attention at 16² tokens needs 4·2·256²·4 B = 2 MiB > the 0.3 MiB budget
    assert rows[("global", "forward+backward", 16)]["status"].startswith("skipped")
    assert rows[("global-fused", "forward", 16)]["status"] == "ok"
    with Image.open(png) as img:
        assert img.size[0] > img.size[1] > 100


def test_profile_writes_loadable_traces(tmp_path):
    out = tmp_path / "prof"
    summary = tmp_path / "profile.json"
    cli.main(["profile", "--default-allocator", "--device", "cpu", "--model", "tiny", "--size", "32", "--batch", "1",
              "--steps", "1", "--out", str(out), "--json", str(summary)])
    trace = json.loads((out / "trace.json").read_text())
    assert any(e.get("name") == "stvit::attention" for e in trace["traceEvents"])
    assert list((out / "tensorboard").glob("*.pt.trace.json"))
    result = json.loads(summary.read_text())
    shares = {r["category"]: r["share"] for r in result["shares"]}
    assert set(shares) == {"attention", "conv", "norm", "rest"}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["attention"] > 0 and shares["conv"] > 0
    assert result["top_ops"] and all(not op["name"].startswith("stvit::") for op in result["top_ops"])


def test_bad_arguments_exit_with_a_message():
    with pytest.raises(SystemExit, match="unknown model"):
        cli.main(["flops", "--default-allocator", "--models", "huge"])
    with pytest.raises(SystemExit, match="threads"):
        cli.main(["flops", "--default-allocator", "--threads", "0"])


def test_timing_summary_and_table():
    t = summarize([0.3, 0.1, 0.2, 0.4, 0.5])
    assert (t.median_s, t.min_s, t.max_s, t.runs) == (0.3, 0.1, 0.5, 5)
    assert t.iqr_s > 0
    table = format_table([dict(a="x", b=1.5), dict(a="yy", b=None)], [("a", "A"), ("b", "B")])
    assert table.splitlines()[0].split() == ["A", "B"] and "—" in table


def test_cpu_peak_memory_sees_allocations():
    def peak(together: bool) -> int:
        with peak_memory(torch.device("cpu")) as mem:
            a = torch.ones(1 << 20)  # 4 MiB
            if not together:
                del a
            b = torch.ones(1 << 20)
            del b
        return mem["peak_bytes"]

    alone, together = peak(False), peak(True)
    assert alone >= 4 * 2 ** 20
    assert together - alone == pytest.approx(4 * 2 ** 20, rel=0.01)  # the second live buffer counts


def test_json_and_png_written_atomically(tmp_path):
    write_json(tmp_path / "a" / "r.json", {"x": 1})
    assert json.loads((tmp_path / "a" / "r.json").read_text()) == {"x": 1}
    save_loglog([Panel("t", "x", "y", [Series("s", [(1, 1), (10, 100)])])], tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").size == (560, 420)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_allocator_tuning_is_reported():
    """Run in a subprocess: mallopt changes the whole process, so keep it out of the test runner."""
    import subprocess
    import sys
    import ctypes.util
    glibc = bool(ctypes.util.find_library("c")) and sys.platform.startswith("linux")
    code = ("import torch; from bench.common import tune_cpu_allocator, machine_info; "
            "before = machine_info(torch.device('cpu'))['allocator']; "
            "ok = tune_cpu_allocator(); info = machine_info(torch.device('cpu')); "
            "print(before, ok, 'mallopt' in info['allocator'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    # On glibc (Linux) the tuning applies and is reported; elsewhere it is reported as not applied.
    assert out.stdout.split()[-3:] == ["default", str(glibc), str(glibc)], out.stderr


def test_emulated_bf16_is_measured_against_the_fp32_peak(tmp_path, monkeypatch):
    """Without native bf16 a bf16 matmul 'peak' is an emulation artefact: bf16 rows use the fp32 peak
    (MFU stays meaningful, below 1) and the run says so; no 0 GFLOP/s peak is printed."""
    from stvit import precision
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    out = tmp_path / "tp.json"
    with pytest.warns(precision.EmulatedBF16Warning):
        cli.main(["throughput", "--default-allocator", "--device", "cpu", "--models", "tiny", "--size", "32",
                  "--batch-sizes", "2", "--modes", "eager", "eager-amp", "--runs", "1", "--warmup", "1",
                  "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result["matmul_peak_gflops"]) == {"fp32"} and result["matmul_peak_gflops"]["fp32"] > 1
    eager, amp = result["rows"]
    assert amp["dtype"] == "bf16" and 0 < amp["mfu"] < 1
    assert amp["mfu"] == pytest.approx(amp["achieved_gflops"] / result["matmul_peak_gflops"]["fp32"])
    from bench.throughput import default_modes
    assert "compiled-bf16" not in default_modes(torch.device("cpu"), authors=False)
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert "compiled-bf16" in default_modes(torch.device("cpu"), authors=False)
