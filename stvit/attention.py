"""Super token attention (STA), sparse form.

Each token is associated only with the 3×3 super tokens around the grid cell it falls in, so
the association holds 9 weights per token — for the cell's 3×3 neighbourhood of super tokens —
instead of the dense (B, N, M) matrix the paper writes (see ``reference/`` for that form). The
per-cell products run in one of two equivalent forms (:class:`CellTokens`, :class:`MapTokens`).

Neighbours are gathered by zero-padding the small super-token grid and taking its nine shifted
views; the adjoint (summing each token's nine contributions back onto the super tokens) is nine
shifted adds into a padded grid. Both are cheap, exact and differentiable, unlike an identity-
kernel convolution per channel.

Semantics kept from the authors' code (the golden tests check each):
- the association is computed without gradient;
- out-of-image neighbour slots are zero vectors and still take part in the 9-way softmax;
- inputs are zero-padded on the right/bottom to a multiple of the grid; padded tokens take part;
- the attention score uses scale C**-0.5 (all channels, not per head);
- a 1×1 grid skips sampling and runs plain MHSA on all tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# Offsets of the 3×3 neighbourhood, row-major: slot k is (dy, dx) = (k // 3 - 1, k % 3 - 1).
NEIGHBOUR_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
EPS = 1e-12  # the authors' guard in the column normalisation


def gather_neighbours(grid: torch.Tensor) -> torch.Tensor:
    """(B, hh, ww, C) super-token grid -> (B, hh, ww, 9, C): each cell's 3×3 neighbours, zeros outside."""
    B, hh, ww, C = grid.shape
    padded = F.pad(grid, (0, 0, 1, 1, 1, 1))
    views = [padded[:, 1 + dy : 1 + dy + hh, 1 + dx : 1 + dx + ww] for dy, dx in NEIGHBOUR_OFFSETS]
    return torch.stack(views, dim=3)


def scatter_neighbours(slots: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`gather_neighbours`: (B, hh, ww, 9, *rest) -> (B, hh, ww, *rest).

    Slot k of cell (y, x) is added onto super token (y + dy, x + dx); slots pointing outside
    the grid (the zero phantoms) are dropped. Written as a sum of nine shifted views of the
    zero-padded slots rather than in-place adds into a buffer: no zero-filled scratch tensor,
    and ``torch.compile`` turns it into one small fused kernel.
    """
    hh, ww = slots.shape[1:3]
    padded = F.pad(slots, (0, 0) * (slots.ndim - 4) + (0, 0, 1, 1, 1, 1))
    # Super token (y, x) receives slot k from cell (y - dy, x - dx), at padded index y - dy + 1.
    shifted = [padded[:, 1 - dy : 1 - dy + hh, 1 - dx : 1 - dx + ww, k]
               for k, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS)]
    out = shifted[0]
    for view in shifted[1:]:
        out = out + view
    return out


class CellTokens:
    """The tokens copied cell by cell, (B, hh, ww, n, C) with n = h·w: per-cell products are
    batched GEMMs, a few large library calls (the eager form)."""

    def __init__(self, x: torch.Tensor, h: int, w: int):
        self.h, self.w = h, w
        self.tokens = rearrange(x, "b (y h) (x w) c -> b y x (h w) c", h=h, w=w)

    def cell_mean(self) -> torch.Tensor:          # (B, hh, ww, C)
        return self.tokens.mean(3)

    def affinity(self, neighbours: torch.Tensor) -> torch.Tensor:   # -> (B, hh, ww, n, 9)
        return self.tokens @ neighbours.transpose(-1, -2)

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

    def affinity(self, neighbours: torch.Tensor) -> torch.Tensor:   # -> (B, hh, h, ww, w, 9)
        return (self.tokens.unsqueeze(-2) * neighbours[:, :, None, :, None]).sum(-1)

    def cell_sum(self, assoc: torch.Tensor) -> torch.Tensor:
        return assoc.sum((2, 4))

    def pool(self, assoc: torch.Tensor) -> torch.Tensor:
        return (assoc.unsqueeze(-1) * self.tokens.unsqueeze(-2)).sum((2, 4))

    def spread(self, assoc: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        out = (assoc.unsqueeze(-1) * neighbours[:, :, None, :, None]).sum(-2)   # (B, hh, h, ww, w, C)
        B, hh, h, ww, w, C = out.shape
        return out.reshape(B, hh * h, ww * w, C)


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
        q, k, v = rearrange(self.qkv(x), "b (h three d) y x -> three b h (y x) d", h=self.num_heads, three=3)
        dropout = self.attn_drop if self.training else 0.0
        if torch.compiler.is_compiling() and dropout == 0.0:
            # Under torch.compile, plain matmuls and softmax: inductor fuses the scaling and softmax
            # and runs the products as (bf16) GEMMs, faster than the fused CPU attention kernel here.
            out = ((q * self.scale) @ k.transpose(-1, -2)).softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale)
        # Back to (B, C, H, W) with channels-last strides, the layout the rest of the model uses.
        out = out.transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)
        return self.proj_drop(self.proj(out))


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
            form = "map" if torch.compiler.is_compiling() else "cells"
        if form not in TOKEN_FORMS:
            raise ValueError(f"form={form!r}: choose one of {sorted(TOKEN_FORMS)}")
        return self.sample_refine_upsample(x, TOKEN_FORMS[form])

    def sample_refine_upsample(self, x: torch.Tensor, form: type) -> torch.Tensor:
        B, C, H0, W0 = x.shape
        h, w = self.stoken_size
        # Token maps are handled as (B, H, W, C) views (free for the model's channels-last maps).
        x = x.permute(0, 2, 3, 1)
        if H0 % h or W0 % w:
            x = F.pad(x, (0, 0, 0, -W0 % w, 0, -H0 % h))  # right/bottom zeros; padded tokens take part
        tokens = form(x, h, w)

        assoc, norm = self.association(tokens)
        # Super tokens: column-normalised sum of their tokens, S = (Aᵀ X) / (Aᵀ 1); grad flows to X.
        stokens = scatter_neighbours(tokens.pool(assoc)) / norm                  # (B, hh, ww, C)
        stokens = self.stoken_refine(stokens.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        # Upsample: each token is the association-weighted sum of its 9 refined super tokens.
        out = tokens.spread(assoc, gather_neighbours(stokens))                  # (B, H, W, C)
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
            assoc = tokens.affinity(gather_neighbours(stokens) * self.scale).softmax(-1)
            norm = scatter_neighbours(tokens.cell_sum(assoc).unsqueeze(-1)) + EPS
            if i < self.n_iter - 1:
                stokens = scatter_neighbours(tokens.pool(assoc)) / norm
        return assoc, norm


TOKEN_FORMS = {"cells": CellTokens, "map": MapTokens}
