"""The timm-style backbone interface: feature maps, strides, heads, checkpoint reuse."""

from __future__ import annotations

import pytest
import torch

import stvit
from stvit.models.stvit import STVIT_CONFIGS


def conv_out(n: int, kernel: int = 3, stride: int = 2, padding: int = 1) -> int:
    """Output length of a convolution (PyTorch's formula)."""
    return (n + 2 * padding - kernel) // stride + 1


def expected_stage_sizes(n: int, stages: int = 4) -> list[int]:
    """Stage map sizes from the conv arithmetic: the stem has two 3×3 stride-2 pad-1 convs
    (its stride-1 convs keep the size), then one more per downsampling between stages."""
    sizes = [conv_out(conv_out(n))]
    for _ in range(stages - 1):
        sizes.append(conv_out(sizes[-1]))
    return sizes


@pytest.fixture(scope="module")
def tiny_backbone():
    torch.manual_seed(0)
    return stvit.create_model("stvit_tiny", features_only=True).eval()


@pytest.mark.parametrize("n", [1, 7, 31, 33, 45, 66])
def test_stage_sizes_follow_the_documented_ceil_formula(tiny_backbone, n):
    # The README formula: stage i (0-based) of an H × W input is ceil(H / 2**(i+2)) × ceil(W / 2**(i+2)).
    with torch.no_grad():
        maps = tiny_backbone(torch.randn(1, 3, n, n + 5))
    assert [tuple(m.shape[-2:]) for m in maps] == [(-(-n // 2 ** (i + 2)), -(-(n + 5) // 2 ** (i + 2)))
                                                   for i in range(4)]


@pytest.mark.parametrize("hw", [(64, 64), (50, 77), (33, 95), (97, 40)])
def test_stage_maps_have_the_conv_arithmetic_shapes(tiny_backbone, hw):
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        maps = tiny_backbone(x)
    assert len(maps) == 4
    heights, widths = expected_stage_sizes(hw[0]), expected_stage_sizes(hw[1])
    for i, (m, info) in enumerate(zip(maps, tiny_backbone.feature_info)):
        assert m.shape == (2, info["num_chs"], heights[i], widths[i])
        assert torch.isfinite(m).all()


def test_feature_info_lists_channels_strides_and_modules(tiny_backbone):
    info = tiny_backbone.feature_info
    assert [f["reduction"] for f in info] == [4, 8, 16, 32] == info.reduction()
    assert info.channels() == STVIT_CONFIGS["stvit_tiny"]["embed_dim"]
    modules = dict(tiny_backbone.named_modules())
    assert all(f["module"] in modules for f in info)


def test_feature_info_modules_output_the_returned_maps(tiny_backbone):
    # timm-style feature extraction hooks the named modules; they must give the same maps.
    modules = dict(tiny_backbone.named_modules())
    seen = {}
    handles = [modules[f["module"]].register_forward_hook(lambda m, a, out, i=i: seen.setdefault(i, out))
               for i, f in enumerate(tiny_backbone.feature_info)]
    with torch.no_grad():
        maps = tiny_backbone(torch.randn(1, 3, 64, 64))
    for handle in handles:
        handle.remove()
    for i, m in enumerate(maps):
        torch.testing.assert_close(seen[i], m)


def test_detection_sized_input_800x1333(tiny_backbone):
    x = torch.randn(1, 3, 800, 1333)
    with torch.no_grad():
        maps = tiny_backbone(x)
    assert [tuple(m.shape[-2:]) for m in maps] == [(200, 334), (100, 167), (50, 84), (25, 42)]
    # The strides hold up to the ceil: each map covers the input exactly once.
    for m, info in zip(maps, tiny_backbone.feature_info):
        s = info["reduction"]
        assert (m.shape[-2] - 1) * s < 800 <= m.shape[-2] * s
        assert (m.shape[-1] - 1) * s < 1333 <= m.shape[-1] * s


def test_out_indices_select_stages_and_feature_info():
    model = stvit.create_model("stvit_tiny", features_only=True, out_indices=(1, 3)).eval()
    assert model.feature_info.reduction() == [8, 32]
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 70, 45))
    assert [m.shape[1] for m in maps] == model.feature_info.channels()
    assert [tuple(m.shape[-2:]) for m in maps] == [(9, 6), (3, 2)]
    with pytest.raises(ValueError, match="out_indices"):
        stvit.create_model("stvit_tiny", features_only=True, out_indices=(4,))


def test_features_match_the_classifier_and_head_shapes():
    torch.manual_seed(0)
    model = stvit.create_model("stvit_tiny", num_classes=7).eval()
    x = torch.randn(2, 3, 72, 88)
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        logits = model.forward_head(feats)
        full = model(x)
    assert feats.shape == (2, model.num_features, 3, 3)
    assert pooled.shape == (2, model.num_features)
    assert logits.shape == (2, 7)
    torch.testing.assert_close(full, logits)
    torch.testing.assert_close(model.head(pooled), logits)


def test_reset_classifier_changes_the_head_only():
    model = stvit.create_model("stvit_tiny", num_classes=7).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model.forward_features(x)
        model.reset_classifier(3)
        assert model(x).shape == (1, 3)
        torch.testing.assert_close(model.forward_features(x), before)
        model.reset_classifier(0)
        assert model(x).shape == (1, model.num_features)  # no head: pooled features
    assert model.pretrained_cfg["num_classes"] == 0


def test_features_only_model_loads_a_classification_checkpoint(tmp_path):
    torch.manual_seed(0)
    classifier = stvit.create_model("stvit_tiny").eval()
    path = tmp_path / "tiny.pth"
    stvit.save_state_dict(classifier.state_dict(), path)
    backbone = stvit.create_model("stvit_tiny", features_only=True, pretrained=str(path)).eval()
    assert not any(k.startswith(("head.", "norm.", "proj.")) for k in backbone.state_dict())
    x = torch.randn(1, 3, 40, 72)
    with torch.no_grad():
        for got, want in zip(backbone(x), classifier.forward_stages(x)):
            torch.testing.assert_close(got, want)


def test_no_weight_decay_names_the_layer_scale_gammas():
    model = stvit.create_model("stvit_tiny", layerscale=[False, False, True, True])
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert names and names <= set(params)
    assert all(n.rsplit(".", 1)[-1] in ("gamma_1", "gamma_2") for n in names)
    assert len(names) == 2 * sum(STVIT_CONFIGS["stvit_tiny"]["depths"][2:])
    assert stvit.create_model("stvit_tiny").no_weight_decay() == set()


def test_set_grad_checkpointing_recomputes_blocks_in_backward():
    # (Gradient equality with and without checkpointing is checked in test_model.py.)
    model = stvit.create_model("stvit_tiny", num_classes=5)
    calls = []
    model.layers[0].blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 32, 32)  # batch 2: training-mode BN needs more than one value per channel

    def forward_calls_in_one_step() -> int:
        calls.clear()
        model(x).sum().backward()
        return len(calls)

    assert forward_calls_in_one_step() == 1
    model.set_grad_checkpointing(True)
    assert [s.checkpoint_num for s in model.layers] == [len(s.blocks) for s in model.layers]
    assert forward_calls_in_one_step() == 2  # once forward, once recomputed in backward
    model.set_grad_checkpointing(True, checkpoint_num=[0, 1, 0, 0])
    assert forward_calls_in_one_step() == 1
    model.set_grad_checkpointing(False)
    assert all(s.checkpoint_num == 0 for s in model.layers)


def test_pretrained_cfg_describes_the_eval_transform_and_classifier():
    model = stvit.create_model("stvit_small", num_classes=10)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224)
    assert 0 < cfg["crop_pct"] <= 1
    assert cfg["interpolation"] == "bicubic"
    assert len(cfg["mean"]) == len(cfg["std"]) == 3
    assert cfg["num_classes"] == 10
    assert getattr(model, cfg["classifier"]) is model.get_classifier()
    assert cfg["architecture"] == "stvit_small"
