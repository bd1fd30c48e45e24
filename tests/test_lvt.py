"""LVT (stvit/models/lvt.py): float64 parity with the authors' code (goldens recorded from
Chenglin-Yang/LVT@c561897), MixToken's box arithmetic, the training objective, the documented
deviations, and the model contract."""

from __future__ import annotations

import json
import math
import random
import types

import numpy as np
import pytest
import torch

from conftest import golden_names, to_device
from stvit.checkpoint import load_checkpoint
from stvit.contract import soft_target_cross_entropy
from stvit.flops import count_macs, count_params
from stvit.models import lvt as L
from stvit.models.lvt import LVT, checkpoint_filter_fn, draw_mix_box, rand_bbox, stage_sizes
from stvit.registry import FAMILIES, MODELS

RTOL, ATOL = 1e-7, 1e-9


def close(actual, expected, what=""):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module", params=golden_names("lvt", "lvt_a"))
def golden(request, golden_dir):
    return torch.load(golden_dir / f"{request.param}.pt", weights_only=True)


@pytest.fixture(scope="module")
def golden_on_device(golden, device):
    """The golden record on ``--device``, for the parity tests."""
    return to_device(golden, device)


@pytest.fixture(scope="module")
def official_keys(golden_dir):
    return json.loads((golden_dir / "official_lvt_keys.json").read_text())["lvt_cls"]


def golden_model(golden) -> LVT:
    model = LVT(**golden["config"]).double()
    model.load_state_dict(golden["state_dict"], strict=True)
    return model.to(golden["cases"][0]["input"].device).eval()  # where the golden fixture put the tensors


def all_cases(golden):
    return [("case", i, c) for i, c in enumerate(golden["cases"])] + \
           [("eval_only", i, c) for i, c in enumerate(golden["eval_only_cases"])]


# ---- float64 parity -------------------------------------------------------------------------------

def test_goldens_have_the_expected_cases(golden):
    assert len(golden["cases"]) == 2 and len(golden["eval_only_cases"]) == 1
    assert sorted(golden["state_dict"]) == sorted(LVT(**golden["config"]).state_dict())


@pytest.mark.parametrize("kind", ["case", "eval_only"])
def test_eval_parity(golden_on_device, kind):
    golden = golden_on_device
    model = golden_model(golden)
    cases = golden["cases"] if kind == "case" else golden["eval_only_cases"]
    for case in cases:
        x = case["input"]
        # Stage maps through forward hooks on feature_info's modules: checks those names too.
        seen = {}
        hooks = [model.get_submodule(info["module"]).register_forward_hook(
            lambda mod, inp, out, i=i: seen.__setitem__(i, out)) for i, info in enumerate(model.feature_info)]
        with torch.no_grad():
            logits = model(x)
        for h in hooks:
            h.remove()
        close(logits, case["eval_logits"], f"eval logits {tuple(x.shape)}")
        assert len(seen) == 4
        for i, expected in enumerate(case["eval_stage_outputs"]):
            close(seen[i], expected, f"stage {i + 1} output")

        with torch.no_grad():
            x_cls, x_aux = model(x, mix_box=(0, 0, 0, 0))  # an empty box: the heads, unmixed
            tokens = model.forward_features(x)
        close(x_cls, case["eval_head_outputs"]["x_cls"], "x_cls")
        close(x_aux, case["eval_head_outputs"]["x_aux"], "x_aux")
        close(model.forward_head(tokens), case["eval_logits"], "forward_head(forward_features)")

        with torch.no_grad():
            close(model.backbone[0][1][0].attn(case["csa_input"]), case["csa_output"], "CSA module")
            close(model.backbone[1][1][0].attn(case["rasa_input"]), case["rasa_output"], "RASA module")


@pytest.mark.parametrize("index", [0, 1])
def test_train_parity_outputs_and_grads(golden_on_device, index):
    golden = golden_on_device
    case = golden["cases"][index]
    model = golden_model(golden).train()
    x = case["input"].clone().requires_grad_(True)
    expected = case["train_outputs"]
    x_cls, x_aux = model(x, mix_box=expected["box"])
    close(x_cls, expected["x_cls"], "train x_cls")
    close(x_aux, expected["x_aux"], "train x_aux (mix reversed)")
    w = case["loss_weights"]
    loss = (x_cls * w["x_cls"]).sum() + (x_aux * w["x_aux"]).sum()
    loss.backward()
    close(x.grad, case["grad_input"], "d loss / d input")
    names = dict(model.named_parameters())
    assert set(names) == set(case["grads"])
    for name, grad in case["grads"].items():
        close(names[name].grad, grad, f"grad of {name}")


def test_batch2_case_mixes_something(golden):
    # The recorded box is non-empty in the batch-2 cases, so train parity really exercises the mix.
    case = golden["cases"][0]
    box = case["train_outputs"]["box"]
    assert (box[2] - box[0]) * (box[3] - box[1]) > 0 and case["input"].shape[0] == 2
    model = golden_model(golden).train()
    with torch.no_grad():
        mixed = model(case["input"], mix_box=box)[0]
        plain = model(case["input"], mix_box=(0, 0, 0, 0))[0]
    assert not torch.allclose(mixed, plain)


# ---- MixToken's box -------------------------------------------------------------------------------

@pytest.mark.parametrize("index", [0, 1])
def test_rand_bbox_reproduces_the_official_draw(golden, index):
    case = golden["cases"][index]
    H, W = case["input"].shape[-2:]
    h1, w1 = stage_sizes(H, W, 4)[0]
    rows, cols = h1 // 8, w1 // 8  # the official grid (H1//8, W1//8)
    assert (rows, cols) == stage_sizes(H, W, 4)[-1]
    np.random.seed(case["numpy_seed"])  # the official draws: beta, then randint(rows), then randint(cols)
    lam = np.random.beta(1.0, 1.0)
    cx, cy = np.random.randint(rows), np.random.randint(cols)
    assert lam == case["mix_lam"]
    assert list(rand_bbox(rows, cols, lam, cx, cy)) == list(case["train_outputs"]["box"])


def test_rand_bbox_arithmetic_properties():
    rng = random.Random(1)
    for _ in range(500):
        rows, cols = rng.randint(1, 9), rng.randint(1, 9)
        lam = rng.random()
        cx, cy = rng.randrange(rows), rng.randrange(cols)
        r1, c1, r2, c2 = rand_bbox(rows, cols, lam, cx, cy)
        assert 0 <= r1 <= r2 <= rows and 0 <= c1 <= c2 <= cols
        cut_r = int(rows * math.sqrt(1 - lam))
        if r1 > 0 and r2 < rows:  # unclipped: an even side centred on cx
            assert r2 - r1 == 2 * (cut_r // 2) and (r1 + r2) // 2 == cx
        if rows < 3 or cols < 3:
            assert (r2 - r1) * (c2 - c1) == 0  # grids smaller than 3 never mix


def test_draw_mix_box_uses_the_rng_in_official_order():
    a = draw_mix_box(4, 5, random.Random(7))
    rng = random.Random(7)
    lam = rng.betavariate(1.0, 1.0)
    cx, cy = rng.randrange(4), rng.randrange(5)
    assert a == rand_bbox(4, 5, lam, cx, cy)
    assert draw_mix_box(4, 5, random.Random(7)) == a


# ---- the training objective ---------------------------------------------------------------------

def _soft_targets(batch, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(batch, classes, generator=g, dtype=torch.float64), -1)


def test_training_loss_matches_the_volo_objective(golden):
    model = golden_model(golden).train()
    x = golden["cases"][0]["input"]
    t = _soft_targets(2, 10)
    boxes = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: boxes.append(kwargs.get("mix_box")),
                                           with_kwargs=True)  # it goes through __call__ (FSDP hooks fire)
    def area(b):
        return (b[2] - b[0]) * (b[3] - b[1])

    seed = next(s for s in range(1000) if area(draw_mix_box(3, 4, random.Random(s))) > 0)  # a box that mixes
    loss = model.training_loss(x, t, random.Random(seed))
    hook.remove()
    box = draw_mix_box(3, 4, random.Random(seed))
    assert boxes == [box]
    with torch.no_grad():
        x_cls, x_aux = model(x, mix_box=box)
    lam = 1 - (box[2] - box[0]) * (box[3] - box[1]) / 12
    expected = soft_target_cross_entropy(x_cls, lam * t + (1 - lam) * t.flip(0)) + 0.5 * sum(
        soft_target_cross_entropy(x_aux[:, n], t) for n in range(12)) / 12
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-7)


def test_training_loss_finite_backprops_and_deterministic():
    torch.manual_seed(0)
    model = L.lvt_tiny(num_classes=5).train()
    x = torch.randn(3, 3, 96, 96)
    t = _soft_targets(3, 5).float()
    losses, grads = [], []
    for _ in range(2):
        model.zero_grad()
        loss = model.training_loss(x, t, random.Random(123))
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert math.isfinite(losses[0]) and losses[0] == losses[1]
    assert torch.equal(grads[0], grads[1])
    assert all(p.grad is not None for p in model.parameters())


# ---- deviations: beyond the official code --------------------------------------------------------

def test_num_classes_is_honoured(golden):
    model = LVT(**{**golden["config"], "num_classes": 7}).eval()
    assert model.head.out_features == 7 and model.aux_head.out_features == 7
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    assert model.pretrained_cfg["num_classes"] == 7


def test_drop_path_rate_is_honoured(golden):
    cfg = {**golden["config"], "drop_path_rate": 0.3}
    model = LVT(**cfg)
    rates = [b.drop_path.p for s in model.backbone for b in s.blocks]
    total = sum(cfg["layers"])
    assert rates == pytest.approx([0.3 * i / (total - 1) for i in range(total)])  # the official linear rule
    x = torch.randn(2, 3, 64, 64)
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.allclose(a, b)  # stochastic depth acts in train mode
    model.eval()
    assert torch.equal(model(x), model(x))
    assert LVT(**{**cfg, "layers": [1, 0, 0, 0]}).backbone[0].blocks[0].drop_path.p == 0.0  # one block: no 0/0


def test_train_mode_at_odd_size_with_empty_box_equals_eval(golden):
    case = golden["eval_only_cases"][0]  # 75×90: the official train mode cannot run here
    model = golden_model(golden).train()
    x_cls, x_aux = model(case["input"], mix_box=(0, 0, 0, 0))
    close(x_cls, case["eval_head_outputs"]["x_cls"], "train-mode x_cls at 75×90")
    close(x_aux, case["eval_head_outputs"]["x_aux"], "train-mode x_aux at 75×90")
    # A real box on the 3×3 stage-4 grid of 75×90 runs too, and the reversal is its own inverse.
    rows, cols = stage_sizes(75, 90, 4)[-1]
    assert (rows, cols) == (3, 3)
    x2 = torch.cat([case["input"], case["input"].flip(-1)])
    x_cls, x_aux = model(x2, mix_box=(0, 0, 2, 2))
    assert x_aux.shape == (2, 9, 10) and torch.isfinite(x_cls).all()
    loss = model.training_loss(x2, _soft_targets(2, 10), random.Random(0))
    loss.backward()
    assert math.isfinite(loss.item())


def test_forward_without_box_returns_logits_in_train_mode(golden_on_device):
    golden = golden_on_device
    model = golden_model(golden).train()
    x = golden["cases"][0]["input"]
    out = model(x)
    close(out, golden["cases"][0]["eval_logits"], "train-mode forward(x) (dropout and drop path are 0)")


# ---- size, keys, checkpoints ---------------------------------------------------------------------

def test_lvt_cls_parameter_count_and_keys(official_keys):
    model = L.lvt_cls()
    assert count_params(model) == official_keys["params"] == 5_521_844
    assert count_params(model.backbone) == official_keys["params_backbone"]
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == official_keys["state_dict"]


def test_lvt_cls_macs_within_one_percent(official_keys):
    macs = count_macs(L.lvt_cls(), (3, 224, 224))
    assert abs(macs - official_keys["macs_224"]) <= 0.01 * official_keys["macs_224"]


def test_release_file_loads_strictly_through_the_filter(official_keys):
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v, generator=g) for k, v in official_keys["state_dict"].items()}
    release = {"epoch": 299, "arch": "lvt_cls", "state_dict": {f"module.{k}": v for k, v in state.items()},
               "optimizer": {"state": {}}, "version": 2}
    model = L.lvt_cls()
    load_checkpoint(model, release)  # unwrapped, prefixes stripped, filtered, strict
    assert torch.equal(model.cls_token, state["cls_token"])
    backbone = L.lvt_cls(features_only=True)
    load_checkpoint(backbone, release)
    assert torch.equal(backbone.backbone[3][0].proj.weight, state["backbone.3.0.proj.weight"])


# ---- errors -----------------------------------------------------------------------------------------

def test_too_small_input_is_a_clear_error(golden):
    model = golden_model(golden)
    side = model.min_input_size()
    assert side == 25  # stage 2 (⌈⌈H/4⌉/2⌉) must hold sr_ratio 4
    with torch.no_grad():
        model(torch.randn(1, 3, side, side, dtype=torch.float64))
        with pytest.raises(ValueError, match=rf"minimum input side is {side}"):
            model(torch.randn(1, 3, side - 1, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 1, 64, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(3, 64, 64, dtype=torch.float64))


def test_constructor_errors(golden):
    cfg = golden["config"]
    with pytest.raises(ValueError, match="qkv_bias"):
        LVT(**{**cfg, "qkv_bias": True})
    with pytest.raises(ValueError, match="r_num"):
        LVT(**{**cfg, "rasa_cfg": {**cfg["rasa_cfg"], "r_num": 0}})
    with pytest.raises(ValueError, match="act_layer"):
        LVT(**{**cfg, "rasa_cfg": {**cfg["rasa_cfg"], "act_layer": "__import__('os')"}})
    with pytest.raises(ValueError, match="divisible"):
        LVT(**{**cfg, "num_heads": [3, 3, 2, 4]})
    with pytest.raises(ValueError, match="stages"):
        LVT(**{**cfg, "sr_ratios": [8, 4, 2]})
    with pytest.raises(ValueError, match="sa_layers"):
        LVT(**{**cfg, "sa_layers": ["csa", "rasa", "mhsa", "rasa"]})


# ---- generality of the configuration ------------------------------------------------------------

def test_any_config_values_build_and_run():
    cfg = dict(layers=[1, 1, 2, 1], embed_dims=[8, 12, 16, 20], num_heads=[2, 3, 4, 5],
               mlp_ratios=[1.5, 2.25, 3.3, 0.5], mlp_depconv=[True, False, True, False], sr_ratios=[4, 2, 1, 1],
               sa_layers=["csa", "sa", "rasa", "rasa"],
               rasa_cfg=dict(atrous_rates=[2, 7], act_layer="nn.GELU()", init="dirac", r_num=4),
               post_layers=["ca", "ca", "ca"], num_classes=3, in_chans=2, qkv_bias=False)
    model = LVT(**cfg).eval()
    assert model.backbone[0][1][0].mlp.fc1.out_channels == int(8 * 1.5)
    assert model.backbone[3][1][0].mlp.fc1.out_features == int(20 * 0.5)
    assert len(model.post_network) == 3 and not hasattr(model.backbone[1][1][0].attn, "ds")
    assert model.backbone[2][1][0].attn.ds.rates == (2, 7)
    assert model(torch.randn(2, 2, 41, 37)).shape == (2, 3)
    # rasa_cfg as an attribute object (the official mmcv Config) builds the same model.
    ns = LVT(**{**cfg, "rasa_cfg": types.SimpleNamespace(**cfg["rasa_cfg"])})
    ns.load_state_dict(model.state_dict())
    x = torch.randn(1, 2, 64, 64)
    assert torch.equal(ns.eval()(x), model(x))


def test_rasa_recursion_rule():
    torch.manual_seed(0)
    one = L.Attention(8, 2, rasa_cfg=L.RasaConfig.parse(dict(atrous_rates=[1, 3], r_num=1)), sr_ratio=2)
    x = torch.randn(2, 6, 5, 8)
    torch.testing.assert_close(one(x), one.inner_attention(x))  # r_num 1: no SiLU at all
    three = L.Attention(8, 2, rasa_cfg=L.RasaConfig.parse(dict(atrous_rates=[1, 3], r_num=3)), sr_ratio=2)
    y1 = torch.nn.functional.silu(three.inner_attention(x))
    y2 = torch.nn.functional.silu(three.inner_attention(y1 + x))
    y3 = torch.nn.functional.silu(three.inner_attention(y2 + y1 + x))
    torch.testing.assert_close(three(x), y3)


def test_post_layer_quirk_only_the_first_gets_qkv_bias():
    model = LVT(sa_layers=["sa", "rasa", "rasa", "rasa"], rasa_cfg=L.LVT_RASA_CFG, qkv_bias=True,
                layers=[1, 1, 1, 1], embed_dims=[8, 8, 8, 8], num_heads=[1, 1, 1, 1], num_classes=2)
    assert model.post_network[0].attn.q.bias is not None and model.post_network[1].attn.q.bias is None
    assert model.backbone[1][1][0].attn.ds.bias is not None  # ds takes bias=qkv_bias


# ---- the rest of the contract ---------------------------------------------------------------------

def test_features_only_and_backbone_mode(golden):
    model = LVT(**golden["config"], features_only=True).double()
    load_checkpoint(model, golden["state_dict"])  # the classifier's keys are ignored, the rest strict
    case = golden["eval_only_cases"][0]
    maps = model.eval()(case["input"])
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    assert model.feature_info.channels() == golden["config"]["embed_dims"]
    for m, expected in zip(maps, case["eval_stage_outputs"]):
        close(m, expected.permute(0, 3, 1, 2), "features_only map (NCHW)")
    assert not hasattr(model, "head") and not hasattr(model, "cls_token")
    two = LVT(**golden["config"], features_only=True, out_indices=(1, -1))
    assert [m.shape[1] for m in two(torch.randn(1, 3, 64, 64))] == [24, 40]
    assert two.feature_info.reduction() == [8, 32]
    with pytest.raises(ValueError):
        model.forward_features(case["input"])

    backbone = LVT(**{**golden["config"], "with_cls_head": False}).eval()
    keys = set(backbone.state_dict())
    assert all(k.startswith(("backbone.", "downstream_norms.")) for k in keys)
    features = LVT(**golden["config"], features_only=True).eval()
    load_checkpoint(features, backbone.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs, maps = backbone(x), features(x)
    assert [o.shape[1] for o in outs] == golden["config"]["embed_dims"]
    for o, m, ln in zip(outs, maps, backbone.downstream_norms):  # each map after its own LayerNorm
        torch.testing.assert_close(o, ln(m.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def test_classifier_weight_decay_blocks_and_cfg(golden):
    model = LVT(**golden["config"])
    assert model.get_classifier() is model.head
    model.reset_classifier(4)
    assert model.head.out_features == 4 and model.aux_head.out_features == 4
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 40)
    assert model.no_weight_decay() == {"cls_token"}
    blocks = model.repeated_blocks()
    assert len(blocks) == sum(golden["config"]["layers"]) + len(golden["config"]["post_layers"])
    assert sum(isinstance(b, L.ClassBlock) for b in blocks) == 2
    cfg = model.pretrained_cfg
    assert cfg["crop_pct"] == 0.96 and cfg["classifier"] == ("head", "aux_head") and cfg["interpolation"] == "bicubic"
    assert cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 0  # after reset_classifier(0)
    assert dict(model.named_modules())[cfg["first_conv"]].in_channels == 3


def test_grad_checkpointing_gives_the_same_grads():
    torch.manual_seed(0)
    model = L.lvt_tiny(num_classes=4).double().train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        x_cls, x_aux = model(x, mix_box=(0, 0, 1, 1))
        (x_cls.sum() + x_aux.square().sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_registry_entries():
    assert FAMILIES["lvt"].model_class is LVT and FAMILIES["lvt"].checkpoint_filter is checkpoint_filter_fn
    cls, tiny = MODELS["lvt_cls"], MODELS["lvt_tiny"]
    # The paper's 3.4 M is the backbone's count (the features_only model); 0.9 "GFLOPs" are MACs.
    assert cls.paper["params_of"] == "backbone"
    assert round(count_params(L.lvt_cls(features_only=True)) / 1e6, 1) == cls.paper["params_m"]
    assert round(count_macs(L.lvt_cls(), (3, 224, 224)) / 1e9, 1) == cls.paper["macs_g"]
    assert cls.recipe["lr"] == 1.6e-3 and cls.recipe["warmup_epochs"] == 20
    assert cls.recipe["mixup"] == 0 and cls.recipe["cutmix"] == 0 and cls.pretrained_cfg["crop_pct"] == 0.96
    assert tiny.demo["input_size"] == 64
    assert cls.pretrained_cfg["classifier"] == ("head", "aux_head")
    assert cls.pretrained_cfg["first_conv"] == "backbone.0.0.proj"
    model = tiny.builder(num_classes=10)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_compile_equals_eager_on_lvt_tiny():
    torch.manual_seed(0)
    model = L.lvt_tiny(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, dynamic=False)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("H, W", [(8, 8), (7, 9), (5, 4), (1, 1), (2, 3)])
def test_csa_unfold_and_fold_are_torchs(H, W):
    """CSA's channels-last unfold (nine strided views) and fold (parity-sorted shifted sums) equal
    ``F.unfold`` / ``F.fold`` (kernel 3, padding 1, stride 2) at even and odd sides."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(H * 10 + W)
    h, w = -(-H // 2), -(-W // 2)
    x = torch.randn(2, H, W, 5, dtype=torch.float64, generator=g)
    expected = F.unfold(x.permute(0, 3, 1, 2), 3, padding=1, stride=2).view(2, 5, 9, h, w).permute(2, 0, 3, 4, 1)
    assert torch.equal(L.gather_slots(x, h, w), expected)
    slots = torch.randn(2, h, w, 3, 3, 5, dtype=torch.float64, generator=g)
    cols = slots.permute(0, 5, 3, 4, 1, 2).reshape(2, 5 * 9, h * w)
    expected = F.fold(cols, (H, W), 3, padding=1, stride=2).permute(0, 2, 3, 1)
    torch.testing.assert_close(L.scatter_slots(slots, H, W), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rate", [1, 3, 4, 5, 6])
@pytest.mark.parametrize("side", [7, 14])
def test_rasa_query_conv_pads_the_map_itself_from_rate_5_on_a_cpu(rate, side):
    """From ``PAD_EXPLICITLY_FROM_RATE`` on, the atrous conv convolves the map padded beforehand
    (oneDNN's depthwise kernels fall back to im2col + GEMM for wider implicit padding on AVX2):
    the same values and gradients as the conv with its padding inside, in float64."""
    import torch.nn.functional as F
    from unittest import mock
    g = torch.Generator().manual_seed(rate * 100 + side)
    conv = L.DilatedQueryConv(4, (rate,), bias=True).double()
    with torch.no_grad():
        conv.bias.copy_(torch.randn(4, dtype=torch.float64, generator=g))
    q = torch.randn(2, 4, side, side, dtype=torch.float64, generator=g).requires_grad_()
    with mock.patch.object(L.F, "pad", wraps=F.pad) as pad:
        out = conv.conv(q, rate)
    assert pad.call_count == (rate >= L.PAD_EXPLICITLY_FROM_RATE)
    q2 = q.detach().clone().requires_grad_()
    expected = F.conv2d(q2, conv.weight, conv.bias, padding=rate, dilation=rate, groups=4)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=g)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(q.grad, q2.grad, rtol=1e-12, atol=1e-12)
