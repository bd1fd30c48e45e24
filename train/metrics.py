"""Run records: ``metrics.jsonl`` (one JSON object per epoch) and TensorBoard scalars.

Only the main process writes. The per-epoch history also travels inside every checkpoint, so a
resumed run rewrites ``metrics.jsonl`` from it: no lost or duplicated epochs whatever the moment
of the interruption.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from stvit.files import atomic_path


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    return value


class MetricsWriter:
    """Append epoch records to ``metrics.jsonl`` and scalars to TensorBoard (main process only)."""

    def __init__(self, output_dir: str | os.PathLike, enabled: bool = True,
                 history: list[dict] | None = None, purge_step: int | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        # A fresh run starts an empty file; a resumed one restores exactly the checkpoint's epochs.
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in (history or [])))
        from torch.utils.tensorboard import SummaryWriter
        # purge_step drops events a killed run logged after its last checkpoint.
        self.tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"), purge_step=purge_step)

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(f"train_step/{name}", value, step)

    def log_epoch(self, record: dict, step: int, group: str = "epoch") -> None:
        """Append ``record`` to metrics.jsonl; its numbers become TensorBoard scalars ``group/<name>``
        (``epoch`` for classification's per-epoch records, ``eval`` for segmentation's)."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for name, value in record.items():
            if isinstance(value, (int, float)) and name != "epoch":
                self.tb.add_scalar(f"{group}/{name}", value, step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
