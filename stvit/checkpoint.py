"""Loading checkpoints — the authors' release files as they are, or ours — safely and strictly."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

# Constant identity kernels of the authors' unfold/fold convolutions: not parameters here.
_CONSTANT_SUFFIXES = (".attn.unfold.weights", ".attn.fold.weights")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_HEAD_PREFIXES = ("proj.", "norm.", "head.")  # absent from a features_only backbone


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


def read_checkpoint(source: str | os.PathLike | Mapping, *, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Return the model state dict inside ``source`` (a path or an already loaded dict).

    Accepts bare state dicts and ``{"model": ...}``, ``{"model_ema": ...}``, ``{"state_dict": ...}``
    wrappers; files are read with ``weights_only=True``, never unpickled into arbitrary objects.
    """
    obj = _load_file(Path(source)) if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state dict; "
                              f"expected a dict of tensors or a {{'model': state_dict}} wrapper")
    order = ("model_ema", "model", "state_dict") if use_ema else ("model", "state_dict", "model_ema")
    for key in order:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state = {}
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"checkpoint entry {name!r} is a {type(value).__name__}, not a tensor; "
                                  f"this is not a model state dict")
        for prefix in _WRAPPER_PREFIXES:
            name = name.removeprefix(prefix)
        if not name.endswith(_CONSTANT_SUFFIXES):
            state[name] = value
    if not state:
        raise CheckpointError("checkpoint contains no tensors; expected a model state dict")
    return state


def _load_file(path: Path):
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds objects other than tensors and plain containers, which are "
                              f"not loaded for safety (weights_only=True). Re-save it as a state dict: "
                              f"torch.save(model.state_dict(), path). Details: {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: the file is truncated, corrupt or not a PyTorch "
                              f"checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              f"download or save it again") from None


def load_checkpoint(model: nn.Module, source: str | os.PathLike | Mapping, *, use_ema: bool = False) -> nn.Module:
    """Load ``source`` into ``model`` strictly; all mismatches are reported in one ``CheckpointError``."""
    state = read_checkpoint(source, use_ema=use_ema)
    if getattr(model, "features_only", False):
        state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or mis_shaped:
        raise CheckpointError(_mismatch_report(missing, unexpected, mis_shaped, state, expected))
    model.load_state_dict(state)
    return model


def _mismatch_report(missing, unexpected, mis_shaped, state, expected, limit: int = 20) -> str:
    def shape(t):
        return "×".join(map(str, t.shape)) or "scalar"

    rows = ([(k, "missing from checkpoint", "-", shape(expected[k])) for k in missing]
            + [(k, "unexpected in checkpoint", shape(state[k]), "-") for k in unexpected]
            + [(k, "shape differs", shape(state[k]), shape(expected[k])) for k in mis_shaped])
    width = max(len(r[0]) for r in rows)
    lines = [f"checkpoint does not match the model architecture: {len(missing)} missing, "
             f"{len(unexpected)} unexpected, {len(mis_shaped)} mis-shaped keys "
             f"(is it a checkpoint of another model size or head? build the matching model with "
             f"stvit.create_model(name, num_classes=...)):",
             f"  {'key':<{width}}  {'problem':<24}  {'checkpoint':>14}  {'model':>14}"]
    lines += [f"  {k:<{width}}  {p:<24}  {c:>14}  {m:>14}" for k, p, c, m in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"  ... and {len(rows) - limit} more")
    return "\n".join(lines)


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a state dict atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        torch.save(dict(state), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
