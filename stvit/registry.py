"""Named STViT configurations (paper Table 8) and ``create_model``."""

from __future__ import annotations

from .model import STViT

_COMMON = dict(n_iter=[1, 1, 1, 1], stoken_size=[8, 4, 1, 1], projection=1024, mlp_ratio=4,
               qkv_bias=True, drop_rate=0.0, drop_path_rate=0.0)

MODEL_CONFIGS: dict[str, dict] = {
    # A small variant for demos and tests: trains on a CPU in minutes at 64×64.
    "stvit_tiny": dict(_COMMON, embed_dim=[32, 64, 128, 160], depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 5],
                       stoken_size=[4, 2, 1, 1], projection=256, layerscale=[False] * 4, init_values=1e-5),
    "stvit_small": dict(_COMMON, embed_dim=[64, 128, 320, 512], depths=[3, 5, 9, 3], num_heads=[1, 2, 5, 8],
                        layerscale=[False] * 4, init_values=1e-5),
    "stvit_base": dict(_COMMON, embed_dim=[96, 192, 384, 512], depths=[4, 6, 14, 6], num_heads=[2, 3, 6, 8],
                       layerscale=[False, False, True, True], init_values=1e-6),
    "stvit_large": dict(_COMMON, embed_dim=[96, 192, 448, 640], depths=[4, 7, 19, 8], num_heads=[2, 3, 7, 10],
                        layerscale=[False, False, True, True], init_values=1e-6, checkpoint_num=[4, 7, 15, 0]),
}
_ALIASES = {name.removeprefix("stvit_"): name for name in MODEL_CONFIGS}


def list_models() -> list[str]:
    return sorted(MODEL_CONFIGS)


def resolve_name(name: str) -> str:
    """Canonical model name (``small`` -> ``stvit_small``); ``ValueError`` listing known names."""
    key = str(name).lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in MODEL_CONFIGS:
        known = ", ".join(list_models() + sorted(_ALIASES))
        raise ValueError(f"unknown model {name!r}; known models: {known}")
    return key


def model_config(name: str, **overrides) -> dict:
    return {**MODEL_CONFIGS[resolve_name(name)], **overrides}


def create_model(name: str, *, pretrained: str | None = None, **overrides) -> STViT:
    """Build a named STViT; keywords override its configuration (``num_classes``, ``drop_path_rate``,
    ``features_only``, ``out_indices``, ...). ``pretrained`` is a checkpoint path to load."""
    model = STViT(**model_config(name, **overrides))
    model.pretrained_cfg["architecture"] = resolve_name(name)
    if pretrained:
        from .checkpoint import load_checkpoint
        load_checkpoint(model, pretrained)
    return model
