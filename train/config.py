"""Command line, recipe presets and the resolved training configuration.

Three presets fill in every value the command line leaves out:

* ``paper``    — ImageNet pre-training as in the paper (Appendix C) and the authors' code; used when
                 ``--data-path`` is given.
* ``finetune`` — the paper's 384² fine-tuning; used when ``--finetune CKPT`` is given.
* ``demo``     — a few minutes on a laptop CPU on the built-in synthetic dataset; used when there
                 is no ``--data-path``.

``--task segment`` (semantic segmentation, a segmentor from ``stvit.create_segmentor``) has two more:

* ``segment``      — UperNet on ADE20K in Swin's setting (MMSegmentation's 160k schedule), used with
                     ``--data-path``;
* ``segment-demo`` — a few minutes on a laptop CPU on a generated set of the demo's shapes.

``--lr`` is always the *base* learning rate at the preset's reference global batch (1024 for
classification, 16 for segmentation); the peak learning rate is ``lr * global_batch / reference``
(global batch = per-process batch × processes × accumulation steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from dataclasses import dataclass, field

import torch

import stvit
from stvit import precision

REFERENCE_BATCH = 1024  # --lr is quoted at this global batch and scaled linearly

PAPER = dict(
    input_size=224, batch_size=128, epochs=300, sched="cosine", lr=1e-3, min_lr=1e-5, warmup_lr=1e-6,
    warmup_epochs=5, weight_decay=0.05, opt_eps=1e-8, opt_betas=(0.9, 0.999), clip_grad=None,
    smoothing=0.1, mixup=0.8, cutmix=1.0, mixup_switch_prob=0.5, mixup_prob=1.0,
    aa="rand-m9-mstd0.5-inc1", reprob=0.25, repeats=3, train_interpolation="bicubic",
    crop_scale_min=0.08, crop_pct=0.875, drop=0.0, model_eval_mode=False, num_workers=10,
    model_ema=False, model_ema_decay=0.99996,
)
# The authors fine-tune at 384² with lr 5e-6 at their global batch of 8 × 64 = 512 (i.e. 1e-5 at
# 1024), lr == min-lr (a constant schedule), no warm-up, weight decay 1e-8, 30 epochs, and keep the
# model in eval mode while fine-tuning (frozen BatchNorm statistics, drop path inactive).
FINETUNE = dict(PAPER, input_size=384, batch_size=64, epochs=30, sched="constant", lr=1e-5,
                warmup_epochs=0, weight_decay=1e-8, model_eval_mode=True)
# A laptop run: small images, lighter augmentation (no RandAugment, Mixup/CutMix, erasing or
# repeats), a higher learning rate for the tiny model and a short schedule.
DEMO = dict(PAPER, input_size=32, batch_size=64, epochs=25, lr=0.064, min_lr=1e-5, warmup_epochs=1,
            smoothing=0.1, mixup=0.0, cutmix=0.0, aa="none", reprob=0.0, repeats=1,
            crop_scale_min=0.5, num_workers=1)
# Semantic segmentation, Swin's ADE20K recipe on MMSegmentation (configs/swin/
# swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py and its bases): 512² crops,
# 16 images per step (8 GPUs × 2), AdamW lr 6e-5, betas 0.9/0.999, weight decay 0.01; a linear warm-up
# over 1,500 iterations from lr × 1e-6 (mmengine's LinearLR, start_factor 1e-6), then poly decay
# (power 1.0) to 0 at 160k iterations; evaluation and checkpoints every 16k. No Mixup, smoothing,
# RandAugment, erasing or repeats: the pipeline is MMSegmentation's (train/seg_data.py).
_NO_CLASSIFICATION_AUGMENTS = dict(smoothing=0.0, mixup=0.0, cutmix=0.0, aa="none", reprob=0.0, repeats=1)
SEGMENT = dict(PAPER, **_NO_CLASSIFICATION_AUGMENTS, input_size=512, batch_size=2, epochs=1, sched="poly", lr=6e-5,
               min_lr=0.0, warmup_lr=6e-11, warmup_epochs=0, weight_decay=0.01, num_workers=4,
               iters=160_000, warmup_iters=1500, eval_every=16_000, ckpt_every=4000, head="upernet",
               head_channels=None, eval_mode="whole", resize_scale=(2048, 512), reference_batch=16)
# A laptop run: stvit_tiny with narrow heads (64 channels, the auxiliary head 32) on 64² crops of the
# generated shapes (resized by 0.5-2 around 256×64, i.e. about the image's own size), 16 per step.
SEGMENT_DEMO = dict(SEGMENT, input_size=64, batch_size=16, lr=3e-3, warmup_lr=1e-6, num_workers=1, iters=600,
                    warmup_iters=50, eval_every=200, ckpt_every=200, head_channels=64, resize_scale=(256, 64))
PRESETS = {"paper": PAPER, "finetune": FINETUNE, "demo": DEMO, "segment": SEGMENT, "segment-demo": SEGMENT_DEMO}
TASKS = ("classify", "segment")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
SEGMENT_PRESETS = ("segment", "segment-demo")

# A family's recipe differs from these presets where its registration says so (``recipe`` for the
# paper preset, ``demo`` for the demo preset; ``drop_path`` in ``recipe`` applies to every preset):
# see stvit/registry.py and each family's file.
DEMO_DATASET = dict(num_classes=10, train_per_class=200, val_per_class=50, image_size=64)
SEGMENT_DEMO_DATASET = dict(train_images=2000, val_images=200, image_size=64)


class ConfigError(ValueError):
    """An invalid combination of command-line options; the message says how to fix it."""


@dataclass
class TrainConfig:
    """Every setting of a run, after presets and scaling; saved as ``config.json``."""

    preset: str
    model: str
    data_path: str | None  # None: the built-in demo dataset
    output_dir: str | None
    task: str = "classify"  # or "segment" (a segmentor: backbone + decode head)
    num_classes: int | None = None  # filled in from the dataset
    input_size: int = 224
    batch_size: int = 128  # per process, per forward pass
    accum_steps: int = 1  # forward/backward passes per optimizer step
    world_size: int = 1
    global_batch: int = 128
    epochs: int = 300
    sched: str = "cosine"
    base_lr: float = 1e-3  # at a global batch of 1024
    lr: float = 1e-3  # peak, scaled to global_batch
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: float = 5
    weight_decay: float = 0.05
    opt_eps: float = 1e-8
    opt_betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = None
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_prob: float = 1.0
    aa: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    repeats: int = 3
    train_interpolation: str = "bicubic"
    crop_scale_min: float = 0.08
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = stvit.IMAGENET_MEAN
    std: tuple[float, float, float] = stvit.IMAGENET_STD
    drop: float = 0.0
    drop_path: float = 0.1
    model_eval_mode: bool = False
    model_ema: bool = False
    model_ema_decay: float = 0.99996
    num_workers: int = 10
    augment_on: str = "auto"  # where RandAugment/normalise/erasing run: auto, device or workers
    seed: int = 0
    resume: str | None = None  # None: auto (continue the run in output_dir if any); "never"; or a folder
    eval_only: bool = False
    checkpoint: str | None = None
    finetune: str | None = None
    ckpt_every: int = 0  # steps; 0 = only at epoch ends
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile's backend for --compile
    grad_checkpoint: bool = False
    precision: str = "auto"  # auto: bf16 mixed precision on GPU, fp32 on CPU
    max_steps: int | None = None  # test hook: stop after this many optimizer steps
    fault: str | None = None  # test hook: "kill@STEP", "nan@STEP", "term@STEP" or "stall@STEP"
    dist_timeout: float = 600.0  # seconds any collective may wait for the other processes
    keep_checkpoints: int = 2  # newest complete checkpoints kept (older ones are the fallbacks)
    log_every: int = 50
    demo_dataset: dict = field(default_factory=dict)
    reference_batch: int = REFERENCE_BATCH  # the global batch --lr is quoted at
    # --task segment (None / 0 for classification):
    head: str | None = None  # upernet or segformer
    aux: bool | None = None  # the auxiliary FCN head (None: with UperNet only)
    head_channels: int | None = None  # decode head width (None: 512 UperNet, 256 SegFormer)
    pretrained: str | None = None  # the backbone's classification checkpoint
    iters: int | None = None  # an iteration-based schedule of this many steps (instead of --epochs)
    warmup_iters: int = 0
    eval_every: int = 0  # evaluate every N steps (and at the end)
    eval_mode: str = "whole"  # or "slide": input_size crops every 2/3 of it
    resize_scale: tuple[int, int] = (2048, 512)  # the random / eval resize's (long, short) scale

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train or evaluate a model of the zoo (STViT, SG-Former, So-ViT/SoT, LVT). With no arguments: a few-minute CPU demo (stvit_tiny on a "
                    "built-in synthetic dataset). ImageNet: torchrun --nproc_per_node 8 -m train --model "
                    "large --data-path /imagenet. Options left out take the values of the preset "
                    "(paper / finetune / demo); the resolved configuration is printed and saved.")
    a = p.add_argument
    a("--model", default=None, help="any registered model (python -c 'import stvit; print(stvit.list_models())'): "
      "stvit_tiny/small/base/large (or tiny/small/...), sgformer_*, So_vit_*, SoT_*, lvt_*; default: stvit_tiny "
      "for the demo, stvit_small otherwise")
    a("--data-path", default=None, help="folder with train/<class>/ and val/<class>/ image folders; "
      "without it the built-in demo dataset is generated and used")
    a("--preset", choices=sorted(PRESETS), default=None,
      help="recipe preset; default: finetune with --finetune, paper with --data-path, else demo")
    a("--output-dir", default=None, help="where config.json, metrics.jsonl, TensorBoard scalars, "
      "checkpoints and model_final.pt go (default: runs/<preset>-<model>)")
    a("--task", choices=TASKS, default=None, help="classify (default) or segment: semantic segmentation with a "
      "decode head on the backbone (--data-path: the ADE20K layout images/{training,validation}/*.jpg, "
      "annotations/{training,validation}/*.png; without it a generated demo set)")
    g = p.add_argument_group("schedule and optimizer (AdamW)")
    g.add_argument("--batch-size", type=int, default=None, help="images per process per forward pass")
    g.add_argument("--accum-steps", type=int, default=None, help="gradient accumulation: forward/backward passes "
                   "per optimizer step (global batch = batch size × processes × accum steps)")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--sched", choices=["cosine", "constant", "poly"], default=None,
                   help="cosine: warm-up then cosine to --min-lr, per iteration; constant: --lr throughout; poly: "
                   "warm-up then linear (power 1) decay to --min-lr (segmentation)")
    g.add_argument("--lr", type=float, default=None, help="base learning rate at a global batch of 1024 "
                   "(scaled linearly: peak lr = lr * global_batch / 1024)")
    g.add_argument("--min-lr", type=float, default=None, help="cosine floor (not scaled)")
    g.add_argument("--warmup-lr", type=float, default=None, help="learning rate at step 0 (not scaled)")
    g.add_argument("--warmup-epochs", type=float, default=None)
    g.add_argument("--weight-decay", type=float, default=None,
                   help="decoupled weight decay; not applied to 1-D parameters and layer-scale gammas")
    g.add_argument("--opt-eps", type=float, default=None)
    g.add_argument("--opt-betas", type=float, nargs=2, default=None)
    g.add_argument("--clip-grad", type=float, default=None, help="clip the global gradient norm (off by default)")
    g = p.add_argument_group("augmentation and regularisation")
    g.add_argument("--input-size", type=int, default=None)
    g.add_argument("--drop", type=float, default=None, help="dropout rate")
    g.add_argument("--drop-path", type=float, default=None,
                   help="stochastic depth rate; default: the model's registered recipe (STViT S 0.1, B 0.4, "
                   "L 0.6; SG-Former S/M/B 0.1/0.2/0.4; ...), 0 in the demo")
    g.add_argument("--smoothing", type=float, default=None, help="label smoothing")
    g.add_argument("--mixup", type=float, default=None, help="Mixup alpha (0 disables)")
    g.add_argument("--cutmix", type=float, default=None, help="CutMix alpha (0 disables)")
    g.add_argument("--mixup-switch-prob", type=float, default=None)
    g.add_argument("--mixup-prob", type=float, default=None)
    g.add_argument("--aa", default=None, help="RandAugment policy, e.g. rand-m9-mstd0.5-inc1; 'none' disables")
    g.add_argument("--reprob", type=float, default=None, help="Random Erasing probability (per-pixel noise)")
    g.add_argument("--repeated-aug", dest="repeats", type=int, default=None, metavar="N",
                   help="repeated augmentation: each image N times per epoch (DeiT's sampler; 1 disables)")
    g.add_argument("--train-interpolation", default=None, choices=["bicubic", "bilinear", "random"])
    g.add_argument("--model-eval-mode", action=argparse.BooleanOptionalAction, default=None,
                   help="train with the model in eval mode (frozen BatchNorm statistics, no drop path), "
                   "as the authors do when fine-tuning; default on for the finetune preset only")
    g.add_argument("--model-ema", action="store_true", default=None,
                   help="keep an EMA of the weights (saved in checkpoints and model_final.pt, not evaluated)")
    g.add_argument("--model-ema-decay", type=float, default=None, help="default 0.99996 (the authors')")
    g = p.add_argument_group("runs, checkpoints, evaluation")
    g.add_argument("--num-workers", type=int, default=None, help="data loader processes per training process")
    g.add_argument("--augment-on", choices=AUGMENT_ON, default="auto",
                   help="where flip, RandAugment, normalisation and Random Erasing run: device (the workers "
                   "decode, crop and resize, and the uint8 batch is finished on the GPU; same draws, Pillow's "
                   "arithmetic), workers (all in the data loader processes), auto (default): device on a GPU, "
                   "workers on a CPU"),
    g.add_argument("--seed", type=int, default=None, help="default 0")
    g.add_argument("--resume", default=None, metavar="auto|never|DIR",
                   help="auto (default): continue the run in --output-dir if it holds a checkpoint of the same "
                   "configuration (so a restarted or re-submitted job picks up where it stopped), start fresh "
                   "if it holds none, refuse if it holds another run; never: start fresh, moving an earlier "
                   "run's files aside; DIR: continue the run (or checkpoint) in DIR, mid-epoch if it stopped "
                   "mid-epoch; options not given take the run's saved values")
    g.add_argument("--keep-checkpoints", type=int, default=None, metavar="K",
                   help="keep the K newest complete checkpoints (default 2): a damaged newest one falls back "
                   "to the one before")
    g.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                   help="how long a collective waits for the other processes before the run fails "
                   "(default 600): a dead or hung peer never leaves the others waiting for ever")
    g.add_argument("--ckpt-every", type=int, default=None,
                   help="also checkpoint every N optimizer steps (0: only at the end of each epoch)")
    g.add_argument("--eval", dest="eval_only", action="store_true",
                   help="only evaluate --checkpoint FILE (or the run in --resume DIR) on the val split")
    g.add_argument("--checkpoint", default=None, help="weights to evaluate with --eval (model_final.pt or "
                   "the authors' .pth)")
    g.add_argument("--finetune", default=None, help="start from these weights with the fine-tune preset; "
                   "a classifier of another size is replaced by a new one")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile each transformer block")
    g.add_argument("--compile-backend", choices=COMPILE_BACKENDS, default=None,
                   help="the backend of --compile: inductor (default: generated kernels), or aot_eager / eager "
                   "(traced graphs run by torch's own kernels: no code generation, to tell a tracing problem "
                   "from a compiler one)")
    g.add_argument("--precision", choices=precision.PRECISIONS, default=None,
                   help="bf16: FSDP2 mixed precision (bf16 compute, fp32 weights, optimizer and gradient "
                   "reduction; BatchNorm normalises in fp32); auto (default): bf16 on GPU, fp32 on CPU")
    g.add_argument("--grad-checkpoint", action="store_true", default=None,
                   help="recompute block activations in backward (large: the authors' first 4/7/15/0 "
                   "blocks per stage; other models: all blocks)")
    g.add_argument("--log-every", type=int, default=None, help="print progress every N steps")
    g = p.add_argument_group("semantic segmentation (--task segment)")
    g.add_argument("--head", choices=("upernet", "segformer"), default=None,
                   help="decode head: upernet (UPerHead + auxiliary FCNHead, default) or segformer (all-MLP)")
    g.add_argument("--aux", action=argparse.BooleanOptionalAction, default=None,
                   help="the auxiliary FCN head (loss weight 0.4); default: on with upernet, off with segformer")
    g.add_argument("--head-channels", type=int, default=None,
                   help="decode head width (default 512 for upernet, 256 for segformer; the demo uses 64)")
    g.add_argument("--pretrained", default=None, metavar="FILE",
                   help="the backbone's ImageNet checkpoint (ours or the authors' release; its classifier is ignored)")
    g.add_argument("--iters", type=int, default=None, help="training iterations (default 160000; the schedule "
                   "counts iterations, not epochs)")
    g.add_argument("--warmup-iters", type=int, default=None, help="linear warm-up iterations (default 1500)")
    g.add_argument("--eval-every", type=int, default=None, help="evaluate (mIoU) every N iterations and at the "
                   "end (default 16000)")
    g.add_argument("--resize-scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"),
                   help="the random resize's scale, ×0.5-2.0 keeping the ratio, and the evaluation resize's "
                   "(default 2048 512, MMSegmentation's ADE20K; the demo 256 64)")
    g.add_argument("--eval-mode", choices=("whole", "slide"), default=None,
                   help="whole images (default, Swin's test_cfg) or slide: --input-size crops every 2/3 of a crop")
    g = p.add_argument_group("test hooks (for the test suite)")
    g.add_argument("--token-label", metavar="DIR", default=None,
                   help="not supported (an error that says why): VOLO/LVT's dense token labelling needs the "
                   "authors' precomputed NFNet label maps")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (the schedule still spans --epochs)")
    g.add_argument("--fault", default=None, help="inject a failure: kill@STEP (SIGKILL after that step), "
                   "nan@STEP (a NaN loss at that step), term@STEP (the last process sends itself SIGTERM after "
                   "that step) or stall@STEP (process 0 pauses after that step, on the first launch only, until "
                   "signalled or for 120 s)")
    return p


def _choose_preset(args: argparse.Namespace) -> str:
    if args.preset:
        return args.preset
    if args.task == "segment":
        return "segment" if args.data_path else "segment-demo"
    if args.finetune:
        return "finetune"
    return "paper" if args.data_path else "demo"


def _output_dir(args: argparse.Namespace, default: str) -> str:
    """--output-dir; else the run folder of --resume; else ``default``, numbered so that a new run never
    lands in the folder of an earlier one."""
    if args.output_dir:
        return args.output_dir
    if args.resume:
        resume = Path(args.resume)
        return str(resume.parent if (resume / ".metadata").exists() else resume)
    candidate, n = Path(default), 1
    while candidate.exists():
        n += 1
        candidate = Path(f"{default}-{n}")
    return str(candidate)


AUGMENT_ON = ("auto", "device", "workers")


def augment_on_device(choice: str, device: torch.device) -> bool:
    """Whether the batch augmentation runs on the training device (``--augment-on``). Batched on
    a GPU it is nearly free; on a CPU the Pillow ops in the workers are faster, so auto keeps
    them there."""
    return choice == "device" or (choice == "auto" and device.type == "cuda")


# Options a resumed run takes from its saved config.json unless given again (test hooks and the
# choice of what to do — --eval, --checkpoint, --finetune — are never inherited).
INHERITED = ("model", "data_path", "preset", "task", "accum_steps", "drop_path", "seed", "ckpt_every", "compile",
             "compile_backend", "grad_checkpoint", "precision", "log_every", *PAPER,
             *(k for k in SEGMENT if k not in PAPER), "aux", "pretrained")
# Options that are neither in a preset nor inherited take TrainConfig's defaults.
BUILTIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                    if f.name in ("accum_steps", "seed", "compile", "compile_backend", "grad_checkpoint", "precision")}


def saved_run_config(resume: str) -> dict | None:
    """The configuration saved by the run in ``resume`` (its folder or one of its checkpoints)."""
    path = Path(resume)
    for candidate in (path / "config.json", path.parent / "config.json"):
        if candidate.is_file():
            try:
                saved = json.loads(candidate.read_text())
            except ValueError:
                raise ConfigError(f"{candidate} is not valid JSON; pass the run's options explicitly") from None
            saved["lr"] = saved.get("base_lr")  # the saved peak lr is derived; --lr is the base lr
            return saved
    return None


def inherit_from_run(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left out of a --resume command line from the resumed run's configuration."""
    saved = saved_run_config(args.resume) if args.resume else None
    args = argparse.Namespace(**vars(args))
    for name in INHERITED:
        if getattr(args, name, None) is None and saved and saved.get(name) is not None:
            setattr(args, name, saved[name])
    for name, value in BUILTIN_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def resolve_config(args: argparse.Namespace, world_size: int = 1) -> TrainConfig:
    """Apply the preset, the per-model defaults and the linear lr scaling; validate the result."""
    args = inherit_from_run(args)
    args.task = args.task or "classify"
    preset_name = _choose_preset(args)
    if (preset_name in SEGMENT_PRESETS) != (args.task == "segment"):
        raise ConfigError(f"--preset {preset_name} is for "
                          f"{'--task segment' if preset_name in SEGMENT_PRESETS else 'classification'}; "
                          f"use --task {'segment' if preset_name in SEGMENT_PRESETS else 'classify'} or another preset")
    preset = PRESETS[preset_name]
    demo = preset_name in ("demo", "segment-demo") and not args.data_path
    model_name = args.model or ("tiny" if demo else "small")
    try:
        entry = stvit.model_entry(model_name)
    except ValueError as e:
        raise ConfigError(f"--model: {e}") from None
    model = entry.name
    preset = {**preset, "drop_path": 0.0, **model_recipe(entry, preset_name)}

    def pick(name: str):
        value = getattr(args, name, None)
        return preset[name] if value is None else value

    values = {name: pick(name) for name in preset}
    values["opt_betas"] = tuple(values["opt_betas"])
    values["num_workers"] = args.num_workers if args.num_workers is not None else preset["num_workers"]
    global_batch = values["batch_size"] * world_size * args.accum_steps
    if args.ckpt_every is None:  # the preset's (segmentation checkpoints every few thousand iterations)
        args.ckpt_every = preset.get("ckpt_every", 0)
    values.pop("ckpt_every", None)
    if args.task == "segment":
        values.update(aux=args.aux, pretrained=args.pretrained)
    else:
        def given_value(name):  # set, and not the default a saved classification config.json holds
            value = getattr(args, name, None)
            value = tuple(value) if isinstance(value, list) else value
            return value not in (None, TrainConfig.__dataclass_fields__[name].default)

        given = [f"--{name.replace('_', '-')}" for name in SEGMENT_ONLY if given_value(name)]
        if given:
            raise ConfigError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} only for semantic segmentation: "
                              f"add --task segment"
                              + ("; to start classification from weights use --finetune FILE"
                                 if "--pretrained" in given else ""))
    demo_dataset = {} if args.data_path else dict(SEGMENT_DEMO_DATASET if args.task == "segment" else DEMO_DATASET)
    cfg = TrainConfig(
        preset=preset_name, model=model, data_path=args.data_path, task=args.task,
        output_dir=_output_dir(args, f"runs/{preset_name}-{model}"),
        accum_steps=args.accum_steps, world_size=world_size, global_batch=global_batch,
        base_lr=values.pop("lr"), lr=0.0,
        seed=args.seed, resume=args.resume, eval_only=args.eval_only, checkpoint=args.checkpoint,
        finetune=args.finetune, ckpt_every=args.ckpt_every, compile=args.compile,
        compile_backend=args.compile_backend,
        grad_checkpoint=args.grad_checkpoint, precision=args.precision, max_steps=args.max_steps,
        fault=args.fault, augment_on=args.augment_on,
        log_every=args.log_every or ((10 if args.task == "classify" else 25) if demo else 50),
        demo_dataset=demo_dataset, **values)
    cfg.opt_betas, cfg.resize_scale = tuple(cfg.opt_betas), tuple(cfg.resize_scale)
    cfg.lr = cfg.base_lr * global_batch / cfg.reference_batch
    if cfg.sched == "constant":
        cfg.min_lr, cfg.warmup_epochs = cfg.lr, 0
    validate(cfg)
    return cfg


SEGMENT_ONLY = ("head", "aux", "head_channels", "pretrained", "iters", "warmup_iters", "eval_every", "eval_mode",
                "resize_scale")


def model_recipe(entry, preset_name: str) -> dict:
    """What a registered model changes in a preset: its ``recipe`` (the paper preset; its
    ``drop_path`` in every preset) and its ``demo`` settings (the demo preset)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    changes = dict(entry.recipe) if preset_name == "paper" else {}
    if preset_name == "demo":
        changes.update(entry.demo)
        if "input_size" not in changes:  # a fixed-size model's demo runs at its own size
            with torch.device("meta"):  # only its pretrained_cfg is read: no memory, no init
                cfg = entry.builder().pretrained_cfg
            if cfg.get("fixed_input_size"):
                changes["input_size"] = cfg["input_size"][-1]
    if "drop_path" in entry.recipe and preset_name not in ("demo", "segment-demo"):
        changes["drop_path"] = entry.recipe["drop_path"]
    unknown = set(changes) - known
    if unknown:  # a registration error, not a user's: say where to fix it
        raise ValueError(f"{entry.name}'s registered recipe has keys train does not know: {sorted(unknown)}")
    return changes


def validate(cfg: TrainConfig) -> None:
    """Reject settings that cannot work, naming the option and a fix."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(cfg.batch_size >= 2, f"--batch-size must be >= 2 (BatchNorm needs 2 images per batch), got "
         f"{cfg.batch_size}")
    need(cfg.accum_steps >= 1, f"--accum-steps must be >= 1, got {cfg.accum_steps}")
    need(cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}")
    need(0 <= cfg.warmup_epochs < cfg.epochs, f"--warmup-epochs must be in [0, --epochs={cfg.epochs}), "
         f"got {cfg.warmup_epochs}")
    need(cfg.base_lr > 0, f"--lr must be > 0, got {cfg.base_lr}")
    need(cfg.min_lr >= 0 and cfg.warmup_lr >= 0, "--min-lr and --warmup-lr must be >= 0")
    need(cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    need(cfg.input_size >= 32, f"--input-size must be >= 32 (the model downsamples by 32), got {cfg.input_size}")
    need(0 <= cfg.drop_path < 1 and 0 <= cfg.drop < 1, "--drop-path and --drop must be in [0, 1)")
    need(0 <= cfg.smoothing < 1, f"--smoothing must be in [0, 1), got {cfg.smoothing}")
    need(cfg.mixup >= 0 and cfg.cutmix >= 0, "--mixup and --cutmix must be >= 0 (0 disables)")
    need(0 <= cfg.reprob <= 1, f"--reprob must be in [0, 1], got {cfg.reprob}")
    need(cfg.repeats >= 1, f"--repeated-aug must be >= 1, got {cfg.repeats}")
    need(cfg.num_workers >= 0, f"--num-workers must be >= 0, got {cfg.num_workers}")
    need(cfg.ckpt_every >= 0, f"--ckpt-every must be >= 0, got {cfg.ckpt_every}")
    need(cfg.clip_grad is None or cfg.clip_grad > 0, "--clip-grad must be > 0")
    need(cfg.max_steps is None or cfg.max_steps >= 1, "--max-steps must be >= 1")
    need(not (cfg.eval_only and not (cfg.checkpoint or cfg.resume)),
         "--eval needs the weights to evaluate: --checkpoint FILE (e.g. model_final.pt) or --resume RUN_DIR")
    need(not (cfg.checkpoint and not cfg.eval_only),
         "--checkpoint is for --eval; to train from weights use --finetune FILE, to continue a run --resume DIR")
    need(not (cfg.finetune and cfg.resume),
         "--finetune starts a new run from weights, --resume continues a run: give only one")
    need(cfg.compile or cfg.compile_backend == "inductor",
         f"--compile-backend {cfg.compile_backend} chooses how --compile compiles: add --compile")
    if cfg.task == "segment":
        need(cfg.head in ("upernet", "segformer"), f"--head must be upernet or segformer, got {cfg.head!r}")
        need(cfg.iters is not None and cfg.iters >= 1, f"--iters must be >= 1, got {cfg.iters}")
        need(0 <= cfg.warmup_iters < cfg.iters, f"--warmup-iters must be in [0, --iters={cfg.iters}), got "
             f"{cfg.warmup_iters}")
        need(cfg.eval_every >= 0, f"--eval-every must be >= 0 (0: only at the end), got {cfg.eval_every}")
        need(cfg.head_channels is None or cfg.head_channels >= 1, "--head-channels must be >= 1")
        need(cfg.eval_mode in ("whole", "slide"), f"--eval-mode must be whole or slide, got {cfg.eval_mode!r}")
        need(min(cfg.resize_scale) >= 1, f"--resize-scale must be positive, got {list(cfg.resize_scale)}")
        need(cfg.augment_on != "device", "--augment-on device is for classification; segmentation augments in "
             "the data-loader workers (drop the option)")
        need(not cfg.finetune, "--finetune is for classification; start a segmentor from the backbone's ImageNet "
             "weights with --pretrained FILE")
        need(not cfg.model_ema, "--model-ema is not supported with --task segment")
    if cfg.fault is not None:
        need(parse_fault(cfg.fault) is not None,
             f"--fault must be one of {', '.join(k + '@STEP' for k in FAULTS)}, got {cfg.fault!r}")


FAULTS = ("kill", "nan", "term", "stall")


def parse_fault(fault: str | None) -> tuple[str, int] | None:
    """``--fault KIND@STEP`` as (kind, step); None when absent or malformed."""
    kind, _, step = (fault or "").partition("@")
    return (kind, int(step)) if kind in FAULTS and step.isdigit() else None
RESUME_MODES = ("auto", "never")


TOKEN_LABEL_UNSUPPORTED = (
    "--token-label: dense token labelling (VOLO's, which LVT's recipe uses) needs the authors' precomputed "
    "NFNet-F6 label maps, which are not available offline, and stvit does not read them. Without them a model "
    "with an auxiliary token head (LVT) trains every token on its image's label, with weight 0.5 beside the "
    "class-token loss (MixToken still mixes the tokens); drop --token-label to train that way")


def parse_config(argv: list[str] | None = None, world_size: int = 1) -> TrainConfig:
    args = build_parser().parse_args(argv)
    if args.token_label is not None:
        raise ConfigError(TOKEN_LABEL_UNSUPPORTED)
    mode = args.resume if args.resume in RESUME_MODES else None
    if mode is not None:  # not a folder: nothing to inherit options from
        args.resume = None
    cfg = resolve_config(args, world_size)
    return apply_fault_options(cfg, args, mode)


def apply_fault_options(cfg: TrainConfig, args: argparse.Namespace, mode: str | None) -> TrainConfig:
    """--resume auto|never, --keep-checkpoints, --dist-timeout (operational: never inherited from a run)."""
    if mode == "never":
        if cfg.eval_only:
            raise ConfigError("--eval --resume never: give the run to evaluate, --resume DIR or --checkpoint FILE")
        cfg.resume = "never"
    if args.keep_checkpoints is not None:
        cfg.keep_checkpoints = args.keep_checkpoints
    if args.dist_timeout is not None:
        cfg.dist_timeout = args.dist_timeout
    if cfg.keep_checkpoints < 1:
        raise ConfigError(f"--keep-checkpoints must be >= 1, got {cfg.keep_checkpoints}")
    if not cfg.dist_timeout > 0:
        raise ConfigError(f"--dist-timeout must be > 0 seconds, got {cfg.dist_timeout}")
    return cfg
