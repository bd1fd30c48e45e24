"""Resumable checkpoints (torch.distributed.checkpoint) and the final plain state dict.

Layout of an output folder::

    ckpt-00001234/         newest complete checkpoint (sharded: one file per process + .metadata)
        train_state.json   epoch, step, sampler position, epoch sums, metric history, config
        rng-rank<R>.pt     torch / CUDA / numpy / python RNG states of process R
    latest                 the name of the newest complete checkpoint (replaced atomically)
    model_final.pt         {"model": full state dict} for stvit.load_checkpoint

A checkpoint is written into ``.ckpt-<step>.tmp/`` and renamed into place only once every process
has finished writing; ``latest`` then points at it and only then is the previous one deleted, so
a crash at any moment leaves a complete checkpoint behind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from stvit.files import atomic_path
from train import distributed
from train.metrics import atomic_write_text

PREFIX = "ckpt-"
LATEST = "latest"
STATE_FILE = "train_state.json"
FINAL = "model_final.pt"


class ResumeError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit this run."""


@contextmanager
def _quiet_single_process():
    """DCP warns that it "assumes a single process" when there is no process group: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


# ---- RNG state ----------------------------------------------------------------------------------
def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- saving --------------------------------------------------------------------------------------
def _training_state(model, optimizer, ema) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


def save_checkpoint(output_dir: str | os.PathLike, model, optimizer, ema, train_state: dict, env) -> Path:
    """Collective: every process calls it. Returns the checkpoint folder."""
    output_dir = Path(output_dir)
    name = f"{PREFIX}{train_state['global_step']:08d}"
    final, tmp = output_dir / name, output_dir / f".{name}.tmp"
    distributed.average_buffers(model)  # every process saves, and later evaluates, the same statistics
    if env.is_main:
        for partial in output_dir.glob(f".{PREFIX}*.tmp"):  # left by a crash while writing
            shutil.rmtree(partial, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    with _quiet_single_process():
        dcp.save(_training_state(model, optimizer, ema), checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng-rank{env.rank}.pt")
    distributed.barrier()
    if env.is_main:
        atomic_write_text(tmp / STATE_FILE, json.dumps(train_state, indent=1))
        if final.exists():  # re-saving a step (e.g. after a resume): keep the old one until replaced
            old = output_dir / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        atomic_write_text(output_dir / LATEST, name + "\n")
        for stale in output_dir.glob(f"{PREFIX}*"):
            if stale.name != name and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
    distributed.barrier()
    return final


def save_final(output_dir: str | os.PathLike, model, ema, extra: dict, env) -> Path | None:
    """Collective: gather the full (unsharded) weights; the main process writes ``model_final.pt``."""
    distributed.average_buffers(model)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    payload = {"model": get_model_state_dict(model, options=full)}
    if ema is not None:
        averaged = {name: _full_cpu(t) for name, t in ema.state_dict().items()}
        payload["model_ema"] = {name: averaged.get(name, value) for name, value in payload["model"].items()}
    if not env.is_main:
        return None
    path = Path(output_dir) / FINAL
    with atomic_path(path) as tmp:
        torch.save({**payload, **extra}, tmp)
    return path


def _full_cpu(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu().clone()


# ---- finding and loading -------------------------------------------------------------------------
def _is_complete(folder: Path) -> bool:
    return (folder / ".metadata").is_file() and (folder / STATE_FILE).is_file()


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder to resume from: ``path`` itself, or the newest complete one inside it."""
    path = Path(path)
    if not path.exists():
        raise ResumeError(f"--resume {path}: no such folder; give the --output-dir of an earlier run")
    if _is_complete(path):
        return path
    latest = path / LATEST
    if latest.is_file():
        candidate = path / latest.read_text().strip()
        if _is_complete(candidate):
            return candidate
    found = sorted(p for p in path.glob(f"{PREFIX}*") if p.is_dir() and _is_complete(p))
    if found:
        return found[-1]
    raise ResumeError(f"--resume {path}: no complete checkpoint in this folder (expected {path}/{LATEST} "
                      f"and {path}/{PREFIX}<step>/ written by a run with --output-dir {path})")


def read_train_state(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ResumeError(f"cannot read {Path(ckpt) / STATE_FILE}: {e}") from None


def check_compatible(state: dict, *, model: str, num_classes: int, global_batch: int, ckpt: Path) -> None:
    """Refuse to resume a checkpoint of another model, head or global batch — with the reason."""
    problems = []
    if state.get("model") != model:
        problems.append(f"it is a checkpoint of {state.get('model')}, this run builds {model} (use --model "
                        f"{state.get('model')})")
    if state.get("num_classes") != num_classes:
        problems.append(f"it has {state.get('num_classes')} classes, this dataset has {num_classes}")
    if state.get("global_batch") != global_batch:
        problems.append(f"it was trained with a global batch of {state.get('global_batch')}, this run has "
                        f"{global_batch} (keep --batch-size × processes × --accum-steps the same to resume)")
    if problems:
        raise ResumeError(f"cannot resume from {ckpt}: " + "; ".join(problems))


def load_checkpoint(ckpt: Path, model, optimizer, ema, env) -> None:
    """Collective: restore weights, optimizer moments, EMA and this process's RNG state."""
    state = _training_state(model, optimizer, ema)
    _dcp_load(state, ckpt)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    rng_file = Path(ckpt) / f"rng-rank{env.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))


def load_model_weights(ckpt: Path, model) -> None:
    """Model weights only, from a checkpoint folder (for --eval --resume DIR)."""
    state = {"model": get_model_state_dict(model)}
    _dcp_load(state, ckpt)
    set_model_state_dict(model, state["model"])


def _dcp_load(state: dict, ckpt: Path) -> None:
    """Collective: fill ``state`` in place from the checkpoint folder ``ckpt``."""
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(ckpt))
    except Exception as e:  # DCP wraps per-rank failures; report the first line of the cause
        raise ResumeError(f"cannot load {ckpt}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0] if len(lines) == 1 else " ".join(lines[:3])[:500]
