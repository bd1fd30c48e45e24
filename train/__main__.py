"""``python -m train`` / ``torchrun --nproc_per_node N -m train``: see ``python -m train --help``."""

from __future__ import annotations

import os
import sys

# Idle OpenMP threads sleep instead of spinning: on a busy CPU (data-loader workers, other jobs)
# spinning threads can slow a training step down many times. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from train.config import ConfigError, parse_config
from train.distributed import exit_process, world_size_hint


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv, world_size_hint())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from train.loop import main_entry  # imported late: --help and option errors stay fast
    return main_entry(cfg)


if __name__ == "__main__":
    exit_process(main())
