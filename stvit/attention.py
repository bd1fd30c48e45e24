"""Super token attention (STA), sparse form.

Each token is associated only with the 3×3 super tokens around the grid cell it falls in, so
the association is a (B, M, n, 9) tensor — M super tokens, n = h·w tokens per cell — instead of
the dense (B, N, M) matrix the paper writes (see ``reference/`` for that form).

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
    """(B, C, hh, ww) super-token grid -> (B, hh·ww, 9, C): each cell's 3×3 neighbours, zeros outside."""
    hh, ww = grid.shape[-2:]
    padded = F.pad(grid, (1, 1, 1, 1))
    views = [padded[:, :, 1 + dy : 1 + dy + hh, 1 + dx : 1 + dx + ww] for dy, dx in NEIGHBOUR_OFFSETS]
    return rearrange(torch.stack(views, dim=1), "b k c y x -> b (y x) k c")


def scatter_neighbours(slots: torch.Tensor, hh: int, ww: int) -> torch.Tensor:
    """Adjoint of :func:`gather_neighbours`: (B, hh·ww, 9, C) -> (B, C, hh, ww).

    Slot k of cell (y, x) is added onto super token (y + dy, x + dx); slots pointing outside
    the grid (the zero phantoms) are dropped.
    """
    slots = rearrange(slots, "b (y x) k c -> k b c y x", y=hh, x=ww)
    out = slots.new_zeros(slots.shape[1], slots.shape[2], hh + 2, ww + 2)
    for k, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS):
        out[:, :, 1 + dy : 1 + dy + hh, 1 + dx : 1 + dx + ww] += slots[k]
    return out[:, :, 1:-1, 1:-1]


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
        H, W = x.shape[-2:]
        qkv = rearrange(self.qkv(x), "b (h three d) y x -> three b h (y x) d", h=self.num_heads, three=3)
        out = F.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale)
        out = rearrange(out, "b h (y x) d -> b (h d) y x", y=H, x=W)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stoken_size == (1, 1):
            return self.stoken_refine(x)
        return self.sample_refine_upsample(x)

    def sample_refine_upsample(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H0, W0 = x.shape
        h, w = self.stoken_size
        x = F.pad(x, (0, -W0 % w, 0, -H0 % h))  # right/bottom zeros; padded tokens take part
        hh, ww = x.shape[-2] // h, x.shape[-1] // w
        pixels = rearrange(x, "b c (y h) (x w) -> b (y x) (h w) c", h=h, w=w)  # (B, M, n, C)

        assoc, norm = self.association(pixels, hh, ww)
        # Super tokens: column-normalised sum of their tokens, S = (Aᵀ X) / (Aᵀ 1); grad flows to X.
        stokens = scatter_neighbours(torch.einsum("bmnk,bmnc->bmkc", assoc, pixels), hh, ww) / norm
        stokens = self.stoken_refine(stokens)
        # Upsample: each token is the association-weighted sum of its 9 refined super tokens.
        tokens = torch.einsum("bmnk,bmkc->bmnc", assoc, gather_neighbours(stokens))
        tokens = rearrange(tokens, "b (y x) (h w) c -> b c (y h) (x w)", y=hh, h=h, w=w)
        return tokens[:, :, :H0, :W0]

    @torch.no_grad()
    def association(self, pixels: torch.Tensor, hh: int, ww: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Iterate the soft token-to-super-token association, starting from cell averages.

        Returns the last association (B, M, n, 9) and each super token's total association
        (B, 1, hh, ww) + EPS, the column normaliser.
        """
        stokens = rearrange(pixels.mean(2), "b (y x) c -> b c y x", y=hh)
        for i in range(self.n_iter):
            logits = torch.einsum("bmnc,bmkc->bmnk", pixels, gather_neighbours(stokens)) * self.scale
            assoc = logits.softmax(-1)
            norm = scatter_neighbours(assoc.sum(2).unsqueeze(-1), hh, ww) + EPS
            if i < self.n_iter - 1:
                stokens = scatter_neighbours(torch.einsum("bmnk,bmnc->bmkc", assoc, pixels), hh, ww) / norm
        return assoc, norm
