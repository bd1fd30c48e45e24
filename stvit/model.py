"""STViT: the hierarchical Super Token Vision Transformer (paper Fig. 3).

Module and parameter names follow the authors' code, so their state dicts map one-to-one.
The backbone API follows timm (forward_features / forward_head / reset_classifier /
features_only / feature_info / no_weight_decay / set_grad_checkpointing / pretrained_cfg).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import SuperTokenAttention

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescale the survivors."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


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
        x = self.drop(self.act1(self.fc1(x)))
        return self.drop(self.fc2(self.conv(x)))


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
        return self.proj(x)


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


class STViT(nn.Module):
    """Super Token Vision Transformer.

    Keywords are the authors' (``embed_dim``, ``depths``, ``num_heads``, ``n_iter``,
    ``stoken_size``, ``projection``, ``mlp_ratio``, ``qkv_bias``, ``qk_scale``, ``layerscale``,
    ``init_values``, ``drop_rate``, ``attn_drop_rate``, ``drop_path_rate``, ``num_classes``,
    ``in_chans``, ``use_checkpoint``, ``checkpoint_num``). ``projection=None`` skips the final
    1×1 projection (the authors' code requires one). ``features_only=True`` builds a backbone
    that returns the stage maps selected by ``out_indices`` (strides 4, 8, 16, 32) and has no head.
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: Sequence[int] = (96, 192, 384, 768), depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), n_iter=(1, 1, 1, 1), stoken_size=(8, 4, 2, 1),
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: float | None = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 projection: int | None = None, use_checkpoint: bool = False,
                 checkpoint_num: Sequence[int] = (0, 0, 0, 0), layerscale=(False, False, False, False),
                 init_values: float = 1e-6, features_only: bool = False,
                 out_indices: Sequence[int] = (0, 1, 2, 3), **unused):
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
        self.num_features = projection or embed_dim[-1]
        self.features_only = features_only

        self.patch_embed = ConvStem(in_chans, embed_dim[0])
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()  # stochastic depth decay rule
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
            self.out_indices = tuple(out_indices)
            if not self.out_indices or any(i not in range(S) for i in self.out_indices):
                raise ValueError(f"out_indices={tuple(out_indices)}: expected stage indices in 0..{S - 1}")
            self.feature_info = FeatureInfo(_stage_info(embed_dim, depths, i) for i in self.out_indices)
        else:
            self.proj = nn.Conv2d(embed_dim[-1], projection, 1) if projection else nn.Identity()
            self.norm = nn.BatchNorm2d(self.num_features)
            self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
            self.feature_info = FeatureInfo(_stage_info(embed_dim, depths, i) for i in range(S))
        self.pretrained_cfg = default_cfg(num_classes if not features_only else 0)
        self.apply(_init_weights)

    # ---- timm-style API -------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected x of shape (B, C, H, W), a 4-D tensor, got {shape}; "
                             f"add a batch dimension with x[None] for a single image")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"x has {x.shape[1]} channels but the model expects in_chans={self.in_chans}; "
                             f"convert the image (e.g. to RGB) or build the model with in_chans={x.shape[1]}")

    def forward_stages(self, x: torch.Tensor, out_indices: Sequence[int] = (0, 1, 2, 3),
                       before_downsample: bool = True) -> list[torch.Tensor]:
        """Stage maps; ``before_downsample`` gives strides 4/8/16/32, else each stage's output."""
        self.check_input(x)
        # Channels-last (NHWC strides) throughout: depthwise and 1×1 convs run several times faster
        # in it on CPU (oneDNN) and GPU (cuDNN), and LayerNorm2d's permutes become free views.
        x = self.pos_drop(self.patch_embed(x.contiguous(memory_format=torch.channels_last)))
        outs = []
        for i, stage in enumerate(self.layers):
            x = stage.forward_blocks(x)
            if before_downsample and i in out_indices:
                outs.append(x)
            if stage.downsample is not None:
                x = stage.downsample(x)
            if not before_downsample and i in out_indices:
                outs.append(x)
            if i >= max(out_indices):
                break
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image -> (B, num_features, ⌈H/32⌉, ⌈W/32⌉) final map (after proj, BN, Swish)."""
        x = self.forward_stages(x, (len(self.layers) - 1,))[0]
        return F.silu(self.norm(self.proj(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor):
        if self.features_only:
            return self.forward_stages(x, self.out_indices)
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        if self.features_only:
            raise ValueError("a features_only model has no classifier; build it with features_only=False")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            _init_weights(self.head)
            self.head.to(self.norm.weight.device, self.norm.weight.dtype)
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


class FeatureInfo(list):
    """List of {num_chs, reduction, module} dicts, one per returned stage (timm's convention)."""

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self]


def _stage_info(embed_dim, depths, i: int) -> dict:
    # The stage map is the last block's output (``layers.i`` itself returns it downsampled).
    return dict(num_chs=embed_dim[i], reduction=4 * 2 ** i, module=f"layers.{i}.blocks.{depths[i] - 1}")


def default_cfg(num_classes: int, input_size: int = 224) -> dict:
    return dict(input_size=(3, input_size, input_size), crop_pct=0.875, interpolation="bicubic",
                mean=IMAGENET_MEAN, std=IMAGENET_STD, classifier="head", first_conv="patch_embed.proj.0",
                num_classes=num_classes)


def _init_weights(m: nn.Module) -> None:
    # As the authors: truncated-normal linear layers, unit LayerNorm; convs keep PyTorch's default.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
