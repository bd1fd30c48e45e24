from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.skip(f"golden tensors not found at {GOLDEN} (they live in ../shared/golden beside the repo); "
                    f"parity with the authors' code is not checked")
    return GOLDEN


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
