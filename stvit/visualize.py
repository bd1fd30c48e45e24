"""Seeing super tokens: ``python -m stvit.visualize IMAGE [--model small] [--checkpoint FILE] [--out DIR]``.

For each chosen stage (default 1 and 2) it writes two PNGs:

* ``<image>_stage<s>_super_tokens.png`` (paper Fig. 4): every pixel coloured by the super token
  it is most associated with (argmax of the association A over the super tokens; the colour
  depends on the super token's grid position modulo 3, so the nine candidates of any token all
  differ), white lines where that super token changes, and the grid of *initial* super tokens
  (the cells whose averages start the sampling) drawn dashed.
* ``<image>_stage<s>_attention.png`` (paper Fig. 2d): for an anchor pixel (``--anchor X Y`` in the
  input image's pixels, default its centre), the effective attention it pays to every pixel
  through the super tokens: row ``anchor`` of ``A · Attn · Âᵀ``, where ``Attn`` is the
  head-averaged self-attention among the super tokens and ``Â`` is A with columns normalised as
  the model normalises them (super tokens are ``Âᵀ X``). Brighter = more attention.

The maps come from the first block of each stage (``--block`` picks another): a forward
pre-hook captures the block's attention input (the LayerNorm output), and the block's own
``SuperTokenAttention.association`` runs again on it in float64.
Token (i, j) of a stage with stride s is drawn over image pixels [s·i, s·(i+1)) × [s·j, s·(j+1)).
With random weights (no ``--checkpoint``) the tool still works and writes
"random weights — not a trained model" on every image.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from .checkpoint import CheckpointError
from .files import atomic_path
from .images import ImageError, load_image, resize_shorter_side, to_tensor
from .models.stvit import STViT, CellTokens, scatter_neighbours, split_qkv_heads
from .predict import device_arg, load_model, model_name_arg
from .registry import FAMILIES, list_models, model_entry

RANDOM_WEIGHTS_NOTE = "random weights — not a trained model"

# Nine distinct colours: super token (gy, gx) gets PALETTE[(gy % 3) * 3 + gx % 3], so the 3×3
# super tokens any token can associate with always have different colours.
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230), (170, 110, 40)], dtype=np.float64)
COLOUR_ALPHA = 0.5  # weight of the super-token colour over the image
BOUNDARY_COLOUR = (255, 255, 255)
GRID_COLOUR = (0, 0, 0)
ANCHOR_COLOUR = (0, 255, 255)
# A perceptually ordered dark-to-bright ramp for attention maps.
HEAT_STOPS = np.array([(0, 0, 4), (80, 18, 123), (182, 54, 121), (251, 136, 97), (252, 253, 191)], dtype=np.float64)


@dataclass
class SuperTokenMaps:
    """One block's super tokens for one image, at token resolution.

    ``association[m, t, k]``: weight of token t of grid cell m for the k-th of the cell's 3×3
    neighbouring super tokens, whose index is ``neighbours[m, k]`` (-1: outside the grid; that
    slot is a zero vector that still takes a share of the softmax, as in the model).
    """

    stage: int                      # 1-based, as in the paper
    block: int                      # 0-based index within the stage
    stride: int                     # input pixels per token
    stoken_size: tuple[int, int]    # tokens per grid cell (h, w)
    token_hw: tuple[int, int]       # token map size before padding
    grid_hw: tuple[int, int]        # super tokens (rows, cols)
    association: torch.Tensor       # (M, h·w, 9) float64
    neighbours: torch.Tensor        # (M, 9) int64
    column_sum: torch.Tensor        # (M,) total association of each super token, + EPS
    super_attention: torch.Tensor   # (M, M) head-averaged attention among the super tokens

    def labels(self) -> np.ndarray:
        """(H, W) index of the super token each token is most associated with (row-major grid index)."""
        scores = self.association.masked_fill(self.neighbours[:, None, :] < 0, float("-inf"))
        best = scores.argmax(-1)                                        # (M, n) slot
        labels = torch.gather(self.neighbours, 1, best)                 # (M, n) super token
        return self._to_map(labels)

    def effective_attention(self, anchor: tuple[int, int]) -> np.ndarray:
        """(H, W) attention token ``anchor`` = (row, col) pays to every token: its row of A·Attn·Âᵀ."""
        m, t = self._cell_and_slot(anchor)
        slots = _with_spare(self.neighbours)
        row = torch.zeros(self.super_attention.shape[0] + 1, dtype=torch.float64)
        row.index_add_(0, slots[m], self.association[m, t])           # A[anchor, :] (+ spare slot)
        weights = row[:-1] @ self.super_attention / self.column_sum   # (A·Attn)[anchor] / colsum
        weights = torch.cat([weights, weights.new_zeros(1)])           # outside the grid: nothing
        per_token = torch.einsum("mnk,mk->mn", self.association, weights[slots])
        return self._to_map(per_token)

    def _cell_and_slot(self, anchor: tuple[int, int]) -> tuple[int, int]:
        (y, x), (h, w), (H, W) = anchor, self.stoken_size, self.token_hw
        if not (0 <= y < H and 0 <= x < W):
            raise ValueError(f"anchor token {anchor} is outside the {H}×{W} token map")
        return (y // h) * self.grid_hw[1] + x // w, (y % h) * w + x % w

    def _to_map(self, per_token: torch.Tensor) -> np.ndarray:
        (h, w), (gh, gw), (H, W) = self.stoken_size, self.grid_hw, self.token_hw
        full = rearrange(per_token, "(gy gx) (h w) -> (gy h) (gx w)", gy=gh, gx=gw, h=h, w=w)
        return full[:H, :W].numpy()


# ---- computing the maps ----------------------------------------------------------------------

def neighbour_table(gh: int, gw: int) -> torch.Tensor:
    """(gh·gw, 9) row-major indices of each cell's 3×3 neighbours (row-major offsets), -1 outside."""
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    columns = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            ny, nx = ys + dy, xs + dx
            inside = (ny >= 0) & (ny < gh) & (nx >= 0) & (nx < gw)
            columns.append(torch.where(inside, ny * gw + nx, -1).flatten())
    return torch.stack(columns, dim=1)


def _with_spare(neighbours: torch.Tensor) -> torch.Tensor:
    """Neighbour indices with "outside the grid" (-1) sent to a spare slot M after the M super tokens."""
    return torch.where(neighbours < 0, neighbours.shape[0], neighbours)


def super_token_maps(attn: torch.nn.Module, attn_input: torch.Tensor, *, stage: int = 1, block: int = 0,
                     stride: int = 4) -> SuperTokenMaps:
    """Association and super-token attention of one ``SuperTokenAttention`` for its (1, C, H, W) input.

    Runs the module's own association (grid size, iteration count, scale) and refinement weights
    on a float64 copy of the input (the model computes the same in its own precision).
    """
    h, w = tuple(attn.stoken_size)
    if (h, w) == (1, 1):
        raise ValueError(f"stage {stage} uses a 1×1 grid (plain self-attention): it has no super tokens to show")
    x = attn_input.detach().to("cpu", torch.float64).permute(0, 2, 3, 1)       # (1, H, W, C)
    _, H, W, C = x.shape
    x = torch.nn.functional.pad(x, (0, 0, 0, -W % w, 0, -H % h))  # right/bottom zeros, as the model
    tokens = CellTokens(x, h, w)
    assoc, norm = attn.association(tokens)                         # (1, gh, gw, n, 9), (1, gh, gw, 1)
    stokens = scatter_neighbours(tokens.pool(assoc)) / norm        # (1, gh, gw, C): what MHSA refines
    _, gh, gw, n, _ = assoc.shape
    return SuperTokenMaps(stage=stage, block=block, stride=stride, stoken_size=(h, w), token_hw=(H, W),
                          grid_hw=(gh, gw), association=assoc.reshape(gh * gw, n, 9),
                          neighbours=neighbour_table(gh, gw), column_sum=norm.reshape(gh * gw),
                          super_attention=_refine_attention(attn.stoken_refine, stokens.permute(0, 3, 1, 2)))


def _refine_attention(refine: torch.nn.Module, stokens: torch.Tensor) -> torch.Tensor:
    """Head-averaged softmax(q kᵀ · scale) of the refinement MHSA over (1, C, gh, gw) super tokens."""
    weight = refine.qkv.weight.detach().to("cpu", torch.float64)
    bias = refine.qkv.bias.detach().to("cpu", torch.float64) if refine.qkv.bias is not None else None
    q, k, _ = split_qkv_heads(torch.nn.functional.conv2d(stokens, weight, bias), refine.num_heads)
    return ((q[0] @ k[0].transpose(1, 2)) * refine.scale).softmax(-1).mean(0)


@torch.no_grad()
def capture_attention_inputs(model: STViT, x: torch.Tensor,
                             blocks: Sequence[tuple[int, int]]) -> dict[tuple[int, int], torch.Tensor]:
    """Run ``model`` (eval) up to the last stage needed and return the input of each
    ``model.layers[stage].blocks[block].attn`` for the 0-based (stage, block) pairs given."""
    captured: dict[tuple[int, int], torch.Tensor] = {}
    handles = []
    for stage, block in blocks:
        def keep(module, args, key=(stage, block)):
            captured[key] = args[0].detach()
        handles.append(model.layers[stage].blocks[block].attn.register_forward_pre_hook(keep))
    was_training = model.training
    try:
        model.eval()
        model.forward_stages(x, out_indices=(max(stage for stage, _ in blocks),))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return captured


def analyse(model: STViT, x: torch.Tensor, stages: Sequence[int] = (1, 2), block: int = 0) -> list[SuperTokenMaps]:
    """Super-token maps of block ``block`` of each 1-based stage in ``stages`` for a (1, 3, H, W) input."""
    check_stages(model, stages, block)
    pairs = [(s - 1, block) for s in stages]
    inputs = capture_attention_inputs(model, x, pairs)
    return [super_token_maps(model.layers[s].blocks[b].attn, inputs[(s, b)], stage=s + 1, block=b, stride=4 * 2 ** s)
            for s, b in pairs]


def check_stages(model: torch.nn.Module, stages: Sequence[int], block: int) -> None:
    """Clear errors for a model without super tokens, stages or blocks it lacks, or stages without
    super tokens."""
    if not isinstance(model, STViT):
        name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
        raise ValueError(f"visualize draws super tokens, which only STViT models have; {name} is not one. "
                         f"Use --model with one of {', '.join(list_models('stvit'))}")
    for stage in stages:
        if not 1 <= stage <= len(model.layers):
            raise ValueError(f"stage {stage} does not exist; the model has stages 1..{len(model.layers)}")
        depth = len(model.layers[stage - 1].blocks)
        if not 0 <= block < depth:
            raise ValueError(f"block {block} does not exist in stage {stage}, which has blocks 0..{depth - 1}")
        if tuple(model.layers[stage - 1].blocks[block].attn.stoken_size) == (1, 1):
            raise ValueError(f"stage {stage} uses a 1×1 grid (plain self-attention over all tokens): it has "
                             f"no super tokens to show; pick stages with a larger grid (1 and 2)")


# ---- drawing --------------------------------------------------------------------------------

def upsample(token_map: np.ndarray, stride: int, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest upsampling: token (i, j) covers pixels [s·i, s·(i+1)) × [s·j, s·(j+1)); cropped to the image."""
    full = np.repeat(np.repeat(token_map, stride, axis=0), stride, axis=1)
    return full[: size_hw[0], : size_hw[1]]


def super_token_colours(labels: np.ndarray, grid_width: int) -> np.ndarray:
    """(..., 3) palette colour of each super-token label."""
    return PALETTE[(labels // grid_width % 3) * 3 + labels % grid_width % 3]


def render_super_tokens(image: Image.Image, maps: SuperTokenMaps, notes: Sequence[str] = ()) -> Image.Image:
    """The image tinted by each pixel's super token, label boundaries in white, initial grid dashed."""
    H, W = image.height, image.width
    labels = upsample(maps.labels(), maps.stride, (H, W))
    rgb = np.asarray(image, dtype=np.float64)
    out = ((1 - COLOUR_ALPHA) * rgb + COLOUR_ALPHA * super_token_colours(labels, maps.grid_hw[1])).round()
    out = out.astype(np.uint8)
    edge = np.zeros((H, W), dtype=bool)
    edge[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    edge[:-1, :] |= labels[1:, :] != labels[:-1, :]
    out[edge] = BOUNDARY_COLOUR
    out[grid_lines((H, W), (maps.stoken_size[0] * maps.stride, maps.stoken_size[1] * maps.stride))] = GRID_COLOUR
    (h, w), s = maps.stoken_size, maps.stride
    caption = [f"stage {maps.stage}, block {maps.block}: colour = the super token each pixel is most associated with",
               f"dashed: initial {maps.grid_hw[0]}×{maps.grid_hw[1]} super-token grid ({h}×{w} tokens = "
               f"{h * s}×{w * s} px per cell)"]
    return add_caption(Image.fromarray(out), caption, notes)


def grid_lines(size_hw: tuple[int, int], cell_px: tuple[int, int], dash: int = 3) -> np.ndarray:
    """(H, W) mask of dashed lines on the inner boundaries of cells of ``cell_px`` pixels."""
    H, W = size_hw
    mask = np.zeros((H, W), dtype=bool)
    on_y = (np.arange(H) // dash) % 2 == 0
    on_x = (np.arange(W) // dash) % 2 == 0
    for x in range(cell_px[1], W, cell_px[1]):
        mask[on_y, x] = True
    for y in range(cell_px[0], H, cell_px[0]):
        mask[y, on_x] = True
    return mask


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] onto the HEAT_STOPS ramp, (..., 3) float."""
    positions = np.linspace(0.0, 1.0, len(HEAT_STOPS))
    v = np.clip(values, 0.0, 1.0)
    return np.stack([np.interp(v, positions, HEAT_STOPS[:, c]) for c in range(3)], axis=-1)


def render_attention(image: Image.Image, maps: SuperTokenMaps, anchor_px: tuple[int, int],
                     notes: Sequence[str] = ()) -> Image.Image:
    """Effective attention of the pixel ``anchor_px`` = (x, y) over the image, as a heat map."""
    H, W = image.height, image.width
    ax, ay = anchor_px
    anchor_token = (min(ay // maps.stride, maps.token_hw[0] - 1), min(ax // maps.stride, maps.token_hw[1] - 1))
    attention = maps.effective_attention(anchor_token)
    low, high = float(attention.min()), float(attention.max())
    scaled = (attention - low) / (high - low) if high > low else np.zeros_like(attention)
    Ht, Wt = scaled.shape
    smooth = Image.fromarray(scaled.astype(np.float32), "F").resize(
        (Wt * maps.stride, Ht * maps.stride), Image.Resampling.BILINEAR)
    heat = heat_colours(np.asarray(smooth)[:H, :W])
    gray = np.asarray(image.convert("L"), dtype=np.float64)[..., None]
    out = Image.fromarray((0.3 * gray + 0.7 * heat).round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    r = max(4, min(H, W) // 40)
    draw.ellipse((ax - r, ay - r, ax + r, ay + r), outline=ANCHOR_COLOUR, width=2)
    draw.line((ax - 2 * r, ay, ax + 2 * r, ay), fill=ANCHOR_COLOUR)
    draw.line((ax, ay - 2 * r, ax, ay + 2 * r), fill=ANCHOR_COLOUR)
    caption = [f"stage {maps.stage}, block {maps.block}: effective attention of the marked pixel ({ax}, {ay})",
               f"through the super tokens, A·Attn·Âᵀ (heads averaged); "
               f"dark = {low:.1e}, bright = {high:.1e} per token"]
    return add_caption(out, caption, notes)


_ASCII_FALLBACK = {"—": "-", "–": "-", "×": "x", "·": ".", "ᵀ": "^T", "Â": "A^"}


def _font(size: int = 12):
    """DejaVu Sans if the system has it (wide Unicode coverage), else Pillow's own font."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except TypeError:
        return ImageFont.load_default()


def _drawable(font, text: str) -> str:
    """``text`` with the characters ``font`` has no glyph for replaced by ASCII look-alikes."""
    def glyph(ch):
        try:
            mask = font.getmask(ch)
            return mask.size, bytes(mask)
        except UnicodeEncodeError:  # Pillow's bitmap font is Latin-1 only
            return None

    missing = glyph("\uffff")
    for ch, plain in _ASCII_FALLBACK.items():
        if ch in text and (glyph(ch) is None or glyph(ch) == missing):
            text = text.replace(ch, plain)
    return text


def wrap_text(text: str, width: int, measure) -> list[str]:
    """``text`` broken at spaces into lines whose ``measure(line)`` fits ``width`` pixels (a single
    word wider than that is broken between characters)."""
    lines: list[str] = []
    for word in text.split(" "):
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and measure(candidate) <= width:
            lines[-1] = candidate
            continue
        while measure(word) > width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and measure(word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines


def add_caption(image: Image.Image, lines: Sequence[str], warnings: Sequence[str] = ()) -> Image.Image:
    """The image with a dark strip below it holding ``lines`` (white) and ``warnings`` (red), each
    wrapped to the picture's width."""
    font = _font()
    probe = ImageDraw.Draw(image)
    margin = 4

    def measure(text: str) -> float:
        return probe.textlength(text, font=font)

    texts = []
    for group, colour in ((lines, (235, 235, 235)), (warnings, (255, 70, 70))):
        for line in group:
            texts += [(part, colour) for part in wrap_text(_drawable(font, line), image.width - 2 * margin, measure)]
    line_h = 16
    width = image.width
    canvas = Image.new("RGB", (width, image.height + line_h * len(texts) + 6), (24, 24, 24))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (text, colour) in enumerate(texts):
        draw.text((margin, image.height + 3 + i * line_h), text, fill=colour, font=font)
    return canvas


def save_png(image: Image.Image, path: Path, metadata: dict[str, str]) -> None:
    """Write a PNG atomically (temporary file in the same folder, then a rename) with text chunks."""
    info = PngInfo()
    for key, value in metadata.items():
        info.add_itxt(key, value)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


# ---- the whole tool -------------------------------------------------------------------------

def prepare_image(image: Image.Image, size: int | None) -> Image.Image:
    """Resize so the shorter side is ``size`` (bicubic); ``None`` or 0 keeps the image as it is."""
    return resize_shorter_side(image, size) if size else image


def visualize(model: STViT, image: Image.Image, *, stages: Sequence[int] = (1, 2), block: int = 0,
              anchor: tuple[float, float] | None = None, notes: Sequence[str] = ()) -> dict[str, Image.Image]:
    """All the pictures for one (already resized) RGB image: ``{"stage1_super_tokens": img, ...}``.

    ``anchor`` = (x, y) in this image's pixels, default its centre.
    """
    cfg = model.pretrained_cfg
    x = to_tensor(image, cfg["mean"], cfg["std"])[None].to(next(model.parameters()).device)
    W, H = image.size
    ax, ay = (W // 2, H // 2) if anchor is None else (int(anchor[0]), int(anchor[1]))
    if not (0 <= ax < W and 0 <= ay < H):
        raise ValueError(f"anchor ({ax}, {ay}) is outside the {W}×{H} image")
    pictures = {}
    for maps in analyse(model, x, stages, block):
        pictures[f"stage{maps.stage}_super_tokens"] = render_super_tokens(image, maps, notes)
        pictures[f"stage{maps.stage}_attention"] = render_attention(image, maps, (ax, ay), notes)
    return pictures


def _stvit_model_name(value: str) -> str:
    name = model_name_arg(value)
    if not FAMILIES[model_entry(name).family].stvit_only_tools:
        raise argparse.ArgumentTypeError(
            f"visualize draws super tokens, which only STViT models have; {name} is a "
            f"{model_entry(name).family} model. Choose one of {', '.join(list_models('stvit'))}")
    return name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stvit.visualize",
        description="Draw an image's super tokens (paper Fig. 4) and the effective attention of one pixel "
                    "through them (Fig. 2d), for stages 1 and 2.")
    parser.add_argument("image", metavar="IMAGE", help="an image file (JPEG, PNG, ...)")
    parser.add_argument("--model", type=_stvit_model_name, default="stvit_small",
                        help=f"an STViT model, one of {', '.join(list_models('stvit'))} (default: stvit_small)")
    parser.add_argument("--checkpoint", metavar="FILE", help="weights to load; without it: random weights")
    parser.add_argument("--out", metavar="DIR", default=".", help="folder for the PNGs (default: current folder)")
    parser.add_argument("--anchor", nargs=2, type=float, metavar=("X", "Y"),
                        help="anchor pixel for the attention map, in the input image's pixels (default: centre)")
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2], metavar="S",
                        help="1-based stages to draw (default: 1 2; stages 3-4 have no super tokens)")
    parser.add_argument("--block", type=int, default=0, help="block within each stage (default 0, the first)")
    parser.add_argument("--size", type=int, default=None,
                        help="resize the image's shorter side to this many pixels first (default: the model's "
                             "input size, 224; 0 keeps the original size)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.size is not None and args.size < 0:
        return _error(f"--size must be positive (or 0 to keep the image size), got {args.size}", code=2)
    try:
        device = device_arg(args.device)
    except ValueError as e:
        return _error(str(e), code=2)
    try:
        model = load_model(args.model, args.checkpoint).to(device)
        check_stages(model, args.stages, args.block)
        original = load_image(args.image)
        size = model.pretrained_cfg["input_size"][-1] if args.size is None else args.size
        image = prepare_image(original, size)
        anchor = None
        if args.anchor is not None:
            ax, ay = args.anchor
            if not (0 <= ax < original.width and 0 <= ay < original.height):
                raise ValueError(f"--anchor {ax:g} {ay:g} is outside the {original.width}×{original.height} image")
            anchor = (ax * image.width / original.width, ay * image.height / original.height)
        notes = [RANDOM_WEIGHTS_NOTE] if args.checkpoint is None else []
        pictures = visualize(model, image, stages=args.stages, block=args.block, anchor=anchor, notes=notes)
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
    except CheckpointError as e:
        return _error(e.command_line_message(args.model))
    except (ImageError, ValueError, OSError) as e:
        return _error(str(e))
    except torch.OutOfMemoryError:
        return _error("out of GPU memory; use a smaller --size or --device cpu")
    if args.checkpoint is None:
        print(f"WARNING: no --checkpoint given: {RANDOM_WEIGHTS_NOTE} (the images say so too)", file=sys.stderr)
    metadata = {"Software": "stvit.visualize", "Model": args.model,
                "Weights": args.checkpoint or RANDOM_WEIGHTS_NOTE}
    stem = Path(args.image).stem
    for name, picture in pictures.items():
        path = out_dir / f"{stem}_{name}.png"
        try:
            save_png(picture, path, metadata)
        except OSError as e:
            return _error(f"cannot write {path}: {e}")
        print(path)
    return 0


def _error(message: str, code: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
