"""So-ViT and SoT: a ViT whose classifier also pools the visual tokens with second-order statistics.

Two families from one repository (github jiangtaoxie/So-ViT, now jiangtaoxie/SoT), recorded
separately by the goldens:

- **So-ViT** (arXiv 2104.10935 v1, ``src/`` at c2d076e): visual tokens from a small ResNet
  (three Bottlenecks); the head adds ``cls_fc(class token)`` to ``visual_fc(svPN(P))`` where P is
  the cross-covariance of two 1×1-conv + BN + ReLU projections of the visual tokens.
- **SoT** (arXiv 2104.10935 v2, ``sot_src/`` at 5da3c37): visual tokens from three DenseNet blocks;
  the head is multi-headed global cross-covariance pooling (MGCrP): per head, P = QᵀK/N of two
  linear projections of the visual tokens, each svPN-normalised.

Both share the pre-norm ViT block, the fixed sinusoid position table and svPN, the singular value
power normalisation. svPN estimates the top singular triplets (u, s, v) of a matrix A by power
iteration started from a learned vector, deflates A after each, and returns
``Σ sᵢ^α uᵢvᵢᵀ + A_res / (s_last^(1-α) + 1e-5)``: no SVD, only batched matrix products, so it
runs under ``torch.compile`` and its cost is counted by the FLOP counter as ``bmm`` (a few
thousand MACs per image: 2 matrix-vector products per iteration, 2 for sᵢ, 2 outer products per
singular value and the final sum; the numbers in ``official_sovit_keys.json`` count the same).

Semantics kept from the authors' code (the float64 goldens check each):
- the token embedding of each family, sizes and BatchNorm eps/momentum included (So-ViT: the last
  Bottleneck has stride ``img_size // 112``; SoT: the dense layers have no BatchNorm, only ReLUs,
  and the last transition does not pool when ``img_size < 224``);
- the position table is rounded through float32 as the authors' (``pos_embed``, a frozen
  parameter in their state dict, is a buffer here under the same key: it is never trained);
- So-ViT mean removal is per channel; SoT's is one scalar per (sample, head) over all N·r entries;
- the covariance divides by N; svPN works on Pᵀ in So-ViT and on P in SoT;
- svPN's start vector is the learned, unnormalised ``weight``, the same for every singular value;
  gradients flow through every iteration (no detach, no custom backward);
- logits are the plain sum ``cls_fc(class token) + visual_fc(svPN features)``.

Beyond the authors' code: every model is built from its own arguments (their factories mutate
shared module-level config dicts, so building one variant changes the next); svPN's temporaries
take the input's dtype (theirs are float32 unless the default dtype is float64); inputs of a size
the model cannot take are refused up front with the sizes it takes.

Module and parameter names equal the authors' state-dict keys one to one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..contract import (DropPath, FeatureInfo, ModelBase, check_fixed_pooling, check_image_batch, check_out_indices,
                        check_output_fmt, drop_path_rates, feature_take_indices, init_vit_weights, is_traced,
                        levels_up_to)
from ..registry import DEFAULT_PRETRAINED_CFG, register_family, register_model

# ---- shared pieces: position table, ViT block, svPN ---------------------------------------------


def sinusoid_table(n_position: int, dim: int) -> torch.Tensor:
    """(1, n_position, dim) fixed position table: sin at even, cos at odd channels of
    pos / 10000^(2⌊j/2⌋/dim); computed in float64 and rounded to float32 as the authors'."""
    pos = np.arange(n_position, dtype=np.float64)[:, None]
    exponent = np.array([2 * (j // 2) / dim for j in range(dim)], dtype=np.float64)
    angles = pos / np.power(10000.0, exponent)[None, :]
    table = np.where(np.arange(dim) % 2 == 0, np.sin(angles), np.cos(angles))
    return torch.from_numpy(table).to(torch.float32).unsqueeze(0)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act_layer: Callable[[], nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention; ``qkv`` lays its output out as (3, heads, head_dim)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                           scale=self.scale)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, qk_scale: float | None,
                 drop: float, attn_drop: float, drop_path: float, act_layer, norm_layer):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer, drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SingularValuePowerNorm(nn.Module):
    """svPN: ``Σᵢ sᵢ^α uᵢvᵢᵀ + A_res / (s_last^(1-α) + 1e-5)`` of each matrix A of a batch, flattened.

    The top ``sv_num`` singular triplets come from ``iter_num`` power-iteration steps each, started
    from the learned vector ``weight`` (length = A's column count), with A deflated after each.
    ``transpose=True`` (So-ViT) works on Aᵀ of the input and transposes the result back.
    ``regular`` is a dropout rate applied to the flattened output (None: none).
    """

    def __init__(self, num_cols: int, alpha: float = 0.5, iter_num: int = 1, sv_num: int = 1,
                 regular: float | None = None, transpose: bool = False, max_sv: int | None = None):
        super().__init__()
        if iter_num < 1:
            raise ValueError(f"iterNum={iter_num}: svPN needs at least one power-iteration step")
        if sv_num < 1 or (max_sv is not None and sv_num > max_sv):
            raise ValueError(f"svNum={sv_num}: expected 1 <= svNum <= {max_sv} (the smaller side of the matrix)")
        if alpha < 0:
            raise ValueError(f"alpha={alpha}: a negative power of the (zero) off-diagonal singular values "
                             f"is infinite; expected alpha >= 0")
        self.alpha, self.iter_num, self.sv_num, self.transpose = float(alpha), int(iter_num), int(sv_num), transpose
        self.weight = nn.Parameter(torch.randn(num_cols))
        self.regular = nn.Dropout(regular) if regular is not None else None

    def normalize(self, a: torch.Tensor) -> torch.Tensor:
        """(B, m, n) -> (B, m, n), the svPN of each matrix."""
        v0 = self.weight.view(1, -1, 1).expand(a.shape[0], -1, 1)
        us, ss, vs = [], [], []
        for _ in range(self.sv_num):
            v = v0
            for _ in range(self.iter_num):
                u = F.normalize(a.bmm(v), dim=1)
                v = F.normalize(a.transpose(1, 2).bmm(u), dim=1)
            s = u.transpose(1, 2).bmm(a).bmm(v)  # (B, 1, 1), = |Aᵀu| >= 0
            a = a - u.bmm(s).bmm(v.transpose(1, 2))  # deflate
            us.append(u)
            ss.append(s)
            vs.append(v)
        U, V = torch.cat(us, 2), torch.cat(vs, 2)  # (B, m, k), (B, n, k)
        s_alpha = torch.cat(ss, 2).pow(self.alpha)  # (B, 1, k)
        y = (U * s_alpha).bmm(V.transpose(1, 2))
        if self.alpha == 0 and self.sv_num > 1:
            # The authors raise the whole diagonal matrix S to the power α; with α = 0 its zero
            # off-diagonal entries become 1, adding every cross term uᵢvⱼᵀ (i ≠ j).
            y = U.sum(2, keepdim=True).bmm(V.sum(2, keepdim=True).transpose(1, 2))
        return y + a / (ss[-1].pow(1.0 - self.alpha) + 1e-5)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        """(B, d1, d2) -> (B, d1·d2), row-major, after ``regular``."""
        y = self.normalize(p.transpose(1, 2)).transpose(1, 2) if self.transpose else self.normalize(p)
        y = y.reshape(y.shape[0], -1)
        return self.regular(y) if self.regular is not None else y


# ---- So-ViT: ResNet token embedding and the cross-covariance head -------------------------------


class Bottleneck(nn.Module):
    """ResNet bottleneck (×4 expansion); the stride sits on the 3×3 conv."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: bool = False, expansion: int = 4):
        super().__init__()
        out = planes * expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, eps=1e-3, momentum=0.01)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-3, momentum=0.01)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out, eps=1e-3, momentum=0.01)
        self.downsample = (nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
                           if downsample else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


def _stem(in_chans: int, token_dim: int) -> nn.Sequential:
    # 3×3 conv with bias (no norm, no activation), then a stride-2 3×3 max-pool.
    return nn.Sequential(nn.Conv2d(in_chans, token_dim, 3, 1, 1), nn.MaxPool2d(3, 2, 1))


class ResNetTokens(nn.Module):
    """So-ViT's token embedding: stem, three Bottlenecks (strides 2, 2, img_size // 112), 1×1 conv."""

    def __init__(self, img_size: int, in_chans: int, embed_dim: int, token_dim: int = 64):
        super().__init__()
        s = img_size // 112
        self.stem = _stem(in_chans, token_dim)
        self.stage = nn.Sequential(Bottleneck(token_dim, 64, 2, True), Bottleneck(256, 64, 2, True),
                                   Bottleneck(256, 64, s, s == 2))
        self.transition = nn.Conv2d(256, embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transition(self.stage(self.stem(x)))


class SoViTTokens(nn.Module):
    """(B, C, H, W) image -> (B, N, E) visual tokens, row-major (the authors' ``visualTokens``)."""

    def __init__(self, tokens: nn.Module):
        super().__init__()
        self.tokens = tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x).flatten(2).transpose(1, 2)


class CrossCovariance(nn.Module):
    """Two 1×1 conv + BN + ReLU branches of the visual tokens, mean-removed per channel; P = X1·X2ᵀ/N."""

    def __init__(self, dim: int, dims: Sequence[int], remove_mean: bool = True):
        super().__init__()
        self.remove_mean = remove_mean
        self.conv_dr_block = nn.Sequential(*(
            nn.Sequential(nn.Conv2d(dim, d, 1, bias=False), nn.BatchNorm2d(d), nn.ReLU()) for d in dims))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, E) -> (B, d1, d2)."""
        x = tokens.transpose(1, 2).unsqueeze(-1)  # (B, E, N, 1)
        x1, x2 = (branch(x).flatten(2) for branch in self.conv_dr_block)  # (B, dk, N)
        if self.remove_mean:
            x1 = x1 - x1.mean(2, keepdim=True)
            x2 = x2 - x2.mean(2, keepdim=True)
        return (1.0 / x1.shape[2]) * x1.bmm(x2.transpose(1, 2))


class SoViTHead(nn.Module):
    """So-ViT's classifier: ``cls_fc(class token) + visual_fc(svPN(cross-covariance(visual tokens)))``."""

    def __init__(self, dim: int, num_classes: int, dims: Sequence[int], remove_mean: bool, alpha: float,
                 iter_num: int, sv_num: int, regular: float | None):
        super().__init__()
        d1, d2 = dims
        self.representation = CrossCovariance(dim, (d1, d2), remove_mean)
        # svPN on Pᵀ (d2 × d1): its start vector has d1 entries.
        self.normalization = SingularValuePowerNorm(d1, alpha, iter_num, sv_num, regular, transpose=True,
                                                    max_sv=min(d1, d2))
        self.pool_dim = d1 * d2
        self.visual_fc = _linear(self.pool_dim, num_classes)
        self.cls_fc = _linear(dim, num_classes)

    def pool(self, visual_tokens: torch.Tensor) -> torch.Tensor:
        return self.normalization(self.representation(visual_tokens))


# ---- SoT: DenseNet token embedding and the multi-headed cross-covariance head --------------------


class DenseLayer(nn.Module):
    """ReLU -> 1×1 conv (bn_size·growth) -> ReLU -> 3×3 conv (growth): no BatchNorm, as in SoT
    (timm 0.3.4's ``DenseBlock`` defaults its norm layer to ``nn.ReLU``)."""

    def __init__(self, in_chs: int, growth_rate: int, bn_size: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, bn_size * growth_rate, 1, bias=False)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(F.relu(x))))


class DenseBlock(nn.Module):
    """Each layer sees the concat of the block input and all earlier layers' maps; outputs all of them."""

    def __init__(self, num_layers: int, in_chs: int, bn_size: int = 2, growth_rate: int = 16):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(in_chs + i * growth_rate, growth_rate, bn_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.children():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class DenseTransition(nn.Sequential):
    """BatchNorm (no activation) -> 1×1 conv -> 2×2 average pool (stride 2, floor) if ``pool``."""

    def __init__(self, in_chs: int, out_chs: int, pool: bool = True):
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(in_chs))
        self.add_module("conv", nn.Conv2d(in_chs, out_chs, 1, bias=False))
        if pool:
            self.add_module("pool", nn.AvgPool2d(2, 2))


class DenseNetTokens(nn.Module):
    """SoT's token embedding: stem, three DenseBlocks with transitions, 1×1 conv to embed_dim."""

    def __init__(self, img_size: int, in_chans: int, embed_dim: int, pools: Sequence[bool]):
        super().__init__()
        self.stem = _stem(in_chans, 64)
        self.stage = nn.Sequential(
            DenseBlock(6, 64), DenseTransition(160, 128, pools[0]),
            DenseBlock(6, 128), DenseTransition(224, 128, pools[1]),
            DenseBlock(6, 128), DenseTransition(224, 128, pools[2]))
        self.transition = nn.Conv2d(128, embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transition(self.stage(self.stem(x)))


class MultiHeadCrossCovariance(nn.Module):
    """MGCrP: ``wr`` projects each visual token to h heads of (q, k) ∈ R^r × R^r; per (sample, head)
    Q and K each lose one scalar mean (over all N·r entries), then P = QᵀK / N is svPN-normalised.
    Output (B, h·r²), head-major."""

    def __init__(self, dim: int, num_heads: int, wr_dim: int, qkv_bias: bool, alpha: float, iter_num: int,
                 sv_num: int, regular: float | None):
        super().__init__()
        self.num_heads, self.wr_dim = num_heads, wr_dim
        self.wr = nn.Linear(dim, wr_dim * num_heads * 2, bias=qkv_bias)
        self.norm = SingularValuePowerNorm(wr_dim, alpha, iter_num, sv_num, regular, transpose=False, max_sv=wr_dim)
        self.output_dim = num_heads * wr_dim ** 2

    def covariance(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, E) -> (B·h, r, r)."""
        B, N, _ = tokens.shape
        q, k = self.wr(tokens).reshape(B, N, 2, self.num_heads, self.wr_dim).permute(2, 0, 3, 1, 4)
        q = q.reshape(B * self.num_heads, N, self.wr_dim)
        k = k.reshape(B * self.num_heads, N, self.wr_dim)
        q = q - q.mean((1, 2), keepdim=True)
        k = k - k.mean((1, 2), keepdim=True)
        return (1.0 / N) * q.transpose(1, 2).bmm(k)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.covariance(tokens)).view(tokens.shape[0], -1)


class SoTHead(nn.Module):
    """SoT's classifier (fusion ``sum_fc``): ``cls_fc(class token) + visual_fc(MGCrP(visual tokens))``."""

    def __init__(self, dim: int, num_classes: int, num_heads: int, wr_dim: int, qkv_bias: bool, alpha: float,
                 iter_num: int, sv_num: int, regular: float | None):
        super().__init__()
        self.representation = MultiHeadCrossCovariance(dim, num_heads, wr_dim, qkv_bias, alpha, iter_num,
                                                       sv_num, regular)
        self.pool_dim = self.representation.output_dim
        self.visual_fc = _linear(self.pool_dim, num_classes)
        self.cls_fc = _linear(dim, num_classes)

    def pool(self, visual_tokens: torch.Tensor) -> torch.Tensor:
        return self.representation(visual_tokens)


def _linear(in_features: int, num_classes: int) -> nn.Module:
    return nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()


# ---- the network (shared by both families) ------------------------------------------------------


class _SecondOrderViT(ModelBase):
    """Token embedding -> [class token; tokens] + fixed sinusoid table -> ViT blocks -> LayerNorm ->
    the family's two-part classifier. Subclasses build ``visual_tokens`` and ``classifier``.

    The feature levels (``feature_info``, ``forward_intermediates``) are the ViT blocks, as for
    timm's ViT: each block's visual tokens as a (B, E, h, w) map, the class token left out.
    ``head_hidden_size`` is the width of the pre-logits, [class token; second-order features].
    The token count is fixed by ``img_size``; ``dynamic_img_size=True`` (timm's name) takes inputs of
    any size, the position table resampled to their token grid (:meth:`position_table`), as a
    segmentation backbone needs.
    """

    family_title = ""

    def _build_trunk(self, *, img_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
                     qk_scale, drop_rate, attn_drop_rate, drop_path_rate, norm_layer, block_norm_layer, act_layer,
                     features_only, out_indices, visual_tokens: nn.Module, num_patches: int,
                     head: Callable[[], nn.Module], grid_stride: int, dynamic_img_size: bool = False):
        if in_chans < 1:
            raise ValueError(f"in_chans={in_chans}: expected a positive number of input channels")
        if depth < 1:
            raise ValueError(f"depth={depth}: expected at least one ViT block")
        norm_layer = norm_layer or nn.LayerNorm
        block_norm_layer = block_norm_layer or norm_layer
        act_layer = act_layer or nn.GELU
        self.img_size, self.in_chans, self.embed_dim = img_size, in_chans, embed_dim
        self.num_classes = 0 if features_only else num_classes
        self.num_features = self.head_hidden_size = embed_dim
        self.features_only = features_only
        self.num_patches = num_patches
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # A fixed table, never trained: a buffer (the authors' frozen parameter, under the same key).
        # torch.empty follows the default device and dtype, a `with torch.device("meta")` block
        # included; torch.get_default_device() sees such a block only from torch 2.8 on (pytorch#148621).
        table = sinusoid_table(num_patches + 1, embed_dim)
        self.register_buffer("pos_embed", torch.empty(table.shape).copy_(table))
        self.visual_tokens = visual_tokens
        self.pos_drop = nn.Dropout(drop_rate)
        rates = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            ViTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, rates[i],
                     act_layer, block_norm_layer) for i in range(depth))

        stride_info = lambda i: dict(num_chs=embed_dim, reduction=grid_stride, module=f"blocks.{i}")  # noqa: E731
        if features_only:
            # An isotropic backbone (timm's ViT convention): chosen blocks' tokens as (B, E, h, w) maps.
            default = min(3, depth)  # the last three blocks
            self.out_indices = check_out_indices(default if out_indices is None else out_indices, depth, "block")
            self.feature_info = FeatureInfo(stride_info(i) for i in self.out_indices)
        else:
            self.classifier = head()
            self.head_hidden_size = embed_dim + self.classifier.pool_dim
            self.norm = norm_layer(embed_dim)
            self.feature_info = FeatureInfo(stride_info(i) for i in range(depth))
        self.apply(init_vit_weights)  # as the authors; convs keep their own (Kaiming in CrossCovariance)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    # ---- input sizes --------------------------------------------------------------------------
    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """The token grid (h, w) of an (height, width) input."""
        raise NotImplementedError

    def _size_rule(self) -> str:
        raise NotImplementedError

    def check_input(self, x: torch.Tensor) -> None:
        if is_traced(x):
            return
        check_image_batch(x, self.in_chans)
        H, W = x.shape[-2:]
        h, w = self.grid_size(H, W)
        if self.dynamic_img_size:
            if h < 1 or w < 1:
                raise ValueError(f"a {H}×{W} input gives a {h}×{w} token grid; {self.family_title} needs at least one "
                                 f"token ({self._size_rule()}); use a larger input")
            return
        if h * w != self.num_patches:
            raise ValueError(
                f"{self.family_title} built for img_size={self.img_size} takes inputs that give exactly "
                f"{self.num_patches} tokens ({self._size_rule()}); a {H}×{W} input gives a {h}×{w} grid "
                f"= {h * w} tokens. Resize or crop the input, or build the model with another img_size")

    # ---- forward ------------------------------------------------------------------------------
    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.grid_size(*x.shape[-2:]) if self.dynamic_img_size else None
        x = self.visual_tokens(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.pos_drop(x + (self.pos_embed if grid is None else self.position_table(grid)))

    def position_table(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position table for an h×w token grid: the model's own for its grid; for another grid
        (``dynamic_img_size``), the visual tokens' part laid out on the model's square
        grid and resampled bicubically (as MMSegmentation's ``resize_pos_embed`` for a ViT backbone),
        the class token's entry kept."""
        side = math.isqrt(self.num_patches)
        if tuple(grid) == (side, side) or side * side != self.num_patches:
            return self.pos_embed
        table = self.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table.float(), size=tuple(grid), mode="bicubic", align_corners=False)
        table = table.to(self.pos_embed.dtype).flatten(2).transpose(1, 2)
        return torch.cat((self.pos_embed[:, :1], table), dim=1)

    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's feature API over the blocks (see stvit/contract.py): ``(final features, maps)`` or the
        maps alone, in block order: each block's visual tokens as a (B, E, h, w) map (class token
        dropped), after the final LayerNorm with ``norm=True``. The final features are those of
        :meth:`forward_features` (of the last block run, with ``stop_early``)."""
        check_output_fmt(output_fmt)
        take, last = feature_take_indices(len(self.blocks), indices)
        self.check_input(x)
        h, w = self.grid_size(*x.shape[-2:])
        stop = last if stop_early or intermediates_only else len(self.blocks) - 1
        x = self._tokens(x)
        final_norm = getattr(self, "norm", nn.Identity())
        maps = []
        for i, block in enumerate(self.blocks[:stop + 1]):
            x = self._run_block(block, x)
            if i in take:
                tap = final_norm(x) if norm else x
                maps.append(tap[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, h, w))
        return maps if intermediates_only else (final_norm(x), maps)

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Keep what the block maps ``indices`` need (timm's API): the blocks after the last one go;
        ``prune_norm`` removes the final LayerNorm, ``prune_head`` the classifier (its second-order
        pooling included: ``forward_head`` then returns the tokens it is given)."""
        take, last = feature_take_indices(len(self.blocks), indices)
        if last < len(self.blocks) - 1:
            self.blocks = self.blocks[:last + 1]
            self.feature_info = levels_up_to(self, last)
        if prune_norm and hasattr(self, "norm"):
            self.norm = nn.Identity()
        if prune_head and not self.features_only:
            self.classifier = None
            self.num_classes = 0
            self.head_hidden_size = self.embed_dim
            self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": 0}
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image -> (B, 1 + N, E) tokens after the final LayerNorm, class token first."""
        if self.features_only:
            raise ValueError("a features_only model has no final norm; call it (model(x)) for its feature maps")
        self.check_input(x)
        x = self._tokens(x)
        for block in self.blocks:
            x = self._run_block(block, x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> logits ``cls_fc(x[:, 0]) + visual_fc(pool(x[:, 1:]))``.

        ``pre_logits=True`` (and a model with ``num_classes=0``) gives the classifier's inputs
        side by side: ``cat([class token (E), second-order features (pool_dim)], 1)``.
        """
        if self.classifier is None:  # pruned (prune_intermediate_layers)
            return x
        cls, visual = x[:, 0], self.classifier.pool(x[:, 1:])
        if pre_logits or self.num_classes == 0:
            return torch.cat((cls, visual), 1)
        return self.classifier.visual_fc(visual) + self.classifier.cls_fc(cls)

    def forward(self, x: torch.Tensor):
        if self.features_only:
            return self.forward_intermediates(x, self.out_indices, intermediates_only=True)
        return self.forward_head(self.forward_features(x))

    # ---- the contract's API -------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        """The authors' ``classifier`` module. Its two parts depend on ``num_classes``:
        ``classifier.cls_fc`` (class token) and ``classifier.visual_fc`` (second-order features),
        which ``pretrained_cfg["classifier"]`` names; the logits are their sum."""
        if self.features_only or self.classifier is None:
            raise ValueError("this model has no classifier (features_only, or pruned by prune_intermediate_layers); "
                             "build it with features_only=False")
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New ``cls_fc`` and ``visual_fc`` for ``num_classes`` (0: both removed, and the model returns
        the pre-logits features); the second-order pooling is kept (``global_pool``: None only)."""
        check_fixed_pooling(global_pool, "its class token and second-order features")
        if self.features_only or self.classifier is None:
            raise ValueError("this model has no classifier (features_only, or pruned by prune_intermediate_layers); "
                             "build it with features_only=False")
        self.num_classes = num_classes
        head = self.classifier
        head.cls_fc = _linear(self.embed_dim, num_classes)
        head.visual_fc = _linear(head.pool_dim, num_classes)
        for fc in (head.cls_fc, head.visual_fc):
            init_vit_weights(fc)
            self.placed(fc)
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}

    def no_weight_decay(self) -> set[str]:
        """None beyond 1-D parameters and biases, as the authors' training (timm 0.3.4's optimizer
        factory finds no ``no_weight_decay`` on their model, so ``cls_token`` is decayed;
        ``pos_embed`` is frozen)."""
        return set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each ViT block's activations in backward."""
        self.grad_checkpointing = bool(enable)

    def repeated_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

    def _pretrained_cfg(self, first_conv: str) -> dict:
        return {**DEFAULT_PRETRAINED_CFG, "fixed_input_size": True, "input_size": (self.in_chans, self.img_size,
                                                                                   self.img_size),
                # timm 0.3.4's data config defaults, which the authors' main.py resolves to
                "crop_pct": 0.875, "interpolation": "bicubic",
                "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                "classifier": ("classifier.cls_fc", "classifier.visual_fc"),
                "first_conv": first_conv, "num_classes": self.num_classes}


class SoViT(_SecondOrderViT):
    """So-ViT (arXiv 2104.10935 v1; the authors' ``So_ViT``).

    Keywords: the authors' ViT settings (``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``,
    ``qkv_bias``, ``qk_scale``, ``attn_drop_rate``, ``drop_rate``, ``drop_path_rate``,
    ``norm_layer`` for the final norm and ``block_norm_layer`` for the blocks (None: the same),
    ``act_layer``), ``token_dim`` (the stem's width), the head's ``dimension_reduction`` [d1, d2]
    and ``remove_mean``, svPN's ``alpha``, ``iter_num``, ``sv_num`` and ``regular`` (a dropout rate
    on its output, or None). ``img_size`` (112 ≤ img_size < 336) sets the last Bottleneck's stride
    (img_size // 112) and the number of tokens, (img_size // (8·stride))². Defaults are the
    authors' module defaults (So-ViT-14). ``from_official_config`` takes their nested config.
    """

    family_title = "So-ViT"

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 384,
                 depth: int = 14, num_heads: int = 6, mlp_ratio: float = 3.0, qkv_bias: bool = False,
                 qk_scale: float | None = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_layer: Callable[[int], nn.Module] | None = nn.LayerNorm,
                 block_norm_layer: Callable[[int], nn.Module] | None = None,
                 act_layer: Callable[[], nn.Module] | None = nn.GELU, token_dim: int = 64,
                 dimension_reduction: Sequence[int] = (64, 48), remove_mean: bool = True, alpha: float = 0.5,
                 iter_num: int = 1, sv_num: int = 1, regular: float | None = 0.5, features_only: bool = False,
                 out_indices: Sequence[int] | None = None, dynamic_img_size: bool = False):
        super().__init__()
        if not 112 <= img_size < 336:
            raise ValueError(f"img_size={img_size}: So-ViT's token embedding takes 112 <= img_size < 336 (its last "
                             f"Bottleneck has stride img_size // 112, which must be 1 or 2)")
        if len(dimension_reduction) != 2 or min(dimension_reduction) < 1:
            raise ValueError(f"dimension_reduction={dimension_reduction}: expected two positive widths [d1, d2]")
        self.stride = img_size // 112
        d1, d2 = (int(d) for d in dimension_reduction)
        self._build_trunk(
            img_size=img_size, in_chans=in_chans, num_classes=num_classes, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, norm_layer=norm_layer,
            block_norm_layer=block_norm_layer, act_layer=act_layer, features_only=features_only,
            out_indices=out_indices, dynamic_img_size=dynamic_img_size,
            visual_tokens=SoViTTokens(ResNetTokens(img_size, in_chans, embed_dim, token_dim)),
            num_patches=(img_size // (8 * self.stride)) ** 2,
            head=lambda: SoViTHead(embed_dim, num_classes, (d1, d2), remove_mean, alpha, iter_num, sv_num, regular),
            grid_stride=8 * self.stride)
        self.pretrained_cfg = self._pretrained_cfg("visual_tokens.tokens.stem.0")

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        # Every stride-2 op (max-pool, 3×3 convs with padding 1) maps a side n to ⌈n/2⌉.
        k = 8 * self.stride
        return -(-height // k), -(-width // k)

    def _size_rule(self) -> str:
        k, side = 8 * self.stride, math.isqrt(self.num_patches)
        return (f"a ⌈H/{k}⌉×⌈W/{k}⌉ grid with {self.num_patches} cells: "
                f"{k * (side - 1) + 1} <= H, W <= {k * side} for the square {side}×{side} grid")

    @classmethod
    def from_official_config(cls, config: Mapping) -> SoViT:
        """Build from the authors' ``So_ViT(...)`` keyword arguments as the goldens record them
        (nested dicts; Python objects as strings such as ``"nn.LayerNorm"``, ``"None"``,
        ``"nn.Dropout(p=0.0)"``; the objects themselves are accepted too)."""
        c = {k: _official(v) for k, v in config.items() if not isinstance(v, Mapping)}
        tokens, vit = _official_dict(config["visualTokenConfig"]), _official_dict(config["ViTConfig"])
        rep = config["representationConfig"]
        args, norm = _official_dict(rep["args"]), rep["normalization"]
        norm_args = _official_dict(norm["args"])
        _expect(tokens.get("type"), "ResNet", "visualTokenConfig type")
        _expect(rep.get("type"), "second-order", "representationConfig type")
        _expect(args.get("cov_type", "cross"), "cross", "cov_type")
        _expect(norm.get("type"), "svPN", "normalization type")
        _expect(norm_args.get("vec", "full"), "full", "svPN vec")
        _expect(norm_args.get("init_weight", "learn"), "learn", "svPN init_weight")
        dr = list(args["dimension_reduction"])
        if "input_dim" in norm_args and list(norm_args["input_dim"]) != dr:
            raise ValueError(f"svPN input_dim {norm_args['input_dim']} must equal dimension_reduction {dr}")
        if args.get("input_dim", vit["embed_dim"]) != vit["embed_dim"]:
            raise ValueError(f"representation input_dim {args['input_dim']} must equal embed_dim {vit['embed_dim']}")
        return cls(img_size=c.get("img_size", 224), in_chans=c.get("in_chans", 3),
                   num_classes=c.get("num_classes", 1000), drop_rate=c.get("drop_rate", 0.0),
                   drop_path_rate=c.get("drop_path_rate", 0.0), norm_layer=c.get("norm_layer", nn.LayerNorm),
                   token_dim=tokens.get("token_dim", 64), dimension_reduction=dr,
                   remove_mean=args.get("remove_mean", True), alpha=norm_args.get("alpha", 0.5),
                   iter_num=norm_args.get("iterNum", 1), sv_num=norm_args.get("svNum", 1),
                   regular=_dropout_rate(norm_args.get("regular")), **_vit_kwargs(vit))


class SoT(_SecondOrderViT):
    """SoT (arXiv 2104.10935 v2; the authors' ``SoT``).

    Keywords as :class:`SoViT` for the ViT; the head's ``head_num_heads`` (MGCrP heads h, independent
    of the ViT's), ``wr_dim`` (r), ``wr_bias``, and svPN's ``alpha``, ``iter_num``, ``sv_num``,
    ``regular``. The DenseNet token embedding always gives 14×14 tokens (``large_output=True``:
    56×56, the authors' unused option): img_size ≥ 224 pools in all three transitions (inputs of
    side 223..238), 112 ≤ img_size < 224 not in the last (side 111..118). Defaults are the
    authors' module defaults (SoT-Small).
    """

    family_title = "SoT"

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 384,
                 depth: int = 14, num_heads: int = 6, mlp_ratio: float = 3.0, qkv_bias: bool = False,
                 qk_scale: float | None = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_layer: Callable[[int], nn.Module] | None = nn.LayerNorm,
                 block_norm_layer: Callable[[int], nn.Module] | None = None,
                 act_layer: Callable[[], nn.Module] | None = nn.GELU, token_dim: int = 64,
                 large_output: bool = False, head_num_heads: int = 6, wr_dim: int = 24, wr_bias: bool = False,
                 alpha: float = 0.5, iter_num: int = 1, sv_num: int = 1, regular: float | None = 0.5,
                 features_only: bool = False, out_indices: Sequence[int] | None = None,
                 dynamic_img_size: bool = False):
        super().__init__()
        if img_size < 112:
            raise ValueError(f"img_size={img_size}: SoT's token embedding takes img_size >= 112")
        if token_dim != 64:
            raise ValueError(f"token_dim={token_dim}: SoT's first DenseBlock takes 64 channels (token_dim=64)")
        if head_num_heads < 1 or wr_dim < 1:
            raise ValueError(f"head_num_heads={head_num_heads}, wr_dim={wr_dim}: expected positive values")
        # Which of the three transitions pool (the authors' ``aa_layer``: 'Pass' = no pool).
        self.pools = (True, False, False) if large_output else (True, True, img_size // 112 != 1)
        side = 56 if large_output else 14
        self._build_trunk(
            img_size=img_size, in_chans=in_chans, num_classes=num_classes, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, norm_layer=norm_layer,
            block_norm_layer=block_norm_layer, act_layer=act_layer, features_only=features_only,
            out_indices=out_indices, dynamic_img_size=dynamic_img_size,
            visual_tokens=SoViTTokens(DenseNetTokens(img_size, in_chans, embed_dim, self.pools)),
            num_patches=side * side,
            head=lambda: SoTHead(embed_dim, num_classes, head_num_heads, wr_dim, wr_bias, alpha, iter_num, sv_num,
                                 regular),
            grid_stride=2 ** (1 + sum(self.pools)))
        self.pretrained_cfg = self._pretrained_cfg("visual_tokens.tokens.stem.0")

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        # The stem's max-pool gives ⌈n/2⌉; each pooling transition ⌊n/2⌋.
        k = 2 ** sum(self.pools)
        return -(-height // 2) // k, -(-width // 2) // k

    def _size_rule(self) -> str:
        k, side = 2 ** sum(self.pools), math.isqrt(self.num_patches)
        low, high = 2 * side * k - 1, 2 * (side * k + k - 1)
        return f"a ⌊⌈H/2⌉/{k}⌋×⌊⌈W/2⌉/{k}⌋ grid with {self.num_patches} cells: {low} <= H, W <= {high} for the square grid"

    @classmethod
    def from_official_config(cls, config: Mapping) -> SoT:
        """Build from the authors' ``SoT(...)`` keyword arguments as the goldens record them
        (see :meth:`SoViT.from_official_config`)."""
        c = {k: _official(v) for k, v in config.items() if not isinstance(v, Mapping)}
        tokens, vit = _official_dict(config["visualTokenConfig"]), _official_dict(config["ViTConfig"])
        rep = config["representationConfig"]
        args = _official_dict({k: v for k, v in rep["args"].items() if k != "normalization"})
        norm = _official_dict(rep["args"]["normalization"])
        _expect(tokens.get("type"), "DenseNet", "visualTokenConfig type")
        _expect(rep.get("type"), "MGCrP", "representationConfig type")
        _expect(rep.get("fusion_type", "sum_fc"), "sum_fc", "fusion_type")
        _expect(norm.get("type"), "svPN", "normalization type")
        _expect(norm.get("vec", "full"), "full", "svPN vec")
        _expect(norm.get("init_weight", "learn"), "learn", "svPN init_weight")
        if args.get("dim", vit["embed_dim"]) != vit["embed_dim"]:
            raise ValueError(f"MGCrP dim {args['dim']} must equal embed_dim {vit['embed_dim']}")
        if norm.get("input_dim", args["wr_dim"]) != args["wr_dim"]:
            raise ValueError(f"svPN input_dim {norm['input_dim']} must equal wr_dim {args['wr_dim']}")
        return cls(img_size=c.get("img_size", 224), in_chans=c.get("in_chans", 3),
                   num_classes=c.get("num_classes", 1000), drop_rate=c.get("drop_rate", 0.0),
                   drop_path_rate=c.get("drop_path_rate", 0.0), norm_layer=c.get("norm_layer", nn.LayerNorm),
                   token_dim=tokens.get("token_dim", 64), large_output=bool(tokens.get("large_output", False)),
                   head_num_heads=args.get("num_heads", 8), wr_dim=args.get("wr_dim", 16),
                   wr_bias=bool(args.get("qkv_bias", False)), alpha=norm.get("alpha", 0.5),
                   iter_num=norm.get("iterNum", 1), sv_num=norm.get("svNum", 1),
                   regular=_dropout_rate(norm.get("regular")), **_vit_kwargs(vit))


# ---- the authors' configs as recorded (strings for Python objects) ------------------------------

_OFFICIAL_CLASSES = {"nn.LayerNorm": nn.LayerNorm, "nn.GELU": nn.GELU, "nn.ReLU": nn.ReLU, "nn.SiLU": nn.SiLU,
                     "nn.Identity": nn.Identity, "nn.BatchNorm2d": nn.BatchNorm2d}
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def _official(value):
    """One recorded value as the Python object it stands for."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[text]
    if text in _OFFICIAL_CLASSES:
        return _OFFICIAL_CLASSES[text]
    found = re.fullmatch(rf"nn\.Dropout\((?:p=)?({_NUMBER})?(?:,\s*inplace=(?:True|False))?\)", text)
    if found:
        return nn.Dropout(float(found.group(1)) if found.group(1) else 0.5)
    found = re.fullmatch(rf"partial\(nn\.LayerNorm,\s*eps=({_NUMBER})\)", text)
    if found:
        return partial(nn.LayerNorm, eps=float(found.group(1)))
    if re.fullmatch(_NUMBER, text):
        return float(text) if re.search(r"[.eE]", text) else int(text)
    return text  # a plain string setting (types, 'full', ...)


def _official_dict(d: Mapping) -> dict:
    return {k: (_official(v) if not isinstance(v, Mapping) else v) for k, v in d.items()}


def _dropout_rate(regular) -> float | None:
    if regular is None:
        return None
    if isinstance(regular, nn.Dropout):
        return float(regular.p)
    if isinstance(regular, (int, float)):
        return float(regular)
    raise ValueError(f"regular={regular!r}: expected None or a dropout (nn.Dropout(p=...))")


def _expect(value, expected, what: str) -> None:
    if value != expected:
        raise NotImplementedError(f"{what}={value!r} is not implemented (only {expected!r}, which every "
                                  f"published variant uses)")


def _vit_kwargs(vit: dict) -> dict:
    return dict(embed_dim=vit["embed_dim"], depth=vit["depth"], num_heads=vit["num_heads"],
                mlp_ratio=vit.get("mlp_ratio", 4.0), qkv_bias=bool(vit.get("qkv_bias", False)),
                qk_scale=vit.get("qk_scale"), attn_drop_rate=vit.get("attn_drop", 0.0),
                block_norm_layer=vit.get("norm_layer", nn.LayerNorm), act_layer=vit.get("act_layer", nn.GELU))


# ---- the authors' release files and the registered variants ------------------------------------


def sovit_checkpoint_filter(state_dict: dict, model: nn.Module) -> dict:
    """The authors' checkpoints (timm 0.3.4 ``CheckpointSaver`` files: ``state_dict`` /
    ``state_dict_ema`` wrappers, unwrapped by ``stvit.load_checkpoint``, which also lets a
    features_only model ignore the head's keys) as ours. Their keys are ours already; the frozen
    ``pos_embed`` is a pure function of (tokens, width), so a missing or differently sized one is
    replaced by the model's own table."""
    state = dict(state_dict)
    own = model.state_dict()
    if "pos_embed" in own and ("pos_embed" not in state or state["pos_embed"].shape != own["pos_embed"].shape):
        state["pos_embed"] = own["pos_embed"].detach().clone()
    return state


sot_checkpoint_filter = sovit_checkpoint_filter  # same release format, same keys


register_family("sovit", SoViT, checkpoint_filter=sovit_checkpoint_filter,
                paper="So-ViT: Mind Visual Tokens for Vision Transformer (Xie et al., arXiv 2104.10935 v1)",
                verified_against="jiangtaoxie/So-ViT@c2d076e src/ (float64 goldens)")
register_family("sot", SoT, checkpoint_filter=sot_checkpoint_filter,
                paper="SoT: Delving Deeper into Classification Head for Transformer (Xie et al., arXiv 2104.10935 v2)",
                verified_against="jiangtaoxie/So-ViT@5da3c37 sot_src/ (float64 goldens)")

_CFG = dict(fixed_input_size=True, input_size=(3, 224, 224), crop_pct=0.875, interpolation="bicubic",
            classifier=("classifier.cls_fc", "classifier.visual_fc"), first_conv="visual_tokens.tokens.stem.0")

# The authors' factories (src/so_vit.py, sot_src/sot.py); all at img_size 224, qkv_bias False,
# α 0.5, one power-iteration step, one singular value. qk_scale stays head_dim**-0.5: their factories
# set another scale only with pretrained=True, which their training and evaluation never pass.
SOVIT_CONFIGS: dict[str, dict] = {
    # Ours, for demos and tests: the cheapest So-ViT the design allows (img_size 112, the smallest
    # it takes: 14×14 tokens from the fixed-width ResNet stem; a thin, shallow ViT and head). Depth 3:
    # its feature levels are its blocks, and a backbone gives three (timm's ViT convention).
    "sovit_tiny": dict(img_size=112, embed_dim=64, depth=3, num_heads=2, mlp_ratio=2.0, token_dim=16,
                       dimension_reduction=(16, 8), regular=None),
    "So_vit_7": dict(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0, dimension_reduction=(48, 24), regular=None),
    "So_vit_10": dict(embed_dim=256, depth=10, num_heads=4, mlp_ratio=2.0, dimension_reduction=(48, 24), regular=None),
    "So_vit_14": dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0, dimension_reduction=(64, 48), regular=0.5),
    "So_vit_19": dict(embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0, dimension_reduction=(96, 48), regular=0.5),
}
SOT_CONFIGS: dict[str, dict] = {
    # Ours, for demos and tests: img_size 112 (the last transition does not pool; 14×14 tokens), depth 3
    # (three feature levels, as sovit_tiny). Not "sot_tiny": names are case-insensitive, and that one
    # is the authors' SoT_Tiny.
    "sot_mini": dict(img_size=112, embed_dim=64, depth=3, num_heads=2, mlp_ratio=2.0, head_num_heads=2,
                     wr_dim=6, regular=None),
    "SoT_Tiny": dict(embed_dim=240, depth=12, num_heads=4, mlp_ratio=2.5, head_num_heads=6, wr_dim=14, regular=None),
    "SoT_Small": dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.5, head_num_heads=6, wr_dim=24, regular=0.5),
    "SoT_Base": dict(embed_dim=528, depth=24, num_heads=8, mlp_ratio=3.0, head_num_heads=6, wr_dim=38, regular=0.7),
}

# Training recipes, as differences from train's paper preset (the DeiT recipe: lr 1e-3 at a global
# batch of 1024, warm-up 5, wd 0.05, mixup 0.8, cutmix 1.0, smoothing 0.1, rand-m9-mstd0.5-inc1,
# reprob 0.25, repeats 3, crop 0.875, no EMA). The authors train with timm 0.3.4's train.py
# (their main.py), 300 epochs, cosine, warm-up 5 from 1e-6, min lr 1e-5, drop path 0.1 (main.py
# defaults: --epochs 300 --warmup-epochs 5 --warmup-lr 1e-6 --min-lr 1e-5 --drop-path 0.1, the
# augmentations above), with two differences for all variants:
_AUTHORS = dict(
    model_ema=True, model_ema_decay=0.99996,  # main.py: --model-ema defaults to True, decay 0.99996
    repeats=1,  # main.py uses timm's plain (distributed) sampler: no repeated augmentation
)
SOVIT_RECIPES = {
    # So_ViT_{7,10}.sh: 8 GPUs × -b 64 = 512 and --lr 1e-3 as is (timm 0.3.4 does not scale it):
    # 2e-3 at 1024 with train's linear scaling; wd 0.03
    "So_vit_7": dict(_AUTHORS, batch_size=64, lr=2e-3, weight_decay=0.03),
    "So_vit_10": dict(_AUTHORS, batch_size=64, lr=2e-3, weight_decay=0.03),
    # So_ViT_{14,19}.sh: 8 × 64 = 512, --lr 1e-3 (2e-3 at 1024), wd 0.05 (the preset's)
    "So_vit_14": dict(_AUTHORS, batch_size=64, lr=2e-3),
    "So_vit_19": dict(_AUTHORS, batch_size=64, lr=2e-3),
}
SOT_RECIPES = {
    # README table and scripts/train_SoT_{Tiny,Small}.sh: 8 × 128 = 1024, lr 1e-3, wd 0.03
    "SoT_Tiny": dict(_AUTHORS, weight_decay=0.03),
    "SoT_Small": dict(_AUTHORS, weight_decay=0.03),
    # scripts/train_SoT_Base.sh: 8 × 64 = 512, lr 5e-4 (1e-3 at 1024, the preset's), wd 0.065
    "SoT_Base": dict(_AUTHORS, batch_size=64, weight_decay=0.065),
}


def _sovit(name: str, overrides: dict) -> SoViT:
    return SoViT(**{**SOVIT_CONFIGS[name], **overrides})


def _sot(name: str, overrides: dict) -> SoT:
    return SoT(**{**SOT_CONFIGS[name], **overrides})


_TINY_CFG = dict(_CFG, input_size=(3, 112, 112))

# Paper numbers. So-ViT: ImageNet-1K top-1 at 224² "paper reported" in the authors' README at
# c2d076e (76.2 / 77.9 / 81.8 / 82.4); the v1 paper's params/FLOPs table was not available here,
# so params_m/macs_g are None. SoT: README table at 5da3c37 (params M, GFLOPs as thop counts them,
# i.e. without attention's matrix products, top-1).


@register_model("sovit", pretrained_cfg=_TINY_CFG, demo=dict(input_size=112), aliases=("so_vit_tiny",))
def sovit_tiny(**overrides) -> SoViT:
    return _sovit("sovit_tiny", overrides)


@register_model("sovit", pretrained_cfg=_CFG, paper=dict(params_m=None, macs_g=None, top1=76.2),
                recipe=SOVIT_RECIPES["So_vit_7"], aliases=("sovit_7", "so_vit7", "sovit7"))
def So_vit_7(**overrides) -> SoViT:
    return _sovit("So_vit_7", overrides)


@register_model("sovit", pretrained_cfg=_CFG, paper=dict(params_m=None, macs_g=None, top1=77.9),
                recipe=SOVIT_RECIPES["So_vit_10"], aliases=("sovit_10", "so_vit10", "sovit10"))
def So_vit_10(**overrides) -> SoViT:
    return _sovit("So_vit_10", overrides)


@register_model("sovit", pretrained_cfg=_CFG, paper=dict(params_m=None, macs_g=None, top1=81.8),
                recipe=SOVIT_RECIPES["So_vit_14"], aliases=("sovit_14", "so_vit14", "sovit14"))
def So_vit_14(**overrides) -> SoViT:
    return _sovit("So_vit_14", overrides)


@register_model("sovit", pretrained_cfg=_CFG, paper=dict(params_m=None, macs_g=None, top1=82.4),
                recipe=SOVIT_RECIPES["So_vit_19"], aliases=("sovit_19", "so_vit19", "sovit19"))
def So_vit_19(**overrides) -> SoViT:
    return _sovit("So_vit_19", overrides)


@register_model("sot", pretrained_cfg=_TINY_CFG, demo=dict(input_size=112))
def sot_mini(**overrides) -> SoT:
    return _sot("sot_mini", overrides)


@register_model("sot", pretrained_cfg=_CFG, paper=dict(params_m=7.7, macs_g=2.5, top1=80.3),
                recipe=SOT_RECIPES["SoT_Tiny"])
def SoT_Tiny(**overrides) -> SoT:
    return _sot("SoT_Tiny", overrides)


@register_model("sot", pretrained_cfg=_CFG, paper=dict(params_m=26.9, macs_g=5.8, top1=82.7),
                recipe=SOT_RECIPES["SoT_Small"])
def SoT_Small(**overrides) -> SoT:
    return _sot("SoT_Small", overrides)


@register_model("sot", pretrained_cfg=_CFG, paper=dict(params_m=76.8, macs_g=14.5, top1=83.5),
                recipe=SOT_RECIPES["SoT_Base"])
def SoT_Base(**overrides) -> SoT:
    return _sot("SoT_Base", overrides)
