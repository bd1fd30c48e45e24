import os
import sys
from pathlib import Path

# Before torch and torchvision: lets torchvision (and timm) import beside the CPU torch, here and in the
# processes tests start (tests/site/sitecustomize.py says why).
SITE = Path(__file__).resolve().parent / "site"
sys.path.insert(0, str(SITE))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE), os.environ.get("PYTHONPATH")) if p)
import sitecustomize  # noqa: E402,F401

import pytest  # noqa: E402
import torch  # noqa: E402

from stvit import compat  # noqa: E402

# ../shared/golden beside the repository; STVIT_GOLDEN names another folder (a GPU machine that
# gets a copy of some of the files, say).
# Tests that shard a model with FSDP2 over CPU processes (gloo): torch 2.9 on (stvit/compat.py says why).
needs_cpu_fsdp2 = pytest.mark.skipif(compat.fsdp2_cpu_problem() is not None, reason=str(compat.fsdp2_cpu_problem()))
# Tests that export the models (torch.export, the dynamo ONNX exporter): torch 2.8 on (stvit/compat.py says why).
needs_export = pytest.mark.skipif(compat.export_problem() is not None, reason=str(compat.export_problem()))

GOLDEN = Path(os.environ.get("STVIT_GOLDEN") or Path(__file__).resolve().parents[1].parent / "shared" / "golden")


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="where the device-independent tests run (golden parity, the oracle properties, the "
                          "contract sweep, optimize): cpu (default) or cuda[:N]. With cpu the session hides "
                          "any GPU, so every test computes as in CI; `pytest --device cuda -m on_device` runs "
                          "just those tests on the GPU")


def pytest_configure(config):
    config.addinivalue_line("markers", "on_device: takes the `device` fixture, so it runs on --device")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        # `pytest -n N` (pytest-xdist): the workers share the cores; N workers each with all of them
        # oversubscribe, and OpenMP teams then wait on descheduled threads.
        torch.set_num_threads(max(1, torch.get_num_threads() // workers))
    name = config.getoption("--device")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise pytest.UsageError(f"--device {name!r} is not a device; use cpu or cuda[:N]") from None
    if device.type == "cpu":
        # Before anything initialises CUDA (and inherited by the processes tests start): the trainer,
        # the bench and optimize pick a GPU by themselves when they see one, and would then compute in
        # bf16 with other kernels than the CPU results these tests pin.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif device.type != "cuda":
        raise pytest.UsageError(f"--device {name}: use cpu or cuda[:N]")
    elif not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    elif (device.index or 0) >= torch.cuda.device_count():
        raise pytest.UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.on_device)


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device of ``--device``: tests that take it compute there, and must give the same results
    (within the tolerances they state) on every device. On CUDA float32 means float32: cuDNN's
    default TF32 convolutions (10-bit mantissa) would blur the float32 tolerances."""
    device = torch.device(request.config.getoption("--device"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return device


def to_device(tree, device: torch.device):
    """A golden record (nested dicts and lists of tensors) with every tensor moved to ``device``."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_device(v, device) for v in tree)
    return tree


def golden_names(prefix: str, *shared: str) -> list[str]:
    """A family's golden files (stems): the ones shared with the project, plus every other
    ``<prefix>_*.pt`` beside them, so a new golden (a hidden one included) is tested without edits.
    A folder named by STVIT_GOLDEN may hold a selection (a GPU machine takes 64 MiB): just what it has."""
    found = {p.stem for p in GOLDEN.glob(f"{prefix}_*.pt")} if GOLDEN.is_dir() else set()
    return sorted(found if os.environ.get("STVIT_GOLDEN") else set(shared) | found)


def _under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(message: str) -> None:
    """Something a test needs from outside the repository is missing: a user's machine skips with the
    message; CI (``CI=true``) fails, so CI never passes on a skipped check."""
    if _under_ci():
        pytest.fail(f"{message}. Under CI (CI=true) that is a failure, not a skip.", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """``../shared/golden``: tensors recorded from each family's official code (see :func:`unavailable`)."""
    if not GOLDEN.is_dir():
        unavailable(f"golden tensors not found at {GOLDEN} (they live in ../shared/golden beside the repo); "
                    f"parity with the authors' code is not checked")
    return GOLDEN


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module that trains in-process: idle OpenMP threads spin (the CLI sets
    OMP_WAIT_POLICY=PASSIVE, too late for a pytest process), which slows small steps down many times
    on a busy machine. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
