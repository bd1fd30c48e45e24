"""SG-Former: Self-guided Transformer with Evolving Token Reallocation (Ren et al., ICCV 2023).

A port of the authors' model (github OliverRensu/SG-Former @ b982803, ``sgformer.py`` and
``pos_embed.py``), written anew, that loads their checkpoints key for key and reproduces their
outputs and gradients (float64 goldens in ``tests/test_sgformer.py``). It reads top to bottom
beside the paper:

1. the stem, patch merging, MLP and positional embedding;
2. the three attention kinds of the paper's method section:
   * ``HybridScaleAttention`` (hybrid-scale attention): half the heads attend to a strided
     summary of the map (global), half inside 7×7 windows (local); their attention maps give
     the *significance map*;
   * ``TokenReallocationAttention`` (self-guided attention): the significance map of the block
     before sorts the tokens; the least significant are merged in large groups, the most
     significant in small ones, and every query attends to those reallocated tokens;
   * ``PlainAttention``: full multi-head attention (sr = 1, e.g. stage 4);
3. the block and the network (``SGFormer``), its checkpoint filter and registered variants.

Layout of a stage (``SGFormer.__init__``): in stages 1-3, blocks alternate hybrid (even j) and
reallocation (odd j), so each reallocation block is guided by the map of the hybrid block just
before it; the last stage, and any stage with sr = 1, has no reallocation block.

Shapes: B batch, N = H·W tokens of the stage grid (row-major), C channels, h heads,
d = C // h head channels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..contract import (DropPath, FeatureInfo, ModelBase, check_global_pool, check_image_batch, check_out_indices,
                        check_output_fmt, feature_take_indices, init_vit_weights, is_traced, levels_up_to)
from ..registry import DEFAULT_PRETRAINED_CFG, register_family, register_model

WINDOW = 7  # local-attention window side of the hybrid blocks; fixed in the authors' code

# Token reallocation (self-guided attention): the tokens sorted by significance, ascending, are cut into
# segments; each segment's consecutive runs of ``run`` tokens are merged into one token by a
# learned Linear(run, 1) (f1, f2, f3 in order). (start, end) are fractions of the N tokens.
# sr 8 and 4: the least significant quarter in big runs, the middle half in medium runs, the
# top quarter in small ones. sr 2: the lower half in pairs, the upper half kept one by one.
REALLOCATION_SEGMENTS: dict[int, tuple[tuple[float, float, int], ...]] = {
    8: ((0.0, 0.25, 196), (0.25, 0.75, 56), (0.75, 1.0, 28)),
    4: ((0.0, 0.25, 49), (0.25, 0.75, 14), (0.75, 1.0, 7)),
    2: ((0.0, 0.5, 2), (0.5, 1.0, 1)),
}
# H·W must be a multiple of this for the runs of every segment to fit exactly.
REALLOCATION_GRANULE = {8: 784, 4: 196, 2: 4}


# ----------------------------------------------------------------------------------------------
# Convolutional pieces: stem, patch merging, MLP
# ----------------------------------------------------------------------------------------------
class ConvNorm(nn.Sequential):
    """Bias-free conv ``c`` then ``bn``, which is GroupNorm(1, C): each sample normalised over
    all of C×H×W with a per-channel affine (the authors' ``Conv2d_BN``; its BatchNorm is
    commented out in their code)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1):
        super().__init__()
        self.c = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.GroupNorm(1, out_chs)


class Stem(nn.Module):
    """Stage-1 patch embedding (the authors' ``Head``): three 3×3 convs, strides 2, 1, 2, so
    stride 4 overall ((B, in_chans, H, W) -> (B, ⌈H/4⌉·⌈W/4⌉, C) tokens, row-major).

    The authors hard-code 3 input channels; ``in_chans`` here only changes the first conv.
    """

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.conv = nn.Sequential(
            ConvNorm(in_chans, dim, 3, 2, 1), nn.GELU(),
            ConvNorm(dim, dim, 3, 1, 1), nn.GELU(),
            ConvNorm(dim, dim, 3, 2, 1),  # no activation after the last unit
        )
        self.norm = nn.LayerNorm(dim)  # eps 1e-5 (not norm_layer), as in the authors' code

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.conv(x)                                   # (B, C, H, W)
        _, _, H, W = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), H, W  # (B, N, C)


class PatchMerging(nn.Module):
    """Stride-2 downsampling between stages: 1×1 conv, GELU, 3×3 depthwise stride-2 conv, GELU,
    1×1 conv (each with GroupNorm(1)). (B, C_in, H, W) -> (B, ⌈H/2⌉·⌈W/2⌉, C_out); no LayerNorm."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.act = nn.GELU()  # one module, used after conv1 and conv2
        self.conv1 = ConvNorm(dim, out_dim, 1)
        self.conv2 = ConvNorm(out_dim, out_dim, 3, 2, 1, groups=out_dim)
        self.conv3 = ConvNorm(out_dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))  # (B, C_out, H', W')
        _, _, H, W = x.shape
        return x.flatten(2).transpose(1, 2), H, W                       # (B, N', C_out)


def tokens_to_map(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(B, H·W, C) row-major tokens -> (B, C, H, W)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], H, W)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H·W, C) row-major tokens."""
    return x.flatten(2).transpose(1, 2)


class TokenDWConv(nn.Module):
    """3×3 depthwise conv (with bias) applied to tokens laid out on their (H, W) grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return map_to_tokens(self.dwconv(tokens_to_map(x, H, W)))  # (B, N, C)


class Mlp(nn.Module):
    """fc1, GELU(h + dwconv(h)) (the depthwise conv is a residual *inside* the activation), fc2."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = TokenDWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = self.fc1(x)                                 # (B, N, hidden)
        x = self.drop(self.act(x + self.dwconv(x, H, W)))
        return self.drop(self.fc2(x))                   # (B, N, C)


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """2-D sine-cosine embedding, (grid², dim), the authors' ``get_2d_sincos_pos_embed``.

    The first dim/2 channels encode the column index w, the last dim/2 the row index h (their
    meshgrid puts w first); each half is [sin(p·ω_k), cos(p·ω_k)], ω_k = 10000^(-k / (dim/4)).
    Computed in float64 and rounded to float32, as their NumPy code does.
    """
    if dim % 4:
        raise ValueError(f"embed_dims[0]={dim}: the sin-cos position embedding needs a multiple of 4")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device="cpu") / (dim / 4))  # (dim/4,)
    pos = torch.arange(grid, dtype=torch.float64, device="cpu")
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")                                # (grid, grid)

    def encode(p: torch.Tensor) -> torch.Tensor:                                        # -> (grid², dim/2)
        angles = p.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


# ----------------------------------------------------------------------------------------------
# Attention (the paper's method section)
# ----------------------------------------------------------------------------------------------
def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, h·d) -> (B, h, N, d)."""
    B, N, _ = x.shape
    return x.reshape(B, N, num_heads, -1).transpose(1, 2)


def split_kv(kv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M, 2·h·d) with channels [k heads | v heads] -> k, v each (B, h, M, d)."""
    B, M, _ = kv.shape
    k, v = kv.reshape(B, M, 2, num_heads, -1).permute(2, 0, 3, 1, 4)
    return k, v


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, h, N, d) -> (B, N, h·d), head-major channels."""
    B, h, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, h * d)


class AttentionBase(nn.Module):
    """What all three attention kinds share: the scale, the locally-enhanced positional term
    (lepe) and the output projection. Subclasses create their q/k/v layers first, then call
    ``_add_output_layers`` so parameter order follows the authors' state dict."""

    def __init__(self, dim: int, num_heads: int, qk_scale: float | None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5  # as the authors: qk_scale=0 means the default

    def _add_output_layers(self, attn_drop: float, proj_drop: float) -> None:
        self.lepe_linear = nn.Linear(self.dim, self.dim)   # always with a bias
        self.lepe_conv = nn.Conv2d(self.dim, self.dim, 3, 1, 1, groups=self.dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(self.dim, self.dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def lepe(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """Positional term added to the attention output before ``proj``: depthwise 3×3 conv of a
        linear map of the (normed) block input. (B, N, C) -> (B, N, C)."""
        return map_to_tokens(self.lepe_conv(tokens_to_map(self.lepe_linear(x), H, W)))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q kᵀ · scale) v with dropout on the probabilities; (B, h, N, d) -> (B, h, N, d)."""
        p = self.attn_drop.p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale)

    def probabilities(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Explicit attention probabilities, for the attentions whose maps are read (hybrid)."""
        return self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))

    def output(self, x: torch.Tensor, x_in: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return self.proj_drop(self.proj(x + self.lepe(x_in, H, W)))


class PlainAttention(AttentionBase):
    """Full multi-head self-attention over all tokens (sr = 1, e.g. stage 4)."""

    kind = "plain"

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__(dim, num_heads, qk_scale)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)  # channels [k | v]
        self._add_output_layers(attn_drop, proj_drop)

    def forward(self, x: torch.Tensor, H: int, W: int, significance: torch.Tensor | None = None):
        q = split_heads(self.q(x), self.num_heads)   # (B, h, N, d)
        k, v = split_kv(self.kv(x), self.num_heads)  # (B, h, N, d) each
        return self.output(merge_heads(self.attend(q, k, v)), x, H, W), None


class HybridScaleAttention(AttentionBase):
    """Hybrid-scale attention, which also estimates the significance map.

    h/2 *global* heads: every query attends to the map reduced by a conv of kernel = stride = sr
    (then LayerNorm, GELU): fewer, coarser keys. h/2 *local* heads: attention inside
    non-overlapping 7×7 windows at full resolution. The two halves are concatenated on channels.

    The significance map (B, H, W), detached, is how much attention each position receives:
    global heads averaged, then queries averaged, one value per reduced key spread back to (H, W)
    by nearest upsampling; plus the local heads averaged, then the 49 queries of each window
    averaged, one value per pixel.
    """

    kind = "hybrid"

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool = False,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__(dim, num_heads, qk_scale)
        if num_heads % 2:
            raise ValueError(f"a hybrid-scale attention (sr_ratio {sr_ratio} > 1) splits its heads into a global "
                             f"and a local half; num_heads={num_heads} must be even")
        self.sr_ratio = sr_ratio
        half = dim // 2  # h/2 heads of d channels (d = dim // h)
        self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
        self.norm = nn.LayerNorm(dim)  # eps 1e-5 whatever norm_layer is, as the authors
        self.act = nn.GELU()
        self.q1 = nn.Linear(dim, half, bias=qkv_bias)   # global queries
        self.kv1 = nn.Linear(dim, dim, bias=qkv_bias)   # global keys/values, from the reduced map
        self.q2 = nn.Linear(dim, half, bias=qkv_bias)   # local queries
        self.kv2 = nn.Linear(dim, dim, bias=qkv_bias)   # local keys/values, full resolution
        self._add_output_layers(attn_drop, proj_drop)

    def forward(self, x: torch.Tensor, H: int, W: int, significance: torch.Tensor | None = None):
        B, N, C = x.shape
        heads = self.num_heads // 2
        # -- global heads: all N queries against the (H/sr)·(W/sr) reduced tokens
        q1 = split_heads(self.q1(x), heads)                                # (B, h/2, N, d)
        reduced = self.sr(tokens_to_map(x, H, W))                          # (B, C, ⌊H/sr⌋, ⌊W/sr⌋)
        Hr, Wr = reduced.shape[-2:]
        k1, v1 = split_kv(self.kv1(self.act(self.norm(map_to_tokens(reduced)))), heads)  # (B, h/2, M, d)
        attn1 = self.probabilities(q1, k1)                                 # (B, h/2, N, M)
        x1 = merge_heads(attn1 @ v1)                                       # (B, N, C/2)

        # -- local heads: 7×7 windows at full resolution
        q2 = self.to_windows(split_heads(self.q2(x), heads), H, W)         # (B, h/2, nW, 49, d)
        k2, v2 = split_kv(self.kv2(x), heads)
        k2, v2 = self.to_windows(k2, H, W), self.to_windows(v2, H, W)
        attn2 = self.probabilities(q2, k2)                                 # (B, h/2, nW, 49, 49)
        x2 = merge_heads(self.from_windows(attn2 @ v2, H, W))              # (B, N, C/2)

        out = self.output(torch.cat([x1, x2], dim=-1), x, H, W)            # (B, N, C)

        # -- significance map (no gradient flows through it)
        received = attn1.detach().mean(1).mean(1)                          # (B, M): mean over heads, queries
        global_map = F.interpolate(received.view(B, 1, Hr, Wr), size=(H, W), mode="nearest")[:, 0]  # (B, H, W)
        local = attn2.detach().mean(1).mean(2)                             # (B, nW, 49): per key pixel
        local_map = self.from_windows(local.unsqueeze(1).unsqueeze(-1), H, W).view(B, H, W)
        return out, local_map + global_map

    @staticmethod
    def to_windows(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """(B, h, H·W, d) -> (B, h, nW, 49, d): windows row-major over the window grid, tokens
        row-major inside a window."""
        B, h, _, d = x.shape
        x = x.reshape(B, h, H // WINDOW, WINDOW, W // WINDOW, WINDOW, d).transpose(3, 4)
        return x.reshape(B, h, -1, WINDOW * WINDOW, d)

    @staticmethod
    def from_windows(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """Inverse of ``to_windows``: (B, h, nW, 49, d) -> (B, h, H·W, d)."""
        B, h, _, _, d = x.shape
        x = x.reshape(B, h, H // WINDOW, W // WINDOW, WINDOW, WINDOW, d).transpose(3, 4)
        return x.reshape(B, h, H * W, d)


def segment(x: torch.Tensor, start: float, end: float) -> torch.Tensor:
    """The tokens (B, N, C) from fraction ``start`` to ``end`` of N (a reallocation segment)."""
    N = x.shape[1]
    return x[:, int(N * start):int(N * end)]


torch.fx.wrap("segment")  # torch.fx records it as one call: N is unknown while it traces


class TokenReallocationAttention(AttentionBase):
    """Self-guided attention: significance-guided token reallocation.

    The map of the hybrid block before is flattened two ways, row-major (index h·W + w) and
    column-major (index w·H + h), and each order sorts the tokens ascending (least significant
    first). In each sorted sequence, consecutive runs of tokens are merged by f1/f2/f3, a
    ``Linear(run, 1)`` over the token axis: one weight per position in the run, shared by all
    channels. Few tokens then represent the insignificant regions and many the salient ones.
    Query heads 0..h/2-1 attend to the row-major reallocated tokens (``kv1``), heads h/2..h-1 to
    the column-major ones (``kv2``).

    Both orders sort the same values, so without exact ties they list the same positions in the
    same sequence (the goldens' do): the two halves then differ only through ``kv1`` / ``kv2``.
    Only tied values (e.g. a constant map) are ordered differently, by their row- or
    column-major index.
    """

    kind = "reallocation"

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool = False,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__(dim, num_heads, qk_scale)
        if sr_ratio not in REALLOCATION_SEGMENTS:
            raise ValueError(f"token reallocation is defined for sr_ratio 2, 4 or 8 (the authors' merge sizes); "
                             f"got sr_ratio {sr_ratio}")
        if num_heads % 2:
            raise ValueError(f"token reallocation gives half the heads to the row-major and half to the "
                             f"column-major order; num_heads={num_heads} must be even")
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv1 = nn.Linear(dim, dim, bias=qkv_bias)  # [k | v] for h/2 heads, row-major tokens
        self.kv2 = nn.Linear(dim, dim, bias=qkv_bias)  # [k | v] for h/2 heads, column-major tokens
        self.segments = REALLOCATION_SEGMENTS[sr_ratio]
        for i, (_, _, run) in enumerate(self.segments):
            setattr(self, f"f{i + 1}", nn.Linear(run, 1))  # merges `run` sorted tokens into one
        self._add_output_layers(attn_drop, proj_drop)

    @staticmethod
    def sort_orders(significance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ascending sort indices of the (B, H, W) map flattened row-major and column-major,
        each (B, H·W) int64 (``torch.sort``, ties in implementation-defined order)."""
        B = significance.shape[0]
        row = torch.sort(significance.reshape(B, -1), dim=1)[1]
        col = torch.sort(significance.transpose(1, 2).reshape(B, -1), dim=1)[1]
        return row, col

    def reallocate(self, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """(B, N, C) tokens and a (B, N) sort order -> (B, M, C) merged tokens, segment by segment."""
        B, N, C = x.shape
        x = torch.gather(x, 1, order.unsqueeze(-1).expand(B, N, C))  # (B, N, C), least significant first
        merged = []
        for i, (start, end, run) in enumerate(self.segments):
            seg = segment(x, start, end)                                # (B, L, C)
            runs = seg.reshape(B, -1, run, C).transpose(2, 3)           # (B, L/run, C, run)
            merged.append(getattr(self, f"f{i + 1}")(runs).squeeze(-1))  # (B, L/run, C)
        return torch.cat(merged, dim=1)

    def forward(self, x: torch.Tensor, H: int, W: int, significance: torch.Tensor | None = None):
        if significance is None:
            raise ValueError("a token reallocation block needs the significance map of the hybrid block before it")
        B, N, C = x.shape
        heads = self.num_heads // 2
        q = split_heads(self.q(x), self.num_heads)                         # (B, h, N, d)
        row_order, col_order = self.sort_orders(significance)              # (B, N) each
        x_col = x.view(B, H, W, C).transpose(1, 2).reshape(B, N, C)        # tokens in column-major order
        k1, v1 = split_kv(self.kv1(self.reallocate(x, row_order)), heads)      # (B, h/2, M, d)
        k2, v2 = split_kv(self.kv2(self.reallocate(x_col, col_order)), heads)  # (B, h/2, M, d)
        k, v = torch.cat([k1, k2], dim=1), torch.cat([v1, v2], dim=1)      # (B, h, M, d)
        return self.output(merge_heads(self.attend(q, k, v)), x, H, W), None


# ----------------------------------------------------------------------------------------------
# Block and network
# ----------------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    ``forward(x, H, W, significance)`` returns (x, map): the map a hybrid block computed, None
    from the other kinds; a reallocation block consumes the map it is given.
    """

    def __init__(self, dim: int, kind: str, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: float | None = None, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer=nn.LayerNorm, sr_ratio: int = 1):
        super().__init__()
        self.norm1 = norm_layer(dim)
        args = dict(qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop)
        if kind == "plain":
            self.attn = PlainAttention(dim, num_heads, **args)
        elif kind == "hybrid":
            self.attn = HybridScaleAttention(dim, num_heads, sr_ratio, **args)
        elif kind == "reallocation":
            self.attn = TokenReallocationAttention(dim, num_heads, sr_ratio, **args)
        else:
            raise ValueError(f"unknown block kind {kind!r}")
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    @property
    def kind(self) -> str:
        return self.attn.kind

    def forward(self, x: torch.Tensor, H: int, W: int, significance: torch.Tensor | None = None):
        y, significance = self.attn(self.norm1(x), H, W, significance)
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x), H, W))
        return x, significance


def block_kinds(depths: Sequence[int], sr_ratios: Sequence[int]) -> list[list[str]]:
    """Each block's kind, as the authors lay stages out: sr = 1 -> plain; otherwise, in stages
    before the last, odd blocks reallocate (guided by the even hybrid block before them); every
    block of the last stage is hybrid."""
    last = len(depths) - 1
    return [["plain" if sr == 1 else "reallocation" if (j % 2 == 1 and i < last) else "hybrid"
             for j in range(depth)] for i, (depth, sr) in enumerate(zip(depths, sr_ratios))]


def _norm_layer(norm_layer):
    """A norm class/factory, or the recorded ``{"type": "LayerNorm", "eps": 1e-6}`` form."""
    if isinstance(norm_layer, Mapping):
        spec = dict(norm_layer)
        kind = spec.pop("type", "LayerNorm")
        if kind != "LayerNorm":
            raise ValueError(f"norm_layer type {kind!r}: only LayerNorm is supported")
        return partial(nn.LayerNorm, **spec)
    return norm_layer


class SGFormer(ModelBase):
    """SG-Former. Keywords are the authors' (``img_size``, ``num_classes``, ``embed_dims``,
    ``num_heads``, ``mlp_ratios``, ``qkv_bias``, ``qk_scale``, ``drop_rate``, ``attn_drop_rate``,
    ``drop_path_rate``, ``norm_layer``, ``depths``, ``sr_ratios``; their unused ``patch_size`` and
    ``linear`` are accepted and ignored, ``num_stages`` must be 4), plus ``in_chans`` (any number; the
    authors hard-code 3), ``features_only`` and ``out_indices`` (timm's backbone mode: the NCHW
    stage maps at strides 4, 8, 16, 32, no head), ``global_pool`` ('avg', the authors' mean over the
    tokens, or '': the head takes the tokens).

    ``forward_features`` gives the last stage's tokens (B, N, C) after ``norm4``; the feature levels
    of ``forward_intermediates`` are the 4 stage outputs (after each stage's norm) as NCHW maps.

    The input size is fixed by ``img_size`` (the learned ``pos_embed`` has (img_size/4)² tokens,
    added flat) and by the window / reallocation arithmetic; ``check_input`` names what fits.
    ``dynamic_img_size=True`` (timm's name; what a segmentation backbone needs) takes any input:
    it is zero-padded on the right and bottom to the smallest size the arithmetic takes
    (:meth:`padded_size`), ``pos_embed`` is resampled (bicubic) to that stage-1 grid, and the
    feature maps are cropped back to the unpadded grid ⌈H/2^(i+2)⌉ × ⌈W/2^(i+2)⌉. Padded tokens
    take part in attention, token reallocation and the stem's GroupNorm.
    The constructor refuses layouts the authors' code cannot run (odd head counts where heads
    are halved, sr outside 2/4/8 where tokens are reallocated, a hybrid map that would reach a
    hybrid block) rather than failing in forward.
    """

    def __init__(self, img_size: int = 224, num_classes: int = 1000,
                 embed_dims: Sequence[int] = (64, 128, 256, 512), num_heads: Sequence[int] = (2, 4, 8, 16),
                 mlp_ratios: Sequence[float] = (4, 4, 4, 4), qkv_bias: bool = False, qk_scale: float | None = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer=nn.LayerNorm, depths: Sequence[int] = (2, 4, 16, 1),
                 sr_ratios: Sequence[int] = (8, 4, 2, 1), in_chans: int = 3, features_only: bool = False,
                 out_indices: Sequence[int] = (0, 1, 2, 3), patch_size: int = 4, num_stages: int = 4,
                 linear: bool = False, global_pool: str = "avg", dynamic_img_size: bool = False):
        super().__init__()
        # The authors' defaults for num_heads ([1, 2, 4, 8]) and depths ([3, 4, 6, 3]) cannot run;
        # ours are sgformer_s's. patch_size and linear are read nowhere in their code.
        if not isinstance(img_size, int) or isinstance(img_size, bool) or img_size < 4:
            raise ValueError(f"img_size={img_size!r}: expected one int (square inputs; the position embedding "
                             f"has (img_size // 4)² tokens)")
        if num_stages != 4 or any(len(v) != 4 for v in (embed_dims, num_heads, mlp_ratios, depths, sr_ratios)):
            raise ValueError("SG-Former has 4 stages: give 4 values each for embed_dims, num_heads, mlp_ratios, "
                             "depths and sr_ratios")
        if in_chans < 1:
            raise ValueError(f"in_chans={in_chans}: expected a positive number of input channels")
        embed_dims, num_heads, depths = [int(v) for v in embed_dims], [int(v) for v in num_heads], list(depths)
        sr_ratios = [int(v) for v in sr_ratios]
        kinds = block_kinds(depths, sr_ratios)
        self._check_layout(depths, sr_ratios, kinds)
        norm_layer = _norm_layer(norm_layer)

        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dims = embed_dims
        self.depths = depths
        self.sr_ratios = sr_ratios
        self.num_stages = 4
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.features_only = features_only
        self.global_pool = check_global_pool(global_pool)
        self.dynamic_img_size = dynamic_img_size
        self._padded_sizes: dict[tuple[int, int], tuple[int, int]] = {}  # padded_size() answers
        self.grad_checkpointing = False

        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # stochastic depth decay rule
        for i in range(4):
            patch_embed = Stem(in_chans, embed_dims[0]) if i == 0 else PatchMerging(embed_dims[i - 1], embed_dims[i])
            first = sum(depths[:i])
            blocks = nn.ModuleList(
                Block(embed_dims[i], kinds[i][j], num_heads[i], mlp_ratios[i], qkv_bias, qk_scale, drop_rate,
                      attn_drop_rate, rates[first + j], norm_layer, sr_ratios[i]) for j in range(depths[i]))
            setattr(self, f"patch_embed{i + 1}", patch_embed)
            setattr(self, f"block{i + 1}", blocks)
            setattr(self, f"norm{i + 1}", norm_layer(embed_dims[i]))
        # Learned absolute position embedding of stage 1, initialised to 2-D sin-cos.
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // 4) ** 2, embed_dims[0]))

        stage_info = [dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f"norm{i + 1}") for i in range(4)]
        if features_only:
            self.out_indices = check_out_indices(out_indices, 4)
            self.feature_info = FeatureInfo(stage_info[i] for i in self.out_indices)
            self.num_classes = 0
        else:
            self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
            self.feature_info = FeatureInfo(stage_info)
        self.pretrained_cfg = {
            **DEFAULT_PRETRAINED_CFG, "fixed_input_size": True, "input_size": (in_chans, img_size, img_size),
            "crop_pct": 0.9,  # timm 0.3.4's vision_transformer._cfg(), which the authors' factories set
            "classifier": "head", "first_conv": "patch_embed1.conv.0.c", "num_classes": self.num_classes,
        }
        self.apply(_init_weights)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed(embed_dims[0], img_size // 4).unsqueeze(0))

    @classmethod
    def from_official_config(cls, config: Mapping, **overrides) -> SGFormer:
        """Build from a recorded config (``norm_layer`` as ``{"type": "LayerNorm", "eps": ...}``)."""
        return cls(**{**dict(config), **overrides})

    @staticmethod
    def _check_layout(depths, sr_ratios, kinds) -> None:
        """Follow the significance map as the authors' forward passes it along (one variable for
        the whole network): a hybrid block sets it, a reallocation or plain block clears it, and a
        hybrid block must never receive one (the authors' code fails there: it has no ``q``)."""
        if any(d < 0 for d in depths) or any(sr < 1 for sr in sr_ratios):
            raise ValueError(f"depths={list(depths)}, sr_ratios={list(sr_ratios)}: expected depths >= 0 and "
                             f"sr_ratios >= 1")
        pending = None  # the block whose map is waiting for the next block
        for i, stage in enumerate(kinds):
            for j, kind in enumerate(stage):
                if kind == "hybrid" and pending is not None:
                    raise ValueError(
                        f"depths={list(depths)}, sr_ratios={list(sr_ratios)}: the significance map of {pending} "
                        f"would reach block{i + 1}.{j}, a hybrid block, which cannot take one. Give a stage with "
                        f"sr > 1 an even depth unless the next stage has sr 1, and the last stage depth 1 if "
                        f"its sr > 1")
                pending = f"block{i + 1}.{j}" if kind == "hybrid" else None

    # ---- input sizes ----------------------------------------------------------------------
    def stage_grids(self, height: int, width: int) -> list[tuple[int, int]]:
        """(H_i, W_i) of each stage's tokens for an input of height × width: every stride-2 conv
        (padding 1) gives ⌈n/2⌉; the stem has two, each patch merging one."""
        def half(n: int) -> int:
            return (n + 1) // 2

        grids = [(half(half(height)), half(half(width)))]
        for _ in range(self.num_stages - 1):
            grids.append((half(grids[-1][0]), half(grids[-1][1])))
        return grids

    def grid_problems(self, height: int, width: int, count_tokens: bool = True) -> list[str]:
        """Why an input of height × width does not fit (empty if it does); ``count_tokens=False``
        leaves out the stage-1 token count that ``pos_embed`` fixes (resampled when dynamic)."""
        grids = self.stage_grids(height, width)
        problems = []
        tokens = (self.img_size // 4) ** 2
        if count_tokens and grids[0][0] * grids[0][1] != tokens:
            problems.append(f"the stage-1 grid {grids[0][0]}x{grids[0][1]} must have {tokens} tokens, the length "
                            f"of pos_embed (img_size {self.img_size})")
        for i, ((h, w), sr) in enumerate(zip(grids, self.sr_ratios)):
            if sr == 1 or not self.depths[i]:
                continue
            if h % WINDOW or w % WINDOW:
                problems.append(f"stage {i + 1} (sr {sr}) grid {h}x{w} must have both sides multiples of {WINDOW} "
                                f"(local-attention windows)")
            if h < sr or w < sr:
                problems.append(f"stage {i + 1} grid {h}x{w} is smaller than its reduction sr {sr}")
            if "reallocation" in self._kinds(i) and (h * w) % REALLOCATION_GRANULE[sr]:
                problems.append(f"stage {i + 1} (sr {sr}) grid {h}x{w} must have a multiple of "
                                f"{REALLOCATION_GRANULE[sr]} tokens (token reallocation)")
        return problems

    def _kinds(self, stage: int) -> list[str]:
        return [block.kind for block in getattr(self, f"block{stage + 1}")]

    def valid_input_sizes(self, limit: int = 1024) -> list[tuple[int, int]]:
        """The (height, width) inputs up to ``limit`` pixels a side that the model takes."""
        # Only stage-1 grids with the pos_embed token count can work: enumerate its divisor pairs.
        tokens = (self.img_size // 4) ** 2
        sizes = []
        for gh in range(1, tokens + 1):
            if tokens % gh or 4 * gh - 3 > limit or 4 * (tokens // gh) - 3 > limit:
                continue
            gw = tokens // gh
            if not self.grid_problems(4 * gh, 4 * gw):
                sizes.append((4 * gh, 4 * gw))
        return sizes

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """The smallest input (by area) of at least height × width whose stage grids the windows and
        token reallocation take (any stage-1 token count): what ``dynamic_img_size`` pads to."""
        key = (int(height), int(width))
        if key not in self._padded_sizes:
            # Stage-1 grids from ⌈H/4⌉ × ⌈W/4⌉ upwards; within 4·7·2³ cells of it every layout of
            # windows (7), strides (2³) and reallocation granules has a solution. Sides along which the
            # windows cannot fit are skipped first (a necessary condition; grid_problems decides).
            def side_fits(n: int) -> bool:
                grids = self.stage_grids(4 * n, 4 * n)
                return all(g % WINDOW == 0 and g >= sr for (g, _), sr, depth in zip(grids, self.sr_ratios, self.depths)
                           if sr > 1 and depth)

            gh, gw, span = -(-key[0] // 4), -(-key[1] // 4), 4 * WINDOW * 2 ** 3
            heights = [h for h in range(gh, gh + span + 1) if side_fits(h)]
            widths = [w for w in range(gw, gw + span + 1) if side_fits(w)]
            best = None
            for h in heights:
                for w in widths:
                    if best is not None and h * w >= best[0]:
                        break  # later widths only grow the area
                    if not self.grid_problems(4 * h, 4 * w, count_tokens=False):
                        best = (h * w, 4 * h, 4 * w)
                        break
            if best is None:
                raise ValueError(f"no input of at least {key[0]}x{key[1]} fits this SG-Former's windows and token "
                                 f"reallocation")
            self._padded_sizes[key] = best[1:]
        return self._padded_sizes[key]

    def check_input(self, x: torch.Tensor) -> None:
        if is_traced(x):
            return
        check_image_batch(x, self.in_chans)
        if self.dynamic_img_size:
            return  # any size: padded to padded_size() in forward
        height, width = x.shape[-2:]
        problems = self.grid_problems(height, width)
        if problems:
            spans = [f"{h - 3}-{h}x{w - 3}-{w}" for h, w in self.valid_input_sizes()]
            raise ValueError(f"input {height}x{width} does not fit this SG-Former (img_size {self.img_size}): "
                             f"{'; '.join(problems)}. It takes height x width in: {', '.join(spans) or 'none'} "
                             f"(e.g. {self.img_size}x{self.img_size}); resize or crop the input")

    # ---- forward --------------------------------------------------------------------------
    def forward_stages(self, x: torch.Tensor, out_indices: Sequence[int] = (0, 1, 2, 3)) -> list[torch.Tensor]:
        """The stage maps for ``out_indices``: the output of stage norm ``norm{i+1}``, (B, H_i·W_i, C_i)
        tokens, reshaped to (B, C_i, H_i, W_i) (strides 4, 8, 16, 32); with ``dynamic_img_size``
        cropped to the grids of the unpadded input."""
        levels = sorted(set(out_indices))
        return [self._stage_map(tokens, i, x) for tokens, i in zip(self._stage_tokens(x, levels), levels)]

    def _stage_map(self, tokens: tuple[torch.Tensor, int, int], stage: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``stage``'s (tokens, H, W) as its (B, C, H, W) map; with ``dynamic_img_size`` cropped to
        the grid of the unpadded input ``x``."""
        fmap = tokens_to_map(*tokens)
        if self.dynamic_img_size:
            h, w = self.stage_grids(*x.shape[-2:])[stage]
            fmap = fmap[:, :, :h, :w]
        return fmap

    def _stage_tokens(self, x: torch.Tensor, out_indices: Sequence[int]) -> list[tuple[torch.Tensor, int, int]]:
        """(tokens, H, W) after each stage norm in ``out_indices``, in stage order; stops after the last one."""
        self.check_input(x)
        pos_embed = self.pos_embed
        if self.dynamic_img_size:
            height, width = x.shape[-2:]
            padded = self.padded_size(height, width)
            x = F.pad(x, (0, padded[1] - width, 0, padded[0] - height))
            pos_embed = resample_pos_embed(pos_embed, *self.stage_grids(*padded)[0])
        outs, last = [], max(out_indices)
        for i in range(last + 1):
            x, H, W = getattr(self, f"patch_embed{i + 1}")(x)   # (B, N_i, C_i)
            if i == 0:
                # The authors add in place (x += pos_embed); out of place is the same sum and keeps
                # autograd and torch.compile simple. Added flat: any grid with (img_size/4)² tokens.
                x = x + pos_embed
            # The significance map flows from each hybrid block to the next block. The authors
            # never reset it between stages; in every layout they can run, a map leaving a stage
            # reaches only plain blocks (sr = 1), which ignore it, so restarting it is the same.
            significance = None
            for block in getattr(self, f"block{i + 1}"):
                if self.grad_checkpointing and torch.is_grad_enabled():
                    x, significance = checkpoint(block, x, H, W, significance, use_reentrant=False)
                else:
                    x, significance = block(x, H, W, significance)
            x = getattr(self, f"norm{i + 1}")(x)                # (B, N_i, C_i)
            if i in out_indices:
                outs.append((x, H, W))
            if i < last:
                x = tokens_to_map(x, H, W)                      # (B, C_i, H_i, W_i) for the next merge
        return outs

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's feature API over the 4 stage maps (see stvit/contract.py): ``(final features, maps)``
        or the maps alone, in stage order. ``norm`` changes nothing: every stage's own norm already
        made its map (``norm4`` is the last stage's). The final features are the tokens (B, N, C) of
        the last stage run (the last one, unless ``stop_early`` stops before it)."""
        check_output_fmt(output_fmt)
        take, last = feature_take_indices(self.num_stages, indices)
        stop = last if stop_early or intermediates_only else self.num_stages - 1
        levels = sorted(set(take) | {stop})
        tokens = dict(zip(levels, self._stage_tokens(x, levels)))
        intermediates = [self._stage_map(tokens[i], i, x) for i in sorted(set(take))]
        return intermediates if intermediates_only else (tokens[stop][0], intermediates)

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Keep what the stage maps ``indices`` need (timm's API): the stages after the last one go,
        and with them (or with ``prune_head``) the classifier; ``num_features`` is then that stage's
        width. ``prune_norm`` removes nothing: the stage norms make the maps."""
        take, last = feature_take_indices(self.num_stages, indices)
        if last < self.num_stages - 1:
            for i in range(last + 1, self.num_stages):
                for name in (f"patch_embed{i + 1}", f"block{i + 1}", f"norm{i + 1}"):
                    delattr(self, name)
            self.num_stages = last + 1
            self.feature_info = levels_up_to(self, last)
            prune_head = True  # the head is sized for the last stage
        if prune_head and not self.features_only:
            self.num_features = self.head_hidden_size = self.embed_dims[last]
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image -> (B, N_4, C_4) tokens of the last stage after ``norm4``."""
        return self._stage_tokens(x, (self.num_stages - 1,))[0][0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Mean over the tokens (no class token; none with ``global_pool=''``), then the classifier."""
        if self.global_pool == "avg":
            x = x.mean(dim=1)                                   # (B, C_4)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor):
        if self.features_only:
            return self.forward_intermediates(x, self.out_indices, intermediates_only=True)
        return self.forward_head(self.forward_features(x))

    # ---- timm-style API -------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        if self.features_only:
            raise ValueError("a features_only model has no classifier; build it with features_only=False")
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes`` (0: none); ``global_pool`` 'avg' or '' changes the
        pooling (None keeps it). (The authors' version reads a missing self.embed_dim and fails.)"""
        if self.features_only:
            raise ValueError("a features_only model has no classifier; build it with features_only=False")
        if global_pool is not None:
            self.global_pool = check_global_pool(global_pool)
        self.num_classes = num_classes
        head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        head.apply(_init_weights)
        self.head = self.placed(head)
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}

    def no_weight_decay(self) -> set[str]:
        """Nothing beyond 1-D parameters and biases, as the authors trained: their method names
        parameters that do not exist (pos_embed1..4, cls_token), so timm decayed ``pos_embed`` and
        the (1, run) ``f*`` merge weights along with every other ≥2-D weight."""
        return set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def repeated_blocks(self) -> list[nn.Module]:
        return [block for i in range(self.num_stages) for block in getattr(self, f"block{i + 1}")]


def _init_weights(m: nn.Module) -> None:
    # As the authors: truncated-normal Linear weights (the f* merges too), zero biases; unit
    # LayerNorm / GroupNorm; convs N(0, 2 / fan_out) with fan_out = k·k·C_out / groups.
    init_vit_weights(m)
    if isinstance(m, nn.GroupNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def resample_pos_embed(pos_embed: torch.Tensor, tokens: int, width: int | None = None) -> torch.Tensor:
    """(1, G², C) learned embedding over its square G×G grid -> bicubic to a g×g grid of ``tokens``
    = g² (or, with ``width``, to a ``tokens`` × ``width`` grid): (1, g_h·g_w, C)."""
    old = math.isqrt(pos_embed.shape[1])
    if width is None:
        new = math.isqrt(tokens)
        if new * new != tokens:
            raise ValueError(f"pos_embed of {pos_embed.shape[1]} tokens cannot be resampled to {tokens}: not square")
        size = (new, new)
    else:
        size = (tokens, width)
    if old * old != pos_embed.shape[1]:
        raise ValueError(f"pos_embed of {pos_embed.shape[1]} tokens is not a square grid")
    if size == (old, old):
        return pos_embed
    grid = pos_embed.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=size, mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, size[0] * size[1], -1).to(pos_embed.dtype)



def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: SGFormer) -> dict[str, torch.Tensor]:
    """The authors' release (timm checkpoint saver; ``stvit.load_checkpoint`` unwraps ``state_dict`` /
    ``state_dict_ema`` and ``module.`` prefixes, and a features-only model ignores the head) -> this
    model's state dict. Their keys are already ours; what is left is resampling ``pos_embed`` to
    another ``img_size``."""
    out = dict(state_dict)
    value = out.get("pos_embed")
    if value is not None and hasattr(model, "pos_embed") and value.shape[1] != model.pos_embed.shape[1]:
        out["pos_embed"] = resample_pos_embed(value, model.pos_embed.shape[1])
    return out


# ----------------------------------------------------------------------------------------------
# Registered variants (the authors' factories sgformer_s / _m / _b, and ours)
# ----------------------------------------------------------------------------------------------
_LN = {"type": "LayerNorm", "eps": 1e-6}
SGFORMER_S_CONFIG = dict(embed_dims=[64, 128, 256, 512], num_heads=[2, 4, 8, 16], mlp_ratios=[4, 4, 4, 4],
                         qkv_bias=True, norm_layer=_LN, depths=[2, 4, 16, 1], sr_ratios=[8, 4, 2, 1])
SGFORMER_M_CONFIG = dict(embed_dims=[64, 128, 256, 512], num_heads=[2, 4, 8, 16], mlp_ratios=[4, 4, 4, 4],
                         qkv_bias=True, norm_layer=_LN, depths=[2, 6, 28, 2], sr_ratios=[8, 4, 2, 1])
SGFORMER_B_CONFIG = dict(embed_dims=[96, 192, 384, 768], num_heads=[4, 6, 12, 24], mlp_ratios=[4, 4, 4, 4],
                         qkv_bias=True, norm_layer=_LN, depths=[4, 6, 24, 2], sr_ratios=[8, 4, 2, 1])
# Ours, for demos and tests on a CPU: 56-px input, 14x14 stage-1 grid. Stage 1 reallocates at
# sr 4 (14x14 = 196 tokens -> 1 + 7 + 7 merged tokens); stage 2 (7x7) has one hybrid block, whose
# map reaches only the plain blocks of stages 3 and 4 (4x4 and 2x2 grids, too small for windows).
SGFORMER_TINY_CONFIG = dict(img_size=56, embed_dims=[32, 64, 128, 192], num_heads=[2, 4, 4, 6],
                            mlp_ratios=[4, 4, 4, 4], qkv_bias=True, norm_layer=_LN, depths=[2, 1, 2, 1],
                            sr_ratios=[4, 2, 1, 1])

register_family("sgformer", SGFormer, checkpoint_filter=checkpoint_filter_fn,
                paper="SG-Former: Self-guided Transformer with Evolving Token Reallocation (Ren et al., ICCV 2023)",
                verified_against="OliverRensu/SG-Former@b982803 (float64 goldens)")

# No registration needs a pretrained_cfg of its own: SGFormer.__init__ sets fixed_input_size,
# input_size (from img_size), crop_pct 0.9 and first_conv for every variant.
# Training recipe: the authors' README commands and main.py defaults (timm 0.3.4 train script),
# given as differences from train's paper preset (STViT's recipe):
#   lr 1e-3 at 8 GPUs x 128 = 1024 global batch (README), the same as ours -> not listed;
#   warmup_epochs 20 (README, main.py default); model_ema on, decay 0.99992 (main.py defaults,
#   README); drop_path 0.1 / 0.2 / 0.4 for S / M / B (README); repeats 1 (main.py has no repeated
#   augmentation sampler); crop_pct 0.9 (timm 0.3.4 vision_transformer._cfg, the default_cfg the
#   factories set; main.py's --crop-pct defaults to None = the model's). min_lr 1e-5, warmup_lr
#   1e-6, wd 0.05, mixup 0.8, cutmix 1.0, smoothing 0.1, aa rand-m9-mstd0.5-inc1, reprob 0.25,
#   no clip_grad, 300 epochs are main.py's defaults and equal ours; its --train-interpolation
#   default is "random" (ours bicubic). Not expressible here: timm's 10 cooldown epochs at min_lr
#   after the 300 (main.py --cooldown-epochs 10).
_RECIPE = dict(warmup_epochs=20, model_ema=True, model_ema_decay=0.99992, repeats=1, crop_pct=0.9,
               train_interpolation="random")
# Paper numbers (ImageNet-1K, 224²): top-1 83.2 / 84.1 / 84.7 and GFLOPs 4.8 / 7.5 / 15.6 for S / M / B
# (the paper's ImageNet table; 84.7 also in its abstract). Its table rounds parameters to
# 23 / 39 / 78 M; params_m here is the exact count of the authors' models (22,545,981 /
# 38,689,316 / 77,950,293) to one decimal.


@register_model("sgformer", recipe=dict(_RECIPE, drop_path=0.1),
                paper=dict(params_m=22.5, macs_g=4.8, top1=83.2))
def sgformer_s(**overrides) -> SGFormer:
    return SGFormer(**{**SGFORMER_S_CONFIG, **overrides})


@register_model("sgformer", recipe=dict(_RECIPE, drop_path=0.2),
                paper=dict(params_m=38.7, macs_g=7.5, top1=84.1))
def sgformer_m(**overrides) -> SGFormer:
    return SGFormer(**{**SGFORMER_M_CONFIG, **overrides})


@register_model("sgformer", recipe=dict(_RECIPE, drop_path=0.4),
                paper=dict(params_m=78.0, macs_g=15.6, top1=84.7))
def sgformer_b(**overrides) -> SGFormer:
    return SGFormer(**{**SGFORMER_B_CONFIG, **overrides})


@register_model("sgformer", paper=dict(params_m=None, macs_g=None, top1=None),
                recipe=dict(_RECIPE, drop_path=0.0),  # small and briefly trained: no stochastic depth
                # The demo's lr (peak 4e-3 at batch 64, tuned for STViT) left this model near chance
                # (22 % val top-1 after 5 epochs, falling back to 17 %); peak 1e-3 reached 91.4 %.
                demo=dict(input_size=56, lr=0.016))
def sgformer_tiny(**overrides) -> SGFormer:
    return SGFormer(**{**SGFORMER_TINY_CONFIG, **overrides})
