"""SG-Former (stvit/models/sgformer.py): parity with the authors' code, the contract, clear errors.

The float64 goldens (../shared/golden/sgformer_*.pt, recorded from OliverRensu/SG-Former@b982803;
see sgformer.md there) are compared field by field at rtol 1e-7 / atol 1e-9, and the token
reallocation sort orders exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import stvit.models.sgformer as sg
from conftest import golden_names, to_device
from stvit.checkpoint import load_checkpoint, read_checkpoint
from stvit.contract import FeatureInfo
from stvit.flops import count_macs
from stvit.registry import DEFAULT_PRETRAINED_CFG, FAMILIES, MODELS

RTOL, ATOL = 1e-7, 1e-9
# Listed at collection time, so a new golden file (the hidden one included) is tested without edits.
GOLDEN_FILES = [f"{name}.pt" for name in golden_names("sgformer", "sgformer_a", "sgformer_b")]
VARIANTS = ("sgformer_s", "sgformer_m", "sgformer_b")


pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: a second intra-op thread only slows them


def close(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def golden_model(record: dict, device: torch.device | str = "cpu") -> sg.SGFormer:
    model = sg.SGFormer.from_official_config(record["config"]).double()
    model.load_state_dict(record["state_dict"], strict=True)
    return model.to(device)


def spread_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights as the goldens draw them (N(0, 1/fan_in)): attention far from uniform, so the
    significance map has no near-ties (the trunc-normal .02 init makes almost everything tie)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
    return model


# ----------------------------------------------------------------------------------------------
# Golden parity
# ----------------------------------------------------------------------------------------------
class Recorder:
    """Hooks recording what the goldens hold: stage grids, stage-norm outputs, and for every
    reallocation block its grid, incoming significance map and the sort orders it uses."""

    def __init__(self, model: sg.SGFormer):
        self.grids, self.stage_outputs, self.reallocation = [], [], []
        self.handles = []
        for i in range(4):
            blocks = getattr(model, f"block{i + 1}")
            self.handles.append(blocks[0].register_forward_pre_hook(self._grid))
            self.handles.append(getattr(model, f"norm{i + 1}").register_forward_hook(self._stage_output))
            for j, block in enumerate(blocks):
                if block.kind == "reallocation":
                    self.handles.append(block.attn.register_forward_pre_hook(self._reallocation(f"block{i + 1}.{j}")))

    def _grid(self, module, args):
        self.grids.append([int(args[1]), int(args[2])])

    def _stage_output(self, module, args, output):
        self.stage_outputs.append(output.detach().clone())

    def _reallocation(self, name):
        def hook(module, args):
            x, H, W, significance = args
            row, col = module.sort_orders(significance)
            self.reallocation.append(dict(block=name, sr_ratio=module.sr_ratio, grid=[int(H), int(W)],
                                          significance=significance.clone(), sort_index_row=row,
                                          sort_index_col=col))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module", params=GOLDEN_FILES)
def golden(request, golden_dir, device):
    path = golden_dir / request.param
    if not path.exists():
        pytest.fail(f"{path} is missing")
    record = torch.load(path, weights_only=True)
    assert record["cases"], f"{request.param} has no cases"
    return request.param, to_device(record, device)


def test_golden_eval(golden, device):
    name, record = golden
    model = golden_model(record, device).eval()
    for c, case in enumerate(record["cases"]):
        where = f"{name} case {c} {tuple(case['input'].shape)}"
        rec = Recorder(model)
        with torch.no_grad():
            logits = model(case["input"])
        rec.remove()
        close(logits, case["eval_logits"], f"{where} eval_logits")
        assert rec.grids == [list(g) for g in case["stage_grids"]], where
        assert len(rec.stage_outputs) == len(case["eval_stage_outputs"]) == 4, where
        for i, (got, want) in enumerate(zip(rec.stage_outputs, case["eval_stage_outputs"])):
            close(got, want, f"{where} norm{i + 1} output")
        assert [r["block"] for r in rec.reallocation] == [r["block"] for r in case["reallocation"]], where
        for got, want in zip(rec.reallocation, case["reallocation"]):
            at = f"{where} {want['block']}"
            assert (got["sr_ratio"], got["grid"]) == (want["sr_ratio"], list(want["grid"])), at
            close(got["significance"], want["significance"], f"{at} significance")
            # The goldens' smallest sort gap is > 1e-9 while float64 differs by ~1e-15: exact.
            assert torch.equal(got["sort_index_row"], want["sort_index_row"]), f"{at}: row-major sort order differs"
            assert torch.equal(got["sort_index_col"], want["sort_index_col"]), f"{at}: column-major sort order differs"
            # No ties: both orders list the same positions (column index w·H + h -> row index h·W + w).
            H, W = got["grid"]
            col = got["sort_index_col"]
            assert torch.equal((col % H) * W + col // H, got["sort_index_row"]), at


def test_golden_train_logits_and_gradients(golden, device):
    name, record = golden
    model = golden_model(record, device).train()
    for c, case in enumerate(record["cases"]):
        where = f"{name} case {c}"
        model.zero_grad(set_to_none=True)
        x = case["input"].clone().requires_grad_(True)
        logits = model(x)
        close(logits.detach(), case["train_logits"], f"{where} train_logits")
        (logits * case["loss_weights"]).sum().backward()
        close(x.grad, case["grad_input"], f"{where} grad_input")
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert set(grads) == set(case["grads"]), where
        for n, g in case["grads"].items():
            assert grads[n] is not None, f"{where}: {n} got no gradient"
            close(grads[n], g, f"{where} grad {n}")


def test_golden_layout_matches_description(golden):
    """The block kinds the goldens imply: one reallocation record per odd block of stages 1-3 with sr > 1."""
    _, record = golden
    model = golden_model(record)
    cfg = record["config"]
    expected = [f"block{i + 1}.{j}" for i in range(3) if cfg["sr_ratios"][i] > 1
                for j in range(cfg["depths"][i]) if j % 2 == 1]
    assert [r["block"] for r in record["cases"][0]["reallocation"]] == expected
    got = [f"block{i + 1}.{j}" for i in range(4) for j, b in enumerate(getattr(model, f"block{i + 1}"))
           if b.kind == "reallocation"]
    assert got == expected


# ----------------------------------------------------------------------------------------------
# Official variants: keys, parameter counts, MACs
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def official(golden_dir):
    return json.loads((golden_dir / "official_sgformer_keys.json").read_text())


def on_meta(name: str) -> sg.SGFormer:
    """A variant without storage: shapes, counts and MACs need no values (and no CPU time)."""
    with torch.device("meta"):
        return getattr(sg, name)()


@functools.cache
def shared_meta(name: str) -> sg.SGFormer:
    """One meta model per variant for the tests that only read it."""
    return on_meta(name)


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_keys_params_and_macs(name, official):
    model, ref = shared_meta(name), official[name]
    state = model.state_dict()
    assert list(state) == list(ref["state_dict"])  # same names, same order
    assert {k: list(v.shape) for k, v in state.items()} == {k: list(v) for k, v in ref["state_dict"].items()}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == ref["params"]
    macs = count_macs(model, (3, 224, 224))
    assert abs(macs / ref["macs_224"] - 1) < 0.01, (macs, ref["macs_224"])


@pytest.mark.parametrize("name", VARIANTS)
def test_official_keys_load_strictly_and_through_the_filter(name, official):
    zeros = {k: torch.zeros(shape) for k, shape in official[name]["state_dict"].items()}
    # assign=True puts the given tensors in place of the meta ones; names and shapes are still
    # checked strictly.
    model = on_meta(name)
    model.load_state_dict(zeros, strict=True, assign=True)
    assert all(v.device.type == "cpu" and not v.any() for v in model.state_dict().values())
    filtered = sg.checkpoint_filter_fn(zeros, model)
    assert set(filtered) == set(zeros)
    model.load_state_dict(filtered, strict=True, assign=True)
    release = {"state_dict_ema": {f"module.{k}": v for k, v in zeros.items()}}  # timm's saver, DDP-wrapped
    model.load_state_dict(sg.checkpoint_filter_fn(read_checkpoint(release), model), strict=True, assign=True)
    wrong = dict(zeros, **{"head.weight": torch.zeros(3, zeros["head.weight"].shape[1])})
    with pytest.raises(RuntimeError, match="head.weight"):
        model.load_state_dict(wrong, strict=True, assign=True)


def test_filter_resamples_pos_embed_and_drops_head_for_backbones():
    src = sg.sgformer_tiny(img_size=112, sr_ratios=[8, 4, 2, 1], depths=[2, 2, 2, 1], num_heads=[2, 4, 4, 6])
    assert src.pos_embed.shape[1] == 28 * 28
    dst = sg.sgformer_tiny(img_size=112, sr_ratios=[8, 4, 2, 1], depths=[2, 2, 2, 1], num_heads=[2, 4, 4, 6],
                           features_only=True)
    state = sg.checkpoint_filter_fn(src.state_dict(), dst)
    assert state["pos_embed"].shape == dst.pos_embed.shape
    load_checkpoint(dst, src.state_dict())  # the generic loader: the filter, and the head ignored
    grid = src.pos_embed.detach().reshape(28, 28, -1)
    small = sg.resample_pos_embed(src.pos_embed.detach(), 14 * 14).reshape(14, 14, -1)
    assert small.shape == (14, 14, grid.shape[-1])
    big = sg.resample_pos_embed(src.pos_embed.detach(), 28 * 28)
    torch.testing.assert_close(big, src.pos_embed.detach(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------
def test_pos_embed_init_is_the_authors_sincos():
    # pos_embed.py: meshgrid(w, h) puts the column index first; omega_k = 1 / 10000^(k / (D/4)).
    dim, grid = 16, 5
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    halves = []
    for p in (w.reshape(-1), h.reshape(-1)):
        out = np.einsum("m,d->md", p, omega)
        halves.append(np.concatenate([np.sin(out), np.cos(out)], axis=1))
    expected = torch.from_numpy(np.concatenate(halves, axis=1)).float()
    torch.testing.assert_close(sg.sincos_pos_embed(dim, grid), expected, rtol=0, atol=0)
    model = sg.sgformer_tiny()
    torch.testing.assert_close(model.pos_embed.detach()[0], sg.sincos_pos_embed(32, 14), rtol=0, atol=0)


def test_pos_embed_is_added_to_the_stem_output_and_trained():
    model = spread_init(sg.sgformer_tiny())
    seen = {}
    model.patch_embed1.register_forward_hook(lambda m, a, out: seen.update(stem=out[0].detach().clone()))
    model.block1[0].register_forward_pre_hook(lambda m, a: seen.update(block=a[0].detach().clone()))
    x = torch.randn(2, 3, 56, 56, requires_grad=True)
    model(x).sum().backward()
    torch.testing.assert_close(seen["block"], seen["stem"] + model.pos_embed.detach())
    assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("sr, H, W", [(2, 14, 14), (7, 14, 21)])
def test_significance_map_mass_and_no_gradient(sr, H, W):
    # Each query's probabilities sum to 1, so after averaging over heads and queries the global
    # part puts mass 1 on the reduced keys, each spread over sr x sr pixels (sr divides H and W
    # here): sr² in all; the local part puts mass 1 on each 7x7 window.
    torch.manual_seed(1)
    attn = spread_init(sg.HybridScaleAttention(16, 4, sr_ratio=sr)).double().eval()
    x = torch.randn(2, H * W, 16, dtype=torch.float64, requires_grad=True)
    out, sig = attn(x, H, W)
    assert out.shape == (2, H * W, 16) and sig.shape == (2, H, W)
    assert not sig.requires_grad and out.requires_grad
    windows = (H // 7) * (W // 7)
    torch.testing.assert_close(sig.sum(dim=(1, 2)), torch.full((2,), float(sr * sr + windows), dtype=torch.float64))


def test_reallocation_merges_sorted_runs():
    torch.manual_seed(2)
    attn = sg.TokenReallocationAttention(8, 2, sr_ratio=4)
    for i, (_, _, run) in enumerate(attn.segments):
        f = getattr(attn, f"f{i + 1}")
        nn.init.constant_(f.weight, 1.0 / run)
        nn.init.zeros_(f.bias)
    x = torch.randn(1, 196, 8)
    order = torch.randperm(196)[None]
    merged = attn.reallocate(x, order)
    s = x[0, order[0]]  # sorted tokens
    expected = torch.cat([s[:49].reshape(1, 49, 8).mean(1), s[49:147].reshape(7, 14, 8).mean(1),
                          s[147:].reshape(7, 7, 8).mean(1)])
    torch.testing.assert_close(merged[0], expected)
    assert merged.shape == (1, 15, 8)  # 15 * N / 196 tokens at sr 4


def test_sort_orders_row_and_column_major():
    sig = torch.tensor([[[0.3, 0.1, 0.5], [0.2, 0.6, 0.0]]])  # (1, H=2, W=3)
    row, col = sg.TokenReallocationAttention.sort_orders(sig)
    assert row.tolist() == [[5, 1, 3, 0, 2, 4]]        # index h·W + w
    assert col.tolist() == [[5, 2, 1, 0, 4, 3]]        # index w·H + h


# ----------------------------------------------------------------------------------------------
# Input sizes and construction errors
# ----------------------------------------------------------------------------------------------
def test_valid_input_sizes_are_the_authors_grids():
    # sgformer.md: with img_size 224 and sr 8/4/2/1 only the 56x56, 112x28 and 28x112 grids work.
    model = shared_meta("sgformer_s")
    assert model.valid_input_sizes() == [(112, 448), (224, 224), (448, 112)]
    for h, w in [(221, 224), (224, 221), (448, 109), (445, 112), (109, 445)]:
        assert model.grid_problems(h, w) == [], (h, w)
    for h, w in [(220, 224), (225, 224), (256, 196), (112, 112), (448, 113)]:
        assert model.grid_problems(h, w), (h, w)


@pytest.mark.parametrize("size", [(64, 64), (56, 60), (112, 112), (28, 28)])
def test_wrong_input_size_is_a_clear_error_before_any_compute(size):
    model = sg.sgformer_tiny()
    called = []
    model.patch_embed1.register_forward_pre_hook(lambda m, a: called.append(1))
    with pytest.raises(ValueError, match=r"56x56") as err:
        model(torch.zeros(1, 3, *size))
    assert f"{size[0]}x{size[1]}" in str(err.value)
    assert not called


def test_wrong_channels_and_rank_are_clear_errors():
    model = sg.sgformer_tiny()
    with pytest.raises(ValueError, match="in_chans=3"):
        model(torch.zeros(1, 1, 56, 56))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.zeros(3, 56, 56))


def test_any_in_chans():
    model = sg.sgformer_tiny(in_chans=1, num_classes=5)
    assert model(torch.randn(2, 1, 56, 56)).shape == (2, 5)
    assert model.pretrained_cfg["input_size"] == (1, 56, 56)


@pytest.mark.parametrize("overrides, match", [
    (dict(num_heads=[2, 4, 4, 6], depths=[3, 4, 6, 3]), "block1.2 would reach block2.0"),  # their default depths
    (dict(num_heads=[2, 1, 4, 6]), "even"),
    (dict(sr_ratios=[3, 2, 1, 1]), "sr_ratio 2, 4 or 8"),
    (dict(depths=[2, 1, 2, 1], sr_ratios=[4, 2, 2, 1]), "hybrid"),
    (dict(depths=[2, 1, 2, 2], sr_ratios=[4, 2, 1, 2]), "block4.0"),
    (dict(depths=[2, 1, 0, 1], sr_ratios=[4, 2, 1, 2]), "block2.0 would reach block4.0"),  # across an empty stage
    (dict(img_size=(56, 56)), "img_size"),
    (dict(embed_dims=[32, 64, 128]), "4 stages"),
])
def test_layouts_the_authors_code_cannot_run_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        sg.sgformer_tiny(**overrides)


def test_authors_default_constructor_is_refused():
    with pytest.raises(ValueError):
        sg.SGFormer(num_heads=[1, 2, 4, 8], depths=[3, 4, 6, 3])


# ----------------------------------------------------------------------------------------------
# Contract
# ----------------------------------------------------------------------------------------------
def test_forward_features_head_and_classifier():
    model = sg.sgformer_tiny(num_classes=7).eval()
    x = torch.randn(2, 3, 56, 56)
    feats = model.forward_features(x)
    assert feats.shape == (2, 2 * 2, 192)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats.mean(1))
        torch.testing.assert_close(model.forward_head(feats), model(x))
    assert model.get_classifier() is model.head and model.num_features == 192
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3 and model.pretrained_cfg["num_classes"] == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 192)


def test_pretrained_cfg_no_weight_decay_and_blocks():
    model = sg.sgformer_tiny()
    cfg = model.pretrained_cfg
    assert set(DEFAULT_PRETRAINED_CFG) <= set(cfg)
    assert cfg["fixed_input_size"] is True and cfg["input_size"] == (3, 56, 56) and cfg["crop_pct"] == 0.9
    assert cfg["num_classes"] == 1000 and cfg["classifier"] == "head"
    assert isinstance(model.get_submodule(cfg["first_conv"]), nn.Conv2d)
    assert model.get_submodule(cfg["first_conv"]).in_channels == 3
    assert model.no_weight_decay() == set()  # as the authors trained (their list names nothing real)
    blocks = model.repeated_blocks()
    assert len(blocks) == sum(model.depths) and all(isinstance(b, sg.Block) for b in blocks)
    assert {id(b) for b in blocks} == {id(m) for m in model.modules() if isinstance(m, sg.Block)}


def test_grad_checkpointing_gives_the_same_gradients():
    model = spread_init(sg.sgformer_tiny(num_classes=4)).double()
    x = torch.randn(2, 3, 56, 56, dtype=torch.float64)
    model(x).square().sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-10, atol=1e-12, msg=n)


def test_features_only_maps_and_feature_info():
    full = spread_init(sg.sgformer_tiny()).eval()
    backbone = sg.sgformer_tiny(features_only=True).eval()
    load_checkpoint(backbone, full.state_dict())
    assert not hasattr(backbone, "head")
    info = backbone.feature_info
    assert isinstance(info, FeatureInfo)
    assert info.channels() == [32, 64, 128, 192] and info.reduction() == [4, 8, 16, 32]
    x = torch.randn(2, 3, 56, 56)
    seen = {}
    for f in info:
        backbone.get_submodule(f["module"]).register_forward_hook(
            lambda m, a, out, name=f["module"]: seen.update({name: out}))
    with torch.no_grad():
        maps = backbone(x)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 14, 14), (2, 64, 7, 7), (2, 128, 4, 4), (2, 192, 2, 2)]
    for m, f in zip(maps, info):
        # the named module outputs (B, H·W, C) tokens; the map is that tensor reshaped to NCHW
        torch.testing.assert_close(m, seen[f["module"]].transpose(1, 2).reshape(m.shape))
    with torch.no_grad():
        torch.testing.assert_close(maps[-1].flatten(2).transpose(1, 2), full.forward_features(x))
    some = sg.sgformer_tiny(features_only=True, out_indices=(1, -1))
    assert some.feature_info.reduction() == [8, 32]
    assert [m.shape[1] for m in some(x)] == [64, 192]
    with pytest.raises(ValueError, match="out_indices"):
        sg.sgformer_tiny(features_only=True, out_indices=(4,))


def test_tiny_learns_on_cpu():
    torch.manual_seed(0)
    model = sg.sgformer_tiny(num_classes=4).train()
    x, y = torch.randn(8, 3, 56, 56), torch.arange(8) % 4
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7, losses


def _compile_case():
    # Weights spread as the goldens' so the significance map has no near-ties and both runs sort
    # the tokens the same way (float32 sums reordered by fusion could otherwise flip a tie).
    torch.manual_seed(0)
    model = spread_init(sg.sgformer_tiny(num_classes=5)).eval()
    return model, torch.randn(2, 3, 56, 56)


def test_compile_traces_one_graph_and_matches_eager():
    # fullgraph=True: sort, gather and the block layout trace without a graph break, i.e. no
    # data-dependent Python control flow. aot_eager keeps this cheap; the inductor run is below.
    model, x = _compile_case()
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, dynamic=False, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # inductor's code generation: ~40 s of CPU even for this model
def test_inductor_compile_matches_eager():
    # float32, tolerance 1e-4: inductor fuses and reorders float32 sums.
    model, x = _compile_case()
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, dynamic=False)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------
def test_registration():
    from train.config import TrainConfig

    assert FAMILIES["sgformer"].model_class is sg.SGFormer
    assert FAMILIES["sgformer"].checkpoint_filter is sg.checkpoint_filter_fn
    names = [n for n, e in MODELS.items() if e.family == "sgformer"]
    assert names == ["sgformer_s", "sgformer_m", "sgformer_b", "sgformer_tiny"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for name in names:
        entry = MODELS[name]
        assert set(entry.recipe) <= fields, (name, set(entry.recipe) - fields)
        model = shared_meta(name)
        cfg = {**model.pretrained_cfg, **entry.pretrained_cfg}  # what create_model sets
        assert cfg["fixed_input_size"] is True and cfg["crop_pct"] == entry.recipe["crop_pct"] == 0.9
        assert cfg["input_size"] == (3, model.img_size, model.img_size)
    assert [MODELS[n].recipe["drop_path"] for n in VARIANTS] == [0.1, 0.2, 0.4]
    for n in VARIANTS:
        assert MODELS[n].recipe["model_ema_decay"] == 0.99992 and MODELS[n].recipe["warmup_epochs"] == 20
        assert shared_meta(n).img_size == 224
    tiny = MODELS["sgformer_tiny"]
    assert tiny.demo["input_size"] == 56 == sg.sgformer_tiny().img_size
    assert sg.sgformer_tiny().valid_input_sizes(limit=64) == [(56, 56)]
