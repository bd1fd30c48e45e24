"""Export a model of the zoo for deployment, checked against eager PyTorch:
``python -m stvit.export --model NAME [--checkpoint FILE] --format onnx|pt2 --output FILE``.

``onnx``: an ONNX model by torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``), checked
in onnxruntime (``pip install "stvit[onnx]"``). ``pt2``: a ``torch.export`` ExportedProgram written by
``torch.export.save`` (load it with ``torch.export.load(path).module()``), checked as loaded.

Both take any batch size, and any height and width for a model whose ``pretrained_cfg`` says
``fixed_input_size=False`` (STViT, LVT); the others (SG-Former, So-ViT, SoT) keep their one size.
The program is traced at ``--input-size`` (default: the model's own); ``torch.export`` specialises
sizes of 1, so sides for which a stage map would be 1 wide where the traced one was not (or the
reverse) are outside it, and the command prints the range of sides it takes. Before the file is
written, its outputs are compared with the eager float32 model at batch sizes 1 and 3, and at two image sizes where the
model takes any; the command prints every relative error (max |difference| / max |eager output|)
and fails if one is above ``--tolerance``. The exported model is the family's inference form
(``prepare_inference``: STViT's BatchNorms folded), the reference the model as loaded.

Exit status: 0 when the file is written and matches, 1 when the export or the check failed, 2 for
bad command-line arguments. Errors are one ``error: ...`` line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from . import compat
from .checkpoint import CheckpointError
from .files import atomic_path
from .predict import load_model, model_name_arg
from .registry import list_models

FORMATS = {".onnx": "onnx", ".pt2": "pt2"}
CHECK_BATCHES = (1, 3)     # neither is the traced batch (2): the checks show the batch is dynamic
TRACE_BATCH = 2            # torch.export specialises example sizes of 0 and 1
DEFAULT_TOLERANCE = 1e-3
ONNX_MISSING = 'ONNX export needs onnx, onnxscript and onnxruntime: pip install "stvit[onnx]"'


class ExportError(RuntimeError):
    """The model could not be exported or the exported file does not match; the message says why."""


def takes_any_size(model: nn.Module) -> bool:
    """Whether the model takes any height and width (its ``pretrained_cfg`` says so)."""
    return not getattr(model, "pretrained_cfg", {}).get("fixed_input_size", False)


def dynamic_shapes(model: nn.Module) -> tuple[dict, ...]:
    """``torch.export`` dynamic shapes of ``forward(x)``: the batch always; height and width where the
    model takes any size. The batch is a named Dim with minimum 1 (``Dim.DYNAMIC`` would start at 2);
    the sides are ``Dim.DYNAMIC``, whose range ``torch.export`` derives from the model."""
    from torch.export import Dim

    dims = {0: Dim("batch", min=1)}
    if takes_any_size(model):
        dims.update({2: Dim.DYNAMIC, 3: Dim.DYNAMIC})
    return (dims,)


def inference_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy in the family's inference form (``prepare_inference``); the model is untouched."""
    model = copy.deepcopy(model).eval()
    if hasattr(model, "prepare_inference"):
        model.prepare_inference()
    return model


def _channels(model: nn.Module) -> int:
    return getattr(model, "in_chans", None) or model.pretrained_cfg["input_size"][0]


def example_input(model: nn.Module, input_size: tuple[int, int]) -> torch.Tensor:
    """The batch to trace with; a ``ValueError`` (the model's ``check_input``) for a size it cannot take."""
    example = torch.randn(TRACE_BATCH, _channels(model), *input_size, generator=torch.Generator().manual_seed(0))
    if hasattr(model, "check_input"):
        model.check_input(example)
    return example


def export_program(model: nn.Module, input_size: tuple[int, int]) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model``'s inference form, traced at ``input_size`` (height, width) with
    :func:`dynamic_shapes`. The size must be one the model takes (``check_input``)."""
    if problem := compat.export_problem():
        raise ExportError(problem)
    example = example_input(model, input_size)
    try:
        with torch.no_grad():
            return torch.export.export(inference_copy(model), (example,), dynamic_shapes=dynamic_shapes(model))
    except Exception as e:  # torch.export reports a failed trace with many types
        raise ExportError(f"torch.export could not export the model at {input_size[0]}×{input_size[1]}: "
                          f"{_first_line(e)}") from e


LARGEST_SIDE_PROBED = 8192


def side_range(program: torch.export.ExportedProgram, input_size: tuple[int, int]) -> tuple[int, int | None]:
    """The smallest and largest square side the program takes (None: at least ``LARGEST_SIDE_PROBED``),
    found by calling it on empty meta tensors, where only its shape guards run (sizes it does not take
    fail them). Traced where a stage map is 1 wide, the program keeps that: it then has a largest side."""
    module = program.module().to("meta")
    channels = program.example_inputs[0][0].shape[1]

    def takes(side: int) -> bool:
        try:
            module(torch.empty(1, channels, side, side, device="meta"))
            return True
        except (AssertionError, RuntimeError) as e:
            if compat.is_shape_guard_failure(e):
                return False
            raise
    return search_sides(takes, min(input_size))


def search_sides(takes: Callable[[int], bool], traced: int) -> tuple[int, int | None]:
    """:func:`side_range`'s search: the run of sides around ``traced`` (taken) where ``takes`` holds,
    by bisection (the guards are bounds on the sizes)."""
    def first(low: int, high: int, taken: bool) -> int:  # the first side in [low, high] where takes() == taken
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if takes(mid) == taken else (mid + 1, high)
        return high

    smallest = first(1, traced, True)
    largest = None if takes(LARGEST_SIDE_PROBED) else first(traced, LARGEST_SIDE_PROBED, False) - 1
    return smallest, largest


def check_sizes(input_size: tuple[int, int], sides: tuple[int, int | None] | None) -> list[tuple[int, int, int]]:
    """(batch, height, width) of the checks: :data:`CHECK_BATCHES` at the traced size, and for a program
    that takes the ``sides`` range (:func:`side_range`) also at a second, non-square size within it
    (169×143 for 224×224)."""
    height, width = input_size
    sizes = [input_size]
    if sides is not None:
        smallest, largest = sides

        def within(side: int) -> int:
            return max(smallest, side if largest is None else min(side, largest))
        other = (within(height * 3 // 4 + 1), within(width * 5 // 8 + 3))
        if other != input_size:
            sizes.append(other)
    return [(batch, h, w) for h, w in sizes for batch in CHECK_BATCHES]


def compare(model: nn.Module, run: Callable[[torch.Tensor], list[torch.Tensor]],
            sizes: Sequence[tuple[int, int, int]]) -> list[dict]:
    """For each (batch, height, width): the largest relative error of ``run`` against the eager
    float32 ``model`` on a seeded random batch (max |difference| / max |eager output|)."""
    rows = []
    generator = torch.Generator().manual_seed(1)
    for batch, height, width in sizes:
        x = torch.randn(batch, _channels(model), height, width, generator=generator)
        with torch.no_grad():
            expected = _outputs(model(x))
        got = run(x)
        if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
            raise ExportError(f"the exported model gives outputs of shapes {[tuple(g.shape) for g in got]} "
                              f"where the model gives {[tuple(e.shape) for e in expected]} at "
                              f"{batch}×{height}×{width}")
        error = max(((g.float() - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
                    for g, e in zip(got, expected))
        rows.append(dict(batch=batch, height=height, width=width, rel_error=error))
    return rows


def _outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


# ---- the two formats ----------------------------------------------------------------------------

def require_onnx() -> None:
    """Import the ONNX packages, or an ``ExportError`` saying how to install them."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(f"{ONNX_MISSING} ({e})") from None


def save_onnx(program: torch.export.ExportedProgram, path: str | Path, model: nn.Module) -> None:
    """The ONNX model of ``program`` (input ``image``, output ``logits`` for a classifier), its
    dynamic axes named ``batch``, ``height``, ``width``, weights inside the file."""
    require_onnx()
    # The program already has its dynamic shapes; these names only rename its symbolic axes.
    axes = {0: "batch"} | ({2: "height", 3: "width"} if takes_any_size(model) else {})
    outputs = None if getattr(model, "features_only", False) else ["logits"]
    from onnxscript import optimizer

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecation notes while it converts
            # Not torch's optimize=True: its pattern rewrites took minutes for STViT-S and did not change
            # onnxruntime's speed (4.35 vs 4.45 s per batch of 8, 2 threads). Folding the constants
            # (e.g. the shape arithmetic of fixed sizes) and dropping dead nodes halves the graph.
            onnx_program = torch.onnx.export(program, program.example_inputs[0], dynamo=True, input_names=["image"],
                                             output_names=outputs, dynamic_shapes=(axes,), optimize=False,
                                             verbose=False)
            optimizer.fold_constants(onnx_program.model)
            optimizer.remove_unused_nodes(onnx_program.model)
    except Exception as e:
        raise ExportError(f"the ONNX exporter failed: {_first_line(e)}") from e
    onnx_program.save(str(path), external_data=False)


def onnx_runner(path: str | Path, threads: int | None = None,
                spinning: bool = True) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """Run the ONNX file in onnxruntime (CPU) on a tensor; ``threads``: its intra-op threads;
    ``spinning=False``: its idle threads sleep instead of busy-waiting for the next call (which would
    take the cores from whatever runs next: other cases timed in the same rounds)."""
    require_onnx()
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its constant-folding notes are noise here
    if threads is not None:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(o) for o in session.run(None, {name: x.numpy()})]
    return run


def pt2_runner(path: str | Path) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """Run the saved ExportedProgram, loaded from ``path`` as a user would."""
    module = torch.export.load(str(path)).module()

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return _outputs(module(x))
    return run


def export(model: nn.Module, path: str | Path, fmt: str, input_size: tuple[int, int] | None = None,
           tolerance: float = DEFAULT_TOLERANCE, log: Callable[[str], None] = lambda _: None) -> dict:
    """Export ``model`` to ``path`` in ``fmt`` (``onnx`` or ``pt2``) and check it against the eager model
    (:func:`compare`) before the file is put in place; returns what was done and measured.
    ``ExportError`` when export fails or an error is above ``tolerance`` (no file is left then)."""
    if fmt not in FORMATS.values():
        raise ValueError(f"format {fmt!r}: choose onnx or pt2")
    if fmt == "onnx":
        require_onnx()
    model = model.eval()
    input_size = tuple(input_size or model.pretrained_cfg["input_size"][-2:])
    example_input(model, input_size)  # a size the model cannot take: its message, before anything else
    start = time.perf_counter()
    log(f"tracing {model.pretrained_cfg.get('architecture', type(model).__name__)} at "
        f"{input_size[0]}×{input_size[1]} with torch.export ...")
    program = export_program(model, input_size)
    sides = side_range(program, input_size) if takes_any_size(model) else None
    with atomic_path(path, suffix=f".tmp.{fmt}") as tmp:
        if fmt == "onnx":
            log("converting to ONNX (torch.onnx, dynamo) ...")
            save_onnx(program, tmp, model)
            run = onnx_runner(tmp)
        else:
            torch.export.save(program, str(tmp))
            run = pt2_runner(tmp)
        export_s = time.perf_counter() - start
        log("checking against the eager model ...")
        rows = compare(model, run, check_sizes(input_size, sides))
        worst = max(r["rel_error"] for r in rows)
        if not worst <= tolerance:
            raise ExportError(f"the exported model differs from the eager model by {worst:.3g} (relative), "
                              f"above the tolerance {tolerance:g}; no file was written")
        size_bytes = tmp.stat().st_size
    return dict(format=fmt, path=str(path), bytes=size_bytes, input_size=input_size, sides=sides, checks=rows,
                max_rel_error=worst, export_s=export_s, tolerance=tolerance)


# ---- command line -------------------------------------------------------------------------------

def _size_arg(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


def _tolerance_arg(value: str) -> float:
    try:
        tolerance = float(value)
    except ValueError:
        tolerance = -1.0
    if not tolerance > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return tolerance


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stvit.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=model_name_arg, required=True,
                        help=f"model name, one of {', '.join(list_models())}")
    parser.add_argument("--checkpoint", metavar="FILE",
                        help="weights to load (the model is sized to its classifier); without it random weights")
    parser.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights if it has them")
    parser.add_argument("--format", choices=sorted(set(FORMATS.values())),
                        help="onnx or pt2 (default: from the --output extension, .onnx or .pt2)")
    parser.add_argument("--output", required=True, metavar="FILE", help="the file to write")
    parser.add_argument("--input-size", type=_size_arg, nargs="+", metavar=("HEIGHT", "WIDTH"),
                        help="the size to trace at (one number: square; default: the model's own)")
    parser.add_argument("--tolerance", type=_tolerance_arg, default=DEFAULT_TOLERANCE,
                        help=f"largest relative error accepted in the check (default {DEFAULT_TOLERANCE:g})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if Path(args.output).is_dir():
        parser.error(f"--output {args.output} is a directory; give a file name")
    fmt = args.format or FORMATS.get(Path(args.output).suffix.lower())
    if fmt is None:
        parser.error(f"--output {args.output}: give --format onnx or pt2 (or a .onnx / .pt2 file name)")
    if args.input_size is not None and len(args.input_size) > 2:
        parser.error(f"--input-size takes HEIGHT [WIDTH], got {len(args.input_size)} numbers")
    input_size = None if args.input_size is None else (args.input_size[0], args.input_size[-1])
    try:
        if problem := compat.export_problem():
            raise ExportError(problem)  # before the model is built
        if fmt == "onnx":
            require_onnx()  # before the model is built and traced
        model = load_model(args.model, args.checkpoint, use_ema=args.ema)
        result = export(model, args.output, fmt, input_size, args.tolerance,
                        log=lambda message: print(message, file=sys.stderr, flush=True))
    except CheckpointError as e:
        return _error(e.command_line_message(args.model))
    except (ExportError, ValueError, OSError) as e:
        return _error(str(e))
    print(report(args.model, result, args.checkpoint))
    return 0


def report(name: str, result: dict, checkpoint: str | None) -> str:
    """What was written and how it was checked, as the command prints it."""
    h, w = result["input_size"]
    checked_in = "onnxruntime" if result["format"] == "onnx" else "the loaded ExportedProgram"
    if result["sides"] is None:
        sides = f"{h}×{w} only (the model's fixed size)"
    else:
        smallest, largest = result["sides"]
        sides = f"height and width {smallest} " + (f"to {largest}" if largest else "and up")
    weights = f"weights of {checkpoint}" if checkpoint else "RANDOM weights (no --checkpoint)"
    lines = [f"wrote {result['path']} ({result['format']}, {result['bytes'] / 2**20:.1f} MiB) in "
             f"{result['export_s']:.0f} s: {name}, {weights}",
             f"inputs: any batch size; {sides}",
             f"checked in {checked_in} against the eager float32 model:",
             "  batch  input      relative error"]
    lines += [f"  {r['batch']:>5}  {r['height']}×{r['width']:<6}  {r['rel_error']:.2e}" for r in result["checks"]]
    lines.append(f"largest relative error {result['max_rel_error']:.2e} (tolerance {result['tolerance']:g})")
    return "\n".join(lines)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _error(message: str, code: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
