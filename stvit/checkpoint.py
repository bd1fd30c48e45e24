"""Loading checkpoints — the authors' release files as they are, or ours — safely and strictly."""

from __future__ import annotations

import argparse
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .files import atomic_path

# Constant identity kernels of the authors' unfold/fold convolutions: not parameters here.
_CONSTANT_SUFFIXES = (".attn.unfold.weights", ".attn.fold.weights")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_HEAD_PREFIXES = ("proj.", "norm.", "head.")  # absent from a features_only backbone


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why.

    ``matching_model``: for a checkpoint of another registered architecture, that model's name.
    """

    def __init__(self, message: str, matching_model: str | None = None):
        super().__init__(message)
        self.matching_model = matching_model

    def command_line_message(self, model_flag: str) -> str:
        """The message for a command-line tool whose ``--model`` was ``model_flag``: its fix is
        a flag, not a Python call."""
        from .registry import resolve_name  # late import: the registry imports the model module

        text = str(self)
        try:
            same = self.matching_model is None or resolve_name(model_flag) == self.matching_model
        except ValueError:
            same = False
        if not same:
            text += f"\n  on the command line: --model {self.matching_model}"
        return text


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
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass the checkpoint file inside it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    _check_format(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols are noise here
            # Training checkpoints often carry their argparse options; a Namespace is plain data.
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported (global: GLOBAL \S+|operand \d+)", str(e))
        detail = f" (the safe loader refused: {found.group(0)})" if found else ""
        raise CheckpointError(f"{path} holds Python objects other than tensors and plain containers{detail}. "
                              f"It was NOT loaded: unpickling such objects can run arbitrary code "
                              f"(weights_only=True). If you trust its source, load it yourself with "
                              f"torch.load(path, weights_only=False) and re-save only the weights: "
                              f"torch.save(model.state_dict(), path)") from None
    except Exception as e:  # torch reports broken files with many types (RuntimeError, KeyError, ...)
        raise CheckpointError(f"cannot read {path}: the file is truncated, corrupt or not a PyTorch "
                              f"checkpoint ({_first_line(e)}); download or save it again") from None


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive
_PICKLE_PROTO = b"\x80"  # the legacy format starts with a pickle PROTO opcode


def _check_format(path: Path) -> None:
    """Reject files that are plainly not checkpoints before handing them to the unpickler."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise CheckpointError(f"cannot read {path}: the file is empty; download or save it again")
    if head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTO):
        return
    if head[8:9] == b"{":
        raise CheckpointError(f"{path} looks like a safetensors file, which stvit does not read; "
                              f"convert it with safetensors.torch.load_file and torch.save")
    kind = "a text file" if _looks_like_text(head) else "not a PyTorch checkpoint"
    raise CheckpointError(f"{path} is {kind} (it starts with {head[:24]!r}); expected a file written "
                          f"by torch.save, e.g. torch.save(model.state_dict(), path)")


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c >= 32 or c in b"\t\r\n" for c in head)


def _first_line(e: Exception) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # drop terminal colour codes
    line = text.splitlines()[0] if text else ""
    line = line.split(". This is an internal miniz error")[0]
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def load_checkpoint(model: nn.Module, source: str | os.PathLike | Mapping, *, use_ema: bool = False) -> nn.Module:
    """Load ``source`` into ``model`` strictly; all mismatches are reported in one ``CheckpointError``."""
    state = read_checkpoint(source, use_ema=use_ema)
    if getattr(model, "features_only", False):
        state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
    expected = model.state_dict()
    # In state-dict (module) order, so the table starts with the stem, not alphabetically.
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mis_shaped:
        raise CheckpointError(_mismatch_report(missing, unexpected, mis_shaped, state, expected),
                              matching_model=_registered_name(state))
    model.load_state_dict(state)
    return model


def _mismatch_report(missing, unexpected, mis_shaped, state, expected, limit: int = 20) -> str:
    def shape(t):
        return "×".join(map(str, t.shape)) or "scalar"

    # Mis-shaped keys first: they say the most about what differs (width, classes).
    rows = ([(k, "shape differs", shape(state[k]), shape(expected[k])) for k in mis_shaped]
            + [(k, "unexpected in checkpoint", shape(state[k]), "-") for k in unexpected]
            + [(k, "missing from checkpoint", "-", shape(expected[k])) for k in missing])
    width = max(len(r[0]) for r in rows)
    lines = [f"checkpoint does not match the model architecture: {len(missing)} missing, "
             f"{len(unexpected)} unexpected, {len(mis_shaped)} mis-shaped keys.",
             f"  checkpoint: {describe_state_dict(state)}",
             f"  model:      {describe_state_dict(expected)}",
             f"  {_mismatch_hint(state, expected, missing, unexpected, mis_shaped)}",
             f"  {'key':<{width}}  {'problem':<24}  {'checkpoint':>14}  {'model':>14}"]
    lines += [f"  {k:<{width}}  {p:<24}  {c:>14}  {m:>14}" for k, p, c, m in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"  ... and {len(rows) - limit} more")
    return "\n".join(lines)


def describe_state_dict(state: Mapping[str, torch.Tensor]) -> str:
    """A one-line summary of an STViT state dict: blocks and width per stage, classes, and the
    registered model it matches (e.g. ``depths (1, 1, 2, 1), widths (32, 64, 128, 160), ...``)."""
    depths, widths = _stage_layout(state)
    head = state.get("head.weight")
    classes = f"{head.shape[0]} classes" if head is not None and head.ndim == 2 else "no classifier head"
    text = f"depths {tuple(depths)}, widths {tuple(widths)}, {classes}"
    name = _registered_name(state)
    return text + (f" (like {name})" if name else "")


def _registered_name(state: Mapping[str, torch.Tensor]) -> str | None:
    from .registry import MODEL_CONFIGS  # late import: the registry imports the model module

    depths, widths = _stage_layout(state)
    for name, cfg in MODEL_CONFIGS.items():
        if list(cfg["depths"]) == depths and list(cfg["embed_dim"]) == widths:
            return name
    return None


def _stage_layout(state: Mapping[str, torch.Tensor]) -> tuple[list[int], list[int]]:
    blocks: dict[int, set[int]] = {}
    widths: dict[int, int] = {}
    for key, value in state.items():
        found = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.norm1\.norm\.weight$", key)
        if found:
            stage, block = int(found.group(1)), int(found.group(2))
            blocks.setdefault(stage, set()).add(block)
            widths[stage] = value.shape[0]
    stages = sorted(blocks)
    return [len(blocks[i]) for i in stages], [widths[i] for i in stages]


def _mismatch_hint(state, expected, missing, unexpected, mis_shaped) -> str:
    differing = set(missing) | set(unexpected) | set(mis_shaped)
    if differing <= {"head.weight", "head.bias"} and "head.weight" in state:
        n = state["head.weight"].shape[0]
        return (f"only the classifier differs: the checkpoint has {n} classes. Build the model with "
                f"num_classes={n}, or load into that model and then call model.reset_classifier(k) "
                f"to fine-tune for k classes.")
    name = _registered_name(state)
    head = state.get("head.weight")
    classes = f", num_classes={head.shape[0]}" if head is not None and head.ndim == 2 else ""
    if name:
        return f"build the matching model: stvit.create_model({name!r}{classes})."
    return ("build the model that matches the checkpoint (stvit.create_model(name, ...) with its "
            "depths and widths), or check that the file is the one you meant.")


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a state dict atomically: a temporary file in the same folder, then a rename."""
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)
