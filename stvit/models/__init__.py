"""The zoo: importing this package registers every family; ``create_model`` builds any of them by name.

One file per family, each read top to bottom beside its paper and registering its variants with
``@register_model`` (see ``stvit/registry.py``): ``stvit`` (STViT), ``sgformer`` (SG-Former),
``sovit`` (So-ViT and SoT), ``lvt`` (LVT).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from torch import nn

from ..checkpoint import load_checkpoint
from ..registry import model_entry, resolve_name
from . import stvit  # noqa: F401  (registers its family; so do the imports below)
from . import sgformer  # noqa: F401
from . import sovit  # noqa: F401
from . import lvt  # noqa: F401


def create_model(name: str, *, pretrained: str | os.PathLike | Mapping | None = None, **overrides) -> nn.Module:
    """Build a registered model; keywords override its configuration (``num_classes``,
    ``drop_path_rate``, ``features_only``, ``out_indices``, ...). ``pretrained`` is a checkpoint
    (path or state dict, the authors' release files included) to load strictly."""
    entry = model_entry(name)
    model = entry.builder(**overrides)
    # The variant's registered settings (crop_pct, interpolation, ...) over the class defaults; what the
    # built model itself determines (its input size, classes) stays the model's.
    own = {k: model.pretrained_cfg[k] for k in ("input_size", "fixed_input_size", "num_classes")
           if k in model.pretrained_cfg}
    model.pretrained_cfg = {**model.pretrained_cfg, **entry.pretrained_cfg, **own, "architecture": entry.name,
                            "family": entry.family}
    if pretrained is not None:
        load_checkpoint(model, pretrained)
    return model


__all__ = ["create_model", "resolve_name"]
