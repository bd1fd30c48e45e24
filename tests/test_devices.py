"""The suite's --device option (tests/conftest.py): a CPU session computes as CI does on any machine,
and a bad --device stops the session with a message instead of failing test by test."""

import os
import re

import pytest
import torch


def test_the_session_computes_where_device_says(device):
    if device.type == "cpu":
        # A GPU on the machine stays hidden: the trainer and the bench pick one by themselves.
        assert os.environ.get("CUDA_VISIBLE_DEVICES") == "" and not torch.cuda.is_available()
    else:
        assert torch.cuda.current_device() == (device.index or 0)
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


class _Options:
    """What pytest_configure reads of pytest's config: the --device value."""

    def __init__(self, device: str):
        self.device = device

    def getoption(self, name: str) -> str:
        assert name == "--device"
        return self.device

    def addinivalue_line(self, name: str, line: str) -> None:
        pass


@pytest.mark.parametrize("name, message", [
    ("mps", "--device mps: use cpu or cuda[:N]"),  # a torch device, not one these tests run on
    ("gpu0", "--device 'gpu0' is not a device; use cpu or cuda[:N]"),
    ("cuda:99", "this machine has") if torch.cuda.is_available() else
    ("cuda", "--device cuda: CUDA is not available on this machine; use --device cpu"),
])
def test_a_bad_device_stops_the_session_with_its_fix(name, message):
    from conftest import pytest_configure

    with pytest.raises(pytest.UsageError, match=re.escape(message)):
        pytest_configure(_Options(name))
