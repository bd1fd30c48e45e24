"""Cluster faults a long run survives, handled in one place.

* **Preemption.** SIGTERM or SIGUSR1 (what SLURM, Kubernetes and torchrun send before a kill) only
  raises a flag. After every optimizer step the processes agree on it with an all-reduce of a
  two-element tensor, so a signal that reached a single process stops them all after the same step;
  they write a checkpoint and leave with :data:`EXIT_PREEMPTED`.
* **Where to start** (:func:`starting_checkpoint`): ``--resume auto`` (the default) continues the
  run in ``--output-dir`` when it holds a checkpoint of the same configuration — a job re-submitted
  with the same command line, or workers restarted by ``torchrun --max-restarts`` — starts fresh when
  it holds none and refuses another run's folder; ``--resume never`` starts over (the earlier run's
  files are moved aside, not deleted); ``--resume DIR`` continues the run in DIR.
* **Storage** (:func:`check_storage`): the output folder is probed for writing and its free space
  compared with an estimate of one checkpoint before training starts.

Checkpoint validation (manifest and checksums) and failed writes are the checkpointer's
(:mod:`train.checkpoint`); bounded collectives are the process group's (``--dist-timeout``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import torch

from train import checkpoint, distributed
from train.config import ConfigError, parse_fault

EXIT_PREEMPTED = 143  # 128 + SIGTERM: "stopped by a termination signal", after a checkpoint was written
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# Configuration fields that may differ between launches of one run (how it runs, not what it
# computes); any other difference means another run. World size and per-process batch may change
# while the global batch stays (checked at resume).
LAUNCH_FIELDS = {"resume", "fault", "max_steps", "log_every", "num_workers", "eval_only", "checkpoint",
                 "output_dir", "dist_timeout", "keep_checkpoints", "world_size", "batch_size", "accum_steps",
                 "compile", "compile_backend", "precision", "grad_checkpoint", "num_classes", "augment_on", "eval_every"}
RUN_FILES = ("config.json", "metrics.jsonl", "tensorboard", checkpoint.LATEST, checkpoint.FINAL,
             checkpoint.FINAL_SAFETENSORS)


class Preempted(Exception):
    """The run stopped on a termination signal after writing a checkpoint."""


class StopSignals:
    """While active, SIGTERM and SIGUSR1 set :attr:`received` instead of killing the process.

    Only the main thread can install handlers; elsewhere (or for a run inside a test) this does
    nothing. Previous handlers are restored on exit."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:  # no printing here: a handler may interrupt a print
        self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def ignore_stop_signals() -> None:
    """For a worker leaving after a preemption checkpoint: a further SIGTERM (torchrun stopping the
    group once one worker has left) must not turn its orderly exit into a kill."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def agree_to_stop(signals: StopSignals | None, env) -> tuple[str, int] | None:
    """Collective, after every step: (signal name, a process that received it) when any process did."""
    if signals is None:
        return None
    flag = torch.tensor([signals.received or 0, env.rank if signals.received else -1], dtype=torch.int64,
                        device=env.device)
    signum, rank = distributed.all_reduce_max(flag).tolist()
    if not signum:
        return None
    return signal.Signals(signum).name, rank


def fault_hook(fault: str | None, step: int, env, signals: StopSignals | None) -> None:
    """Test hooks run after optimizer step ``step`` (1-based): see ``--fault``."""
    kind, at = parse_fault(fault) or (None, None)
    if at != step:
        return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)  # die like a preempted job without warning
    elif kind == "term" and env.rank == env.world_size - 1:
        os.kill(os.getpid(), signal.SIGTERM)  # a termination signal that reaches one process only
    elif kind == "stall" and env.is_main and restart_count() == 0:
        print(f"--fault stall@{step}: process 0 (pid {os.getpid()}) pauses", flush=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (signals and signals.received):
            time.sleep(0.05)


def restart_count() -> int:
    """How many times torchrun has restarted this run's workers (``TORCHELASTIC_RESTART_COUNT``)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    except ValueError:
        return 0


# ---- where to start ----------------------------------------------------------------------------
def identity_differences(saved: dict, current: dict) -> list[str]:
    """The configuration fields in which ``current`` is another run than ``saved``."""
    return [f"{k} {saved[k]!r} → {current[k]!r}" for k in sorted(set(saved) & set(current))
            if k not in LAUNCH_FIELDS and current[k] is not None and _norm(saved[k]) != _norm(current[k])]


def _norm(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def _saved_config(out: Path) -> dict | None:
    for source in [out / "config.json"] + [c / checkpoint.STATE_FILE for c in checkpoint.candidates(out)]:
        try:
            saved = json.loads(source.read_text())
        except (OSError, ValueError):
            continue
        saved = saved.get("config", saved) if source.name == checkpoint.STATE_FILE else saved
        if isinstance(saved, dict):
            return saved
    return None


def starting_checkpoint(cfg, env, log) -> Path | None:
    """Collective: the checkpoint this launch continues from (None: a fresh start), after the checks
    in the module docstring. Raises :class:`~train.checkpoint.ResumeError` for another run's folder."""
    restarts = restart_count()
    if restarts:
        limit = os.environ.get("TORCHELASTIC_MAX_RESTARTS")
        log(f"torchrun restarted the workers (TORCHELASTIC_RESTART_COUNT={restarts}"
            f"{f' of at most {limit}' if limit else ''}): continuing from the newest intact checkpoint")
    out = Path(cfg.output_dir)
    if cfg.resume not in (None, "never"):
        if restarts and not cfg.eval_only and distributed.broadcast_object(
                env.is_main and out.is_dir() and bool(checkpoint.candidates(out))):
            return checkpoint.select_checkpoint(out, env, log)  # what this launch has written since
        return checkpoint.select_checkpoint(cfg.resume, env, log)
    if cfg.eval_only:
        return None
    if cfg.resume == "never" and not restarts:  # a restart continues what this launch started
        if env.is_main:
            _move_aside(out, log)
        distributed.barrier()
        return None
    problem, holds = None, False
    if env.is_main:
        holds = bool(checkpoint.candidates(out)) if out.is_dir() else False
        saved = _saved_config(out) if out.is_dir() else None
        differences = identity_differences(saved, cfg.to_dict()) if saved else []
        if differences and (holds or (out / checkpoint.FINAL).exists()):
            problem = (f"--output-dir {out} already holds a run with another configuration ("
                       f"{'; '.join(differences)}); nothing was changed. Continue that run with its own options "
                       f"(--resume {out} takes them from its config.json; options given override them), start "
                       f"over in this folder with --resume never (its files are moved aside), or choose another "
                       f"--output-dir")
        elif differences:
            log(f"--output-dir {out}: replacing the config.json of a run that wrote no checkpoint")
    problem, holds = distributed.broadcast_object((problem, holds))
    if problem:
        raise checkpoint.ResumeError(problem)
    if not holds:
        return None
    ckpt = checkpoint.select_checkpoint(out, env, log)
    log(f"--output-dir {out} holds this run's checkpoints (--resume auto): continuing from {ckpt}")
    return ckpt


def _move_aside(out: Path, log) -> None:
    present = [out / n for n in RUN_FILES if (out / n).exists()] + sorted(out.glob(f"{checkpoint.PREFIX}*")) \
        if out.is_dir() else []
    if not present:
        return
    aside = out / time.strftime("replaced-%Y%m%d-%H%M%S")
    n = 1
    while aside.exists():
        n += 1
        aside = out / f"{time.strftime('replaced-%Y%m%d-%H%M%S')}-{n}"
    aside.mkdir()
    for path in present:
        os.replace(path, aside / path.name)
    log(f"--resume never: the earlier run's files in {out} were moved to {aside}; starting fresh")


# ---- storage -------------------------------------------------------------------------------------
def checkpoint_bytes(model, optimizer, ema) -> int:
    """Bytes of one checkpoint, estimated: the weights, AdamW's two moments per weight, the EMA copy,
    the buffers (the global sizes; summed over processes that is what the shards hold)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    moments = 2 if optimizer is not None else 0
    return int(params * (1 + moments + (1 if ema is not None else 0)) + buffers * (2 if ema is not None else 1))


def check_storage(output_dir: str | os.PathLike, env, needed: int) -> None:
    """Collective: every process writes a probe file into ``output_dir`` (creating it), then the free
    space is compared with ``needed`` bytes. Raises :class:`ConfigError` on every process, with the
    path and the free space, when a checkpoint could not be written."""
    out = Path(output_dir)
    problem = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{env.rank}-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        problem = (f"--output-dir {out} is not writable: {e.strerror or e} ({type(e).__name__}); "
                   f"{checkpoint.disk_space(out)}")
    if problem is None and env.is_main:
        try:
            free = shutil.disk_usage(out).free
        except OSError:
            free = None
        if free is not None and free < needed:
            problem = (f"--output-dir {out} has too little free space for a checkpoint: "
                       f"{checkpoint.disk_space(out)}, one checkpoint needs about {needed / 2**20:.1f} MiB; "
                       f"free some space or choose another --output-dir")
    problems = [p for p in distributed.all_gather_object(problem) if p]
    if problems:
        raise ConfigError(problems[0])
