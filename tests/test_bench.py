"""`python -m bench`: every subcommand runs on a tiny configuration and writes the documented JSON."""

import json
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

import stvit
from stvit.models.stvit import STVIT_CONFIGS
from bench import __main__ as cli
from bench.authors import AuthorsCodeError, check_same_output, import_authors_module, load_authors_twin
from bench.common import BenchError, format_table, peak_memory, summarize, time_interleaved, write_json
from bench.throughput import onnx_step
from bench.plot import Panel, Series, save_loglog
from conftest import needs_cpu_fsdp2, needs_export
from stvit import compat, precision

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
    assert result["machine"]["device_name"] == result["machine"]["cpu"]  # on CUDA: the GPU's name
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
        cli.main(["throughput", "--default-allocator", "--models", "sgformer_tiny", "--modes", "authors",
                  "--authors-code", "/nonexistent/stvit.py"])
    # Beside an STViT model a peer runs without the authors* modes: the run goes on to read their code.
    with pytest.raises(SystemExit, match="/nonexistent/stvit.py"):
        cli.main(["throughput", "--default-allocator", "--models", "sgformer_tiny", "tiny", "--modes", "authors",
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


def test_authors_amp_is_fp16_on_cuda_as_their_engine_runs_it():
    """Their engine.py autocasts with torch.cuda.amp.autocast(): fp16. On a CPU, where that does
    nothing, we run bf16 autocast; our own mixed-precision modes are bf16 everywhere."""
    from bench.throughput import mode_dtype
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [mode_dtype(m, cuda) for m in ("authors-amp", "authors-train-amp")] == [torch.float16] * 2
    assert [mode_dtype(m, cpu) for m in ("authors-amp", "authors-train-amp")] == [torch.bfloat16] * 2
    assert [mode_dtype(m, cuda) for m in ("compiled-bf16", "train-bf16")] == [torch.bfloat16] * 2
    assert mode_dtype("authors-train", cuda) == torch.float32


@needs_authors
def test_throughput_authors_amp_modes(tmp_path):
    out = tmp_path / "tp.json"
    with warnings.catch_warnings():  # bf16 is emulated on most CPUs: slow and said so, not an error here
        warnings.simplefilter("ignore", precision.EmulatedBF16Warning)
        cli.main(["throughput", "--default-allocator", "--device", "cpu", "--threads", "2", "--models", "tiny",
                  "--size", "32", "--batch-sizes", "2", "--modes", "authors-amp", "authors-train-amp", "--runs", "1",
                  "--warmup", "1", "--authors-code", str(AUTHORS_CODE), "--json", str(out)])
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    assert all(set(r) == THROUGHPUT_FIELDS for r in rows.values())
    assert rows["authors-amp"]["dtype"] == rows["authors-train-amp"]["dtype"] == "bf16"  # on a CPU
    assert rows["authors-train-amp"]["gflop_per_img"] == pytest.approx(3 * rows["authors-amp"]["gflop_per_img"])


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



def test_authors_file_imports_beside_timm_without_touching_its_registry(tmp_path):
    """Their file registers its models with timm's register_model: with timm installed (the test extra,
    the GPU machine) it imports, and timm's registry is left without them."""
    timm = pytest.importorskip("timm")
    fake = tmp_path / "stvit.py"
    fake.write_text("from timm.models.registry import register_model\n"
                    "class STViT: pass\n"
                    "@register_model\n"
                    "def stvit_fake_authors(**kw): return None\n")
    module = import_authors_module(fake)
    assert module.stvit_fake_authors() is None and "stvit_fake_authors" not in timm.list_models()

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


def test_profile_names_the_compiled_cpu_kernels():
    """Compiled modes on a CPU profile each generated kernel by name, not one opaque graph call."""
    from torch.profiler import profile

    from bench.profile import inductor_kernel_names
    fn = torch.compile(lambda x: (x.sin() * 2).softmax(-1), backend="inductor", dynamic=False)
    x = torch.randn(4, 24)
    with inductor_kernel_names(torch.device("cpu")):
        expected = fn(x)  # compiles
        with profile() as prof:
            assert torch.equal(fn(x), expected)
    names = [e.key for e in prof.key_averages()]
    assert any("cpp_fused" in n and "softmax" in n for n in names), names


@needs_cpu_fsdp2
def test_profile_runs_train_bf16_in_its_one_process_group(tmp_path, monkeypatch):
    """``--mode train-bf16`` profiles what ``train --precision bf16`` runs (FSDP2 on a one-process
    group, blocks compiled), and ends the group it started. Backend eager: the wiring is tested here,
    inductor's kernels elsewhere."""
    import torch.distributed as dist

    from train import distributed
    compile_block = distributed.compile_block  # where prepare_model compiles each block
    monkeypatch.setattr(distributed, "compile_block", lambda block, backend="inductor": compile_block(block, "eager"))
    summary = tmp_path / "profile.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", precision.EmulatedBF16Warning)
        cli.main(["profile", "--default-allocator", "--device", "cpu", "--model", "tiny", "--size", "32",
                  "--batch", "2", "--steps", "1", "--mode", "train-bf16", "--out", str(tmp_path / "prof"),
                  "--json", str(summary)])
    result = json.loads(summary.read_text())
    assert result["mode"] == "train-bf16" and result["top_ops"]
    assert any("Backward" in op["name"] or "backward" in op["name"] for op in result["top_ops"])
    assert not dist.is_initialized()


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


def test_timing_interleaves_the_cases_round_by_round():
    calls, rounds = [], []
    timings = time_interleaved([lambda: calls.append("a"), lambda: calls.append("b")], torch.device("cpu"), runs=3,
                               each_round=lambda done, seconds: rounds.append(done))
    assert calls == ["a", "b"] * 3 and rounds == [1, 2, 3]
    assert [t.runs for t in timings] == [3, 3]


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


# ---- timm models beside ours (timm is not installed here: a stand-in with timm's layout) ----------

class _ToyBlock(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv, self.norm = torch.nn.Conv2d(dim, dim, 3, padding=1), torch.nn.BatchNorm2d(dim)
        # A float constant derived at build time and never saved, as Swin's attention mask: added to
        # bf16 activations (train-bf16) it would make them float32, which the next layer's bf16
        # weights refuse, unless it follows the parameters to bf16.
        self.register_buffer("offset", torch.full((dim, 1, 1), 0.5), persistent=False)
        self.mix = torch.nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        x = x + torch.relu(self.norm(self.conv(x)))
        return x + self.mix(x + self.offset)


class _ToyStage(torch.nn.Module):
    def __init__(self, dim: int, depth: int):
        super().__init__()
        self.blocks = torch.nn.Sequential(*[_ToyBlock(dim) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(x)


class _ToyTimmModel(torch.nn.Module):
    """timm's layout: ``stages[i].blocks``, ``num_classes``, a ``pretrained_cfg`` dict; no contract methods."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes, self.pretrained_cfg = num_classes, {"input_size": (3, 16, 16)}
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.stages = torch.nn.Sequential(_ToyStage(8, 2), _ToyStage(8, 1))
        self.head = torch.nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


@pytest.fixture
def fake_timm(monkeypatch):
    """A module named timm whose create_model builds _ToyTimmModel for "toy" (and records its calls)."""
    calls = []

    def create_model(name, **kwargs):
        calls.append((name, kwargs))
        if name != "toy":
            raise RuntimeError(f"Unknown model ({name})")  # timm's message
        return _ToyTimmModel(kwargs.get("num_classes", 1000))

    module = types.ModuleType("timm")
    module.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", module)
    return calls


@needs_cpu_fsdp2
def test_timm_models_run_in_our_modes(tmp_path, fake_timm):
    import torch.distributed as dist
    from torch._dynamo.utils import counters
    frames = dict(counters["frames"])
    out = tmp_path / "tp.json"
    # train-compiled and train-bf16 compile the same block code twice (fp32, bf16): past a recompile
    # limit of 1 the second would run eagerly unless the bench lifts the limit
    with warnings.catch_warnings(), compat.dynamo_config(recompile_limit=1):
        warnings.simplefilter("ignore", precision.EmulatedBF16Warning)
        cli.main(["throughput", "--default-allocator", "--device", "cpu", "--threads", "2", "--models", "timm:toy",
                  "--batch-sizes", "2", "--train-batch-sizes", "3", "--modes", "eager", "compiled", "train-compiled",
                  "train-bf16", "--runs", "1", "--warmup", "1", "--json", str(out)])
    assert fake_timm == [("toy", dict(pretrained=False, num_classes=1000))]
    compiled = {k: counters["frames"][k] - frames.get(k, 0) for k in ("total", "ok")}
    assert compiled["ok"] == compiled["total"] > 0  # every frame compiled, none left to run eagerly
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["mode"], r["dtype"], r["batch"]) for r in rows] == [
        ("timm:toy", "eager", "fp32", 2), ("timm:toy", "compiled", "fp32", 2),
        ("timm:toy", "train-compiled", "fp32", 3), ("timm:toy", "train-bf16", "bf16", 3)]
    for r in rows:
        assert set(r) == THROUGHPUT_FIELDS and r["img_per_s"] > 0 and r["speedup"] is None
        assert r["size"] == 16  # the model's pretrained_cfg input size
    macs = stvit.count_macs(_ToyTimmModel(1000), (3, 16, 16))
    assert rows[0]["gflop_per_img"] == pytest.approx(2 * macs / 1e9)
    assert not dist.is_initialized()  # the run ended the process group it started for train-bf16

    with pytest.raises(SystemExit, match="timm:toy is not an STViT model"):
        cli.main(["throughput", "--default-allocator", "--models", "timm:toy", "--modes", "authors",
                  "--authors-code", "/nonexistent/stvit.py"])
    with pytest.raises(SystemExit, match=r"timm:tiny_vit_xxl: Unknown model \(tiny_vit_xxl\); timm.list_models"):
        cli.main(["throughput", "--default-allocator", "--models", "timm:tiny_vit_xxl"])


@needs_export
def test_onnx_mode_runs_the_exported_model_in_onnxruntime_and_says_what_it_does(tmp_path, fake_timm, capsys,
                                                                                monkeypatch):
    out = tmp_path / "tp.json"
    cli.main(["throughput", "--default-allocator", "--device", "cpu", "--threads", "2", "--models", "timm:toy",
              "--batch-sizes", "2", "--modes", "eager", "onnx", "--runs", "2", "--warmup", "1", "--json", str(out)])
    stdout, stderr = capsys.readouterr()
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["dtype"]) for r in rows] == [("eager", "fp32"), ("onnx", "fp32")]
    eager, onnx = rows
    assert set(onnx) == THROUGHPUT_FIELDS and onnx["img_per_s"] > 0 and onnx["runs"] == 2
    assert onnx["peak_mib"] is None  # onnxruntime's memory is not torch's
    assert onnx["gflop_per_img"] == eager["gflop_per_img"]
    table = stdout.splitlines()
    assert table[0].split()[:3] == ["model", "batch", "mode"] and table[3].split()[:3] == ["timm:toy", "2", "onnx"]
    # Progress on stderr (the table alone on stdout): the export, each warm-up's start and end, each round.
    progress = [line.split("] ", 1)[1] for line in stderr.splitlines() if line.startswith("[")]
    assert progress == [
        "timm:toy batch 2 onnx: exporting to ONNX, checking it in onnxruntime ...",
        "timm:toy batch 2 eager: warming up (1 untimed calls) ...", progress[2],
        "timm:toy batch 2 onnx: warming up (1 untimed calls) ...", progress[4],
        "timing 2 cases in interleaved rounds (at least 2) ...", progress[6], progress[7],
        "measuring the peak memory of 2 cases ..."]
    assert progress[2].startswith("timm:toy batch 2 eager: warming up done in ")
    assert progress[4].startswith("timm:toy batch 2 onnx: warming up done in ")
    assert progress[6].startswith("round 1 timed (") and progress[7].startswith("round 2 timed (")

    with pytest.raises(BenchError, match="the onnx mode runs onnxruntime's CPU execution provider: use it with "
                                         "--device cpu"):
        onnx_step(_ToyTimmModel(10), torch.zeros(1, 3, 16, 16), torch.device("cuda"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as where the onnx extra is not installed
    with pytest.raises(SystemExit, match=r'the onnx mode: ONNX export needs .*pip install "stvit\[onnx\]"'):
        cli.main(["throughput", "--default-allocator", "--models", "timm:toy", "--modes", "onnx"])


def test_missing_timm_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm fails, as where it is not installed
    with pytest.raises(SystemExit, match="timm:convnext_tiny needs timm, which does not import here .*: pip install"):
        cli.main(["throughput", "--default-allocator", "--models", "timm:convnext_tiny", "--modes", "eager"])


def test_blocks_of_a_model_outside_the_zoo():
    """The contract's repeated_blocks() where a model has it, else the entries of timm's outermost
    `blocks` containers; neither: an error saying what to add."""
    from stvit.contract import blocks_of
    model = _ToyTimmModel(5)
    assert blocks_of(model) == [*model.stages[0].blocks, *model.stages[1].blocks]
    ours = stvit.create_model("tiny")
    assert blocks_of(ours) == ours.repeated_blocks()
    with pytest.raises(ValueError, match="no repeated_blocks"):
        blocks_of(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@needs_cpu_fsdp2
def test_train_bf16_trains_an_fsdp2_model_and_the_authors_scaler_steps():
    """train-bf16 is train's FSDP2 wrapping (every block and the root, bf16 compute) on a one-process
    group, and its step learns; the fp16 step with a GradScaler (the authors' AMP on CUDA) learns too."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from stvit.contract import blocks_of
    from train import distributed
    from bench.throughput import build_step, process_group, train_step

    torch.manual_seed(0)
    model = _ToyTimmModel(5).eval()
    before = model.head.weight.detach().clone()
    x = torch.randn(4, 3, 16, 16)
    cpu = torch.device("cpu")
    with warnings.catch_warnings(), process_group(cpu, True) as env:
        warnings.simplefilter("ignore", precision.EmulatedBF16Warning)
        assert distributed.one_process_group(cpu).mesh.size() == 1  # reused: a second init would raise
        step = build_step("train-bf16", model, None, x, cpu, env)
        fsdp = step.model
        assert isinstance(fsdp, FSDPModule) and all(isinstance(b, FSDPModule) for b in blocks_of(fsdp))
        losses = [step().item() for _ in range(4)]
        assert losses[-1] < losses[0]
        assert not torch.equal(fsdp.head.weight.full_tensor(), before)  # the copy trained...
        assert torch.equal(model.head.weight, before)  # ...the caller's model did not
        assert fsdp(x).dtype == torch.bfloat16  # computed in bf16 by FSDP2's policy
    assert not dist.is_initialized()

    scaled = _ToyTimmModel(5).train()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    step = train_step(scaled, x, precision.autocast(cpu, torch.float16), scaler)
    losses = [step().item() for _ in range(4)]
    assert losses[-1] < losses[0] and scaler.get_scale() == 2.0 ** 10  # no overflow, no step skipped


def test_gpu_session_script_parses_and_carries_what_fits(tmp_path):
    """bench/gpu_session.sh runs on a lent GPU (no CI there): here it must at least parse, and its
    carry stage must pick the goldens that fit a call (all but tiny_a.pt) and the authors' file."""
    root = Path(__file__).resolve().parents[1]
    script = root / "bench" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    (repo / "bench" / "gpu_session.sh").write_bytes(script.read_bytes())
    golden = tmp_path / "golden"
    golden.mkdir()
    for name in ("tiny_a.pt", "tiny_b.pt", "lvt_a.pt", "official_lvt_keys.json", "lvt.md"):
        (golden / name).write_text(name)
    authors = tmp_path / "stvit.py"
    authors.write_text("# theirs")
    env = dict(os.environ, STVIT_SHARED_GOLDEN=str(golden), STVIT_AUTHORS_CODE=str(authors))
    run = subprocess.run(["bash", "bench/gpu_session.sh", "carry"], cwd=repo, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (repo / ".gpu" / "golden").iterdir()) == [
        "lvt_a.pt", "official_lvt_keys.json", "tiny_b.pt"]
    assert (repo / ".gpu" / "authors" / "models" / "stvit.py").read_text() == "# theirs"
    bad = subprocess.run(["bash", "bench/gpu_session.sh", "warp"], cwd=repo, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown stage warp" in bad.stderr
