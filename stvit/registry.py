"""The model registry: every family registers its variants here, and everything else looks them up.

A family file (``stvit/models/<family>.py``) does two things at import time (timm's
``@register_model`` idea)::

    register_family("sgformer", SGFormer, checkpoint_filter=checkpoint_filter_fn,
                    paper="SG-Former (Ren et al., ICCV 2023)", verified_against="OliverRensu/SG-Former@b982803")

    @register_model("sgformer", pretrained_cfg=dict(crop_pct=0.9), paper=dict(params_m=22.5, macs_g=4.8, top1=83.2),
                    recipe=dict(drop_path=0.1, model_ema=True, model_ema_decay=0.99992, warmup_epochs=20))
    def sgformer_s(**overrides):
        return SGFormer(**{**SGFORMER_S, **overrides})

``recipe`` holds the variant's differences from the ``paper`` preset of ``python -m train``
(``train/config.py`` names the keys; ``drop_path`` applies to every preset); ``demo`` holds its
differences from the ``demo`` preset (a fixed-size model names its ``input_size`` there).
``stvit.create_model`` (``stvit/models/__init__.py``) builds a registered name; this module
imports no model, so every other module can import it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

# Keys every model's pretrained_cfg has (timm's names); a family class starts from these.
DEFAULT_PRETRAINED_CFG = dict(input_size=(3, 224, 224), fixed_input_size=False, crop_pct=0.875,
                              interpolation="bicubic", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                              classifier="head", first_conv=None)


@dataclass(frozen=True)
class Family:
    """A model family: its class, how the authors' release files map to its state dict, provenance."""

    name: str
    model_class: type[nn.Module]
    checkpoint_filter: Callable[[dict, nn.Module], dict] | None = None  # authors' keys -> ours
    paper: str = ""                 # the paper, for tables
    verified_against: str = ""      # the official code its goldens were recorded from
    stvit_only_tools: bool = False  # visualize / bench scaling work on this family


@dataclass(frozen=True)
class ModelEntry:
    """One registered variant."""

    name: str
    family: str
    builder: Callable[..., nn.Module]
    pretrained_cfg: dict  # what differs from the model class's own pretrained_cfg
    # params_m, macs_g, top1 (None where the paper has none); params_of="backbone" where the paper
    # counts the backbone only (the features_only model)
    paper: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)  # differences from train's paper preset
    demo: dict = field(default_factory=dict)    # differences from train's demo preset
    aliases: tuple[str, ...] = ()

    @property
    def ours(self) -> bool:
        """A variant of ours (demos, tests): the paper has no figure for it."""
        return all(self.paper.get(k) is None for k in ("params_m", "macs_g", "top1"))


FAMILIES: dict[str, Family] = {}
MODELS: dict[str, ModelEntry] = {}
_LOOKUP: dict[str, str] = {}  # normalised name or alias -> canonical name


def _key(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def register_family(name: str, model_class: type[nn.Module], **info) -> Family:
    family = Family(name, model_class, **info)
    FAMILIES[name] = family
    return family


def register_model(family: str, *, pretrained_cfg: dict | None = None, paper: dict | None = None,
                   recipe: dict | None = None, demo: dict | None = None, aliases: tuple[str, ...] = ()):
    """Decorator registering ``builder(**overrides) -> model`` under the builder's name."""
    if family not in FAMILIES:
        raise ValueError(f"register_family({family!r}, ...) must come before its models")

    def register(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = builder.__name__
        entry = ModelEntry(name, family, builder, dict(pretrained_cfg or {}), dict(paper or {}), dict(recipe or {}), dict(demo or {}),
                           tuple(aliases))
        for key in (name, *aliases):
            other = _LOOKUP.get(_key(key))
            if other is not None and other != name:
                raise ValueError(f"model name {key!r} is registered twice ({other} and {name})")
            _LOOKUP[_key(key)] = name
        MODELS[name] = entry
        return builder

    return register


def list_models(family: str | None = None) -> list[str]:
    """Registered names (of one family if given), family by family in registration order."""
    return [n for n, e in MODELS.items() if family is None or e.family == family]


def list_families() -> list[str]:
    return list(FAMILIES)


def resolve_name(name: str) -> str:
    """The canonical name of a model (case-insensitive; ``small`` -> ``stvit_small``,
    ``sot_small`` -> ``SoT_Small``); ``ValueError`` listing every family's models otherwise."""
    canonical = _LOOKUP.get(_key(name))
    if canonical is None:
        listing = "; ".join(f"{fam}: {', '.join(list_models(fam))}" for fam in FAMILIES)
        raise ValueError(f"unknown model {name!r}; registered models by family: {listing}")
    return canonical


def model_entry(name: str) -> ModelEntry:
    return MODELS[resolve_name(name)]


def family_of(model: nn.Module) -> Family | None:
    """The registered family whose class ``model`` is (or derives from); None for other modules."""
    by_class = {family.model_class: family for family in FAMILIES.values()}
    for cls in type(model).__mro__:  # the most derived registered class wins
        if cls in by_class:
            return by_class[cls]
    return None
