"""LVT: the Lite Vision Transformer (Yang et al., "Lite Vision Transformer with Enhanced
Self-Attention", CVPR 2022), the ``lvt_cls`` classifier.

Four stages of channels-last (B, H, W, C) maps, strides 4/8/16/32 (paper Fig. 2):

- stage 1 uses **Convolutional Self-Attention** (CSA, paper Sec. 3.1): every 2×2 cell of the map
  predicts a 9×9 attention matrix between the 3×3 neighbourhood slots around it; values are the
  neighbours, each transformed by its own slot's C×C matrix, and the results are folded back onto
  the map (a convolution whose kernel is chosen per location by attention);
- stages 2–4 use **Recursive Atrous Self-Attention** (RASA, Sec. 3.2): spatial-reduction attention
  whose queries see multi-scale context through a depthwise 3×3 convolution at several dilation
  rates (one shared kernel), applied ``r_num`` times with a residual between recursions;
- then VOLO-style class-attention "post layers" on the stage-4 tokens with a class token, a class
  head and an auxiliary per-token head (token labelling, Jiang et al. 2021), and MixToken in training.

Semantics kept from the authors' code (github Chenglin-Yang/LVT@c561897, classification/models/
lvt.py and lvt_cls.py; the float64 goldens check each):
- every map between modules is channels-last; convolutions permute to NCHW and back;
- CSA's attention comes from a ceil-mode 2×2 average pool (the last window of an odd side averages
  only in-image pixels); out-of-image neighbour slots are zero values that still take part in the
  9-way softmax; the fold sums overlapping contributions without normalising them;
- RASA: the SiLU of each dilation rate is taken before the sum; x0 is ``norm1(x)``; each recursion
  adds the previous recursion's input; with ``r_num > 1`` every step, the last included, ends in a
  SiLU (with ``r_num == 1`` there is none); all weights are shared across recursions;
- class attention reads keys/values from all tokens (class token included) and only updates the
  class token; the eval logits are ``x_cls + 0.5 * max over tokens of x_aux`` (a max per class);
- the post-layer list receives ``qkv_bias`` / ``attn_drop_rate`` only in its first layer (the
  official comprehension pops them from its kwargs); the rest get the defaults (False / 0).

Deviations, none of which changes a number where the official code runs:
- ``num_classes`` and ``drop_path_rate`` are honoured (the official ``lvt``/``lvt_cls`` constructors
  hard-code the architecture and silently drop them, so the README's ``--drop-path 0.1`` had no
  effect). ``drop_rate`` is accepted and unused, as in the official code;
- MixToken is not drawn inside the model: ``model(x, mix_box=box)`` takes the box (stage-4 grid
  units) and :meth:`LVT.training_loss` draws it from a ``random.Random``, with the official
  ``rand_bbox`` arithmetic (see :func:`rand_bbox`);
- the mix works at any input size the eval path takes: the box lives on the real stage-4 grid
  (⌈H/32⌉-ish, the chain of ceilings), where the official code reshapes to (H1//8, W1//8) and so
  fails unless each input side is in (32k−4, 32k]; on those sizes both grids are the same.

Module and parameter names are the official state dict's keys, one to one. The file reads top to
bottom: the attention modules, the blocks, the network, the loss, the registered variants.
"""

from __future__ import annotations

import ast
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..contract import (DropPath, FeatureInfo, ModelBase, check_fixed_pooling, check_image_batch, check_out_indices,
                        check_output_fmt, feature_take_indices, init_vit_weights, is_traced, levels_up_to,
                        soft_target_cross_entropy)
from ..registry import DEFAULT_PRETRAINED_CFG, register_family, register_model

CSA_KERNEL = 3   # CSA's neighbourhood is fixed at 3×3 ...
CSA_STRIDE = 2   # ... around each cell of a stride-2 grid (kernel 3, stride 2, padding 1)
AUX_WEIGHT = 0.5  # VOLO / LVT main.py ``--dense-weight`` default: the token-label loss weight
CLS_WEIGHT = 1.0  # ``--cls-weight`` default
EVAL_AUX_WEIGHT = 0.5  # eval logits = x_cls + 0.5 * max_tokens(x_aux) (lvt_cls.py forward)


# ---- configuration helpers --------------------------------------------------------------------

def build_activation(spec) -> nn.Module:
    """The activation module the official ``eval(act_layer)`` would build, without ``eval``.

    Accepts a string such as ``'nn.SiLU(True)'`` or ``'nn.GELU()'`` (a ``torch.nn`` module class
    called with literal arguments), an ``nn.Module`` class, or a module instance.
    """
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        return spec()
    if isinstance(spec, str):
        try:
            call = ast.parse(spec.strip(), mode="eval").body
            if isinstance(call, (ast.Attribute, ast.Name)):  # 'nn.SiLU' without a call
                call = ast.Call(func=call, args=[], keywords=[])
            if isinstance(call, ast.Call):
                name = call.func.attr if isinstance(call.func, ast.Attribute) else call.func.id
                cls = getattr(nn, name, None)
                if isinstance(cls, type) and issubclass(cls, nn.Module):
                    args = [ast.literal_eval(a) for a in call.args]
                    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
                    return cls(*args, **kwargs)
        except (SyntaxError, ValueError, AttributeError, TypeError):
            pass
    raise ValueError(f"rasa_cfg act_layer={spec!r}: expected a torch.nn activation such as 'nn.SiLU(True)', "
                     f"an nn.Module class or an instance")


@dataclass(frozen=True)
class RasaConfig:
    """The official ``rasa_cfg`` (configs/lvt_imagenet.py): dilation rates of the query's depthwise
    conv (None: no conv), its activation, its init ('kaiming' or 'dirac') and the recursion count."""

    atrous_rates: tuple[int, ...] | None = (1, 3, 5)
    act_layer: object = "nn.SiLU(True)"
    init: str = "kaiming"
    r_num: int = 2

    @classmethod
    def parse(cls, cfg) -> RasaConfig | None:
        """A dict (the goldens' form), an attribute object (the official mmcv Config) or None."""
        if cfg is None or isinstance(cfg, RasaConfig):
            return cfg
        get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d: getattr(cfg, k, d))
        rates = get("atrous_rates", None)
        out = cls(tuple(int(r) for r in rates) if rates is not None else None,
                  get("act_layer", "nn.SiLU(True)"), get("init", "kaiming"), int(get("r_num", 1)))
        if out.r_num < 1:
            raise ValueError(f"rasa_cfg r_num={out.r_num}: RASA needs at least one recursion (r_num >= 1)")
        if out.atrous_rates is not None and (not out.atrous_rates or min(out.atrous_rates) < 1):
            raise ValueError(f"rasa_cfg atrous_rates={out.atrous_rates}: expected positive dilation rates or None")
        if out.init not in ("kaiming", "dirac"):
            raise ValueError(f"rasa_cfg init={out.init!r}: expected 'kaiming' or 'dirac'")
        return out


def stage_sizes(height: int, width: int, num_stages: int) -> list[tuple[int, int]]:
    """(H_i, W_i) of each stage: the 7×7/s4/p3 stem gives ⌈H/4⌉, each 3×3/s2/p1 embed halves, rounding up."""
    sizes = [(-(-height // 4), -(-width // 4))]
    for _ in range(num_stages - 1):
        h, w = sizes[-1]
        sizes.append((-(-h // 2), -(-w // 2)))
    return sizes


# ---- attention ----------------------------------------------------------------------------------

def gather_slots(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H, W, C) -> (9, B, h, w, C): the 3×3 neighbourhood (padding 1, stride 2) of each cell,
    slot kk = 3·ki + kj row-major, zeros outside the image (``F.unfold(x, 3, padding=1, stride=2)``).

    Nine strided views of the zero-padded map: cell (a, b)'s slot (ki, kj) is pixel
    (2a − 1 + ki, 2b − 1 + kj), i.e. padded pixel (2a + ki, 2b + kj). Channels stay innermost."""
    H, W = x.shape[1:3]
    xp = F.pad(x, (0, 0, 1, 2 * w - W, 1, 2 * h - H))                        # (B, 2h + 1, 2w + 1, C)
    return torch.stack([xp[:, ki:ki + 2 * h:2, kj:kj + 2 * w:2]
                        for ki in range(CSA_KERNEL) for kj in range(CSA_KERNEL)])


def _fold_axis(slots: torch.Tensor, dim: int, slot_dim: int) -> torch.Tensor:
    """One axis of :func:`scatter_slots`: ``slots`` has n cells along ``dim`` and their 3 slots of
    this axis along ``slot_dim`` (> ``dim``); returns the 2n + 2 padded positions along ``dim``.

    Slot k of cell a lands on padded position 2a + k: even positions 2p take slot 0 of cell p and
    slot 2 of cell p − 1, odd positions 2p + 1 take slot 1 of cell p (the last odd position, 2n + 1,
    is outside every map and stays zero)."""
    def placed(k: int, first: int) -> torch.Tensor:  # slot k's n cells at positions first..first+n-1 of n+1
        part = slots.select(slot_dim, k)
        return F.pad(part, [0, 0] * (part.ndim - 1 - dim) + [first, 1 - first])

    even = placed(0, 0) + placed(2, 1)
    odd = placed(1, 0)
    return torch.stack([even, odd], dim=dim + 1).flatten(dim, dim + 1)      # interleaved: n + 1 pairs


def scatter_slots(slots: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The adjoint of :func:`gather_slots` (``F.fold(..., (H, W), 3, padding=1, stride=2)``):
    (B, h, w, 3, 3, C) slots -> (B, H, W, C), summing overlapping slots without normalising and
    dropping those outside the image.

    Sorted by the parity of the padded position, the fold has no overlaps left to resolve: each
    output pixel is a sum of at most four shifted slot maps (see :func:`_fold_axis`), rows first,
    then columns. Channels stay innermost, so the fold is one pass over the map without strided
    writes: nine strided in-place adds into an NCHW buffer were compiled LVT's slowest kernel (a
    third of its step), and inductor miscompiles ``F.fold`` of a permuted input on CPU."""
    rows = _fold_axis(slots, 1, 3)                                            # (B, 2h + 2, w, 3, C)
    out = _fold_axis(rows, 2, 3)                                              # (B, 2h + 2, 2w + 2, C)
    return out[:, 1:H + 1, 1:W + 1]


torch.fx.wrap("scatter_slots")  # torch.fx records it as one call (it adds into slices of a new tensor)


class CSA(nn.Module):
    """Convolutional Self-Attention (paper Sec. 3.1, official ``CSA``), on a (B, H, W, C) map.

    Around each cell of the stride-2 grid (h×w = ⌈H/2⌉×⌈W/2⌉), the 3×3 neighbourhood has 9 slots.
    Attention row i (the slot written) over column j (the neighbour read) is predicted from the
    cell's 2×2 average; neighbour j's value is its vector times slot j's own C×C matrix (the
    official 9-group 1×1 conv); the 9 outputs per cell are folded back onto the map.
    """

    def __init__(self, in_dim: int, out_dim: int, num_heads: int, qkv_bias: bool = False,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if in_dim != out_dim:
            raise ValueError(f"CSA needs equal input and output dims, got {in_dim} and {out_dim}")
        if out_dim % num_heads:
            raise ValueError(f"CSA: dim {out_dim} is not divisible by num_heads {num_heads}")
        if qkv_bias:  # the official code asserts it: the slot transforms have no bias
            raise ValueError("CSA (sa_layers 'csa') has no bias in its value transform: qkv_bias must be False")
        k2 = CSA_KERNEL * CSA_KERNEL
        self.dim, self.num_heads = out_dim, num_heads
        self.scale = qk_scale or (out_dim // num_heads) ** -0.5
        self.attn = nn.Linear(in_dim, k2 * k2 * num_heads)  # channel head·81 + i·9 + j -> attn[head, i, j]
        self.attn_drop = nn.Dropout(attn_drop)
        # Named ``weight`` as in the official state dict (``attn.weight.weight``): a 9-group 1×1 conv,
        # i.e. one C×C matrix per slot; its (9C, C, 1, 1) weight is read as (slot, C_out, C_in).
        self.weight = nn.Conv2d(k2 * out_dim, k2 * out_dim, 1, groups=k2, bias=False)
        nn.init.normal_(self.weight.weight, 0.0, math.sqrt(2.0 / (k2 * out_dim)))
        self.proj = nn.Linear(out_dim, out_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        k2, heads = CSA_KERNEL * CSA_KERNEL, self.num_heads

        # Attention per cell: (B, heads, L, 9 written slots i, 9 read neighbours j), softmax over j.
        pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), CSA_STRIDE, CSA_STRIDE, ceil_mode=True)  # (B, C, h, w)
        h, w = pooled.shape[-2:]
        L = h * w
        attn = self.attn(pooled.permute(0, 2, 3, 1).reshape(B, L, C))          # (B, L, heads·81)
        attn = attn.view(B, L, heads, k2, k2).transpose(1, 2) * self.scale
        attn = self.attn_drop(attn.softmax(dim=-1))

        # Values: the 3×3 neighbours (zeros outside the image), each through its slot's matrix.
        patches = gather_slots(x, h, w).reshape(k2, B * L, C)                  # (9, B·L, C_in)
        slot_weight = self.weight.weight.view(k2, C, C)                         # (slot, C_out, C_in)
        v = torch.bmm(patches, slot_weight.transpose(1, 2))                     # (9, B·L, C_out)
        v = v.view(k2, B, L, heads, C // heads).permute(1, 3, 2, 0, 4)         # (B, heads, L, 9, d)

        # Each cell writes 9 slots; they are summed onto the (H, W) map (outside slots dropped).
        out = attn @ v                                                          # (B, heads, L, 9 i, d)
        out = out.permute(0, 2, 3, 1, 4).reshape(B, h, w, CSA_KERNEL, CSA_KERNEL, C)  # channel head·d + e
        return self.proj_drop(self.proj(scatter_slots(out, H, W)))


# From this dilation rate on, DilatedQueryConv pads the map itself on a CPU: oneDNN's depthwise kernels
# take at most 4 rows and columns of implicit zero padding with AVX2 (and rate 5 not on a 7² map with
# AVX-512); past that it computes the conv as im2col + GEMM or a generic kernel, 10-60× slower.
PAD_EXPLICITLY_FROM_RATE = 5


class DilatedQueryConv(nn.Module):
    """RASA's atrous query context (official ``ds_conv2d``): Σ_r act(depthwise3×3(q, dilation r)),
    on NCHW, with one (C, 1, 3, 3) kernel shared by every rate; the activation is applied per rate."""

    def __init__(self, dim: int, rates: Sequence[int], act_layer="nn.SiLU(True)", bias: bool = False,
                 init: str = "kaiming"):
        super().__init__()
        self.rates = tuple(rates)
        self.dim = dim  # the conv's groups: a plain int, which torch.fx traces as a constant
        self.weight = nn.Parameter(torch.empty(dim, 1, 3, 3))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.act = build_activation(act_layer)
        if init == "dirac":
            nn.init.dirac_(self.weight, dim)
            if self.bias is not None:
                nn.init.zeros_(self.bias)
        else:  # 'kaiming', as the official
            nn.init.kaiming_uniform_(self.weight)
            if self.bias is not None:
                bound = math.sqrt(1.0 / 9)  # sqrt(groups / (9 · in_planes)) with groups == in_planes
                nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        out = 0
        for r in self.rates:
            out = out + self.act(self.conv(q, r))
        return out

    def conv(self, q: torch.Tensor, rate: int) -> torch.Tensor:
        """The depthwise conv at one rate, zero padding ``rate`` keeping the size; on a CPU from
        ``PAD_EXPLICITLY_FROM_RATE`` on, the same conv of the map padded beforehand (bench/RESULTS.md)."""
        padding = rate
        if rate >= PAD_EXPLICITLY_FROM_RATE and isinstance(q, torch.Tensor) and q.device.type == "cpu":
            q, padding = F.pad(q, (rate, rate, rate, rate)), 0
        return F.conv2d(q, self.weight, self.bias, padding=padding, dilation=rate, groups=self.dim)

    def extra_repr(self) -> str:
        return f"rates={self.rates}"


class Attention(nn.Module):
    """Spatial-reduction attention (official ``Attention``); with a ``rasa_cfg`` it is RASA (Sec. 3.2).

    One inner step: q = Linear(x) (through the atrous conv under RASA); k, v = Linear of x after an
    optional sr×sr stride-sr conv + LayerNorm (leftover rows/columns dropped); softmax(q kᵀ/√d) v;
    proj. RASA repeats it ``r_num`` times on ``previous output + previous input``, with shared weights.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, rasa_cfg: RasaConfig | None = None,
                 sr_ratio: int = 1):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.sr_ratio = dim, num_heads, sr_ratio
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.rasa_cfg = rasa_cfg
        self.attn_drop = attn_drop
        # Registration order = the official state dict's order.
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)   # channels [0, C) are k, [C, 2C) are v
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
        if rasa_cfg is not None and rasa_cfg.atrous_rates is not None:
            self.ds = DilatedQueryConv(dim, rasa_cfg.atrous_rates, rasa_cfg.act_layer, bias=qkv_bias,
                                       init=rasa_cfg.init)

    def inner_attention(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        heads, d = self.num_heads, C // self.num_heads
        q = self.q(x)                                                           # (B, H, W, C)
        if hasattr(self, "ds"):
            q = self.ds(q.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)              # multi-scale context
        q = q.reshape(B, H * W, heads, d).transpose(1, 2)                       # (B, heads, N, d)

        if self.sr_ratio > 1:
            x = self.norm(self.sr(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))   # (B, H/sr, W/sr, C)
        k, v = self.kv(x).reshape(B, -1, 2, heads, d).permute(2, 0, 3, 1, 4)    # each (B, heads, M, d)

        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                             scale=self.scale)                  # (B, heads, N, d)
        out = out.transpose(1, 2).reshape(B, H, W, C)
        return self.proj_drop(self.proj(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rasa_cfg is None:  # plain spatial-reduction attention ('sa')
            return self.inner_attention(x)
        r_num = self.rasa_cfg.r_num
        x_prev = x                 # norm1(block input)
        y = self.inner_attention(x)
        if r_num > 1:
            y = F.silu(y)
        for _ in range(r_num - 1):  # recursion: the next input is this output plus the previous input
            x_prev = y + x_prev
            y = F.silu(self.inner_attention(x_prev))
        return y


# ---- blocks -------------------------------------------------------------------------------------

class Mlp(nn.Module):
    """The backbone MLP (official lvt.py ``Mlp``) on a (B, H, W, C) map.

    ``with_depconv``: 1×1 conv ``fc1`` -> depthwise 3×3 ``depconv`` -> GELU -> 1×1 conv ``fc2``
    (no activation between fc1 and depconv); otherwise Linear -> GELU -> Linear.
    """

    def __init__(self, dim: int, hidden: int, with_depconv: bool, drop: float = 0.0):
        super().__init__()
        self.with_depconv = with_depconv
        if with_depconv:
            self.fc1 = nn.Conv2d(dim, hidden, 1)
            self.depconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
            self.fc2 = nn.Conv2d(hidden, dim, 1)
        else:
            self.fc1 = nn.Linear(dim, hidden)
            self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.with_depconv:
            return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
        x = x.permute(0, 3, 1, 2)
        x = self.drop(self.act(self.depconv(self.fc1(x))))
        return self.drop(self.fc2(x)).permute(0, 2, 3, 1)


class Block(nn.Module):
    """Pre-norm transformer block (official ``Transformer_block``): x + attn(norm1 x), x + mlp(norm2 x)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sa_layer: str, rasa_cfg: RasaConfig | None,
                 sr_ratio: int, qkv_bias: bool, attn_drop: float, drop_path: float, with_depconv: bool,
                 qk_scale: float | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if sa_layer == "csa":      # CSA ignores sr_ratio
            self.attn = CSA(dim, dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop)
        elif sa_layer == "rasa":   # without a rasa_cfg this quietly is plain 'sa', as in the official code
            self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, rasa_cfg=rasa_cfg, sr_ratio=sr_ratio)
        elif sa_layer == "sa":
            self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, rasa_cfg=None, sr_ratio=sr_ratio)
        else:
            raise ValueError(f"sa_layers entry {sa_layer!r}: expected 'csa', 'rasa' or 'sa'")
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), with_depconv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Overlapping patch embedding (official ``OverlapPatchEmbed``): conv (+bias) then LayerNorm.

    Stage 1: 7×7, stride 4, padding 3 on the NCHW image; later stages: 3×3, stride 2, padding 1 on
    the channels-last map. Output channels-last.
    """

    def __init__(self, in_chans: int, dim: int, first: bool):
        super().__init__()
        self.first = first
        k, s = (7, 4) if first else (3, 2)
        self.proj = nn.Conv2d(in_chans, dim, k, stride=s, padding=k // 2)
        self.norm = nn.LayerNorm(dim)
        fan_out = k * k * dim  # the official init: normal(0, sqrt(2 / fan_out)), bias 0
        nn.init.normal_(self.proj.weight, 0.0, math.sqrt(2.0 / fan_out))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.first:
            x = x.permute(0, 3, 1, 2)
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class Blocks(nn.Sequential):
    """A stage's blocks; recomputes their activations in backward when ``grad_checkpointing`` is set."""

    grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class Stage(nn.Sequential):
    """``[patch embed, blocks]``: a Sequential so the keys are the official ``backbone.i.0`` / ``backbone.i.1``."""

    def __init__(self, patch_embed: PatchEmbed, blocks: Blocks):
        super().__init__(patch_embed, blocks)

    @property
    def patch_embed(self) -> PatchEmbed:
        return self[0]

    @property
    def blocks(self) -> Blocks:
        return self[1]


class ClassAttention(nn.Module):
    """Class attention (VOLO, official lvt_cls.py ``ClassAttention``) on (B, 1 + N, C) tokens.

    Only the class token queries (q scaled by head_dim^-0.5); keys and values come from every
    token, the class token included. Returns the new class embedding (B, 1, C).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        inner = self.head_dim * num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.attn_drop = attn_drop
        self.kv = nn.Linear(dim, inner * 2, bias=qkv_bias)
        self.q = nn.Linear(dim, inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = self.q(x[:, :1]).reshape(B, self.num_heads, 1, self.head_dim)
        cls = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                             scale=self.scale)                   # (B, heads, 1, d)
        return self.proj(cls.transpose(1, 2).reshape(B, 1, -1))


class PostMlp(nn.Module):
    """lvt_cls.py ``Mlp``: Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClassBlock(nn.Module):
    """Post layer ``'ca'`` (official ``ClassBlock``): cls += CA(norm1(all)); cls += Mlp(norm2(cls));
    the patch tokens pass through unchanged."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False,
                 qk_scale: float | None = None, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ClassAttention(dim, num_heads, qkv_bias, qk_scale, attn_drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = PostMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = x[:, :1] + self.drop_path(self.attn(self.norm1(x)))
        cls = cls + self.drop_path(self.mlp(self.norm2(cls)))
        return torch.cat([cls, x[:, 1:]], dim=1)


# ---- MixToken -----------------------------------------------------------------------------------

def rand_bbox(rows: int, cols: int, lam: float, cx: int, cy: int) -> tuple[int, int, int, int]:
    """The official ``rand_bbox`` arithmetic (lvt_cls.py), with the centre passed in.

    ``rows`` × ``cols`` is the stage-4 grid (the official names them "W" and "H" but the box is
    rows × columns); ``cx`` ∈ [0, rows), ``cy`` ∈ [0, cols). The side is ``int(side·√(1−λ))``
    rounded down to even by ``//2`` (unless clipped), so grids smaller than 3 give an empty box.
    Returns ``(bbx1, bby1, bbx2, bby2)``: rows ``bbx1:bbx2``, columns ``bby1:bby2``.
    """
    cut_rat = math.sqrt(1.0 - lam)
    cut_r, cut_c = int(rows * cut_rat), int(cols * cut_rat)

    def clip(v: int, hi: int) -> int:
        return min(max(v, 0), hi)

    return (clip(cx - cut_r // 2, rows), clip(cy - cut_c // 2, cols),
            clip(cx + cut_r // 2, rows), clip(cy + cut_c // 2, cols))


def draw_mix_box(rows: int, cols: int, rng: random.Random) -> tuple[int, int, int, int]:
    """λ ~ Beta(1, 1), then the centre row, then the centre column (the official draw order), from ``rng``."""
    lam = rng.betavariate(1.0, 1.0)
    cx = rng.randrange(rows)
    cy = rng.randrange(cols)
    return rand_bbox(rows, cols, lam, cx, cy)


def _box_mask(box, rows: int, cols: int, scale: int, device) -> torch.Tensor:
    """(rows, cols, 1) bool: True inside rows scale·bbx1:scale·bbx2, columns scale·bby1:scale·bby2.

    Built by comparison, so a box given as a tensor does not specialise a compiled graph."""
    r1, c1, r2, c2 = (torch.as_tensor(box, device=device) * scale).unbind()
    r = torch.arange(rows, device=device)
    c = torch.arange(cols, device=device)
    return (((r >= r1) & (r < r2))[:, None] & ((c >= c1) & (c < c2))[None, :])[..., None]


def mix_tokens(x: torch.Tensor, box, scale: int) -> torch.Tensor:
    """x (B, H, W, C) with the box region taken from the batch reversed (``x.flip(0)``); the gradient
    reaches both sources. Applying it twice restores x, so it also reverses the mix."""
    mask = _box_mask(box, x.shape[1], x.shape[2], scale, x.device)
    return torch.where(mask, x.flip(0), x)


# ---- the network --------------------------------------------------------------------------------

class LVT(ModelBase):
    """Lite Vision Transformer with class-attention post layers (official ``lvt_cls``).

    Keywords are the official constructor's (``layers``, ``embed_dims``, ``num_heads``,
    ``mlp_ratios``, ``mlp_depconv``, ``sr_ratios``, ``sa_layers`` ('csa' | 'rasa' | 'sa'),
    ``rasa_cfg`` (dict, attribute object or None), ``post_layers`` (list of 'ca'), ``num_classes``,
    ``in_chans``, ``qkv_bias``, ``qk_scale``, ``drop_rate`` (unused, as officially),
    ``attn_drop_rate``, ``drop_path_rate``, ``with_cls_head``).

    ``forward(x)`` returns the eval logits in any mode; ``forward(x, mix_box=box)`` is the official
    training forward with that MixToken box and returns ``(x_cls, x_aux)`` (mix reversed in x_aux);
    an empty box ``(0, 0, 0, 0)`` gives the unmixed heads. ``with_cls_head=False`` is the official
    backbone (``lvt(with_cls_head=False)``): 4 NCHW stage maps, each after its ``downstream_norms``.
    ``features_only=True``: the stage maps selected by ``out_indices`` (strides 4/8/16/32, NCHW,
    no norm), no post layers or heads.

    The feature levels of ``forward_intermediates`` are the 4 stage maps (NCHW); ``head_hidden_size``
    is the class token's width (the pre-logits, as timm's VOLO).
    """

    # stvit.optimize's CPU compile without inductor's layout optimisation: the blocks keep (B, H, W, C)
    # token maps and view them as NCHW only around their convs; the pass, which picks one layout for a
    # graph with convolutions, made the compiled forward 13-15 % slower (bench/RESULTS.md).
    inference_compile_options = {"layout_optimization": False}

    def __init__(self, layers: Sequence[int] = (2, 2, 2, 2), embed_dims: Sequence[int] = (64, 64, 160, 256),
                 num_heads: Sequence[int] = (2, 2, 5, 8), mlp_ratios: Sequence[float] = (4, 8, 4, 4),
                 mlp_depconv: Sequence[bool] = (False, True, True, True), sr_ratios: Sequence[int] = (8, 4, 2, 1),
                 sa_layers: Sequence[str] = ("csa", "rasa", "rasa", "rasa"), rasa_cfg=None,
                 post_layers: Sequence[str] = ("ca", "ca"), num_classes: int = 1000, in_chans: int = 3,
                 qkv_bias: bool = False, qk_scale: float | None = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, with_cls_head: bool = True,
                 features_only: bool = False, out_indices: Sequence[int] = (0, 1, 2, 3), patch_size: int = 4):
        super().__init__()
        layers = [int(n) for n in layers]
        S = len(layers)
        per_stage = dict(embed_dims=embed_dims, num_heads=num_heads, mlp_ratios=mlp_ratios,
                         mlp_depconv=mlp_depconv, sr_ratios=sr_ratios, sa_layers=sa_layers)
        for name, value in per_stage.items():
            if len(value) != S:
                raise ValueError(f"{name} has {len(value)} entries but layers has {S} stages")
        if in_chans < 1:
            raise ValueError(f"in_chans={in_chans}: expected a positive number of input channels")
        rasa_cfg = RasaConfig.parse(rasa_cfg)
        for p in post_layers:
            if p != "ca":
                raise ValueError(f"post_layers entry {p!r}: only 'ca' (class attention) exists")

        self.in_chans, self.num_classes = in_chans, num_classes
        self.embed_dims, self.num_heads = list(embed_dims), list(num_heads)
        self.sr_ratios, self.sa_layers = [int(r) for r in sr_ratios], list(sa_layers)
        self.rasa_cfg = rasa_cfg
        self.with_cls_head, self.features_only = with_cls_head, features_only
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.mix_scale = 2 ** (S - 1)  # stage-1 tokens per stage-4 token along a side (official pooling_scale 8)
        self.drop_rate = drop_rate     # accepted, unused (as in the official code); so is patch_size
        self.grad_checkpointing = False

        # Registration order = the official state dict's: cls_token, backbone, norm, head, post_network, aux_head.
        has_head = with_cls_head and not features_only
        if has_head:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[-1]))

        # Stochastic depth grows linearly over the backbone blocks (official lite_vision_transformer).
        total = sum(layers)
        stages = []
        for i in range(S):
            blocks = []
            for j in range(layers[i]):
                rate = drop_path_rate * (sum(layers[:i]) + j) / max(total - 1, 1)
                blocks.append(Block(embed_dims[i], num_heads[i], mlp_ratios[i], sa_layers[i],
                                    rasa_cfg if sa_layers[i] == "rasa" else None, self.sr_ratios[i],
                                    qkv_bias, attn_drop_rate, rate, bool(mlp_depconv[i]), qk_scale))
            embed = PatchEmbed(in_chans if i == 0 else embed_dims[i - 1], embed_dims[i], first=i == 0)
            stages.append(Stage(embed, Blocks(*blocks)))
        self.backbone = nn.ModuleList(stages)

        if features_only:
            self.out_indices = check_out_indices(out_indices, S)
        elif with_cls_head:
            C, heads = embed_dims[-1], num_heads[-1]
            self.norm = nn.LayerNorm(C)
            self.head = nn.Linear(C, num_classes) if num_classes > 0 else nn.Identity()
            # Official quirk: only the first post layer gets qkv_bias / qk_scale / attn_drop_rate (they
            # are popped from kwargs inside the list comprehension); the others get False / None / 0.
            self.post_network = nn.ModuleList(
                ClassBlock(C, heads, mlp_ratios[-1], qkv_bias=qkv_bias if i == 0 else False,
                           qk_scale=qk_scale if i == 0 else None, attn_drop=attn_drop_rate if i == 0 else 0.0)
                for i in range(len(post_layers)))
            self.aux_head = nn.Linear(C, num_classes) if num_classes > 0 else nn.Identity()
        else:  # the official backbone for downstream tasks
            self.downstream_norms = nn.ModuleList(nn.LayerNorm(d) for d in embed_dims)

        indices = self.out_indices if features_only else tuple(range(S))
        # The map is the output of ``backbone.i.1`` (the blocks), channels-last; returned as NCHW.
        self.feature_info = FeatureInfo(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f"backbone.{i}.1")
                                        for i in indices)
        self.pretrained_cfg = {**LVT_CFG, "num_classes": num_classes if has_head else 0}
        self._init_weights()

    def _init_weights(self) -> None:
        # The official: Linear trunc-normal(0.02) / bias 0 and LayerNorm (1, 0) over the whole model
        # (CSA's ``attn`` Linear included); the patch-embed, sr and CSA convs and ``ds`` were set in
        # their modules; MLP convs keep PyTorch's default; cls_token trunc-normal(0.02).
        for m in self.modules():
            init_vit_weights(m)
            if isinstance(m, Attention) and m.sr_ratio > 1:
                nn.init.normal_(m.sr.weight, 0.0, math.sqrt(2.0 / (m.sr_ratio ** 2 * m.dim)))
                nn.init.zeros_(m.sr.bias)
        if hasattr(self, "cls_token"):
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    # ---- sizes and input checks ------------------------------------------------------------
    def min_input_size(self) -> int:
        """The smallest side every spatial reduction can take (an sr×sr stride-sr conv needs ≥ sr rows)."""
        side = 1
        while not self._fits(side):
            side += 1
        return side

    def _fits(self, side: int) -> bool:
        sizes = stage_sizes(side, side, len(self.backbone))
        return all(layer == "csa" or sizes[i][0] >= self.sr_ratios[i]
                   for i, layer in enumerate(self.sa_layers) if len(self.backbone[i].blocks))

    def check_input(self, x: torch.Tensor) -> None:
        if is_traced(x):
            return
        check_image_batch(x, self.in_chans)
        H, W = x.shape[-2:]
        for i, (h, w) in enumerate(stage_sizes(H, W, len(self.backbone))):
            sr = self.sr_ratios[i]
            if self.sa_layers[i] != "csa" and len(self.backbone[i].blocks) and min(h, w) < sr:
                side = self.min_input_size()
                raise ValueError(f"input {H}×{W} is too small for LVT: stage {i + 1} is {h}×{w} but its "
                                 f"spatial reduction (sr_ratio {sr}) needs at least {sr}×{sr}; "
                                 f"the minimum input side is {side} (e.g. {side}×{side})")

    # ---- forward ---------------------------------------------------------------------------
    def forward_stages(self, x: torch.Tensor, mix_box=None, last: int | None = None) -> list[torch.Tensor]:
        """The stage maps up to stage ``last`` (all by default), channels-last (B, H_i, W_i, C_i), each
        the output of its last block.

        ``mix_box``: MixToken (token labelling), applied after stage 1's patch embed and before its
        blocks: the box's stage-1 tokens (box × ``mix_scale``) come from the batch reversed.
        """
        self.check_input(x)
        outs = []
        for i, stage in enumerate(self.backbone[:None if last is None else last + 1]):
            x = stage.patch_embed(x)
            if i == 0 and mix_box is not None:
                x = mix_tokens(x, mix_box, self.mix_scale)
            x = stage.blocks(x)
            outs.append(x)
        return outs

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's feature API over the 4 stage maps (see stvit/contract.py): ``(final features, maps)``
        or the maps alone, in stage order. ``norm=True`` applies the norm that fits a map: the official
        backbone's ``downstream_norms`` (``with_cls_head=False``) to every map, the classifier's final
        ``norm`` to the last stage's. The final features are those of :meth:`forward_features` (the
        tokens of the last stage run, with ``stop_early`` before the last)."""
        check_output_fmt(output_fmt)
        take, last = feature_take_indices(len(self.backbone), indices)
        stop = last if stop_early or intermediates_only else len(self.backbone) - 1
        maps = self.forward_stages(x, last=stop)
        intermediates = [(self._level_norm(i, maps[i]) if norm else maps[i]).permute(0, 3, 1, 2).contiguous()
                         for i in sorted(set(take))]
        if intermediates_only:
            return intermediates
        final = maps[stop].flatten(1, 2)                                       # (B, N, C)
        if stop == len(self.backbone) - 1 and self.with_cls_head and not self.features_only:
            final = self._head_tokens(final)
        return final, intermediates

    def _level_norm(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if not self.with_cls_head and not self.features_only:
            return self.downstream_norms[i](x)
        if hasattr(self, "norm") and i == len(self.backbone) - 1:
            return self.norm(x)
        return x

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Keep what the stage maps ``indices`` need (timm's API, as its VOLO): the stages after the last
        one go, and with them the final norm and the head; ``prune_head`` removes the class token, the
        post layers and both classifiers (``forward_head`` then returns the tokens it is given),
        ``prune_norm`` the final norm (the official backbone's ``downstream_norms``)."""
        take, last = feature_take_indices(len(self.backbone), indices)
        if last < len(self.backbone) - 1:
            self.backbone = self.backbone[:last + 1]
            if not self.with_cls_head and not self.features_only:
                self.downstream_norms = self.downstream_norms[:last + 1]
            self.feature_info = levels_up_to(self, last)
            prune_head = prune_norm = True  # both are sized for the last stage
        if self.features_only:
            return take
        if not self.with_cls_head:
            if prune_norm:
                self.downstream_norms = nn.ModuleList(nn.Identity() for _ in self.downstream_norms)
            return take
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.cls_token, self.post_network, self.aux_head = None, None, None
            self.head = nn.Identity()
            self.num_classes = 0
            self.num_features = self.head_hidden_size = self.embed_dims[last]
            self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": 0}
        return take

    def forward_features(self, x: torch.Tensor, mix_box=None) -> torch.Tensor:
        """(B, C, H, W) image -> (B, 1 + N, C) normalised tokens: the class token, then the N stage-4
        tokens (row-major), after the post layers (which only update the class token) and ``norm``."""
        if self.features_only or not self.with_cls_head:
            raise ValueError("forward_features needs the classifier (built with features_only=False and "
                             "with_cls_head=True); this model returns stage maps from forward()")
        return self._head_tokens(self.forward_stages(x, mix_box)[-1].flatten(1, 2))

    def _head_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) last-stage tokens -> [class token; tokens] through the post layers, then ``norm``
        (without a class token and post layers once the head is pruned)."""
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            for block in self.post_network:
                if self.grad_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens from :meth:`forward_features` -> eval logits ``head(cls) + 0.5·max_tokens aux_head``
        (a max per class); ``pre_logits``: the class token's features (B, C), as timm's VOLO. With
        the head pruned: the tokens as they are."""
        if getattr(self, "cls_token", None) is None:
            return x
        if pre_logits:
            return x[:, 0]
        return self.head(x[:, 0]) + EVAL_AUX_WEIGHT * self.aux_head(x[:, 1:]).max(dim=1).values

    def forward(self, x: torch.Tensor, mix_box=None):
        if self.features_only:
            return self.forward_intermediates(x, self.out_indices, intermediates_only=True)
        if not self.with_cls_head:
            return self.forward_intermediates(x, norm=True, intermediates_only=True)
        # torch.fx makes every argument a placeholder: a trace records the inference forward (its
        # mix_box argument unused), as MixToken is the training loop's input.
        if mix_box is None or is_traced(mix_box):
            return self.forward_head(self.forward_features(x))
        return self.forward_train(x, mix_box)

    def forward_train(self, x: torch.Tensor, mix_box) -> tuple[torch.Tensor, torch.Tensor]:
        """The official training forward with a given box: ``(x_cls (B, K), x_aux (B, N, K))``.

        x_aux's box region is swapped back with the batch reversed, so every token of row b
        describes image b (the reversal of MixToken)."""
        tokens = self.forward_features(x, mix_box)
        rows, cols = stage_sizes(x.shape[-2], x.shape[-1], len(self.backbone))[-1]
        x_cls = self.head(tokens[:, 0])
        x_aux = self.aux_head(tokens[:, 1:])                                    # (B, N, K)
        B, N, K = x_aux.shape
        x_aux = mix_tokens(x_aux.reshape(B, rows, cols, K), mix_box, 1).reshape(B, N, K)
        return x_cls, x_aux

    # ---- training objective ----------------------------------------------------------------
    def training_loss(self, x: torch.Tensor, soft_targets: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """MixToken + token-labelling objective (VOLO ``TokenLabelCrossEntropy``, LVT's main.py defaults).

        Draws λ ~ Beta(1, 1) and the box on the stage-4 grid from ``rng`` (official ``rand_bbox``),
        runs ``self(x, mix_box=box)``, and returns
        ``1.0 · CE(x_cls, λ_eff·t + (1−λ_eff)·t.flip(0)) + 0.5 · CE(x_aux tokens, t per token)``,
        with λ_eff = 1 − box area / grid area. Without the authors' dense NFNet token-label maps
        (not available offline), every token of sample b gets sample b's soft target — what VOLO's
        loss does for 2-D targets; the mix is already reversed in x_aux, so that is consistent.
        """
        rows, cols = stage_sizes(x.shape[-2], x.shape[-1], len(self.backbone))[-1]
        box = draw_mix_box(rows, cols, rng)
        x_cls, x_aux = self(x, mix_box=box)
        B, N, K = x_aux.shape
        area = (box[2] - box[0]) * (box[3] - box[1])
        lam = 1.0 - area / N
        target_cls = soft_targets if lam >= 1.0 else lam * soft_targets + (1.0 - lam) * soft_targets.flip(0)
        loss_cls = soft_target_cross_entropy(x_cls, target_cls)
        loss_aux = soft_target_cross_entropy(x_aux.reshape(B * N, K), soft_targets.repeat_interleave(N, dim=0))
        return CLS_WEIGHT * loss_cls + AUX_WEIGHT * loss_aux

    # ---- the rest of the contract ----------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New ``head`` and ``aux_head`` for ``num_classes`` (0: identity, the heads return features);
        ``global_pool``: None only."""
        check_fixed_pooling(global_pool, "its class token and the token head's maximum")
        if getattr(self, "cls_token", None) is None:
            raise ValueError("this model has no classifier (features_only, with_cls_head=False, or pruned by "
                             "prune_intermediate_layers)")
        self.num_classes = num_classes
        for name in ("head", "aux_head"):
            layer = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
            if num_classes > 0:
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
            setattr(self, name, self.placed(layer))
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}

    def no_weight_decay(self) -> set[str]:
        """lvt_cls.py ``no_weight_decay``: the class token."""
        return {"cls_token"} if getattr(self, "cls_token", None) is not None else set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every backbone block's (and, with it, every post layer's) activations in backward."""
        self.grad_checkpointing = enable
        for stage in self.backbone:
            stage.blocks.grad_checkpointing = enable

    def repeated_blocks(self) -> list[nn.Module]:
        blocks = [block for stage in self.backbone for block in stage.blocks]
        return blocks + list(getattr(self, "post_network", None) or [])


def checkpoint_filter_fn(state_dict: Mapping, model: nn.Module) -> dict:
    """The authors' release (``lvt_imagenet.pth.tar``, a timm ``CheckpointSaver`` file) -> our keys.

    The file holds ``{"state_dict": ..., "optimizer": ..., "epoch": ..., "args": ...}`` (and
    ``state_dict_ema`` with ``--model-ema``), which ``stvit.load_checkpoint`` unwraps, with any
    ``module.`` prefix, and a features-only model ignores the keys of what it lacks; the keys are the
    official ``lvt_cls`` names, which are ours. What is left: a ``with_cls_head=False`` backbone also
    drops the classifier (its ``downstream_norms`` are not in the classification release and stay as
    initialised, as in the official segmentation code).
    """
    if getattr(model, "with_cls_head", True):
        return dict(state_dict)
    return {k: v for k, v in state_dict.items() if k.startswith(("backbone.", "downstream_norms."))}


# ---- registered variants ------------------------------------------------------------------------

# lvt_cls.py ``_cfg(crop_pct=0.96)``: 224², bicubic. Two classifiers (timm allows a tuple): fine-tuning
# to another class count replaces both ``head`` and ``aux_head``; ``get_classifier()`` returns ``head``.
LVT_PRETRAINED = dict(crop_pct=0.96, interpolation="bicubic", classifier=("head", "aux_head"),
                      first_conv="backbone.0.0.proj")
LVT_CFG = {**DEFAULT_PRETRAINED_CFG, **LVT_PRETRAINED}

# configs/lvt_imagenet.py (the README's --cfg): RASA with rates 1/3/5, SiLU, two recursions.
LVT_RASA_CFG = dict(atrous_rates=[1, 3, 5], act_layer="nn.SiLU(True)", init="kaiming", r_num=2)

LVT_CONFIGS: dict[str, dict] = {
    # The official lvt_cls (lvt.py ``lvt`` + lvt_cls.py ``lvt_cls``, hard-coded there).
    "lvt_cls": dict(layers=[2, 2, 2, 2], embed_dims=[64, 64, 160, 256], num_heads=[2, 2, 5, 8],
                    mlp_ratios=[4, 8, 4, 4], mlp_depconv=[False, True, True, True], sr_ratios=[8, 4, 2, 1],
                    sa_layers=["csa", "rasa", "rasa", "rasa"], rasa_cfg=LVT_RASA_CFG, post_layers=["ca", "ca"],
                    num_classes=1000, qkv_bias=False, drop_path_rate=0.0),
    # Ours, for CPU demos and tests: one block per stage, one post layer; 64-px inputs give stage grids
    # 16/8/4/2 (the 2×2 stage-4 grid makes every MixToken box empty, as it would be officially).
    "lvt_tiny": dict(layers=[1, 1, 1, 1], embed_dims=[32, 48, 64, 96], num_heads=[1, 2, 2, 3],
                     mlp_ratios=[4, 4, 4, 4], mlp_depconv=[False, True, True, True], sr_ratios=[8, 4, 2, 1],
                     sa_layers=["csa", "rasa", "rasa", "rasa"], rasa_cfg=LVT_RASA_CFG, post_layers=["ca"],
                     num_classes=1000, qkv_bias=False, drop_path_rate=0.0),
}

register_family("lvt", LVT, checkpoint_filter=checkpoint_filter_fn,
                paper="Lite Vision Transformer with Enhanced Self-Attention (Yang et al., CVPR 2022)",
                verified_against="Chenglin-Yang/LVT@c561897 classification/ (float64 goldens)")

# The authors' recipe: README's command (8 GPUs × -b 128 = 1024, --lr 1.6e-3, --token-label,
# --token-label-size 7) on main.py's (VOLO's) defaults. Differences from train's paper preset:
LVT_RECIPE = dict(
    lr=1.6e-3,          # README --lr 1.6e-3 at 8 × 128 = 1024 (main.py default too)
    warmup_epochs=20,   # main.py --warmup-epochs default 20
    mixup=0.0,          # main.py --mixup default 0 (MixToken replaces Mixup/CutMix)
    cutmix=0.0,         # main.py --cutmix default 0
    repeats=1,          # main.py (timm train) has no repeated augmentation
    crop_pct=0.96,      # lvt_cls.py _cfg(crop_pct=0.96)
    drop_path=0.0,      # README passes --drop-path 0.1, but lvt/lvt_cls drop it: the 74.8 run had none
)
# Same as the preset (main.py defaults): min_lr 1e-5, warmup_lr 1e-6, weight_decay 0.05, smoothing 0.1,
# aa rand-m9-mstd0.5-inc1, reprob 0.25, clip_grad None, epochs 300, batch_size 128 per GPU, no EMA.
# Not expressible here: --train-interpolation random, --apex-amp (O1 mixed precision).


# README / paper Table (ImageNet, 224²): 74.8 top-1, 0.9 GFLOPs (= MACs: 0.889 G counted), and
# "Backbone Params 3.4 M" — the backbone only; the whole classifier (post layers, heads) is 5.52 M.
@register_model("lvt", pretrained_cfg=LVT_PRETRAINED, paper=dict(params_m=3.4, params_of="backbone", macs_g=0.9, top1=74.8),
                recipe=LVT_RECIPE)
def lvt_cls(**overrides) -> LVT:
    return LVT(**{**LVT_CONFIGS["lvt_cls"], **overrides})


@register_model("lvt", pretrained_cfg=LVT_PRETRAINED, recipe=LVT_RECIPE, demo=dict(input_size=64))
def lvt_tiny(**overrides) -> LVT:
    return LVT(**{**LVT_CONFIGS["lvt_tiny"], **overrides})
