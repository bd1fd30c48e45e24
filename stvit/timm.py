"""The zoo in timm: ``import stvit.timm`` registers every stvit variant in timm's model registry.

    import stvit.timm, timm
    model = timm.create_model("stvit_small", pretrained=True,
                              pretrained_cfg_overlay=dict(file="stvit-small-224.pth"))  # the authors' file
    backbone = timm.create_model("sgformer_s", features_only=True, out_indices=(1, 2, 3))
    config = timm.data.resolve_data_config({}, model=model)       # our evaluation transform
    transform = timm.data.create_transform(**config)

timm builds our model (``stvit.create_model``; nothing here defines a layer) through its own
``build_model_with_cfg``, so everything timm does around a model applies: ``pretrained=True``
reads the file of ``pretrained_cfg_overlay`` (train.py's ``--pretrained-path``), maps the authors'
keys with the family's ``checkpoint_filter`` from stvit's registry, adapts ``in_chans`` and drops a
classifier of another size; ``features_only=True`` wraps the model in timm's ``FeatureGetterNet``,
which prunes it and calls its ``forward_intermediates``. stvit publishes no weights:
``pretrained=True`` needs a file. (timm's ``checkpoint_path=`` / validate.py's ``--checkpoint``
load a state dict as it is, without the family filter: right for files of ours.)

Each family is a timm "module" of its own name (``timm.list_models(module="sgformer")``); its
registered ``pretrained_cfg`` is the one ``stvit.create_model`` gives the variant (input size, crop,
interpolation, mean/std, classifier and first conv), with ``pool_size`` and the paper.

timm's scripts (``train.py``, ``validate.py``, ``benchmark.py`` of its repository) have no hook to
import a module; this one runs a script with the zoo registered::

    python -m stvit.timm path/to/validate.py --data-dir /data/imagenet/val --model stvit_small \\
        --pretrained --model-kwargs "pretrained_cfg_overlay={'file': 'stvit-small-224.pth'}"

timm is optional (``pip install "stvit[timm]"``); ``import stvit`` never imports it.
"""

from __future__ import annotations

import runpy
import sys
import types
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

try:
    import timm.models
    from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
except ImportError as e:  # timm absent, or a timm this module cannot use
    raise ImportError(f'stvit.timm needs timm >= 1.0 ({e}); install it with: pip install "stvit[timm]"') from e

from .models import create_model
from .registry import FAMILIES, MODELS

NAMESPACE = "stvit.timm"  # this module's name, also when `python -m stvit.timm` runs it as __main__
_SOURCE_KEYS = ("file", "url", "hf_hub_id", "state_dict")
_CFG_FIELDS = ("input_size", "fixed_input_size", "interpolation", "crop_pct", "mean", "std", "num_classes",
               "first_conv", "classifier")


# Per family: does forward_features give an NCHW map (timm's "standard" models), or tokens (B, N, C), as
# timm's ViT-like models do (its tests call those non-standard)?
MAP_FEATURES: dict[str, bool] = {}


def timm_module(family: str) -> str:
    """The module holding a family's timm entrypoints, ``stvit.timm.<family>``: timm names it ``<family>``."""
    return f"{NAMESPACE}.{family}"


def _final_features_are_maps(family: str) -> bool:
    """Whether a family's ``forward_features`` gives an NCHW map (timm's standard) or tokens: asked of
    its smallest variant on the meta device (no memory, no arithmetic)."""
    name = min((n for n in MODELS if MODELS[n].family == family), key=lambda n: not MODELS[n].ours)
    with torch.device("meta"):
        model = create_model(name).eval()
        return model.forward_features(torch.empty(1, *model.pretrained_cfg["input_size"])).ndim == 4


def _pretrained_cfg(name: str, maps: bool) -> dict:
    """The variant's ``pretrained_cfg`` for timm: ``stvit.create_model``'s (the model built on the meta
    device), with ``pool_size``, the final map's size, for a family whose final features are maps."""
    with torch.device("meta"):
        model = create_model(name)
    cfg = {k: model.pretrained_cfg[k] for k in _CFG_FIELDS}
    stride = model.feature_info[-1]["reduction"]
    family = FAMILIES[MODELS[name].family]
    return dict(cfg, pool_size=tuple(-(-side // stride) for side in cfg["input_size"][1:]) if maps else None,
                paper_name=family.paper, description=f"stvit: {name}, verified against {family.verified_against}",
                notes=("No published weights here: pass the authors' release file with "
                       "pretrained_cfg_overlay=dict(file=PATH).",))


def _default_out_indices(name: str):
    """What ``features_only=True`` returns without ``out_indices``: stvit's own backbone default."""
    with torch.device("meta"):
        backbone = create_model(name, features_only=True)
    return backbone.out_indices


def _build_ours(name: str, **kwargs) -> torch.nn.Module:
    """``stvit.create_model`` for timm's builder, which passes a fixed-size model ``img_size`` as (H, W)."""
    size = kwargs.get("img_size")
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"img_size={tuple(size)}: {name} takes square inputs; give one side (img_size=224)")
        kwargs["img_size"] = int(size[0])
    return create_model(name, **kwargs)


def _create(name: str, pretrained: bool = False, *, pretrained_cfg=None, pretrained_cfg_overlay=None,
            device=None, dtype=None, **kwargs) -> torch.nn.Module:
    """timm's entrypoint for ``name`` (``create_model`` calls it with its keywords)."""
    if pretrained:
        resolved = timm.models.resolve_pretrained_cfg(name, pretrained_cfg, pretrained_cfg_overlay).to_dict()
        if not any(resolved.get(k) for k in _SOURCE_KEYS):
            raise ValueError(f"{name}: stvit publishes no weights for timm to download; pass the checkpoint "
                             f"(e.g. the authors' release file): timm.create_model({name!r}, pretrained=True, "
                             f"pretrained_cfg_overlay=dict(file=PATH))")
    if kwargs.get("features_only"):
        kwargs.setdefault("feature_cls", "getter")  # forward_intermediates: every family has it
        kwargs.setdefault("out_indices", _default_out_indices(name))
    built = {}

    def construct(**kw) -> torch.nn.Module:
        built["model"] = _build_ours(name, **kw)
        built["input_size"] = built["model"].pretrained_cfg["input_size"]
        return built["model"]

    with torch.device(device) if device is not None else nullcontext():
        model = build_model_with_cfg(construct, name, pretrained, pretrained_cfg=pretrained_cfg,
                                     pretrained_cfg_overlay=pretrained_cfg_overlay,
                                     pretrained_filter_fn=FAMILIES[MODELS[name].family].checkpoint_filter, **kwargs)
    # timm's cfg describes the weights (their classes); the input size is the one this model takes.
    own = {"input_size": built["input_size"], "family": MODELS[name].family}
    for module in {id(model): model, id(built["model"]): built["model"]}.values():
        module.pretrained_cfg = {**module.pretrained_cfg, **own}
        module.default_cfg = module.pretrained_cfg
    return model if dtype is None else model.to(dtype)


def _entrypoint(name: str, module: types.ModuleType):
    def entrypoint(pretrained: bool = False, **kwargs) -> torch.nn.Module:
        return _create(name, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = module.__name__
    entrypoint.__doc__ = f"stvit's {name} ({FAMILIES[MODELS[name].family].paper})."
    return entrypoint


def _register_all() -> dict[str, list[str]]:
    """Register every variant, family by family; returns what was registered. A name timm already
    gives another model keeps timm's meaning (with a warning: ``stvit.create_model`` builds ours)."""
    registered: dict[str, list[str]] = {}
    for family in FAMILIES:
        MAP_FEATURES[family] = _final_features_are_maps(family)
        module = sys.modules.get(timm_module(family))
        if module is None:
            module = types.ModuleType(timm_module(family), f"stvit's {family} variants, as timm sees them")
            module.default_cfgs = {}
            sys.modules[module.__name__] = module
            setattr(sys.modules[NAMESPACE], family, module)
        names, maps = [], MAP_FEATURES[family]
        for name in (n for n in MODELS if MODELS[n].family == family):
            owner = timm.models._registry._model_to_module.get(name)
            if owner == family and hasattr(module, name):
                continue  # this module registered it already (a re-import)
            if timm.models.is_model(name):
                warnings.warn(f"timm already has a model named {name!r} (module {owner!r}); it keeps that meaning. "
                              f"stvit.create_model({name!r}) builds stvit's", stacklevel=2)
                continue
            module.default_cfgs.update(generate_default_cfgs({name: _pretrained_cfg(name, maps)}))
            fn = _entrypoint(name, module)
            setattr(module, name, fn)
            register_model(fn)
            names.append(name)
        registered[family] = names
    return registered


def main(argv: list[str] | None = None) -> int:
    """``python -m stvit.timm SCRIPT [ARGS...]``: run a timm script (train.py, validate.py, benchmark.py)
    as ``python SCRIPT ARGS...`` would, with every stvit variant registered."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m stvit.timm SCRIPT [ARGS...]\n\nRuns a timm script (train.py, validate.py, "
              "benchmark.py of the timm repository, huggingface/pytorch-image-models) with stvit's models registered "
              "in timm, e.g.\n  python -m stvit.timm validate.py --data-dir /data/imagenet/val --model stvit_small "
              "--pretrained --model-kwargs \"pretrained_cfg_overlay={'file': 'stvit-small-224.pth'}\"\n\n"
              "registered: " +
              ", ".join(n for names in REGISTERED.values() for n in names))
        return 0 if argv else 2
    script = Path(argv[0])
    if not script.is_file():
        print(f"error: {script} is not a file; give the path of a timm script such as validate.py", file=sys.stderr)
        return 2
    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(script.resolve().parent))  # as `python SCRIPT` puts the script's folder first
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    # `python -m stvit.timm` runs this file as __main__: register through the module stvit.timm itself,
    # so timm's registry points at one copy.
    import stvit.timm

    sys.exit(stvit.timm.main())
else:
    REGISTERED = _register_all()
