"""Load the authors' STViT (hhb072/STViT ``models/stvit.py``) from a user-supplied path, for timing.

Their module imports timm, fvcore and scipy at the top but uses only a few trivial helpers from
them; we install minimal stand-ins under those module names (only where the real package is
absent) so the file imports here without those dependencies. Nothing of theirs is copied.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import torch
from torch import nn

from stvit.contract import DropPath  # the same stochastic depth as timm's, which their file imports

# Per-block constant kernels of their unfold/fold convolutions: present in their state dict only.
_CONSTANT_KERNELS = ("attn.unfold.weights", "attn.fold.weights")


class AuthorsCodeError(ValueError):
    """The file given with --authors-code cannot be used; the message says why."""


def _to_2tuple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _unavailable(*args, **kwargs):
    raise RuntimeError("fvcore is not installed; this stand-in exists only so the module imports")


def _stand_in_modules() -> dict[str, types.ModuleType]:
    """Module objects named like the ones their file imports, holding just what it touches."""
    def module(name: str, **attrs) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        return m

    layers = module("timm.models.layers", DropPath=DropPath, to_2tuple=_to_2tuple,
                    trunc_normal_=lambda t, std=1.0, **kw: nn.init.trunc_normal_(t, std=std))
    registry = module("timm.models.registry", register_model=lambda fn: fn)
    vit = module("timm.models.vision_transformer", _cfg=lambda **kw: dict(kw))
    models = module("timm.models", layers=layers, registry=registry, vision_transformer=vit)
    fv_nn = module("fvcore.nn", FlopCountAnalysis=_unavailable, flop_count_table=_unavailable)
    scipy_io = module("scipy.io")
    return {
        "timm": module("timm", models=models), "timm.models": models, "timm.models.layers": layers,
        "timm.models.registry": registry, "timm.models.vision_transformer": vit,
        "fvcore": module("fvcore", nn=fv_nn), "fvcore.nn": fv_nn,
        "scipy": module("scipy", io=scipy_io), "scipy.io": scipy_io,
    }


def import_authors_module(path: str | Path) -> types.ModuleType:
    """Import their ``models/stvit.py`` from ``path`` as module ``authors_stvit``."""
    path = Path(path)
    if not path.is_file():
        raise AuthorsCodeError(f"--authors-code {path}: no such file; pass the path of models/stvit.py "
                               f"from a checkout of github.com/hhb072/STViT")
    # timm's registry always gets the stand-in: the real register_model looks their module up in
    # sys.modules (absent during this import: KeyError 'authors_stvit'), and would list their models
    # in timm's registry under our models' names.
    stand_ins = {name: mod for name, mod in _stand_in_modules().items()
                 if _missing(name) or name == "timm.models.registry"}
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        spec = importlib.util.spec_from_file_location("authors_stvit", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as e:  # a wrong file fails in many ways; say which file and why
        raise AuthorsCodeError(f"--authors-code {path}: importing it failed ({type(e).__name__}: {e}); "
                               f"expected the authors' models/stvit.py") from e
    finally:
        for name, old in saved.items():  # leave sys.modules as we found it
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    if not hasattr(module, "STViT"):
        raise AuthorsCodeError(f"--authors-code {path}: the file defines no STViT class; "
                               f"expected the authors' models/stvit.py")
    return module


def _missing(name: str) -> bool:
    root = name.split(".")[0]
    if root in sys.modules and not isinstance(sys.modules[root], types.ModuleType):
        return True
    try:
        return importlib.util.find_spec(root) is None
    except (ImportError, ValueError):
        return True


def has_authors_twin(name: str) -> bool:
    """Whether the authors' code builds registered model ``name`` (their code is STViT's)."""
    from stvit.models.stvit import STVIT_CONFIGS

    return name in STVIT_CONFIGS


def authors_config(name: str) -> dict:
    """The STViT keywords of registered model ``name``, for building the authors' twin; a clear error
    for a model of another family (their code is STViT's)."""
    from stvit.models.stvit import STVIT_CONFIGS

    if not has_authors_twin(name):
        raise AuthorsCodeError(f"the authors* modes time the authors' STViT code; {name} is not an STViT model: "
                               f"drop it or the authors* modes")
    return STVIT_CONFIGS[name]


def build_authors_model(module: types.ModuleType, config: dict) -> nn.Module:
    """Their STViT with the same architecture keywords as ours (``authors_config(name)``)."""
    keys = ("in_chans", "num_classes", "embed_dim", "depths", "num_heads", "n_iter", "stoken_size",
            "mlp_ratio", "qkv_bias", "qk_scale", "drop_rate", "attn_drop_rate", "drop_path_rate",
            "projection", "layerscale", "init_values")
    if not config.get("projection"):
        raise AuthorsCodeError("the authors' STViT needs a projection width; use a config with projection set")
    kwargs = {k: config[k] for k in keys if k in config}
    for k in ("embed_dim", "depths", "num_heads", "n_iter", "stoken_size", "layerscale"):
        if k in kwargs and not isinstance(kwargs[k], (list, tuple)):
            kwargs[k] = [kwargs[k]] * len(config["depths"])
    return module.STViT(**kwargs)


def to_authors_state_dict(ours: dict[str, torch.Tensor], authors_model: nn.Module) -> dict[str, torch.Tensor]:
    """Our state dict plus their constant identity kernels (taken from their freshly built model)."""
    theirs = dict(ours)
    for name, value in authors_model.state_dict().items():
        if name.endswith(_CONSTANT_KERNELS):
            theirs[name] = value
    return theirs


def load_authors_twin(path: str | Path, ours: nn.Module, config: dict, atol: float = 1e-4) -> nn.Module:
    """Their model carrying our weights, checked to give our output on a random batch (eval mode)."""
    module = import_authors_module(path)
    theirs = build_authors_model(module, config)
    missing, unexpected = theirs.load_state_dict(to_authors_state_dict(ours.state_dict(), theirs), strict=False)
    if missing or unexpected:
        raise AuthorsCodeError(f"state dicts do not line up: missing in ours {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
    check_same_output(ours, theirs, atol=atol)
    return theirs


@torch.no_grad()
def check_same_output(ours: nn.Module, theirs: nn.Module, atol: float = 1e-4, size: int = 64) -> float:
    """Max |difference| of logits on a random batch; raises if above ``atol`` (relative to scale)."""
    was = ours.training, theirs.training
    ours.eval(), theirs.eval()
    try:
        p = next(ours.parameters())
        x = torch.randn(2, ours.in_chans, size, size, generator=torch.Generator().manual_seed(0)).to(p.device)
        a, b = ours(x), theirs(x)
    finally:
        ours.train(was[0]), theirs.train(was[1])
    diff = (a - b).abs().max().item()
    scale = max(1.0, b.abs().max().item())
    if not math.isfinite(diff) or diff > atol * scale:
        raise AuthorsCodeError(f"the authors' model and ours disagree by {diff:.3g} (> {atol:g}·{scale:.3g}) "
                               f"with the same weights; timings would compare different computations")
    return diff
