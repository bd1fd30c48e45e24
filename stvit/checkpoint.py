"""Loading checkpoints — the authors' release files as they are, or ours — safely and strictly.

Generic over the zoo: a family's own key conventions live in its registered ``checkpoint_filter``
(timm's ``checkpoint_filter_fn``), applied here; a checkpoint that fits another registered model is
named in the error.

Two file formats, neither of which runs code when read: ``torch.save`` files (read with
``weights_only=True``) and safetensors (the Hugging Face hub's and timm's format: a JSON header and
raw tensor bytes; read and written with the optional ``safetensors`` package,
``pip install "stvit[safetensors]"``).
"""

from __future__ import annotations

import argparse
import os
from functools import lru_cache
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .files import atomic_path
from .registry import MODELS, family_of, resolve_name

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
# Where training scripts put the weights: ours and DeiT's ("model", "model_ema"), timm's saver's.
_WEIGHTS_KEYS = ("model", "state_dict")
_EMA_KEYS = ("model_ema", "state_dict_ema")
SAFETENSORS_SUFFIX = ".safetensors"
SAFETENSORS_INSTALL = 'pip install "stvit[safetensors]"'


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

    Accepts bare state dicts and ``{"model": ...}``, ``{"model_ema": ...}``, ``{"state_dict": ...}``,
    ``{"state_dict_ema": ...}`` wrappers (``use_ema`` prefers the EMA weights); strips ``module.`` and
    ``_orig_mod.`` prefixes. ``torch.save`` files are read with ``weights_only=True``, never unpickled
    into arbitrary objects; safetensors files (``.safetensors``, or any file in that format) hold
    tensors only.
    """
    obj = _load_file(Path(source)) if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state dict; "
                              f"expected a dict of tensors or a {{'model': state_dict}} wrapper")
    order = _EMA_KEYS + _WEIGHTS_KEYS if use_ema else _WEIGHTS_KEYS + _EMA_KEYS
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
        state[name] = value
    if not state:
        raise CheckpointError("checkpoint contains no tensors; expected a model state dict")
    return state


def _load_file(path: Path):
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass the checkpoint file inside it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if _check_format(path) == "safetensors":
        return _load_safetensors(path)
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


def _check_format(path: Path) -> str:
    """``"torch"`` or ``"safetensors"``: which reader the file is for; files that are plainly neither
    are rejected before any reader sees them."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise CheckpointError(f"cannot read {path}: the file is empty; download or save it again")
    if head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTO):
        return "torch"
    # safetensors: an 8-byte little-endian header length, then the JSON header
    if head[8:9] == b"{" or path.suffix.lower() == SAFETENSORS_SUFFIX:
        return "safetensors"
    kind = "a text file" if _looks_like_text(head) else "not a PyTorch checkpoint"
    raise CheckpointError(f"{path} is {kind} (it starts with {head[:24]!r}); expected a file written "
                          f"by torch.save, e.g. torch.save(model.state_dict(), path)")


def _safetensors():
    """The ``safetensors.torch`` module, or a ``CheckpointError`` saying how to install it."""
    try:
        import safetensors.torch
    except ImportError:
        raise CheckpointError(f"safetensors files need the safetensors package, which is not installed: "
                              f"{SAFETENSORS_INSTALL}") from None
    return safetensors.torch


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    load_file = _safetensors().load_file
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError (header, sizes), OSError, ...
        raise CheckpointError(f"cannot read {path}: the safetensors file is truncated or corrupt "
                              f"({_first_line(e)}); download or save it again") from None


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
    """Load ``source`` into ``model`` strictly; all mismatches are reported in one ``CheckpointError``.

    The model's family filter maps the authors' release keys to ours first. A ``features_only``
    backbone ignores the keys of modules it does not have (the classifier head).
    """
    state = filter_for(model, read_checkpoint(source, use_ema=use_ema))
    expected = model.state_dict()
    if getattr(model, "features_only", False):
        children = {name for name, _ in model.named_children()}
        state = {k: v for k, v in state.items() if k in expected or k.split(".", 1)[0] in children}
    # In state-dict (module) order, so the table starts with the stem, not alphabetically.
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mis_shaped:
        match = matching_model(state)
        raise CheckpointError(_mismatch_report(model, missing, unexpected, mis_shaped, state, expected, match),
                              matching_model=match)
    model.load_state_dict(state)
    return model


def filter_for(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` through the checkpoint filter of ``model``'s family (if it has one)."""
    family = family_of(model)
    if family is not None and family.checkpoint_filter is not None:
        state = family.checkpoint_filter(dict(state), model)
    return state


def classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier(s), whose shapes depend on ``num_classes``
    (``pretrained_cfg["classifier"]``: a module name, or a tuple of them, as timm allows)."""
    names = model.pretrained_cfg.get("classifier", "head") if hasattr(model, "pretrained_cfg") else "head"
    names = (names,) if isinstance(names, str) else tuple(names)
    return {k for k in model.state_dict() if k.startswith(tuple(f"{n}." for n in names))}


@lru_cache(maxsize=None)
def _signature(name: str) -> tuple[nn.Module, dict[str, tuple[int, ...]], frozenset[str]] | None:
    """A registered model built on the meta device (no memory, no init cost): its key shapes."""
    try:
        with torch.device("meta"):
            model = MODELS[name].builder()
    except Exception:  # a builder that needs real tensors: build it for real (once; error path only)
        try:
            model = MODELS[name].builder()
        except Exception:
            return None
    return model, {k: tuple(v.shape) for k, v in model.state_dict().items()}, frozenset(classifier_keys(model))


def matching_model(state: Mapping[str, torch.Tensor]) -> str | None:
    """The registered model whose architecture fits ``state`` (any number of classes), or None."""
    for name in MODELS:
        found = _signature(name)
        if found is None:
            continue
        model, shapes, classifier = found
        try:
            mapped = filter_for(model, dict(state))
        except Exception:  # another family's filter may not understand these keys
            continue
        if set(mapped) == set(shapes) and all(tuple(mapped[k].shape) == shapes[k] or k in classifier
                                              for k in shapes):
            return name
    return None


def _mismatch_report(model, missing, unexpected, mis_shaped, state, expected, match, limit: int = 20) -> str:
    def shape(t):
        return "×".join(map(str, t.shape)) or "scalar"

    # Mis-shaped keys first: they say the most about what differs (width, classes).
    rows = ([(k, "shape differs", shape(state[k]), shape(expected[k])) for k in mis_shaped]
            + [(k, "unexpected in checkpoint", shape(state[k]), "-") for k in unexpected]
            + [(k, "missing from checkpoint", "-", shape(expected[k])) for k in missing])
    width = max(len(r[0]) for r in rows)
    lines = [f"checkpoint does not match the model architecture: {len(missing)} missing, "
             f"{len(unexpected)} unexpected, {len(mis_shaped)} mis-shaped keys.",
             f"  checkpoint: {describe_state_dict(state, match)}",
             f"  model:      {describe_state_dict(expected, _architecture(model))}",
             f"  {_mismatch_hint(model, state, missing, unexpected, mis_shaped, match)}",
             f"  {'key':<{width}}  {'problem':<24}  {'checkpoint':>14}  {'model':>14}"]
    lines += [f"  {k:<{width}}  {p:<24}  {c:>14}  {m:>14}" for k, p, c, m in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"  ... and {len(rows) - limit} more")
    return "\n".join(lines)


def _architecture(model: nn.Module) -> str | None:
    return getattr(model, "pretrained_cfg", {}).get("architecture")


def describe_state_dict(state: Mapping[str, torch.Tensor], name: str | None = None) -> str:
    """A one-line summary of a state dict: tensors, parameters, classes, and the registered model
    it is (e.g. ``312 tensors, 25.5 M values, 1000 classes (stvit_small, family stvit)``)."""
    values = sum(t.numel() for t in state.values())
    head = state.get("head.weight")
    classes = f", {head.shape[0]} classes" if head is not None and head.ndim == 2 else ""
    text = f"{len(state)} tensors, {values / 1e6:.2f} M values{classes}"
    if name in MODELS:
        text += f" ({name}, family {MODELS[name].family})"
    return text


def _mismatch_hint(model, state, missing, unexpected, mis_shaped, match) -> str:
    differing = set(missing) | set(unexpected) | set(mis_shaped)
    classifier = classifier_keys(model)
    if differing and differing <= classifier and not missing and not unexpected:
        head = state.get("head.weight")
        n = f" the checkpoint has {head.shape[0]} classes." if head is not None and head.ndim == 2 else ""
        return (f"only the classifier differs:{n} Build the model with the checkpoint's num_classes, or "
                f"load into that model and then call model.reset_classifier(k) to fine-tune for k classes.")
    if match:
        head = state.get("head.weight")
        classes = f", num_classes={head.shape[0]}" if head is not None and head.ndim == 2 else ""
        family = MODELS[match].family
        ours = family_of(model)
        other = f" (a {family} checkpoint, not {ours.name})" if ours is not None and ours.name != family else ""
        return f"this is a checkpoint of {match}{other}: build the matching model: stvit.create_model({match!r}{classes})."
    return ("no registered model matches the checkpoint: build the model it was saved from "
            "(stvit.create_model(name, ...) with its configuration), or check that the file is the one you meant.")


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> None:
    """Write a state dict atomically: a temporary file in the same folder, then a rename.

    A ``.safetensors`` path writes safetensors (tensors only; ``metadata``, string pairs, goes in its
    header beside ``format: pt``, the key the Hugging Face loaders check); any other path ``torch.save``.
    """
    if Path(path).suffix.lower() != SAFETENSORS_SUFFIX:
        with atomic_path(path) as tmp:
            torch.save(dict(state), tmp)
        return
    save_file = _safetensors().save_file
    tensors, storages = {}, set()
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"safetensors holds tensors only: {name!r} is a {type(value).__name__}; "
                             f"save the model's state_dict(), or use a .pt file for other objects")
        value = value.detach().cpu().contiguous()
        # safetensors refuses tensors that share memory (tied or viewed weights): each gets its own copy
        if value.untyped_storage().data_ptr() in storages:
            value = value.clone()
        storages.add(value.untyped_storage().data_ptr())
        tensors[name] = value
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}})
