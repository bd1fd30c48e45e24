"""Resumable checkpoints (torch.distributed.checkpoint) and the final plain state dict.

Layout of an output folder::

    ckpt-00001234/         newest complete checkpoint (sharded: one file per process + .metadata)
        train_state.json   epoch, step, sampler position, epoch sums, metric history, config
        rng-rank<R>.pt     RNG states and BatchNorm running statistics of process R
        manifest.json      size and CRC-32 of every other file; written last
    ckpt-00001200/         the one before (``--keep-checkpoints K``, default 2: the K newest are kept)
    latest                 the name of the newest complete checkpoint (replaced atomically)
    model_final.pt         {"model": full state dict (, "model_ema": ...), "config", "epoch", ...} for
                           stvit.load_checkpoint
    model_final.safetensors  the same weights ("model") as safetensors, for the Hugging Face hub and timm
                           (written when the safetensors package is installed)

A checkpoint is written into ``.ckpt-<step>.tmp/``; once every process has finished writing, the
file sizes and checksums are recorded in ``manifest.json`` and only then is the folder renamed
into place, ``latest`` pointed at it and checkpoints beyond the newest K deleted, so a crash at any
moment leaves complete checkpoints behind. A write that fails (a full disk) removes the temporary
folder on every process and names the path and the free space. On resume every file is checked
against the manifest (each process checks its share); a damaged checkpoint — a shard cut short,
a garbled file — is reported and the one before it is used.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from stvit.checkpoint import CheckpointError, save_state_dict
from stvit.files import atomic_path
from train import distributed
from train.metrics import atomic_write_text

PREFIX = "ckpt-"
LATEST = "latest"
STATE_FILE = "train_state.json"
FINAL = "model_final.pt"
FINAL_SAFETENSORS = "model_final.safetensors"
MANIFEST = "manifest.json"


class ResumeError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit this run."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, folder not writable); nothing partial was kept."""


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


def save_checkpoint(output_dir: str | os.PathLike, model, optimizer, ema, train_state: dict, env,
                    keep: int = 2) -> Path:
    """Collective: every process calls it. Returns the checkpoint folder; raises
    :class:`CheckpointWriteError` on every process alike when any process could not write."""
    output_dir = Path(output_dir)
    name = f"{PREFIX}{train_state['global_step']:08d}"
    final, tmp = output_dir / name, output_dir / f".{name}.tmp"
    own = distributed.local_buffers(model)  # this process's BatchNorm statistics, put back after saving
    distributed.average_buffers(model)  # every process saves, and later evaluates, the same statistics
    try:
        error = None
        if env.is_main:
            try:
                for partial in output_dir.glob(f".{PREFIX}*.tmp"):  # left by a crash while writing
                    shutil.rmtree(partial, ignore_errors=True)
                tmp.mkdir(parents=True)
            except OSError as e:
                error = e
        _raise_if_any(distributed.all_gather_object(_describe(error)), output_dir, final, tmp, env)
        try:
            with _quiet_single_process():
                dcp.save(_training_state(model, optimizer, ema), checkpoint_id=str(tmp))
            torch.save({**rng_state(), "buffers": own, "world_size": env.world_size}, tmp / f"rng-rank{env.rank}.pt")
        except Exception as e:  # noqa: BLE001 - reported below, on every process
            error = e
        _raise_if_any(distributed.all_gather_object(_describe(error)), output_dir, final, tmp, env)
        try:  # every file is written: each process checksums its share
            entries = _checksums(tmp, env.rank, env.world_size)
        except OSError as e:
            error, entries = e, {}
        shares = distributed.all_gather_object((_describe(error), entries))
        _raise_if_any([problem for problem, _ in shares], output_dir, final, tmp, env)
        if env.is_main:
            try:
                text = json.dumps(train_state, indent=1)
                atomic_write_text(tmp / STATE_FILE, text)
                files = {k: v for _, share in shares for k, v in share.items()}
                files[STATE_FILE] = {"bytes": len(text.encode()), "crc32": _crc32_bytes(text.encode())}
                atomic_write_text(tmp / MANIFEST, json.dumps({"format": 1, "step": train_state["global_step"],
                                                              "world_size": env.world_size, "files": files},
                                                             indent=1))
                _publish(output_dir, name, final, tmp, keep)
            except OSError as e:
                error = e
        _raise_if_any([distributed.broadcast_object(_describe(error))], output_dir, final, tmp, env)
    finally:
        distributed.restore_buffers(model, own)
    return final


def _publish(output_dir: Path, name: str, final: Path, tmp: Path, keep: int) -> None:
    """Rename the written folder into place, point ``latest`` at it, keep the ``keep`` newest."""
    if final.exists():  # re-saving a step (e.g. after a resume): keep the old one until replaced
        old = output_dir / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    atomic_write_text(output_dir / LATEST, name + "\n")
    # Older checkpoints beyond the newest ``keep`` go, and so do newer ones: those belong to a timeline
    # abandoned by resuming from an earlier checkpoint.
    older = sorted(p.name for p in output_dir.glob(f"{PREFIX}*") if p.is_dir() and p.name < name)
    kept = {name, *older[len(older) - (keep - 1):]} if keep > 1 else {name}
    for stale in output_dir.glob(f"{PREFIX}*"):
        if stale.is_dir() and stale.name not in kept:
            shutil.rmtree(stale, ignore_errors=True)


def _describe(error: BaseException | None) -> str | None:
    if error is None:
        return None
    return _first_line(error)


def _raise_if_any(problems: list, output_dir: Path, final: Path, tmp: Path, env) -> None:
    """Collective outcome of one phase of a save: every process raises the same error, the main
    process first removes the partial folder, so a partial checkpoint is never taken for complete."""
    found = [(rank, p) for rank, p in enumerate(problems) if p]
    if not found:
        return
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    latest = output_dir / LATEST
    previous = latest.read_text().strip() if latest.is_file() else None
    where = "" if len(problems) == 1 else f" (process {found[0][0]})"
    raise CheckpointWriteError(
        f"cannot write checkpoint {final}{where}: {found[0][1]}; {disk_space(output_dir)}; the partial checkpoint "
        f"was removed; " + (f"the last complete checkpoint is {output_dir / previous}" if previous
                            else "no earlier checkpoint exists"))


def disk_space(path: str | os.PathLike) -> str:
    """``free space on PATH: X GiB of Y GiB`` for the nearest existing folder of ``path``."""
    path = Path(path).absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError as e:
        return f"free space on {probe} unknown ({e.strerror or e})"
    return f"free space on {probe}: {_gib(usage.free)} of {_gib(usage.total)}"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def _crc32_file(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _crc32_bytes(data: bytes) -> str:
    return f"{zlib.crc32(data):08x}"


def _checksums(folder: Path, rank: int, world: int) -> dict:
    """Size and CRC-32 of this process's share of the files in ``folder`` (the manifest's entries)."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in (STATE_FILE, MANIFEST))
    return {n: {"bytes": (folder / n).stat().st_size, "crc32": _crc32_file(folder / n)}
            for n in names[rank::world]}


def save_final(output_dir: str | os.PathLike, model, ema, extra: dict, env, log=print) -> Path | None:
    """Collective: gather the full (unsharded) weights; the main process writes ``model_final.pt``
    and the model weights again as ``model_final.safetensors`` (the EMA weights stay in the .pt file:
    ``stvit.save_state_dict(stvit.read_checkpoint(pt, use_ema=True), "ema.safetensors")`` writes
    them). Without the safetensors package that second file is skipped and ``log`` says how to get it."""
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
    # The header carries what identifies the weights (string pairs only).
    metadata = {k: str(v) for k, v in extra.items() if isinstance(v, (str, int, float))}
    if isinstance(extra.get("config"), dict) and "model" in extra["config"]:
        metadata["model"] = str(extra["config"]["model"])
    try:
        save_state_dict(payload["model"], Path(output_dir) / FINAL_SAFETENSORS, metadata)
    except CheckpointError as e:  # the safetensors package is not installed
        log(f"{FINAL_SAFETENSORS} not written: {e}")
    return path


def _full_cpu(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu().clone()


# ---- finding and loading -------------------------------------------------------------------------
def verify(folder: str | os.PathLike, rank: int = 0, world: int = 1) -> str | None:
    """What is wrong with the checkpoint ``folder`` (None: complete and intact).

    Every file is checked against ``manifest.json`` — process ``rank`` of ``world`` checks its share.
    A folder without a manifest (written before manifests existed) counts as complete when it holds
    ``.metadata`` and a readable ``train_state.json``."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        if not (folder / ".metadata").is_file():
            return f"{folder} has no {MANIFEST} and no .metadata (not completely written)"
        try:
            json.loads((folder / STATE_FILE).read_text())
        except (OSError, ValueError) as e:
            return f"{folder / STATE_FILE} is unreadable ({_first_line(e)})"
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
        entries = sorted((str(n), int(v["bytes"]), str(v["crc32"])) for n, v in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{manifest} is unreadable ({_first_line(e)})"
    names = {n for n, _, _ in entries}
    if not {".metadata", STATE_FILE} <= names:
        return f"{manifest} does not list .metadata and {STATE_FILE}"
    for name, size, crc in entries[rank::world]:
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{path} has {actual} bytes, {size} were written (cut short or overwritten)"
        if _crc32_file(path) != crc:
            return f"{path} does not match the checksum written with it (damaged)"
    return None


def candidates(folder: str | os.PathLike) -> list[Path]:
    """Checkpoint folders inside ``folder``, the one to try first first: the one ``latest`` names, then
    the older ones, newest first (newer ones than ``latest`` belong to an abandoned timeline)."""
    folder = Path(folder)
    names = sorted((p.name for p in folder.glob(f"{PREFIX}*") if p.is_dir()), reverse=True)
    latest = folder / LATEST
    try:
        pointed = latest.read_text().strip() if latest.is_file() else None
    except (OSError, UnicodeDecodeError):
        pointed = None
    if pointed in names:
        names = [pointed] + [n for n in names if n < pointed]
    return [folder / n for n in names]


def _is_checkpoint_folder(path: Path) -> bool:
    return (path / ".metadata").is_file() or (path / MANIFEST).is_file()


def select_checkpoint(path: str | os.PathLike, env, warn) -> Path:
    """Collective: the newest intact checkpoint in ``path`` (or ``path`` itself, a checkpoint folder).

    Each damaged one is reported through ``warn`` with what is wrong, and the one before it is tried;
    every process checks its share of the files and all agree on the result."""
    path = Path(path)
    listing = None
    if env.is_main:
        if not path.exists():
            listing = f"--resume {path}: no such folder; give the --output-dir of an earlier run"
        else:
            listing = [str(path)] if _is_checkpoint_folder(path) else [str(c) for c in candidates(path)]
    listing = distributed.broadcast_object(listing)
    if isinstance(listing, str):
        raise ResumeError(listing)
    for candidate in map(Path, listing):
        problems = [p for p in distributed.all_gather_object(verify(candidate, env.rank, env.world_size)) if p]
        if not problems:
            return candidate
        warn(f"warning: checkpoint {candidate} is damaged and is skipped: {problems[0]}")
    if listing == [str(path)]:
        raise ResumeError(f"--resume {path}: this checkpoint is damaged; give its run folder to fall back to an "
                          f"earlier one")
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
        saved = torch.load(rng_file, weights_only=True)
        set_rng_state(saved)
        if saved.get("world_size") == env.world_size and "buffers" in saved:
            # Same layout: each process continues with its own BatchNorm statistics, as if never stopped.
            distributed.restore_buffers(model, saved["buffers"])


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
