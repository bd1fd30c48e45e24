"""The model contract every family implements, and the few pieces the families share.

A model (``stvit.create_model(name)`` or a family class built directly) answers:

====================================  ============================================================
``forward(x)``                        logits (B, num_classes); with ``features_only=True`` the list
                                      of NCHW feature maps that ``feature_info`` describes
``forward_features(x)``               the final features before pooling
``forward_head(x, pre_logits=False)`` pooling (+ classifier)
``get_classifier()`` /                the classifier module; a new one for ``num_classes`` (a
``reset_classifier(num_classes)``     family whose head averages a map also takes timm's
                                      ``global_pool``: 'avg', or '' for no pooling)
``no_weight_decay()``                 parameter names exempt from weight decay beyond 1-D
                                      parameters and biases (which the trainer always exempts)
``set_grad_checkpointing(enable)``    recompute block activations in backward
``repeated_blocks()``                 the blocks ``train`` compiles and FSDP2 shards one by one
                                      (torchtitan's ``model.layers``); :func:`blocks_of` asks for
                                      them, and finds them in a model from outside the zoo
``check_input(x)``                    a clear ``ValueError`` for an input the model cannot take
``training_loss(x, soft_targets,      the training objective for (B, num_classes) soft targets;
rng)``                                default: soft-target cross-entropy of ``forward(x)``. A family
                                      with its own objective (LVT's MixToken) overrides it and
                                      draws its randomness from ``rng`` (a ``random.Random``)
``prepare_inference()``               optional: fold what eval mode makes foldable (BatchNorm…) in
                                      place; returns the names of what it folded (``stvit.optimize``)
``inference_compile_options``         inductor options ``stvit.optimize`` adds to its own when it
                                      compiles the model for a CPU (default none; LVT's)
``forward_intermediates(x,            timm's feature API: the maps of the levels ``feature_info``
indices=None, norm=False,             lists (stages, or the blocks of an isotropic ViT), NCHW, and
stop_early=False, output_fmt='NCHW',  the final features: ``(final, [maps])``, or ``[maps]`` with
intermediates_only=False)``           ``intermediates_only``. ``indices``: None = every level, an
                                      int n = the last n, a sequence = those levels (negative from
                                      the end); ``stop_early`` stops after the last one asked for;
                                      ``norm`` applies the final norm where it fits (each family says)
``prune_intermediate_layers(          removes what the levels ``indices`` do not need: later levels,
indices=1, prune_norm=False,          the classifier (``prune_head``), the final norm
prune_head=True)``                    (``prune_norm``); returns the kept indices
``pretrained_cfg`` (alias             attributes (timm's names). ``head_hidden_size`` is the width of
``default_cfg``), ``feature_info``,   ``forward_head(x, pre_logits=True)``; ``feature_info`` lists
``num_classes``, ``num_features``,    every level of a classifier, the selected ones of a
``head_hidden_size``, ``in_chans``,   ``features_only`` backbone
``features_only``
====================================  ============================================================

:class:`ModelBase` supplies the defaults; a family overrides what differs.

Every family traces with ``torch.fx`` (``symbolic_trace``, torchvision's ``create_feature_extractor``):
the input checks step aside for a traced input (:func:`is_traced`), and what depends on the values
of sizes runs inside functions the tracer records as one call (``torch.fx.wrap``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .registry import DEFAULT_PRETRAINED_CFG

IMAGENET_MEAN = DEFAULT_PRETRAINED_CFG["mean"]
IMAGENET_STD = DEFAULT_PRETRAINED_CFG["std"]


class FeatureInfo(list):
    """List of ``{num_chs, reduction, module}`` dicts, one per returned feature map (timm's convention).

    ``module`` names the submodule whose output is that map (for hooks); ``reduction`` is the
    map's stride in input pixels.
    """

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self]


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


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The blocks to compile and shard one by one: the model's ``repeated_blocks()``, or for a
    model from outside the zoo (a timm model timed beside ours) timm's layout: the entries of every
    outermost ``blocks`` container (ConvNeXt's ``stages[i].blocks``, Swin's ``layers[i].blocks``,
    ViT's ``blocks``)."""
    if callable(getattr(model, "repeated_blocks", None)):
        return model.repeated_blocks()
    blocks, found = [], []
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{outer}.") for outer in found)
        if not inside and name.rsplit(".", 1)[-1] == "blocks" and isinstance(module, (nn.Sequential, nn.ModuleList)):
            found.append(name)
            blocks += list(module)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no repeated_blocks() and no `blocks` containers (timm's "
                         f"layout) to compile and shard one by one; give it a repeated_blocks() method "
                         f"returning its blocks")
    return blocks


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """The stochastic depth decay rule: rates rising linearly from 0 to ``rate`` over ``depth`` blocks
    (``torch.linspace(0, rate, depth)``, in Python so models can be built on the meta device)."""
    return [rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]


def init_vit_weights(m: nn.Module) -> None:
    """The usual ViT initialisation (timm's, which STViT, So-ViT/SoT and LVT use): truncated-normal
    (std 0.02) linear weights with zero bias, unit LayerNorm; other modules keep their own."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum(targets * log_softmax(logits))`` (computed in float32)."""
    if logits.shape != targets.shape:
        raise ValueError(f"soft targets {tuple(targets.shape)} must match logits {tuple(logits.shape)}")
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return torch.sum(-targets.float() * log_probs, dim=-1).mean()


def is_traced(x) -> bool:
    """True while ``torch.fx`` traces the model: ``x`` is then a Proxy whose sizes are not known, so
    the input checks (a clear error for an eager call) have nothing to check."""
    return isinstance(x, torch.fx.Proxy)


def check_image_batch(x, in_chans: int) -> None:
    """A (B, in_chans, H, W) tensor, or a ``ValueError`` that says what to change (nothing to check
    on a traced input)."""
    if is_traced(x):
        return
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected x of shape (B, C, H, W), a 4-D tensor, got {shape}; "
                         f"add a batch dimension with x[None] for a single image")
    if x.shape[1] != in_chans:
        raise ValueError(f"x has {x.shape[1]} channels but the model expects in_chans={in_chans}; "
                         f"convert the image (e.g. to RGB) or build the model with in_chans={x.shape[1]}")


def _levels(indices, count: int, name: str, what: str) -> list[int]:
    """timm's rule for choosing among ``count`` feature levels: None is every level, an int n the
    last n, a sequence those levels (negative ones count from the end)."""
    if indices is None:
        indices = count
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise ValueError(f"{name}={indices}: an int asks for the last n of the {count} {what}s, "
                             f"so 1 <= n <= {count}")
        return list(range(count - indices, count))
    take = [int(i) + count if int(i) < 0 else int(i) for i in indices]
    if not take or any(i not in range(count) for i in take):
        raise ValueError(f"{name}={tuple(indices)}: expected {what} indices in 0..{count - 1} "
                         f"(or -{count}..-1 from the end)")
    return take


def check_out_indices(out_indices: int | Sequence[int], count: int, what: str = "stage") -> tuple[int, ...]:
    """A ``features_only`` model's ``out_indices`` as a tuple of indices in ``0..count-1``."""
    return tuple(_levels(out_indices, count, "out_indices", what))


def feature_take_indices(count: int, indices: int | Sequence[int] | None = None) -> tuple[list[int], int]:
    """``forward_intermediates``' ``indices`` over ``count`` feature levels (timm's function of the
    same name): the levels in the order asked, and the largest."""
    take = _levels(indices, count, "indices", "feature level")
    return take, max(take)


def levels_up_to(model: nn.Module, last: int) -> FeatureInfo:
    """``model.feature_info`` without the levels after ``last`` (pruning): all levels of a classifier,
    or the selected ones (``out_indices``, which are cut alike) of a ``features_only`` backbone."""
    if not getattr(model, "features_only", False):
        return FeatureInfo(model.feature_info[:last + 1])
    kept = [(i, f) for i, f in zip(model.out_indices, model.feature_info) if i <= last]
    model.out_indices = tuple(i for i, _ in kept)
    return FeatureInfo(f for _, f in kept)


def check_output_fmt(output_fmt: str) -> None:
    if output_fmt != "NCHW":
        raise ValueError(f"output_fmt={output_fmt!r}: the intermediate features are NCHW maps; use output_fmt='NCHW'")


def check_fixed_pooling(global_pool: str | None, pooling: str) -> None:
    """timm's ``reset_classifier(num_classes, global_pool)`` for a head whose pooling is its design:
    only None (keep it) is accepted."""
    if global_pool is not None:
        raise ValueError(f"global_pool={global_pool!r}: this model pools with {pooling}, which global_pool cannot "
                         f"change; pass None, or build the model with features_only=True for its feature maps")


def check_global_pool(global_pool: str) -> str:
    """timm's ``global_pool`` of a model whose head averages a map: 'avg', or '' for none (the head
    then takes the unpooled map)."""
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool={global_pool!r}: expected 'avg' (average the final map) or '' (no pooling)")
    return global_pool


class ModelBase(nn.Module):
    """Defaults of the contract (see the module docstring); families subclass it."""

    in_chans: int = 3
    num_classes: int = 0
    num_features: int = 0
    head_hidden_size: int = 0
    features_only: bool = False
    inference_compile_options: dict = {}  # read-only: a family that needs options sets its own dict

    @property
    def default_cfg(self) -> dict:
        """timm's older name of ``pretrained_cfg`` (its scripts and tests still read it)."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, value: dict) -> None:
        self.pretrained_cfg = value

    def check_input(self, x: torch.Tensor) -> None:
        check_image_batch(x, self.in_chans)

    def placed(self, module: nn.Module) -> nn.Module:
        """A new submodule (a reset classifier) on this model's device and dtype, in its training mode."""
        like = next(self.parameters(), None)
        if like is not None:
            module.to(like.device, like.dtype)
        return module.train(self.training)

    def get_classifier(self) -> nn.Module:
        return self.get_submodule(self.pretrained_cfg.get("classifier", "head"))

    def no_weight_decay(self) -> set[str]:
        return set()

    def repeated_blocks(self) -> list[nn.Module]:
        raise NotImplementedError(f"{type(self).__name__} must list its blocks in repeated_blocks()")

    def training_loss(self, x: torch.Tensor, soft_targets: torch.Tensor, rng: random.Random) -> torch.Tensor:
        return soft_target_cross_entropy(self(x), soft_targets)

    def prepare_inference(self) -> list[str]:
        return []
