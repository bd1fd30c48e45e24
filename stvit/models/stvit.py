"""STViT: the hierarchical Super Token Vision Transformer (Huang et al., CVPR 2023, paper Fig. 3).

Super token attention (STA, Sec. 3.2) in its sparse form: each token is associated only with the
3×3 super tokens around the grid cell it falls in, so the association holds 9 weights per token —
for the cell's 3×3 neighbourhood of super tokens — instead of the dense (B, N, M) matrix the paper
writes (see ``reference/`` for that form). The per-cell products run in one of two equivalent
forms (:class:`CellTokens`, :class:`MapTokens`).

Neighbours are gathered by zero-padding the small super-token grid and taking its nine shifted
views; the adjoint (summing each token's nine contributions back onto the super tokens) is nine
shifted adds into a padded grid. Both are cheap, exact and differentiable, unlike an identity-
kernel convolution per channel; eagerly on a CPU each is one indexing op instead, and compiled
for training each is the other's backward.

Semantics kept from the authors' code (github hhb072/STViT; the golden tests check each):
- the association is computed without gradient;
- out-of-image neighbour slots are zero vectors and still take part in the 9-way softmax;
- inputs are zero-padded on the right/bottom to a multiple of the grid; padded tokens take part;
- the attention score uses scale C**-0.5 (all channels, not per head);
- a 1×1 grid skips sampling and runs plain MHSA on all tokens;
- the MHSA's ``qkv`` lays channels out per head as [q, k, v].

Module and parameter names follow the authors' code, so their state dicts map one-to-one. The file
reads top to bottom: STA, the blocks, the network, its registered variants (paper Table 8).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
import torch.fx
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn.modules import module as nn_module  # the global forward hooks
from torch.utils.checkpoint import checkpoint

from .. import compat
from ..contract import (DropPath, FeatureInfo, ModelBase, check_global_pool, check_image_batch, check_out_indices,
                        check_output_fmt, drop_path_rates, feature_take_indices, init_vit_weights, levels_up_to)
from ..optimize import fold_bn_conv, fold_conv_bn  # the generic BatchNorm algebra
from ..registry import DEFAULT_PRETRAINED_CFG, register_family, register_model

# Offsets of the 3×3 neighbourhood, row-major: slot k is (dy, dx) = (k // 3 - 1, k % 3 - 1).
NEIGHBOUR_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
EPS = 1e-12  # the authors' guard in the column normalisation


def gather_neighbours(grid: torch.Tensor) -> torch.Tensor:
    """(B, hh, ww, C) super-token grid -> (B, hh, ww, 9, C): each cell's 3×3 neighbours, zeros outside."""
    if _one_index_op(grid):
        B, hh, ww, C = grid.shape
        padded = F.pad(grid, (0, 0, 1, 1, 1, 1))
        return padded.flatten(1, 2).index_select(1, neighbour_index(hh, ww, grid.device)).view(B, hh, ww, 9, C)
    if _compiled_with_grad(grid):
        return _GatherNeighbours.apply(grid)
    return _gather_shifted(grid)


def _gather_shifted(grid: torch.Tensor) -> torch.Tensor:
    hh, ww = grid.shape[1:3]
    padded = F.pad(grid, (0, 0, 1, 1, 1, 1))
    views = [padded[:, 1 + dy : 1 + dy + hh, 1 + dx : 1 + dx + ww] for dy, dx in NEIGHBOUR_OFFSETS]
    return torch.stack(views, dim=3)


def neighbour_index(hh: int, ww: int, device: torch.device) -> torch.Tensor:
    """(hh·ww·9,) positions in the flattened zero-padded (hh+2, ww+2) grid: cell (y, x)'s slot k."""
    y = torch.arange(1, hh + 1, device=device).view(hh, 1, 1)
    x = torch.arange(1, ww + 1, device=device).view(1, ww, 1)
    dy, dx = (torch.tensor(d, device=device) for d in zip(*NEIGHBOUR_OFFSETS))
    return ((y + dy) * (ww + 2) + x + dx).flatten()


def _one_index_op(t: torch.Tensor) -> bool:
    """Gather and scatter the neighbours with one indexing op each way (``index_select`` and its
    adjoint ``index_add``) rather than nine shifted views: in eager CPU training that is a few ops
    instead of some forty (STViT-S's stage-2 super token attention, forward + backward, 21.0 → 13.5
    ms at batch 8; bench/RESULTS.md). Not under torch.compile, which fuses the shifted views into their consumers,
    not on CUDA, where ``index_add`` sums with atomics in no fixed order, and not while torch.fx
    traces (``t`` is then a Proxy, whose device is unknown)."""
    return isinstance(t, torch.Tensor) and t.device.type == "cpu" and not torch.compiler.is_compiling()


def pad_to_grid(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H, W, C) map zero-padded on the right/bottom to multiples of (h, w); the map itself when
    they divide it. Exported with symbolic sizes (``torch.export``) the pad is unconditional (a zero
    pad is a no-op; a branch on ``H % h`` would fix the graph to the traced size's answer), and sized
    as grid × cell - size with the grid a ceiling division of positive numbers, so the padded size
    visibly divides by the cell (the ONNX exporter miscompiles floor division of a negative size)."""
    H, W = x.shape[1:3]
    if compat.is_exporting() or H % h or W % w:
        x = F.pad(x, (0, 0, 0, (W + w - 1) // w * w - W, 0, (H + h - 1) // h * h - H))
    return x


# torch.fx records these as single calls (their sizes are unknown while it traces; einops cannot
# read a traced tensor's shape).
torch.fx.wrap("pad_to_grid")
torch.fx.wrap("rearrange")


def scatter_neighbours(slots: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`gather_neighbours`: (B, hh, ww, 9, *rest) -> (B, hh, ww, *rest).

    Slot k of cell (y, x) is added onto super token (y + dy, x + dx); slots pointing outside
    the grid (the zero phantoms) are dropped. Written as a sum of nine shifted views of the
    zero-padded slots rather than in-place adds into a buffer: no zero-filled scratch tensor,
    and ``torch.compile`` turns it into one small fused kernel. Eagerly on a CPU it is one
    ``index_add`` into a zeroed padded grid (:func:`_one_index_op`).
    """
    if _one_index_op(slots):
        B, hh, ww = slots.shape[:3]
        rest = slots.shape[4:]
        padded = slots.new_zeros(B, (hh + 2) * (ww + 2), *rest).index_add_(
            1, neighbour_index(hh, ww, slots.device), slots.flatten(1, 3))
        return padded.view(B, hh + 2, ww + 2, *rest)[:, 1 : hh + 1, 1 : ww + 1]
    if _compiled_with_grad(slots):
        return _ScatterNeighbours.apply(slots)
    return _scatter_shifted(slots)


def _scatter_shifted(slots: torch.Tensor) -> torch.Tensor:
    hh, ww = slots.shape[1:3]
    padded = F.pad(slots, (0, 0) * (slots.ndim - 4) + (0, 0, 1, 1, 1, 1))
    # Super token (y, x) receives slot k from cell (y - dy, x - dx), at padded index y - dy + 1.
    shifted = [padded[:, 1 - dy : 1 - dy + hh, 1 - dx : 1 - dx + ww, k]
               for k, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS)]
    out = shifted[0]
    for view in shifted[1:]:
        out = out + view
    return out


def _compiled_with_grad(t: torch.Tensor) -> bool:
    """Under torch.compile (not export), for a tensor autograd follows: the gather and the scatter
    then carry each other as their backward (:class:`_GatherNeighbours`)."""
    return torch.compiler.is_compiling() and not compat.is_exporting() and t.requires_grad


class _GatherNeighbours(torch.autograd.Function):
    """The shifted-view gather whose backward is the shifted-view scatter, its adjoint (and
    :class:`_ScatterNeighbours` the other way round). Left to itself, autograd differentiates the
    nine views and their stack as nine zero-filled slice gradients summed, which inductor fuses into
    a loop evaluating all nine shifted terms for every slot and keeping one; the adjoint reads each
    term once. STViT-S, one compiled block forward + backward at batch 8 under bf16 autocast: stage
    1 46.0 → 39.2 ms, stage 2 26.2 → 23.5 ms (bench/RESULTS.md). Used only while compiling: eagerly
    a CPU takes the index ops, and inference needs no backward."""

    generate_vmap_rule = True  # torch.func transforms (vmap, grad) work through it

    @staticmethod
    def forward(grid: torch.Tensor) -> torch.Tensor:
        return _gather_shifted(grid)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass  # the adjoint is linear and shape-preserving: it needs nothing saved

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _scatter_shifted(grad)


class _ScatterNeighbours(torch.autograd.Function):
    """The shifted-view scatter whose backward is the shifted-view gather (:class:`_GatherNeighbours`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(slots: torch.Tensor) -> torch.Tensor:
        return _scatter_shifted(slots)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _gather_shifted(grad)


class CellTokens:
    """The tokens copied cell by cell, (B, hh, ww, n, C) with n = h·w: per-cell products are
    batched GEMMs, a few large library calls (the eager form)."""

    def __init__(self, x: torch.Tensor, h: int, w: int):
        self.h, self.w = h, w
        self.tokens = rearrange(x, "b (y h) (x w) c -> b y x (h w) c", h=h, w=w)

    def cell_mean(self) -> torch.Tensor:          # (B, hh, ww, C)
        return self.tokens.mean(3)

    def assign(self, neighbours: torch.Tensor) -> torch.Tensor:     # -> (B, hh, ww, n, 9)
        """Each token's softmax over its cell's 9 neighbour slots (``neighbours``: (B, hh, ww, 9, C)).

        Computed slot-major, (B, hh, ww, 9, n), and returned as that buffer's transposed view: on a
        CPU torch's softmax vectorises along the contiguous dim, and over a contiguous dim of 9 it
        ran 1.96 ms at stage 1's shape against 0.29 ms over this layout's slot dim
        (bench/RESULTS.md). The products below take either layout."""
        return (neighbours @ self.tokens.transpose(-1, -2)).softmax(-2).transpose(-1, -2)

    def cell_sum(self, assoc: torch.Tensor) -> torch.Tensor:        # (B, hh, ww, 9)
        return assoc.sum(3)

    def pool(self, assoc: torch.Tensor) -> torch.Tensor:            # Aᵀ X per cell: (B, hh, ww, 9, C)
        return assoc.transpose(-1, -2) @ self.tokens

    def spread(self, assoc: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:  # A S -> (B, H, W, C)
        return rearrange(assoc @ neighbours, "b y x (h w) c -> b (y h) (x w) c", h=self.h, w=self.w)


class MapTokens:
    """The token map viewed as (B, hh, h, ww, w, C), no copy: per-cell products are broadcast
    multiplies and sums (the compiled form). Inductor fuses them into loops over the map in its
    own memory order; a GEMM form would make it copy the tokens into a layout of its choosing,
    which for these shapes was cell-innermost and turned the 64-channel dot products into strided
    scalar loops. Eagerly this form would materialise 9× larger temporaries."""

    def __init__(self, x: torch.Tensor, h: int, w: int):
        B, H, W, C = x.shape
        self.tokens = x.reshape(B, H // h, h, W // w, w, C)

    def cell_mean(self) -> torch.Tensor:
        return self.tokens.mean((2, 4))

    def assign(self, neighbours: torch.Tensor) -> torch.Tensor:     # -> (B, hh, h, ww, w, 9)
        return (self.tokens.unsqueeze(-2) * neighbours[:, :, None, :, None]).sum(-1).softmax(-1)

    def cell_sum(self, assoc: torch.Tensor) -> torch.Tensor:
        # Summed with the 9 slots zero-padded to 32, a whole vector: inductor (torch 2.13–2.15,
        # pytorch/pytorch#190757) counts a loop narrower than one vector as no work, so it would run
        # this reduction serially over the B·hh·ww cells and start the threads anew for each one's
        # 16–64 tokens. Same sums, no copy (the pad fuses into the loads); STViT-S's compiled bf16
        # inference runs 3 % faster (bench/RESULTS.md).
        return F.pad(assoc, (0, 32 - assoc.shape[-1])).sum((2, 4))[..., :assoc.shape[-1]]

    def pool(self, assoc: torch.Tensor) -> torch.Tensor:
        return (assoc.unsqueeze(-1) * self.tokens.unsqueeze(-2)).sum((2, 4))

    def spread(self, assoc: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        out = (assoc.unsqueeze(-1) * neighbours[:, :, None, :, None]).sum(-2)   # (B, hh, h, ww, w, C)
        B, hh, h, ww, w, C = out.shape
        return out.reshape(B, hh * h, ww * w, C)


def split_qkv_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 3·C, H, W) ``qkv`` output -> q, k, v, each (B, heads, H·W, C/heads).

    The authors lay the channels out per head as [q, k, v] (``head·3·d + {0, d, 2d} + j``), not
    as [all q, all k, all v]; their state dicts only work with this split.
    """
    return rearrange(qkv, "b (h three d) y x -> three b h (y x) d", h=num_heads, three=3)


class MultiHeadSelfAttention(nn.Module):
    """MHSA on a (B, C, H, W) map with 1×1-conv projections (parameter names as the authors').

    The ``qkv`` output channels are laid out per head as [q, k, v], each ``head_dim`` wide.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the channel count dim={dim}; "
                             f"choose a head count among the divisors of {dim}")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Conv2d(dim, dim, 1)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = split_qkv_heads(pointwise_conv(self.qkv, x), self.num_heads)
        dropout = self.attn_drop if self.training else 0.0
        if torch.compiler.is_compiling() and dropout == 0.0:
            # Under torch.compile, plain matmuls and softmax: inductor fuses the scaling and softmax
            # and runs the products as (bf16) GEMMs, faster than the fused CPU attention kernel here.
            out = ((q * self.scale) @ k.transpose(-1, -2)).softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale)
        # Back to (B, C, H, W) with channels-last strides, the layout the rest of the model uses.
        out = out.transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)
        return self.proj_drop(pointwise_conv(self.proj, out))


class SuperTokenAttention(nn.Module):
    """Sample super tokens, refine them with MHSA, map them back to tokens (paper Sec. 3.2)."""

    def __init__(self, dim: int, stoken_size: tuple[int, int], n_iter: int = 1, num_heads: int = 8,
                 qkv_bias: bool = True, qk_scale: float | None = None, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if n_iter < 1:
            raise ValueError(f"n_iter={n_iter}: the number of super token sampling iterations must be >= 1")
        self.dim = dim
        self.stoken_size = tuple(stoken_size)
        self.n_iter = n_iter
        self.scale = dim ** -0.5
        self.stoken_refine = MultiHeadSelfAttention(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)

    def forward(self, x: torch.Tensor, form: str | None = None) -> torch.Tensor:
        """``form``: "cells" (batched GEMMs; the eager default) or "map" (broadcast products; the
        default under ``torch.compile``). Both compute the same function."""
        if self.stoken_size == (1, 1):
            return self.stoken_refine(x)
        if form is None:
            form = "map" if torch.compiler.is_compiling() and not compat.is_exporting() else "cells"
        if form not in TOKEN_FORMS:
            raise ValueError(f"form={form!r}: choose one of {sorted(TOKEN_FORMS)}")
        return self.sample_refine_upsample(x, TOKEN_FORMS[form])

    def sample_refine_upsample(self, x: torch.Tensor, form: type) -> torch.Tensor:
        B, C, H0, W0 = x.shape
        h, w = self.stoken_size
        # Token maps are handled as (B, H, W, C) views (free for the model's channels-last maps).
        x = x.permute(0, 2, 3, 1)
        x = pad_to_grid(x, h, w)  # right/bottom zeros; padded tokens take part
        tokens = form(x, h, w)

        assoc, norm = self.association(tokens)
        # Super tokens: column-normalised sum of their tokens, S = (Aᵀ X) / (Aᵀ 1); grad flows to X.
        stokens = scatter_neighbours(tokens.pool(assoc)) / norm                  # (B, hh, ww, C)
        stokens = self.stoken_refine(stokens.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        # Upsample: each token is the association-weighted sum of its 9 refined super tokens.
        out = tokens.spread(assoc, gather_neighbours(stokens))                  # (B, H, W, C)
        if compat.is_exporting():
            rows, cols = torch.arange(H0, device=out.device), torch.arange(W0, device=out.device)
            return out.index_select(1, rows).index_select(2, cols).permute(0, 3, 1, 2)
        return out[:, :H0, :W0].permute(0, 3, 1, 2)

    @torch.no_grad()
    def association(self, tokens: CellTokens | MapTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """Iterate the soft token-to-super-token association, starting from cell averages.

        Returns the last association (each token's softmax over its cell's 9 neighbour slots) and
        each super token's total association + EPS, the column normaliser, as (B, hh, ww, 1).
        """
        stokens = tokens.cell_mean()
        for i in range(self.n_iter):
            # Scale the 9 neighbours rather than the n·9 logits: fewer multiplies, same result.
            assoc = tokens.assign(gather_neighbours(stokens) * self.scale)
            norm = scatter_neighbours(tokens.cell_sum(assoc).unsqueeze(-1)) + EPS
            if i < self.n_iter - 1:
                stokens = scatter_neighbours(tokens.pool(assoc)) / norm
        # Detached here already (no_grad); said again for a torch.fx trace, which records no grad mode.
        return assoc.detach(), norm.detach()


TOKEN_FORMS = {"cells": CellTokens, "map": MapTokens}

class LayerNorm2d(nn.Module):
    """LayerNorm over channels of a (B, C, H, W) map (eps 1e-6 as the authors)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ResidualDepthwiseConv(nn.Module):
    """x + depthwise 3×3 conv(x): the convolutional position embedding and the MLP's local mixing."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)
        self.identity_folded = False  # True once the kernel itself includes the identity (inference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x + conv(x) is one depthwise conv whose kernel has 1 added at its centre tap; running it
        # that way saves a full read-add-write pass over the map (the kernel sum is tiny).
        if self.identity_folded:
            return self.conv(x)
        return F.conv2d(x, self.conv.weight + self.identity_kernel(), self.conv.bias,
                        padding=self.conv.padding, groups=self.conv.groups)

    def identity_kernel(self) -> torch.Tensor:
        """The depthwise kernel of the identity map: 1 at the centre tap of every channel."""
        w, k = self.conv.weight, self.conv.kernel_size[0] // 2
        return F.pad(w.new_ones(w.shape[0], 1, 1, 1), (k, k, k, k))

    def fold_identity(self) -> None:
        """Add the identity into the stored kernel (for inference copies: the parameter then
        means conv + identity, so the weight becomes a constant the compiler can prepack)."""
        if not self.identity_folded:
            with torch.no_grad():
                self.conv.weight += self.identity_kernel()
            self.identity_folded = True


def conv_gelu(conv: nn.Conv2d, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(conv(x))``; in eager float32 CPU inference with ``act`` an exact GELU, one oneDNN
    convolution with GELU as its post-op, applied while each output tile is in cache rather than in a
    second pass over the map (STViT-S's eager forward at batch 8: 327 → 311 ms, bench/RESULTS.md)."""
    return _onednn_conv_gelu(conv, x) if _gelu_fusable(conv, act, x) else act(pointwise_conv(conv, x))


def _gelu_fusable(conv: nn.Conv2d, act: nn.Module, x: torch.Tensor) -> bool:
    # Training (autograd on) leaves at the first test.
    eager_cpu_inference = (not torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.device.type == "cpu"
                           and x.dtype == conv.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"))
    # Only the plain modules, without hooks: a subclass or wrapper (quantized, LoRA, pruned) keeps
    # its own forward, and a hook (a feature extractor's, a profiler's) sees both modules run.
    plain = (eager_cpu_inference and type(conv) is nn.Conv2d and type(act) is nn.GELU and act.approximate == "none"
             and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple) and not _hooked(conv, act))
    # torch.compile (inductor makes the same fusion), export, tracing and dispatch modes (a FLOP
    # counter, fake tensors) see the two public ops; a build without the kernel runs them too.
    return (plain and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not compat.is_exporting() and not compat.in_dispatch_mode() and compat.onednn_conv_gelu_works())


def _hooked(*modules: nn.Module) -> bool:
    """Whether a forward hook, on one of ``modules`` or global, would see them called."""
    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks) or any(
        m._forward_hooks or m._forward_pre_hooks for m in modules)


def _onednn_conv_gelu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, list(conv.padding), list(conv.stride),
                                                   list(conv.dilation), conv.groups, "gelu", [], "none")


def pointwise_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``; for a 1×1 conv on a small map in CPU training, the same map as a Linear layer over
    the channels-last map's (B, H, W, C) view, with the conv's own parameters: its backward is then
    two GEMMs, where oneDNN's 1×1 convolution backward is slower. One block forward + backward at
    batch 8, compiled: stage 3 (14²) 6–8 % and stage 4 (7²) 19–23 % faster, in bf16 and float32;
    eager float32: 4 % and 22 %. At 56² and 28² no faster, so those maps keep the conv
    (bench/RESULTS.md). Inference keeps it too: compiled, weight freezing prepacks it with its
    post-ops, and the Linear form was 6 % slower there."""
    if _linear_for_training(conv, x):
        return F.linear(x.permute(0, 2, 3, 1), conv.weight.flatten(1), conv.bias).permute(0, 3, 1, 2)
    return conv(x)


LINEAR_MAX_POSITIONS = 14 * 14  # stages 3 and 4 at 224², and the super-token grids of stages 1 and 2


def _linear_for_training(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    # Not while torch.fx traces (x is a Proxy) or exports (the graph keeps the model's Conv nodes).
    # A subclass or wrapper (quantized, LoRA) keeps its own forward, and a hooked conv is called.
    return (torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.device.type == "cpu"
            and x.shape[-2] * x.shape[-1] <= LINEAR_MAX_POSITIONS and not compat.is_exporting()
            and type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1 and not _hooked(conv))


class ConvMlp(nn.Module):
    """1×1 conv -> GELU -> residual depthwise conv -> 1×1 conv."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act1 = nn.GELU()
        self.conv = ResidualDepthwiseConv(hidden, 3)
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(conv_gelu(self.fc1, self.act1, x))
        return self.drop(pointwise_conv(self.fc2, self.conv(x)))


class STTBlock(nn.Module):
    """Super Token Transformer block: CPE, then LN -> STA and BN -> ConvFFN residual branches."""

    def __init__(self, dim: int, n_iter: int, stoken_size: tuple[int, int], num_heads: int,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: float | None = None,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 layerscale: bool = False, init_values: float = 1e-5):
        super().__init__()
        self.pos_embed = ResidualDepthwiseConv(dim, 3)
        self.norm1 = LayerNorm2d(dim)
        self.attn = SuperTokenAttention(dim, stoken_size, n_iter, num_heads, qkv_bias, qk_scale,
                                        attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp2 = ConvMlp(dim, int(dim * mlp_ratio), drop)
        self.layerscale = layerscale
        if layerscale:
            self.gamma_1 = nn.Parameter(torch.full((1, dim, 1, 1), float(init_values)))
            self.gamma_2 = nn.Parameter(torch.full((1, dim, 1, 1), float(init_values)))

    def compile(self, *args, **kwargs) -> None:
        """``nn.Module.compile`` with static shapes by default (``dynamic=False``).

        Blocks of different stages share one ``forward`` but see different shapes; torch.compile
        would then switch to dynamic-shape kernels, which are slower and which inductor currently
        fails to build for this block's strided views. Static shapes give one graph per stage.
        """
        kwargs.setdefault("dynamic", False)
        super().compile(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_embed(x)
        if self.layerscale:
            x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x)))
            return x + self.drop_path(self.gamma_2 * self.mlp2(self.norm2(x)))
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp2(self.norm2(x)))


class Downsample(nn.Module):
    """Stride-2 3×3 conv + BN between stages (the authors' PatchMerging)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(in_dim, out_dim, 3, 2, 1), nn.BatchNorm2d(out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class ConvStem(nn.Module):
    """Four 3×3 convs (two of stride 2), each followed by GELU and BN: stride 4 in total."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        half = dim // 2
        layers: list[nn.Module] = []
        for cin, cout, stride in ((in_chans, half, 2), (half, half, 1), (half, dim, 2), (dim, dim, 1)):
            layers += [nn.Conv2d(cin, cout, 3, stride, 1), nn.GELU(), nn.BatchNorm2d(cout)]
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(0, len(self.proj), 3):
            conv, act, norm = self.proj[i:i + 3]
            x = norm(conv_gelu(conv, act, x))
        return x


@contextmanager
def _running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """BatchNorm uses batch statistics but leaves its running statistics alone.

    Used while gradient checkpointing recomputes a block: without it the recomputed forward
    would update the running mean/var a second time per step (doubling their momentum).
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    # Momentum 0 keeps the same kernels (so checkpointing sees the same saved tensors) but makes
    # the running-statistics update a no-op; the batch counter is restored afterwards.
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


class Stage(nn.Module):
    """A stack of blocks at one resolution, then (except the last stage) a downsampling conv."""

    def __init__(self, blocks: list[STTBlock], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.checkpoint_num = 0  # how many leading blocks recompute activations in backward

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if i < self.checkpoint_num and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False,
                               context_fn=lambda b=block: (nullcontext(), _running_stats_frozen(b)))
            else:
                x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        return self.downsample(x) if self.downsample is not None else x


def _per_stage(name: str, value, num_stages: int) -> list:
    if isinstance(value, (int, float, bool)) or (name == "stoken_size" and isinstance(value, tuple)):
        return [value] * num_stages
    value = list(value)
    if len(value) != num_stages:
        raise ValueError(f"{name} has {len(value)} entries but depths has {num_stages} stages; "
                         f"give one value per stage")
    return value


def _grid(value, stage: int) -> tuple[int, int]:
    grid = (value, value) if isinstance(value, int) else tuple(value)
    if len(grid) != 2 or any(not isinstance(g, int) or g < 1 for g in grid):
        raise ValueError(f"stoken_size[{stage}]={value!r}: expected a positive int or an (h, w) pair "
                         f"of positive ints (the super-token grid cell size)")
    return grid


class STViT(ModelBase):
    """Super Token Vision Transformer.

    Keywords are the authors' (``embed_dim``, ``depths``, ``num_heads``, ``n_iter``,
    ``stoken_size``, ``projection``, ``mlp_ratio``, ``qkv_bias``, ``qk_scale``, ``layerscale``,
    ``init_values``, ``drop_rate``, ``attn_drop_rate``, ``drop_path_rate``, ``num_classes``,
    ``in_chans``, ``use_checkpoint``, ``checkpoint_num``). ``projection=None`` skips the final
    1×1 projection (the authors' code requires one). ``global_pool``: 'avg' (the authors' head) or ''
    (the head takes the unpooled map). ``features_only=True`` builds a backbone that returns the
    stage maps selected by ``out_indices`` (strides 4, 8, 16, 32) and has no head.

    The feature levels of ``forward_intermediates`` are the 4 stage maps, each its last block's
    output (before the downsampling into the next stage).
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: Sequence[int] = (96, 192, 384, 768), depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), n_iter=(1, 1, 1, 1), stoken_size=(8, 4, 2, 1),
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: float | None = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 projection: int | None = None, use_checkpoint: bool = False,
                 checkpoint_num: Sequence[int] = (0, 0, 0, 0), layerscale=(False, False, False, False),
                 init_values: float = 1e-6, features_only: bool = False,
                 out_indices: Sequence[int] = (0, 1, 2, 3), global_pool: str = "avg", **unused):
        super().__init__()
        unknown = set(unused) - {"freeze_bn"}  # accepted by the authors' constructor, no effect
        if unknown:
            raise TypeError(f"STViT got unexpected keyword arguments {sorted(unknown)}")
        depths = list(depths)
        S = len(depths)
        embed_dim, num_heads, n_iter, stoken_size, layerscale, checkpoint_num = (
            _per_stage(n, v, S) for n, v in (("embed_dim", embed_dim), ("num_heads", num_heads),
                                             ("n_iter", n_iter), ("stoken_size", stoken_size),
                                             ("layerscale", layerscale), ("checkpoint_num", checkpoint_num)))
        for i in range(S):
            if embed_dim[i] % num_heads[i]:
                raise ValueError(f"embed_dim[{i}]={embed_dim[i]} is not divisible by num_heads[{i}]="
                                 f"{num_heads[i]}; pick a head count that divides the channel count")
            if n_iter[i] < 1:
                raise ValueError(f"n_iter[{i}]={n_iter[i]}: each stage needs at least 1 sampling iteration")
        if in_chans < 1:
            raise ValueError(f"in_chans={in_chans}: expected a positive number of input channels")

        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.num_features = self.head_hidden_size = projection or embed_dim[-1]
        self.features_only = features_only
        self.global_pool = check_global_pool(global_pool)

        self.patch_embed = ConvStem(in_chans, embed_dim[0])
        self.pos_drop = nn.Dropout(drop_rate)
        rates = drop_path_rates(drop_path_rate, sum(depths))
        self.layers = nn.ModuleList()
        for i in range(S):
            first = sum(depths[:i])
            blocks = [STTBlock(embed_dim[i], n_iter[i], _grid(stoken_size[i], i), num_heads[i], mlp_ratio,
                               qkv_bias, qk_scale, drop_rate, attn_drop_rate, rates[first + j],
                               layerscale[i], init_values) for j in range(depths[i])]
            down = Downsample(embed_dim[i], embed_dim[i + 1]) if i < S - 1 else None
            self.layers.append(Stage(blocks, down))
        self.default_checkpoint_num = [int(n) for n in checkpoint_num]
        if use_checkpoint:
            self.set_grad_checkpointing(True)

        if features_only:
            self.out_indices = check_out_indices(out_indices, S)
            self.feature_info = FeatureInfo(_stage_info(embed_dim, depths, i) for i in self.out_indices)
        else:
            # The head's projection, BN and Swish (the final features): like EfficientNet's conv head,
            # they widen the last map for the classifier and never feed the feature maps.
            self.proj = nn.Conv2d(embed_dim[-1], projection, 1) if projection else nn.Identity()
            self.norm = nn.BatchNorm2d(self.num_features)
            self.act = nn.SiLU()
            self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
            self.feature_info = FeatureInfo(_stage_info(embed_dim, depths, i) for i in range(S))
        self.pretrained_cfg = {**STVIT_CFG, "num_classes": num_classes if not features_only else 0}
        self.apply(init_vit_weights)  # as the authors; convs keep PyTorch's default

    # ---- the model contract (stvit/contract.py) ---------------------------------------------
    def forward_stages(self, x: torch.Tensor, out_indices: Sequence[int] = (0, 1, 2, 3),
                       before_downsample: bool = True) -> list[torch.Tensor]:
        """Stage maps in stage order; ``before_downsample`` gives strides 4/8/16/32, else each stage's
        output (downsampled for the next stage). Stops after the last stage asked for."""
        check_image_batch(x, self.in_chans)  # any size: the stem and the grids pad as needed
        # Channels-last (NHWC strides) throughout: depthwise and 1×1 convs run several times faster
        # in it on CPU (oneDNN) and GPU (cuDNN), and LayerNorm2d's permutes become free views.
        x = self.pos_drop(self.patch_embed(x.contiguous(memory_format=torch.channels_last)))
        outs, last = [], max(out_indices)
        for i, stage in enumerate(self.layers):
            x = stage.forward_blocks(x)
            if before_downsample and i in out_indices:
                outs.append(x)
                if i == last:
                    break
            if stage.downsample is not None:
                x = stage.downsample(x)
            if not before_downsample and i in out_indices:
                outs.append(x)
            if i >= last:
                break
        return outs

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's feature API over the 4 stage maps (see stvit/contract.py): ``(final features, maps)``
        or the maps alone, in stage order. ``norm`` changes nothing here: the final projection, BN and
        Swish belong to the head and apply to the final features only (those of the last stage; with
        ``stop_early`` before it, the final features are the last stage map computed)."""
        check_output_fmt(output_fmt)
        take, last = feature_take_indices(len(self.layers), indices)
        stop = last if stop_early or intermediates_only else len(self.layers) - 1
        levels = sorted(set(take) | {stop})
        maps = dict(zip(levels, self.forward_stages(x, levels)))
        intermediates = [maps[i] for i in sorted(set(take))]
        if intermediates_only:
            return intermediates
        final = maps[stop]
        if stop == len(self.layers) - 1 and not self.features_only:
            final = self.act(self.norm(self.proj(final)))
        return final, intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Keep what the stage maps ``indices`` need (timm's API): the stages after the last one go (and
        that stage's downsampling); the head's projection/BN/Swish go with the head, with the norm, or
        with the last stage, and ``num_features`` is then the width of the last map kept."""
        take, last = feature_take_indices(len(self.layers), indices)
        if last < len(self.layers) - 1:
            self.layers = self.layers[:last + 1]
            self.layers[-1].downsample = None
            self.feature_info = levels_up_to(self, last)
            prune_head = True  # the head is sized for the final stage
        if not self.features_only and (prune_head or prune_norm):
            self.proj, self.norm, self.act = nn.Identity(), nn.Identity(), nn.Identity()
            self.num_features = self.head_hidden_size = self.embed_dim[last]
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image -> (B, num_features, ⌈H/32⌉, ⌈W/32⌉) final map (after proj, BN, Swish)."""
        x = self.forward_stages(x, (len(self.layers) - 1,))[0]
        return self.act(self.norm(self.proj(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor):
        if self.features_only:
            return self.forward_intermediates(x, self.out_indices, intermediates_only=True)
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes`` (0: none, the model returns the pooled features);
        ``global_pool`` 'avg' or '' changes the pooling (None keeps it)."""
        if self.features_only:
            raise ValueError("a features_only model has no classifier; build it with features_only=False")
        if global_pool is not None:
            self.global_pool = check_global_pool(global_pool)
        self.num_classes = num_classes
        head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            init_vit_weights(head)
        self.head = self.placed(head)
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay beyond 1-D ones and biases: the layer-scale gammas."""
        return {name for name, _ in self.named_parameters() if name.rsplit(".", 1)[-1].startswith("gamma_")}

    def set_grad_checkpointing(self, enable: bool = True, checkpoint_num: Sequence[int] | None = None) -> None:
        """Recompute block activations in backward to save memory.

        ``checkpoint_num[i]`` leading blocks of stage i are checkpointed; by default the model's
        ``checkpoint_num`` (the authors' [4, 7, 15, 0] for STViT-L) or, if that is all zero, every block.
        """
        if checkpoint_num is None:
            checkpoint_num = (self.default_checkpoint_num if any(self.default_checkpoint_num)
                              else [len(stage.blocks) for stage in self.layers])
        for stage, n in zip(self.layers, checkpoint_num):
            stage.checkpoint_num = int(n) if enable else 0

    def repeated_blocks(self) -> list[nn.Module]:
        return [block for stage in self.layers for block in stage.blocks]

    def prepare_inference(self) -> list[str]:
        """Fold every eval-mode BatchNorm that folds exactly, and each residual depthwise conv's
        identity into its kernel (``stvit.optimize`` calls this on its copy). Returns what it folded.

        Eval-mode BatchNorm is a per-channel affine map, so it merges into an adjacent linear map:
        ``Downsample``'s conv -> BN backward into the conv; the head's ``proj`` -> ``norm`` likewise;
        each block's ``norm2`` (BN) -> ``mlp2.fc1`` (1×1 conv) forward into ``fc1``, exact because a
        1×1 conv has no padding. Not folded: the stem's conv -> GELU -> BN -> conv (the GELU is in
        between, and folding forward into a padded 3×3 conv would turn its zero padding into the
        shift), nor the stem's last BN before the first block's padded depthwise conv.
        """
        if self.training:
            raise ValueError("prepare_inference needs an eval-mode model (call model.eval() first): a "
                             "training-mode BatchNorm normalises with batch statistics and cannot be folded")
        folded = []
        with torch.no_grad():
            for name, module in list(self.named_modules()):  # a list: children are swapped as we go
                if isinstance(module, Downsample) and isinstance(module.proj[1], nn.BatchNorm2d):
                    module.proj[0] = fold_conv_bn(module.proj[0], module.proj[1])
                    module.proj[1] = nn.Identity()
                    folded.append(f"{name}.proj.1")
                elif isinstance(module, STTBlock) and isinstance(module.norm2, nn.BatchNorm2d):
                    module.mlp2.fc1 = fold_bn_conv(module.norm2, module.mlp2.fc1)
                    module.norm2 = nn.Identity()
                    folded.append(f"{name}.norm2")
                elif isinstance(module, ResidualDepthwiseConv) and not module.identity_folded:
                    module.fold_identity()  # a constant kernel: prepacked by the compiler, no per-call add
                    folded.append(f"{name} (identity)")
            if not self.features_only and isinstance(self.proj, nn.Conv2d) and isinstance(self.norm, nn.BatchNorm2d):
                self.proj = fold_conv_bn(self.proj, self.norm)
                self.norm = nn.Identity()
                folded.append("norm")
        return folded


def _stage_info(embed_dim, depths, i: int) -> dict:
    # The stage map is the last block's output (``layers.i`` itself returns it downsampled).
    return dict(num_chs=embed_dim[i], reduction=4 * 2 ** i, module=f"layers.{i}.blocks.{depths[i] - 1}")


STVIT_CFG = {**DEFAULT_PRETRAINED_CFG, "first_conv": "patch_embed.proj.0"}


# ---- the authors' release files and the registered variants (paper Table 8) -------------------------

def checkpoint_filter_fn(state_dict: dict, model: STViT) -> dict:
    """The authors' state dicts as ours: their per-block constant identity kernels of the unfold/fold
    convolutions (``*.attn.unfold.weights``, ``*.attn.fold.weights``) are not parameters here."""
    return {k: v for k, v in state_dict.items() if not k.endswith((".attn.unfold.weights", ".attn.fold.weights"))}


register_family("stvit", STViT, checkpoint_filter=checkpoint_filter_fn, paper="Vision Transformer with Super Token Sampling (Huang et al., CVPR 2023)",
                verified_against="hhb072/STViT models/stvit.py (float64 goldens)", stvit_only_tools=True)

_COMMON = dict(n_iter=[1, 1, 1, 1], stoken_size=[8, 4, 1, 1], projection=1024, mlp_ratio=4,
               qkv_bias=True, drop_rate=0.0, drop_path_rate=0.0)
STVIT_CONFIGS: dict[str, dict] = {
    # A small variant for demos and tests: trains on a CPU in minutes at 32×32.
    "stvit_tiny": dict(_COMMON, embed_dim=[32, 64, 128, 160], depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 5],
                       stoken_size=[4, 2, 1, 1], projection=256, layerscale=[False] * 4, init_values=1e-5),
    "stvit_small": dict(_COMMON, embed_dim=[64, 128, 320, 512], depths=[3, 5, 9, 3], num_heads=[1, 2, 5, 8],
                        layerscale=[False] * 4, init_values=1e-5),
    "stvit_base": dict(_COMMON, embed_dim=[96, 192, 384, 512], depths=[4, 6, 14, 6], num_heads=[2, 3, 6, 8],
                       layerscale=[False, False, True, True], init_values=1e-6),
    "stvit_large": dict(_COMMON, embed_dim=[96, 192, 448, 640], depths=[4, 7, 19, 8], num_heads=[2, 3, 7, 10],
                        layerscale=[False, False, True, True], init_values=1e-6, checkpoint_num=[4, 7, 15, 0]),
}


def _build(name: str, overrides: dict) -> STViT:
    return STViT(**{**STVIT_CONFIGS[name], **overrides})


# The training recipe is train's paper preset (the authors' DeiT recipe); only the stochastic depth
# differs per model (paper / authors' README: S 0.1, B 0.4, L 0.6). ImageNet top-1 at 224² (Table 2).
@register_model("stvit", demo=dict(input_size=32), aliases=("tiny",))
def stvit_tiny(**overrides) -> STViT:
    return _build("stvit_tiny", overrides)


@register_model("stvit", paper=dict(params_m=25.0, macs_g=4.4, top1=83.6), recipe=dict(drop_path=0.1),
                aliases=("small",))
def stvit_small(**overrides) -> STViT:
    return _build("stvit_small", overrides)


@register_model("stvit", paper=dict(params_m=52.0, macs_g=9.9, top1=84.8), recipe=dict(drop_path=0.4),
                aliases=("base",))
def stvit_base(**overrides) -> STViT:
    return _build("stvit_base", overrides)


@register_model("stvit", paper=dict(params_m=95.0, macs_g=15.6, top1=85.8), recipe=dict(drop_path=0.6),
                aliases=("large",))
def stvit_large(**overrides) -> STViT:
    return _build("stvit_large", overrides)
