"""One sweep over every registered family through the same checks: the model
contract of ``stvit/contract.py`` holds for all of them, so ``train`` and ``bench`` can stay generic.

Per family (its small variant of ours, the one registered without paper numbers): forward and ``features_only`` shapes at two input sizes it accepts, the classifier
calls, a state-dict round trip through ``load_checkpoint``, ``optimize`` equal to eager,
``no_weight_decay`` names that exist, gradient checkpointing equal to the plain backward, one
training step through the real loop (``python -m train`` in-process), and FSDP2 wrapping of the
declared blocks on 2 CPU processes. Plus the clear errors: unknown model, wrong input size,
a checkpoint of another family.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import stvit
from conftest import needs_cpu_fsdp2
from stvit.contract import ModelBase
from stvit.flops import count_params
from train.__main__ import main as train_main
from train.synthetic import ensure_demo_dataset

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = stvit.list_families()


def tiny_of(family: str) -> str:
    """The family's variant of ours for demos and tests: the one registered without paper numbers."""
    names = [n for n in stvit.list_models(family) if stvit.model_entry(n).ours]
    assert len(names) == 1, f"family {family} must register exactly one variant of ours (no paper numbers)"
    return names[0]


def build(family: str, device: torch.device | str = "cpu", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return stvit.create_model(tiny_of(family), **overrides).to(device)


def sizes(model) -> list[tuple[int, int]]:
    """Two input sizes the model accepts: its own, and one pixel shorter (every family takes that:
    the stem's strides round up)."""
    _, h, w = model.pretrained_cfg["input_size"]
    return [(h, w), (h - 1, w)]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_family_is_registered_with_provenance():
    assert {"stvit", "sgformer", "sovit", "sot", "lvt"} <= set(FAMILIES)
    for family in FAMILIES:
        info = stvit.FAMILIES[family]
        assert info.paper and info.verified_against, family
        assert issubclass(info.model_class, ModelBase), family
        tiny_of(family)


def test_every_family_class_is_at_the_top_level():
    """``stvit.SGFormer(**config)`` as ``stvit.STViT(**config)`` (issue #9): each family's class."""
    classes = {stvit.FAMILIES[f].model_class for f in FAMILIES}
    assert classes == {stvit.STViT, stvit.SGFormer, stvit.SoViT, stvit.SoT, stvit.LVT}
    assert {"STViT", "SGFormer", "SoViT", "SoT", "LVT"} <= set(stvit.__all__)
    from stvit.models.sgformer import SGFORMER_TINY_CONFIG
    model = stvit.SGFormer(**SGFORMER_TINY_CONFIG)
    assert model.state_dict().keys() == stvit.create_model("sgformer_tiny").state_dict().keys()


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_features_and_head(family, device):
    model = build(family, device).eval()
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == tiny_of(family) and cfg["family"] == family
    assert {"input_size", "crop_pct", "interpolation", "mean", "std", "classifier", "num_classes"} <= set(cfg)
    for h, w in sizes(model):
        x = torch.randn(2, model.in_chans, h, w, device=device)
        with torch.no_grad():
            logits = model(x)
            assert logits.shape == (2, model.num_classes) and torch.isfinite(logits).all()
            pre = model.forward_head(model.forward_features(x), pre_logits=True)
            assert pre.ndim == 2 and pre.shape[0] == 2  # pooled features, before the classifier
            torch.testing.assert_close(model.forward_head(model.forward_features(x)), logits)
    # get_classifier() is the classifier pretrained_cfg names, or the module holding it (a two-part head)
    named = model.get_submodule(cfg["classifier"] if isinstance(cfg["classifier"], str) else cfg["classifier"][0])
    assert any(m is named for m in model.get_classifier().modules())
    model.reset_classifier(7)
    with torch.no_grad():
        assert model(torch.randn(1, model.in_chans, *sizes(model)[0], device=device)).shape == (1, 7)
    assert model.num_classes == 7


@pytest.mark.parametrize("family", FAMILIES)
def test_features_only_maps_match_feature_info(family, device):
    backbone = build(family, device, features_only=True).eval()
    info = backbone.feature_info
    modules = dict(backbone.named_modules())
    assert info and all(f["module"] in modules for f in info)
    for h, w in sizes(backbone):
        with torch.no_grad():
            maps = backbone(torch.randn(2, backbone.in_chans, h, w, device=device))
        assert len(maps) == len(info)
        for m, f in zip(maps, info):
            assert m.shape == (2, f["num_chs"], math.ceil(h / f["reduction"]), math.ceil(w / f["reduction"])), (
                family, f)


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_round_trip_and_optimize(family, tmp_path, device):
    model = build(family, device).eval()
    path = tmp_path / "weights.pt"
    stvit.save_state_dict(model.state_dict(), path)
    torch.manual_seed(1)
    other = stvit.create_model(tiny_of(family)).to(device).eval()
    stvit.load_checkpoint(other, path)
    x = torch.randn(2, model.in_chans, *sizes(model)[0], device=device)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(other(x), expected, rtol=0, atol=0)
        fast = stvit.optimize(model, compile=False)
        torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_weight_decay_names_exist_and_checkpointing_keeps_gradients(family, device):
    model = build(family, device).train()
    names = dict(model.named_parameters())
    assert set(model.no_weight_decay()) <= set(names)
    assert model.repeated_blocks() and all(isinstance(b, torch.nn.Module) for b in model.repeated_blocks())
    block_ids = {id(b) for b in model.repeated_blocks()}
    assert len(block_ids) == len(model.repeated_blocks())  # each block once
    x = torch.randn(2, model.in_chans, *sizes(model)[0], device=device)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = []
    for enable in (False, True):
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        model.set_grad_checkpointing(enable)
        torch.manual_seed(3)
        out = model(x)
        out = out[0] if isinstance(out, tuple) else out
        out.square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in names.items() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-5, msg=k)


def test_clear_errors():
    with pytest.raises(ValueError) as e:
        stvit.create_model("huge_transformer")
    for family in FAMILIES:  # the message lists every family with its models
        assert family in str(e.value) and tiny_of(family) in str(e.value)
    model = build("stvit")
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(3, 32, 32))
    # A checkpoint of another family names the model that fits it.
    other = build("sgformer").state_dict()
    with pytest.raises(stvit.CheckpointError) as e:
        stvit.load_checkpoint(model, other)
    assert "sgformer_tiny" in str(e.value) and e.value.matching_model == "sgformer_tiny"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_size_the_model_cannot_take_is_named_and_others_run(family, device):
    """A fixed-size family (pretrained_cfg["fixed_input_size"]) refuses another size with a message
    naming the size it takes; the others take it."""
    model = build(family, device).eval()
    h, w = sizes(model)[0]
    x = torch.randn(1, model.in_chans, 2 * h + 5, w, device=device)
    if model.pretrained_cfg.get("fixed_input_size"):
        with pytest.raises(ValueError, match=str(h)):
            model(x)
    else:
        with torch.no_grad():
            assert model(x).shape == (1, model.num_classes)


# ---- timm's model API: forward_intermediates, prune_intermediate_layers, torch.fx, buffers --------


def image(model, device="cpu", batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, model.in_chans, *sizes(model)[1], device=device)  # a size the stems round up


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_intermediates_follows_timms_indices_semantics(family, device):
    model = build(family, device).eval()
    x = image(model, device)
    levels = len(model.feature_info)
    assert levels >= 3  # every variant of ours has at least three feature levels
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert model.forward_head(final, pre_logits=True).shape == (2, model.head_hidden_size)
        assert len(maps) == levels
        for m, f in zip(maps, model.feature_info):
            assert m.shape == (2, f["num_chs"], math.ceil(x.shape[2] / f["reduction"]),
                               math.ceil(x.shape[3] / f["reduction"])), (family, f)
        def same(got, want):
            assert len(got) == len(want)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=0, atol=0)
        same(model.forward_intermediates(x, indices=2, intermediates_only=True), maps[-2:])  # int: the last n
        same(model.forward_intermediates(x, indices=[-1, 0], intermediates_only=True), [maps[0], maps[-1]])
        calls = []
        hook = model.repeated_blocks()[-1].register_forward_pre_hook(lambda *_: calls.append(1))
        early_final, early = model.forward_intermediates(x, indices=[1], stop_early=True)
        hook.remove()
        same(early, [maps[1]])
        assert not calls and not torch.equal(early_final, final)  # stopped after level 1
        _, normed = model.forward_intermediates(x, indices=[0], norm=True)
        assert normed[0].shape == maps[0].shape
    for bad in (0, levels + 1, [levels], [-levels - 1], []):
        with pytest.raises(ValueError, match="indices"):
            model.forward_intermediates(x, indices=bad)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("family", FAMILIES)
def test_features_only_returns_the_maps_of_forward_intermediates(family, device):
    model = build(family, device).eval()
    levels = len(model.feature_info)
    backbone = build(family, device, features_only=True, out_indices=(0, levels - 1)).eval()
    stvit.load_checkpoint(backbone, model.state_dict())
    x = image(model, device)
    with torch.no_grad():
        want = model.forward_intermediates(x, indices=[0, levels - 1], intermediates_only=True)
        for got, w in zip(backbone(x), want, strict=True):
            torch.testing.assert_close(got, w, rtol=0, atol=0)
    assert backbone.feature_info == [model.feature_info[0], model.feature_info[-1]]


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_intermediate_layers_keeps_the_taps_and_leaves_no_unused_parameter(family, device):
    model = build(family, device).eval()
    x = image(model, device)
    levels = len(model.feature_info)
    with torch.no_grad():
        expected, taps = model(x), model.forward_intermediates(x, intermediates_only=True)
    keep_head = copy.deepcopy(model)
    assert keep_head.prune_intermediate_layers([levels - 1], prune_head=False) == [levels - 1]
    with torch.no_grad():
        torch.testing.assert_close(keep_head(x), expected, rtol=0, atol=0)
    for prune_norm in (False, True):
        pruned = copy.deepcopy(model)
        assert pruned.prune_intermediate_layers([-2], prune_norm=prune_norm) == [levels - 2]
        assert count_params(pruned) < count_params(model) and len(pruned.feature_info) == levels - 1
        with torch.no_grad():  # no head: the unpooled features, a map (B, C, h, w) or tokens (B, N, C)
            out = pruned(x)
        assert pruned.num_classes == 0 and out.shape[1 if out.ndim == 4 else -1] == pruned.head_hidden_size
        with torch.no_grad():
            torch.testing.assert_close(pruned.forward_intermediates(x, indices=[-1], intermediates_only=True)[0],
                                       taps[-2], rtol=0, atol=0)
        pruned.train()
        features = pruned.forward_features(x)
        maps = pruned.forward_intermediates(x, indices=[levels - 2], intermediates_only=True)
        (features.sum() + maps[0].sum()).backward()
        unused = [n for n, p in pruned.named_parameters() if p.grad is None]
        assert not unused, (family, prune_norm, unused)  # DDP would stop on a parameter without a gradient


@pytest.mark.parametrize("family", FAMILIES)
def test_traceable_by_torch_fx_and_torchvision_with_clear_errors_for_eager_calls(family):
    from torchvision.models.feature_extraction import create_feature_extractor

    model = build(family).eval()
    x = image(model)
    traced = torch.fx.symbolic_trace(model)
    extractor = create_feature_extractor(model, return_nodes={f["module"]: str(i) for i, f in
                                                              enumerate(model.feature_info)})
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
        assert len(extractor(x)) == len(model.feature_info)
    with pytest.raises(ValueError, match="4-D"):
        model(x[0])
    with pytest.raises(ValueError, match="channels"):
        model(x[:, :1])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_parameter_is_trained_and_models_build_on_the_meta_device(family):
    """A tensor that is never trained is a buffer (timm's backward tests need a gradient on every
    parameter); the state-dict keys stay the authors' (the goldens load them one-to-one)."""
    model = build(family).train()
    out = model(image(model))
    (out[0] if isinstance(out, tuple) else out).square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    with torch.device("meta"):
        meta = stvit.create_model(tiny_of(family))
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    assert meta.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("family", FAMILIES)
def test_timms_names_default_cfg_head_hidden_size_and_a_reset_classifier_in_place(family):
    model = build(family).double().eval()
    assert model.default_cfg is model.pretrained_cfg
    model.default_cfg = {**model.pretrained_cfg, "crop_pct": 0.5}  # timm's builder sets it
    assert model.pretrained_cfg["crop_pct"] == 0.5
    x = image(model).double()
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.head_hidden_size)
    model.reset_classifier(3)
    head = model.get_classifier()
    assert all(p.dtype == torch.float64 for p in head.parameters()) and not any(m.training for m in model.modules())
    model.reset_classifier(0)
    assert model(x).shape == (2, model.head_hidden_size)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return ensure_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", num_classes=3, train_per_class=4,
                               val_per_class=2, image_size=64)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_training_step_through_the_real_loop(family, data, tmp_path):
    out = tmp_path / "run"
    code = train_main(["--model", tiny_of(family), "--data-path", str(data), "--preset", "demo",
                       "--batch-size", "4", "--epochs", "2", "--warmup-epochs", "0", "--num-workers", "0", "--max-steps", "3",
                       "--log-every", "1000", "--output-dir", str(out)])
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == tiny_of(family)
    demo_size = stvit.model_entry(tiny_of(family)).demo.get("input_size")
    if demo_size:
        assert config["input_size"] == demo_size
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["global_step"] == 3 and math.isfinite(records[0]["train_loss"])
    model = stvit.create_model(tiny_of(family), num_classes=3)
    stvit.load_checkpoint(model, out / "model_final.pt")


FSDP_WORKER = r"""
import sys, torch
import stvit
from torch.distributed.fsdp import FSDPModule
from train.distributed import barrier, exit_process, init_distributed, prepare_model, shutdown

env = init_distributed()
for name in sys.argv[1:]:
    torch.manual_seed(0)
    reference = stvit.create_model(name, num_classes=5)
    torch.manual_seed(0)
    model = prepare_model(stvit.create_model(name, num_classes=5), env)
    blocks = model.repeated_blocks()
    assert isinstance(model, FSDPModule) and blocks and all(isinstance(b, FSDPModule) for b in blocks), name
    for (k, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):  # sharded, same weights
        assert torch.equal(p.full_tensor(), q.detach()), (name, k)
    size = model.pretrained_cfg["input_size"][1:]
    torch.manual_seed(env.rank)
    x = torch.randn(2, 3, *size)
    soft = torch.softmax(torch.randn(2, 5), -1)
    model.train()
    loss = model.training_loss(x, soft, __import__("random").Random(env.rank))
    loss.backward()
    assert torch.isfinite(loss), name
    assert all(p.grad is not None and torch.isfinite(p.grad.full_tensor()).all() for p in model.parameters()), name
    print(f"rank {env.rank} {name} ok", flush=True)
barrier()  # leave as train's workers do: together, and without interpreter finalisation
shutdown()
exit_process(0)
"""


@needs_cpu_fsdp2
def test_fsdp2_wraps_every_family_on_two_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(FSDP_WORKER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    names = [tiny_of(f) for f in FAMILIES]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), *names], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        for name in names:
            assert f"rank {rank} {name} ok" in result.stdout


def test_lvt_trains_with_mixtoken_through_the_real_loop(data, tmp_path, monkeypatch):
    """The loop draws LVT's MixToken box (the model's training_loss, seeded like the rest of the
    augmentation) and the model mixes with it: at 128² the 4×4 stage-4 grid takes non-empty boxes."""
    from stvit.models.lvt import LVT

    boxes = []
    forward = LVT.forward

    def spy(self, x, mix_box=None):
        boxes.append(None if mix_box is None else tuple(int(v) for v in mix_box))
        return forward(self, x, mix_box=mix_box)

    monkeypatch.setattr(LVT, "forward", spy)
    args = ["--model", "lvt_tiny", "--data-path", str(data), "--preset", "demo", "--input-size", "128",
            "--batch-size", "4", "--epochs", "2", "--warmup-epochs", "0", "--num-workers", "0", "--max-steps", "3",
            "--log-every", "1000"]
    assert train_main(args + ["--output-dir", str(tmp_path / "a")]) == 0
    train_boxes = [b for b in boxes if b is not None]
    assert len(train_boxes) == 3  # one per training step; evaluation forwards without a box
    assert any(b[2] > b[0] and b[3] > b[1] for b in train_boxes)  # some box really mixes tokens
    first = list(train_boxes)
    boxes.clear()
    assert train_main(args + ["--output-dir", str(tmp_path / "b")]) == 0
    assert [b for b in boxes if b is not None] == first  # seeded: the same boxes again


def test_a_training_size_the_model_cannot_take_stops_before_training(data, tmp_path, capsys):
    out = tmp_path / "run"
    code = train_main(["--model", "sgformer_tiny", "--data-path", str(data), "--preset", "demo", "--input-size", "40",
                       "--batch-size", "4", "--num-workers", "0", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: --input-size 40 does not fit sgformer_tiny") and "56" in err
    assert not (out / "metrics.jsonl").exists()
