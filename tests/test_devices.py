"""The suite's --device option (tests/conftest.py): a CPU session computes as CI does on any machine,
and a bad --device stops the session with a message instead of failing test by test."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_the_session_computes_where_device_says(device):
    if device.type == "cpu":
        # A GPU on the machine stays hidden: the trainer and the bench pick one by themselves.
        assert os.environ.get("CUDA_VISIBLE_DEVICES") == "" and not torch.cuda.is_available()
    else:
        assert torch.cuda.current_device() == (device.index or 0)
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("name, message", [
    ("mps", "--device mps: use cpu or cuda[:N]"),  # a torch device, not one these tests run on
    ("gpu0", "--device 'gpu0' is not a device; use cpu or cuda[:N]"),
    *([] if torch.cuda.is_available() else [("cuda", "CUDA is not available on this machine; use --device cpu")]),
])
def test_a_bad_device_stops_the_session_with_its_fix(name, message):
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "--device", name,
                          "tests/test_devices.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and message in run.stderr, run.stdout + run.stderr
