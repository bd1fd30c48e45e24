"""Recipe presets and the learning-rate schedule (fast: no training)."""

import math

import pytest
import torch

import stvit
from train.config import ConfigError, parse_config
from train.optim import WeightEMA, build_optimizer, param_groups
from train.schedule import LRSchedule, build_schedule


def test_paper_preset_matches_the_paper():
    # 8 processes × 128 = the paper's global batch of 1024: the peak lr is the base lr, 1e-3.
    cfg = parse_config(["--model", "small", "--data-path", "/imagenet"], world_size=8)
    assert cfg.preset == "paper" and cfg.model == "stvit_small"
    assert cfg.global_batch == 1024 and cfg.lr == pytest.approx(1e-3)
    assert (cfg.epochs, cfg.warmup_epochs, cfg.warmup_lr, cfg.min_lr) == (300, 5, 1e-6, 1e-5)
    assert cfg.sched == "cosine" and cfg.weight_decay == 0.05
    assert cfg.opt_betas == (0.9, 0.999) and cfg.opt_eps == 1e-8
    assert (cfg.smoothing, cfg.mixup, cfg.cutmix, cfg.mixup_switch_prob) == (0.1, 0.8, 1.0, 0.5)
    assert cfg.aa == "rand-m9-mstd0.5-inc1" and cfg.reprob == 0.25 and cfg.repeats == 3
    assert cfg.train_interpolation == "bicubic" and cfg.crop_pct == 0.875 and cfg.input_size == 224
    assert cfg.model_ema is False and cfg.model_ema_decay == 0.99996 and cfg.model_eval_mode is False


@pytest.mark.parametrize("model, drop_path", [("small", 0.1), ("base", 0.4), ("large", 0.6)])
def test_drop_path_per_model(model, drop_path):
    assert parse_config(["--model", model, "--data-path", "/x"]).drop_path == drop_path
    assert parse_config(["--model", model, "--data-path", "/x", "--drop-path", "0.2"]).drop_path == 0.2


def test_lr_scales_linearly_with_the_global_batch():
    one = parse_config(["--data-path", "/x", "--batch-size", "64"], world_size=1)
    assert one.global_batch == 64 and one.lr == pytest.approx(1e-3 * 64 / 1024)
    accum = parse_config(["--data-path", "/x", "--batch-size", "64", "--accum-steps", "4", "--lr", "2e-3"],
                         world_size=2)
    assert accum.global_batch == 512 and accum.lr == pytest.approx(1e-3)
    assert accum.min_lr == 1e-5 and accum.warmup_lr == 1e-6  # floors are not scaled


def test_finetune_preset_matches_the_authors():
    # The authors fine-tune at 384² on 8 × 64 images with lr 5e-6 == min-lr, no warm-up, wd 1e-8.
    cfg = parse_config(["--model", "base", "--data-path", "/x", "--finetune", "ck.pth", "--input-size", "384"],
                       world_size=8)
    assert cfg.preset == "finetune" and cfg.input_size == 384 and cfg.epochs == 30
    assert cfg.global_batch == 512 and cfg.lr == pytest.approx(5e-6)
    assert cfg.sched == "constant" and cfg.min_lr == cfg.lr and cfg.warmup_epochs == 0
    assert cfg.weight_decay == 1e-8 and cfg.drop_path == 0.4 and cfg.model_eval_mode is True
    schedule = build_schedule(cfg, steps_per_epoch=100)
    assert [schedule(s) for s in (0, 1, 1500, 2999)] == pytest.approx([5e-6] * 4)


def test_demo_is_the_default():
    cfg = parse_config([])
    assert cfg.preset == "demo" and cfg.model == "stvit_tiny" and cfg.data_path is None
    assert cfg.mixup == 0 and cfg.cutmix == 0 and cfg.aa == "none" and cfg.repeats == 1


@pytest.mark.parametrize("warmup_epochs", [5, 0.5])
def test_schedule_hits_the_recipe_values(warmup_epochs):
    cfg = parse_config(["--data-path", "/x", "--warmup-epochs", str(warmup_epochs), "--epochs", "300"],
                       world_size=8)
    steps_per_epoch = 1251  # ImageNet-1k at a global batch of 1024
    s = build_schedule(cfg, steps_per_epoch)
    warmup = round(warmup_epochs * steps_per_epoch)
    total = 300 * steps_per_epoch
    assert s.warmup_steps == warmup and s.total_steps == total
    assert s(0) == pytest.approx(1e-6)  # warm-up starts at --warmup-lr
    assert s(warmup // 2) == pytest.approx(1e-6 + (1e-3 - 1e-6) * (warmup // 2) / warmup)
    assert s(warmup) == pytest.approx(1e-3)  # the peak at the end of warm-up
    assert s(total - 1) == pytest.approx(1e-5)  # the floor at the last step
    midpoint = warmup + (total - 1 - warmup) / 2
    assert s(math.ceil(midpoint)) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-3)
    lrs = [s(t) for t in range(warmup, total, 997)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay after warm-up


def test_schedule_rejects_warmup_longer_than_training():
    with pytest.raises(ValueError, match="warm-up"):
        LRSchedule(lr=1e-3, total_steps=10, warmup_steps=10)


def test_weight_decay_skips_norms_biases_and_layer_scale():
    model = stvit.create_model("base", num_classes=10)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert model.no_weight_decay() and model.no_weight_decay() <= exempt  # layer-scale gammas
    assert all(p.ndim > 1 for n, p in model.named_parameters() if n in decayed)
    assert all(not n.endswith(".bias") for n in decayed)
    assert "head.weight" in decayed and "head.bias" in exempt
    assert len(decayed) + len(exempt) == len(list(model.parameters()))


def test_adamw_is_fused_where_the_parameters_device_has_it():
    """torch's fused AdamW on a CPU (and CUDA): one kernel for all tensors, the same update as its
    per-tensor loop; a device without the kernel (meta here) keeps the loop."""
    cfg = parse_config(["--model", "tiny"])
    model, twin = (stvit.create_model("tiny", num_classes=10) for _ in range(2))
    twin.load_state_dict(model.state_dict())
    fused = build_optimizer(model, cfg)
    loop = torch.optim.AdamW(param_groups(twin, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.opt_betas),
                             eps=cfg.opt_eps, fused=False)
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    x = torch.randn(2, 3, 32, 32)
    for m, opt in ((model, fused), (twin, loop)):  # one step: later ones amplify rounding differences
        m(x).square().mean().backward()            # (conv biases before a BatchNorm get noise gradients)
        opt.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert not build_optimizer(stvit.create_model("tiny", num_classes=10).to("meta"), cfg).defaults["fused"]


def test_weight_ema_follows_its_formula_for_every_parameter():
    """``ema = decay * ema + (1 - decay) * w`` after each update, parameter by parameter, by name."""
    model = stvit.create_model("tiny", num_classes=10)
    ema = WeightEMA(model, decay=0.9)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model)
    ema.update(model)
    averaged = ema.state_dict()
    assert set(averaged) == set(start)
    for name, p in model.named_parameters():
        expected = 0.81 * start[name] + 0.19 * p.detach()  # two steps towards the same weights
        torch.testing.assert_close(averaged[name], expected, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("argv, message", [
    (["--model", "huge"], "unknown model 'huge'"),
    (["--batch-size", "1"], "--batch-size must be >= 2"),
    (["--epochs", "3", "--warmup-epochs", "3"], "--warmup-epochs must be in"),
    (["--eval"], "--eval needs the weights"),
    (["--checkpoint", "x.pt"], "--checkpoint is for --eval"),
    (["--accum-steps", "0"], "--accum-steps must be >= 1"),
    (["--fault", "boom"], "--fault must be"),
    (["--compile-backend", "aot_eager"], "--compile-backend aot_eager chooses how --compile compiles: add --compile"),
])
def test_bad_options_are_config_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(argv)


def test_default_output_dir_never_reuses_a_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_config([]).output_dir == "runs/demo-stvit_tiny"
    (tmp_path / "runs" / "demo-stvit_tiny").mkdir(parents=True)
    assert parse_config([]).output_dir == "runs/demo-stvit_tiny-2"
    assert parse_config(["--resume", "some/run"]).output_dir == "some/run"


def test_resume_takes_the_saved_options_unless_given(tmp_path):
    run = tmp_path / "run"
    first = parse_config(["--model", "base", "--data-path", "/imagenet", "--lr", "2e-3", "--epochs", "90",
                          "--output-dir", str(run), "--ckpt-every", "500"], world_size=8)
    run.mkdir()
    (run / "config.json").write_text(first.to_json())
    resumed = parse_config(["--resume", str(run)], world_size=8)
    assert (resumed.model, resumed.data_path, resumed.preset) == ("stvit_base", "/imagenet", "paper")
    assert (resumed.base_lr, resumed.lr, resumed.epochs, resumed.ckpt_every) == (2e-3, 2e-3, 90, 500)
    assert resumed.drop_path == 0.4 and resumed.output_dir == str(run) and resumed.resume == str(run)
    longer = parse_config(["--resume", str(run), "--epochs", "120"], world_size=8)
    assert longer.epochs == 120 and longer.base_lr == 2e-3


@pytest.mark.parametrize("name", stvit.list_models())
def test_every_registered_recipe_reaches_the_config(name):
    """A family's registered recipe is the paper preset for its models, its demo settings the demo
    preset; a flag on the command line still wins."""
    entry = stvit.model_entry(name)
    cfg = parse_config(["--model", name, "--data-path", "/x"])
    for key, value in entry.recipe.items():
        got = cfg.base_lr if key == "lr" else getattr(cfg, key)
        assert got == (tuple(value) if isinstance(value, list) else value), (name, key)
    demo = parse_config(["--model", name])
    assert demo.preset == "demo"
    for key, value in entry.demo.items():
        assert (demo.base_lr if key == "lr" else getattr(demo, key)) == value, (name, key)
    assert parse_config(["--model", name, "--data-path", "/x", "--lr", "3e-4"]).base_lr == 3e-4


def test_a_fixed_size_model_demos_at_its_own_size():
    """The demo preset's 32² is STViT's; a fixed-size model without a registered demo size runs at its own."""
    assert stvit.model_entry("sgformer_s").demo.get("input_size") is None
    assert parse_config(["--model", "sgformer_s"]).input_size == 224
    assert parse_config(["--model", "lvt_cls"]).input_size == 32  # LVT takes any size
    assert parse_config(["--model", "sgformer_s", "--input-size", "448"]).input_size == 448  # a flag still wins


def test_token_labelling_is_refused_with_what_the_run_does_instead():
    with pytest.raises(ConfigError, match="NFNet-F6 label maps, which are not available offline") as e:
        parse_config(["--model", "lvt_cls", "--data-path", "/x", "--token-label", "/labels"])
    assert "every token on its image's label" in str(e.value)
