"""Classify images with any model of the zoo: ``python -m stvit.predict IMAGE... --model NAME --checkpoint FILE``.

For every image prints the top-5 classes with their probabilities, using the evaluation
transform of the model's ``pretrained_cfg`` (resize, center crop, normalise). Class names are the
ImageNet-1k names bundled with the package when the head has 1000 classes (or those of
``--class-names FILE``, one per line), else ``class <i>``. The number of classes is read from the
checkpoint's head, so fine-tuned checkpoints work too. Without ``--checkpoint`` the model has
random weights; that is allowed (to try the tool) and says so loudly.

Exit status: 0 on success, 1 when a checkpoint or an image could not be used (the other images
are still classified), 2 for bad command-line arguments. Errors are one ``error: ...`` line
on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch

from torch import nn

from . import precision
from .checkpoint import CheckpointError, classifier_keys, filter_for, load_checkpoint, read_checkpoint
from .images import EvalTransform, ImageError, load_image
from .models import create_model
from .registry import list_models, resolve_name

IMAGENET_NUM_CLASSES = 1000
RANDOM_WEIGHTS_WARNING = ("WARNING: no --checkpoint given: the model has RANDOM weights, "
                          "so these predictions are meaningless (pass --checkpoint FILE)")


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in class-index order (bundled ``imagenet_classes.txt``).

    The names are the short WordNet lemmas of the usual synset order (as in Keras'
    ``imagenet_class_index.json``, underscores as spaces); two names repeat, for different
    synsets: ``crane`` (134 bird, 517 machine) and ``maillot`` (638, 639).
    """
    text = resources.files("stvit").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    names = text.splitlines()
    if len(names) != IMAGENET_NUM_CLASSES:
        raise RuntimeError(f"the bundled imagenet_classes.txt has {len(names)} lines, expected 1000")
    return names


def class_names(num_classes: int, names_file: str | os.PathLike | None = None) -> list[str]:
    """Names for the classes of a head: from ``names_file``, ImageNet's for 1000 classes, else ``class <i>``."""
    if names_file is not None:
        try:
            names = Path(names_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read class names from {names_file}: {e}") from None
        if len(names) != num_classes:
            raise ValueError(f"{names_file} has {len(names)} lines but the model has {num_classes} classes; "
                             f"give one class name per line, in class-index order")
        return names
    if num_classes == IMAGENET_NUM_CLASSES:
        return imagenet_class_names()
    return [f"class {i}" for i in range(num_classes)]


def load_model(name: str, checkpoint: str | os.PathLike | None = None, *, use_ema: bool = False,
               **overrides) -> nn.Module:
    """Build model ``name`` sized to ``checkpoint``'s classifier and load it (eval mode).

    A checkpoint without any classifier key (a backbone) gives a ``features_only`` model.
    Without a checkpoint the model keeps its random initialisation.
    """
    model = create_model(name, **overrides)
    if checkpoint is None:
        return model.eval()
    state = filter_for(model, read_checkpoint(checkpoint, use_ema=use_ema))
    heads = classifier_keys(model)
    weight = next((state[k] for k in sorted(heads) if k.endswith(".weight") and k in state and state[k].ndim == 2),
                  None)
    if weight is not None:
        if weight.shape[0] != model.num_classes and "num_classes" not in overrides:
            model.reset_classifier(weight.shape[0])
    elif not heads & set(state) and not model.features_only:
        model = create_model(name, **{**overrides, "features_only": True})
    load_checkpoint(model, state)
    return model.eval()


def device_arg(name: str | None) -> torch.device:
    """A command's ``--device`` (None: cuda if available); ValueError says what is wrong and the fix."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for but no CUDA GPU is available; use --device cpu")
    return device


@torch.no_grad()
def predict_probabilities(model: nn.Module, batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Softmax class probabilities (float32) of a normalised (B, 3, H, W) batch, computed in ``dtype``."""
    device = next(model.parameters()).device
    batch = batch.to(device, non_blocking=True)
    with precision.autocast(device, dtype):  # softmax in float32 either way
        logits = model(batch)
    return logits.float().softmax(-1).cpu()


def top_k(probs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The ``k`` most probable (class index, probability) pairs of one probability vector, best first."""
    values, indices = probs.topk(min(k, probs.numel()))
    return [(int(i), float(v)) for v, i in zip(values, indices)]


def format_predictions(image: str, predictions: list[tuple[int, float]], names: Sequence[str]) -> str:
    """``image`` then one line per class: probability, class index, name."""
    lines = [f"{image}:"]
    lines += [f"  {prob:.4f}  {index:>4}  {names[index]}" for index, prob in predictions]
    return "\n".join(lines)


def model_name_arg(value: str) -> str:
    """argparse type: a registered model name (any case or alias) -> its canonical name."""
    try:
        return resolve_name(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stvit.predict",
        description="Print the top-k ImageNet classes (with probabilities) of each image.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    parser.add_argument("--model", type=model_name_arg, default="stvit_small",
                        help=f"model name, one of {', '.join(list_models())} (default: stvit_small)")
    parser.add_argument("--checkpoint", metavar="FILE",
                        help="weights to load (a state dict or a {'model': ...} training checkpoint); "
                             "without it the model has random weights")
    parser.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights if it has them")
    parser.add_argument("--topk", type=_positive_int, default=5, help="how many classes to print (default 5)")
    parser.add_argument("--class-names", metavar="FILE", help="class names, one per line in index order")
    parser.add_argument("--batch-size", type=_positive_int, default=16, help="images per forward pass")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--precision", choices=precision.PRECISIONS, default="auto",
                        help="bf16 or fp32 compute; auto (default): bf16 on GPU, fp32 on CPU")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = device_arg(args.device)
    except ValueError as e:
        return _error(str(e), code=2)
    try:
        model = load_model(args.model, args.checkpoint, use_ema=args.ema)
        if model.features_only or model.num_classes == 0:
            raise CheckpointError(f"{args.checkpoint} has no classifier head (a backbone checkpoint); "
                                  f"predict needs a classification checkpoint")
        names = class_names(model.num_classes, args.class_names)
    except CheckpointError as e:
        return _error(e.command_line_message(args.model))
    except ValueError as e:
        return _error(str(e))
    if args.checkpoint is None:
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    model.to(device)
    dtype = precision.resolve(args.precision, device)
    transform = EvalTransform(model.pretrained_cfg)

    status = 0
    loaded: list[tuple[str, torch.Tensor]] = []
    for path in args.images:
        try:
            loaded.append((path, transform(load_image(path))))
        except ImageError as e:
            status = _error(str(e))
    for start in range(0, len(loaded), args.batch_size):
        chunk = loaded[start:start + args.batch_size]
        try:
            probs = predict_probabilities(model, torch.stack([x for _, x in chunk]), dtype)
        except torch.OutOfMemoryError:
            return _error("out of GPU memory; use a smaller --batch-size or --device cpu")
        for (path, _), p in zip(chunk, probs):
            print(format_predictions(path, top_k(p, args.topk), names), flush=True)
    return status


def _error(message: str, code: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
