"""So-ViT and SoT (stvit/models/sovit.py): parity with the authors' code (float64 goldens), the
published variants' sizes, and the model contract."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import stvit.models.sovit as sovit
from conftest import golden_names, to_device
from stvit.checkpoint import load_checkpoint
from stvit.flops import count_macs, count_params
from stvit.registry import FAMILIES, MODELS, family_of, model_entry, resolve_name

RTOL, ATOL = 1e-7, 1e-9
GOLDENS = golden_names("sovit", "sovit_a", "sovit_b") + golden_names("sot", "sot_a", "sot_b")
OFFICIAL = ("So_vit_7", "So_vit_10", "So_vit_14", "So_vit_19", "SoT_Tiny", "SoT_Small", "SoT_Base")


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def load_golden(golden_dir, name, device="cpu"):
    return to_device(torch.load(golden_dir / f"{name}.pt", weights_only=True), device)


def build_golden_model(record, device="cpu"):
    cls = sovit.SoViT if record["family"] == "sovit" else sovit.SoT
    model = cls.from_official_config(record["config"]).double()
    model.load_state_dict(record["state_dict"], strict=True)
    return model.to(device)


def svpn_module(model):
    return (model.classifier.normalization if isinstance(model, sovit.SoViT)
            else model.classifier.representation.norm)


@pytest.fixture(scope="module")
def official_keys(golden_dir):
    return json.loads((golden_dir / "official_sovit_keys.json").read_text())


def build_meta(name):
    with torch.device("meta"):
        return getattr(sovit, name)()


# ---- parity with the authors' code -----------------------------------------------------------------


@pytest.mark.parametrize("name", GOLDENS)
def test_golden_parity_every_case_every_field(golden_dir, name, device):
    record = load_golden(golden_dir, name, device)
    model = build_golden_model(record, device)
    assert model.pos_embed.dtype == torch.float64 and not model.pos_embed.requires_grad
    for i, case in enumerate(record["cases"]):
        model.load_state_dict(record["state_dict"])  # the train step below updates BN statistics
        model.eval()
        seen = {}
        hooks = [model.visual_tokens.register_forward_hook(lambda m, a, out: seen.update(tokens=out)),
                 svpn_module(model).register_forward_hook(lambda m, a, out: seen.update(cov=a[0], svpn=out)),
                 model.classifier.cls_fc.register_forward_hook(lambda m, a, out: seen.update(cls=out)),
                 model.classifier.visual_fc.register_forward_hook(lambda m, a, out: seen.update(visual=out))]
        hooks += [block.register_forward_hook(lambda m, a, out, j=j: seen.update({f"block{j}": out}))
                  for j, block in enumerate(model.blocks)]
        with torch.no_grad():
            logits = model(case["input"])
        for h in hooks:
            h.remove()
        where = f"{name} case {i}"
        close(seen["tokens"], case["eval_token_embedding"], f"{where} token embedding")
        assert len(case["eval_block_outputs"]) == len(model.blocks)
        for j, expected in enumerate(case["eval_block_outputs"]):
            close(seen[f"block{j}"], expected, f"{where} block {j}")
        close(seen["cov"], case["eval_cov"], f"{where} cross-covariance")
        close(seen["svpn"], case["eval_svpn"], f"{where} svPN")
        close(seen["cls"], case["eval_head_parts"]["cls_logits"], f"{where} cls logits")
        close(seen["visual"], case["eval_head_parts"]["visual_logits"], f"{where} visual logits")
        close(logits, case["eval_logits"], f"{where} eval logits")

        model.train()
        model.zero_grad(set_to_none=True)
        x = case["input"].clone().requires_grad_(True)
        out = model(x)
        close(out.detach(), case["train_logits"], f"{where} train logits")
        (out * case["loss_weights"]).sum().backward()
        close(x.grad, case["grad_input"], f"{where} input gradient")
        params = dict(model.named_parameters())
        omitted = tuple(case["grads_omitted"])
        expected_names = {k for k, p in params.items() if p.requires_grad and not k.startswith(omitted)} \
            if omitted else {k for k, p in params.items() if p.requires_grad}
        assert set(case["grads"]) == expected_names
        for k, g in case["grads"].items():
            close(params[k].grad, g, f"{where} grad of {k}")


@pytest.mark.parametrize("name", ["sovit_b", "sot_b"])
def test_svpn_alone_matches_at_float64_precision(golden_dir, name, device):
    # float32 temporaries inside svPN would leave ~1e-8 relative errors; float64 ones ~1e-14.
    record = load_golden(golden_dir, name, device)
    model = build_golden_model(record, device).eval()
    for case in record["cases"]:
        with torch.no_grad():
            out = svpn_module(model)(case["eval_cov"])
        torch.testing.assert_close(out, case["eval_svpn"], rtol=1e-11, atol=1e-13)


class _DtypeLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.dtypes, self.ops = {}, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.__name__.split(".")[0])
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.dtypes.setdefault(t.dtype, str(func))
        return out


@pytest.mark.parametrize("name", ["sovit_tiny", "sot_mini"])
def test_float64_model_computes_in_float64_everywhere(name):
    assert torch.get_default_dtype() == torch.float32
    model = getattr(sovit, name)().double().train()
    x = torch.randn(2, 3, 112, 112, dtype=torch.float64)
    # The trunk is plain layers of a float64 model; the head (svPN's temporaries) is watched op by op.
    with torch.no_grad():
        feats = model.forward_features(x)
    feats.requires_grad_(True)
    with _DtypeLog() as log:
        model.forward_head(feats).sum().backward()
    assert set(log.dtypes) == {torch.float64}, log.dtypes
    assert {"bmm", "linalg_vector_norm"} <= log.ops  # svPN's power iteration ran under the watch


def test_from_official_config_takes_objects_as_well_as_strings(golden_dir):
    record = load_golden(golden_dir, "sovit_b")
    config = json.loads(json.dumps(record["config"]))
    config["norm_layer"] = nn.LayerNorm
    config["ViTConfig"].update(norm_layer=nn.LayerNorm, act_layer=nn.GELU, qkv_bias=True, qk_scale=None)
    config["representationConfig"]["normalization"]["args"]["regular"] = nn.Dropout(0.0)
    a, b = sovit.SoViT.from_official_config(config), sovit.SoViT.from_official_config(record["config"])
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert repr(a) == repr(b)


# ---- the published variants ------------------------------------------------------------------------


@pytest.mark.parametrize("name", OFFICIAL)
def test_variant_keys_params_and_macs_match_the_authors(official_keys, name):
    ref = official_keys[name]
    model = build_meta(name)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(shapes) == list(ref["state_dict"])  # same keys, same order
    assert shapes == ref["state_dict"]
    assert count_params(model) == ref["params"]
    # svPN is batched matrix products (power iteration), counted as bmm like the attention.
    assert abs(count_macs(model, (3, 224, 224)) / ref["macs_224"] - 1) < 0.01
    assert family_of(model).name == ref["family"]


def test_official_state_dicts_load_strictly_through_the_checkpoint_filter(official_keys):
    for name in ("So_vit_7", "SoT_Tiny"):
        model = build_meta(name)
        state = {k: torch.zeros(shape, device="meta") for k, shape in official_keys[name]["state_dict"].items()}
        family = FAMILIES[official_keys[name]["family"]]
        model.load_state_dict(family.checkpoint_filter(dict(state), model), strict=True)
        # A position table of another length (e.g. trained at another size) is rebuilt, not loaded.
        state["pos_embed"] = torch.zeros(1, 50, state["pos_embed"].shape[-1])
        filtered = family.checkpoint_filter(dict(state), model)
        assert filtered["pos_embed"].shape == model.pos_embed.shape
    model = sovit.sovit_tiny()
    backbone = sovit.sovit_tiny(features_only=True)
    load_checkpoint(backbone, model.state_dict())  # the generic loader ignores the head's keys


def test_building_a_variant_never_changes_another():
    # The authors' factories mutate shared config dicts (So_vit_14 after another one raises, So_vit_19
    # inherits regular=None from So_vit_7/10; a second SoT factory raises).
    def describe(model):
        return repr(model), {k: tuple(v.shape) for k, v in model.state_dict().items()}

    first = {name: describe(build_meta(name)) for name in OFFICIAL}
    for name in reversed(OFFICIAL):
        assert describe(build_meta(name)) == first[name]
    assert build_meta("So_vit_19").classifier.normalization.regular.p == 0.5
    assert build_meta("So_vit_7").classifier.normalization.regular is None
    assert build_meta("SoT_Base").classifier.representation.norm.regular.p == 0.7
    assert len(build_meta("So_vit_14").blocks) == 14


def test_registry_names_aliases_and_recipes():
    import train.config

    fields = {f.name for f in dataclasses.fields(train.config.TrainConfig)}
    for name in OFFICIAL + ("sovit_tiny", "sot_mini"):
        entry = model_entry(name)
        assert entry.family in ("sovit", "sot")
        assert set(entry.recipe) <= fields, set(entry.recipe) - fields
        assert entry.pretrained_cfg["fixed_input_size"] is True
    assert resolve_name("sovit_7") == "So_vit_7" and resolve_name("so_vit_19") == "So_vit_19"
    assert resolve_name("sot_small") == "SoT_Small" and resolve_name("SOT-BASE") == "SoT_Base"
    assert MODELS["sovit_tiny"].demo["input_size"] == 112 == MODELS["sot_mini"].demo["input_size"]


# ---- input sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, low, high", [("sovit_tiny", 105, 112), ("sot_mini", 111, 118)])
def test_input_sizes_it_takes_and_clear_errors_for_the_others(name, low, high):
    model = getattr(sovit, name)().eval()
    calls = []
    model.visual_tokens.register_forward_pre_hook(lambda m, a: calls.append(1))
    for side in (low, high):
        model.check_input(torch.zeros(1, 3, side, side))
        model.check_input(torch.zeros(1, 3, low, high))
    for side in (low - 1, high + 1, 64, 224):
        with pytest.raises(ValueError, match=f"{low} <= H, W <= {high}"):
            model(torch.zeros(1, 3, side, side))
    with pytest.raises(ValueError, match="in_chans=3"):
        model(torch.zeros(1, 1, 112, 112))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.zeros(3, 112, 112))
    assert not calls  # refused before any compute
    with torch.no_grad():
        assert model(torch.zeros(1, 3, low, high)).shape == (1, 1000)


def test_input_size_rules_at_224():
    # The token-count rule in the authors' code: So-ViT ⌈H/16⌉, SoT ⌊⌈H/2⌉/8⌋ per side at 224.
    with torch.device("meta"):
        sv, st = sovit.SoViT(embed_dim=32, depth=1, num_heads=1), sovit.SoT(embed_dim=32, depth=1, num_heads=1)
    for model, low, high in ((sv, 209, 224), (st, 223, 238)):
        for side in range(low - 3, high + 4):
            ok = low <= side <= high
            try:
                model.check_input(torch.zeros(1, 3, side, side, device="meta"))
                assert ok, side
            except ValueError as e:
                assert not ok and f"{low} <= H, W <= {high}" in str(e), side
    for bad in (dict(img_size=100), dict(img_size=336)):
        with pytest.raises(ValueError, match="img_size"):
            sovit.SoViT(**bad, embed_dim=16, depth=1, num_heads=1)
    with pytest.raises(ValueError, match="token_dim"):
        sovit.SoT(token_dim=32, embed_dim=16, depth=1, num_heads=1)


# ---- the contract's API ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sovit_tiny", "sot_mini"])
def test_features_only_returns_block_maps(name):
    model = getattr(sovit, name)().eval()
    backbone = getattr(sovit, name)(features_only=True, out_indices=(0, -1)).eval()
    load_checkpoint(backbone, model.state_dict())
    assert not hasattr(backbone, "classifier") and not hasattr(backbone, "norm")
    x = torch.randn(2, 3, 112, 112)
    outs = {}
    for j, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, a, out, j=j: outs.update({j: out}))
    with torch.no_grad():
        model(x)
        maps = backbone(x)
    depth, E = len(model.blocks), model.embed_dim
    assert backbone.out_indices == (0, depth - 1)
    h, w = model.grid_size(112, 112)
    assert h * w == model.num_patches
    for m, i, info in zip(maps, backbone.out_indices, backbone.feature_info):
        assert m.shape == (2, E, h, w)
        torch.testing.assert_close(m, outs[i][:, 1:].transpose(1, 2).reshape(2, E, h, w))
        assert info == dict(num_chs=E, reduction=112 // h, module=f"blocks.{i}")
        assert backbone.get_submodule(info["module"]) is backbone.blocks[i]
    default = getattr(sovit, name)(features_only=True)
    assert default.out_indices == tuple(range(max(0, depth - 3), depth))
    assert [f["module"] for f in default.feature_info] == [f"blocks.{i}" for i in default.out_indices]


def test_feature_info_reduction_at_224():
    for model in (build_meta("So_vit_7"), build_meta("SoT_Tiny")):
        h, w = model.grid_size(224, 224)
        assert model.feature_info[-1]["reduction"] == 224 // h == 224 // w == 16


@pytest.mark.parametrize("name", ["sovit_tiny", "sot_mini"])
def test_classifier_head_and_api(name):
    model = getattr(sovit, name)(num_classes=5).eval()
    x = torch.randn(2, 3, 112, 112)
    head = model.get_classifier()
    assert head is model.classifier
    cfg = model.pretrained_cfg
    assert cfg["num_classes"] == 5 and cfg["input_size"] == (3, 112, 112) and cfg["fixed_input_size"]
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in cfg["classifier"])
    assert isinstance(model.get_submodule(cfg["first_conv"]), nn.Conv2d)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        logits = model(x)
    E = model.embed_dim
    assert feats.shape == (2, 1 + model.num_patches, E)
    assert pre.shape == (2, E + head.pool_dim)
    torch.testing.assert_close(logits, head.cls_fc(pre[:, :E]) + head.visual_fc(pre[:, E:]))

    model.double().reset_classifier(3)
    assert model.classifier.cls_fc.out_features == model.classifier.visual_fc.out_features == 3
    assert model.classifier.cls_fc.weight.dtype == torch.float64
    assert model.pretrained_cfg["num_classes"] == 3
    assert model(x.double()).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x.double()).shape == (2, E + head.pool_dim)

    assert model.no_weight_decay() == set()  # as the authors: only 1-D parameters and biases skip decay
    assert model.repeated_blocks() == list(model.blocks)


def test_grad_checkpointing_gives_the_same_gradients():
    model = sovit.sovit_tiny(num_classes=4).double().eval()
    x = torch.randn(2, 3, 112, 112, dtype=torch.float64)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x).square().sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["sot_mini"])
def test_compiled_equals_eager(name):
    # One graph (fullgraph: the power iteration is a fixed Python loop). The default inductor backend
    # also matches (checked by hand; it takes minutes on a loaded CPU), here the fast aot_eager one.
    model = getattr(sovit, name)().eval()
    x = torch.randn(2, 3, 112, 112)
    compiled = torch.compile(model, dynamic=False, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_training_loss_uses_train_mode_logits():
    import random

    model = sovit.sot_mini(num_classes=4).train()
    x, targets = torch.randn(2, 3, 112, 112), torch.full((2, 4), 0.25)
    loss = model.training_loss(x, targets, random.Random(0))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert model.classifier.representation.norm.weight.grad is not None
