"""Segment images with a segmentor of the zoo: ``python -m stvit.segment IMAGE... --model NAME --checkpoint FILE``,
the sibling of ``python -m stvit.predict`` (classification), with its options.

For every image writes ``<out>/<image name>_mask.png``: a palette PNG whose pixel values are the
predicted class indices and whose palette colours them (``stvit.segmentation.palette``), and
prints the classes covering the most pixels. The image goes through MMSegmentation's evaluation
resize (to fit 2048 × 512, keeping its ratio), ``whole`` or ``slide`` inference, and the logits
are resized back to the image. The head, its width and the number of classes are read from the
checkpoint (``model_final.pt`` of ``python -m train --task segment``, or any state dict with
MMSegmentation's key names); names are ADE20K's for 150 classes, else ``--class-names FILE``.

Exit status: 0 on success, 1 when a checkpoint or an image could not be used, 2 for bad arguments;
errors are one ``error: ...`` line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import precision
from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from .images import ImageError, load_image
from .predict import _error, _positive_int, class_names, device_arg, model_name_arg
from .registry import list_models
from .segmentation import CROP_SIZE, SLIDE_STRIDE, ade20k_class_names, create_segmentor, palette
from .segmentation.resize import rescale_size, resize_image, to_normalized_tensor

RANDOM_WEIGHTS_WARNING = ("WARNING: no --checkpoint given: the segmentor has RANDOM weights, so these masks are "
                          "meaningless (pass --checkpoint FILE)")


def load_segmentor(name: str, checkpoint: str | None, head: str = "upernet", num_classes: int = 150):
    """A segmentor on backbone ``name`` shaped like ``checkpoint`` (head kind, widths, classes,
    auxiliary head) with its weights, in eval mode; without a checkpoint, random weights."""
    if checkpoint is None:
        return create_segmentor(name, head=head, num_classes=num_classes).eval()
    state = read_checkpoint(checkpoint)
    weight = state.get("decode_head.conv_seg.weight")
    if weight is None:
        raise CheckpointError(f"{checkpoint} has no decode_head.conv_seg.weight: it is not a segmentor checkpoint "
                              f"(python -m train --task segment writes one); a classification checkpoint goes to "
                              f"python -m train --task segment --pretrained FILE")
    kind = "upernet" if any(k.startswith("decode_head.psp_modules.") for k in state) else "segformer"
    aux = state.get("auxiliary_head.conv_seg.weight")
    seg = create_segmentor(name, head=kind, num_classes=weight.shape[0], channels=weight.shape[1], aux=aux is not None,
                           aux_channels=aux.shape[1] if aux is not None else None)
    load_checkpoint(seg, state)
    return seg.eval()


def colour_mask(labels: np.ndarray, num_classes: int) -> Image.Image:
    """A palette ('P') image: pixel values are the class indices, the palette their colours."""
    mask = Image.fromarray(labels.astype(np.uint8), mode="P")
    colours = palette(num_classes)
    mask.putpalette([c for rgb in colours for c in rgb] + [0] * (3 * (256 - len(colours))))
    return mask


@torch.no_grad()
def segment_image(seg, image: Image.Image, device: torch.device, dtype: torch.dtype, mode: str,
                  scale: tuple[int, int]) -> np.ndarray:
    """(H, W) class indices of ``image`` at its own size."""
    pixels = np.array(image)
    resized = resize_image(pixels, rescale_size(*pixels.shape[:2], scale))
    cfg = seg.pretrained_cfg
    x = to_normalized_tensor(resized, cfg["mean"], cfg["std"])[None].to(device)
    with precision.autocast(device, dtype):
        logits = seg.inference(x, mode, CROP_SIZE, SLIDE_STRIDE)
    logits = F.interpolate(logits.float(), size=pixels.shape[:2], mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].cpu().numpy()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stvit.segment",
                                description="Write a coloured class mask (PNG) for each image.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--model", type=model_name_arg, default="stvit_small",
                   help=f"backbone, one of {', '.join(list_models())} (default: stvit_small)")
    p.add_argument("--checkpoint", metavar="FILE", help="a segmentor's weights (model_final.pt of "
                   "python -m train --task segment); without it the weights are random")
    p.add_argument("--head", choices=("upernet", "segformer"), default="upernet",
                   help="the head without --checkpoint (a checkpoint says which it has)")
    p.add_argument("--out", default=".", metavar="DIR", help="where <image>_mask.png go (default: here)")
    p.add_argument("--mode", choices=("whole", "slide"), default="whole",
                   help=f"whole image, or {CROP_SIZE}² windows every {SLIDE_STRIDE} px")
    p.add_argument("--resize-scale", type=int, nargs=2, default=(2048, 512), metavar=("LONG", "SHORT"),
                   help="fit the image into this (long, short) size first, keeping its ratio (default 2048 512)")
    p.add_argument("--class-names", metavar="FILE", help="class names, one per line (default: ADE20K's for 150)")
    p.add_argument("--top", type=_positive_int, default=5, help="how many classes to print per image")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--precision", choices=precision.PRECISIONS, default="auto")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = device_arg(args.device)
    except ValueError as e:
        return _error(str(e), code=2)
    try:
        seg = load_segmentor(args.model, args.checkpoint, args.head)
        k = seg.num_classes
        names = (class_names(k, args.class_names) if args.class_names or k != 150 else ade20k_class_names())
    except CheckpointError as e:
        return _error(e.command_line_message(args.model))
    except ValueError as e:
        return _error(str(e))
    if args.checkpoint is None:
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return _error(f"cannot create --out {out}: {e.strerror or e}")
    seg.to(device)
    dtype = precision.resolve(args.precision, device)
    status = 0
    for path in args.images:
        try:
            image = load_image(path)
        except ImageError as e:
            status = _error(str(e))
            continue
        labels = segment_image(seg, image, device, dtype, args.mode, tuple(args.resize_scale))
        target = out / f"{Path(path).stem}_mask.png"
        colour_mask(labels, k).save(target)
        counts = np.bincount(labels.ravel(), minlength=k)
        top = [(int(c), counts[c] / labels.size) for c in np.argsort(-counts)[:args.top] if counts[c]]
        print(f"{path} -> {target}:")
        for c, share in top:
            print(f"  {share * 100:5.1f} %  {c:>4}  {names[c]}")
    return status


if __name__ == "__main__":
    sys.exit(main())
