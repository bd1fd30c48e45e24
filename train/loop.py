"""The training run: data, model, optimizer, resume, epochs, checkpoints, final weights.

Both tasks run here: classification (records and evaluations per epoch) and, with ``--task
segment``, semantic segmentation, whose schedule counts iterations: the sampler's epochs still
order the data (and resume mid-epoch), but the run ends after ``--iters`` steps and evaluates
every ``--eval-every`` steps and at the end — also when ``--max-steps`` stops it."""

from __future__ import annotations

import json
import random
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

import stvit
from stvit import precision
from train import checkpoint, distributed, engine, faults
from train.config import ConfigError, TrainConfig, augment_on_device, parse_fault
from train.data import DataError, build_datasets, collate_skip_corrupt
from train.distributed import DistEnv
from train.metrics import MetricsWriter, atomic_write_text
from train.mixup import Mixup
from train.optim import WeightEMA, build_optimizer
from train.samplers import DistributedEvalSampler, build_train_sampler
from train.schedule import build_schedule, set_lr

EPOCH_SUMS = ("loss_sum", "images", "skipped", "train_time")


def _images_seen(sums: dict, val: dict) -> dict:
    """What every evaluation record says of its training period's speed and images and its validation images."""
    return {"images_per_sec": sums["images"] / max(sums["train_time"], 1e-9),
            "train_images": int(sums["images"]), "train_skipped": int(sums["skipped"]),
            "val_images": val["val_images"], "val_skipped": val["val_skipped"]}


def _skipped_note(record: dict) -> str:
    if not (record["train_skipped"] or record["val_skipped"]):
        return ""
    return f", skipped {record['train_skipped']} unreadable train / {record['val_skipped']} val images"


class Run:
    """State and helpers of one training or evaluation run (one per process)."""

    def __init__(self, cfg: TrainConfig, env: DistEnv):
        self.cfg, self.env = cfg, env
        # Filled in by the build_* steps, in this order (all exist from the start, for readers).
        self.train_ds = self.val_ds = None                   # build_data
        self.train_sampler = self.train_loader = self.val_loader = None
        self.step_batch = self.steps_per_epoch = 0
        self.total_steps = self.num_epochs = 0  # the schedule's length, and the sampler epochs it spans
        self.model: nn.Module | None = None                  # build_model
        self.num_params = 0
        self.bf16 = False
        self.optimizer: torch.optim.Optimizer | None = None  # build_training
        self.ema: WeightEMA | None = None
        self.schedule = self.mixup = None
        self.state: dict = {}
        self.stop_signals: faults.StopSignals | None = None  # while training: SIGTERM / SIGUSR1 stop after a step

    def log(self, message: str) -> None:
        if self.env.is_main:
            print(message, flush=True)

    # ---- setup ------------------------------------------------------------------------------------
    @property
    def segment(self) -> bool:
        return self.cfg.task == "segment"

    def build_data(self) -> None:
        cfg = self.cfg
        data_path = cfg.data_path
        if data_path is None:
            if self.segment:
                from train.seg_data import ensure_demo_segmentation as ensure
            else:
                from train.synthetic import ensure_demo_dataset as ensure
            self.log(f"no --data-path: using the built-in demo dataset {cfg.demo_dataset}")
            if self.env.is_main:  # builds it once; the others then find the finished copy
                data_path = str(ensure(seed=0, **cfg.demo_dataset))
            distributed.barrier()
            if not self.env.is_main:
                data_path = str(ensure(seed=0, **cfg.demo_dataset))
            self.log(f"demo dataset: {data_path}")
        if self.segment:
            from train.seg_data import build_segmentation_datasets
            self.train_ds, self.val_ds = build_segmentation_datasets(data_path, cfg.input_size, cfg.resize_scale,
                                                                     mean=cfg.mean, std=cfg.std)
        else:
            self.train_ds, self.val_ds = build_datasets(
                data_path, cfg.input_size, aa=cfg.aa, reprob=cfg.reprob, interpolation=cfg.train_interpolation,
                crop_pct=cfg.crop_pct, mean=cfg.mean, std=cfg.std, scale=(cfg.crop_scale_min, 1.0),
                defer=augment_on_device(cfg.augment_on, self.env.device))
        if self.train_ds.transform.defer:
            self.log(f"--augment-on {cfg.augment_on}: the data loader workers decode, crop and resize; flip, "
                     f"RandAugment, normalisation and erasing run batched on {self.env.device}")
        cfg.num_classes = self.train_ds.num_classes
        env = self.env
        self.train_sampler = build_train_sampler(len(self.train_ds), env.world_size, env.rank,
                                                 num_repeats=cfg.repeats, seed=cfg.seed)
        self.step_batch = cfg.batch_size * cfg.accum_steps  # images per process per optimizer step
        self.steps_per_epoch = self.train_sampler.epoch_length // self.step_batch
        if self.steps_per_epoch < 1 and not cfg.eval_only:
            raise ConfigError(f"the training split has {len(self.train_ds)} images, fewer than one global batch "
                              f"of {cfg.global_batch}; lower --batch-size")
        if cfg.iters:  # iteration-based: as many sampler epochs as the iterations need
            self.total_steps = cfg.iters
            self.num_epochs = -(-cfg.iters // max(self.steps_per_epoch, 1))
        else:
            self.total_steps, self.num_epochs = cfg.epochs * self.steps_per_epoch, cfg.epochs
        loader_args = dict(num_workers=cfg.num_workers, collate_fn=collate_skip_corrupt,
                           pin_memory=env.device.type == "cuda", persistent_workers=cfg.num_workers > 0)
        self.train_loader = DataLoader(self.train_ds, batch_size=self.step_batch, sampler=self.train_sampler,
                                       drop_last=True, **loader_args)
        # Segmentation evaluates one image at a time (images differ in size; MMSegmentation's val batch).
        eval_batch = 1 if self.segment else max(2, int(1.5 * cfg.batch_size))
        self.val_loader = DataLoader(self.val_ds, batch_size=eval_batch,
                                     sampler=DistributedEvalSampler(len(self.val_ds), env.world_size, env.rank),
                                     **loader_args)

    def build_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the same initial weights on every process, whatever the world size
        if self.segment:
            model = stvit.create_segmentor(cfg.model, head=cfg.head, num_classes=cfg.num_classes, aux=cfg.aux,
                                           channels=cfg.head_channels, drop_path_rate=cfg.drop_path,
                                           pretrained=cfg.pretrained, drop_rate=cfg.drop)
            if cfg.pretrained:
                self.log(f"--pretrained: the backbone starts from {cfg.pretrained}")
        else:
            model = stvit.create_model(cfg.model, num_classes=cfg.num_classes, drop_path_rate=cfg.drop_path,
                                       drop_rate=cfg.drop)
        try:  # a size the model cannot take (a fixed-size family): the model's message, before any work
            model.check_input(torch.empty(1, model.in_chans, cfg.input_size, cfg.input_size, device="meta"))
        except ValueError as e:
            raise ConfigError(f"--input-size {cfg.input_size} does not fit {cfg.model}: {e}") from None
        if cfg.finetune:
            self.load_finetune_weights(model, cfg.finetune)
        if cfg.eval_only and cfg.checkpoint:
            stvit.load_checkpoint(model, cfg.checkpoint)
        if cfg.grad_checkpoint:
            model.set_grad_checkpointing(True)
        self.num_params = sum(p.numel() for p in model.parameters())
        torch.manual_seed(cfg.seed + self.env.rank)
        self.bf16 = precision.resolve(cfg.precision, self.env.device) == torch.bfloat16
        self.model = distributed.prepare_model(model, self.env, compile_blocks=cfg.compile, bf16=self.bf16,
                                                  compile_backend=cfg.compile_backend)

    def load_finetune_weights(self, model, path: str) -> None:
        state = stvit.checkpoint.filter_for(model, stvit.read_checkpoint(path))
        fresh = model.state_dict()
        heads = [k for k in stvit.checkpoint.classifier_keys(model) if k in state and state[k].shape != fresh[k].shape]
        if heads:
            classes = state[heads[0]].shape[0]
            self.log(f"--finetune: {path} has a {classes}-class classifier and this dataset has "
                     f"{self.cfg.num_classes} classes: the classifier ({', '.join(heads)}) is replaced by a new, "
                     f"randomly initialised one; every other weight is loaded")
            state.update({k: fresh[k] for k in heads})
        stvit.load_checkpoint(model, state)
        self.log(f"--finetune: loaded {path}")

    def build_training(self) -> None:
        cfg = self.cfg
        self.optimizer = build_optimizer(self.model, cfg)
        self.ema = WeightEMA(self.model, cfg.model_ema_decay) if cfg.model_ema else None
        self.schedule = build_schedule(cfg, self.steps_per_epoch)
        mixup = Mixup(cfg.mixup, cfg.cutmix, switch_prob=cfg.mixup_switch_prob, prob=cfg.mixup_prob,
                      label_smoothing=cfg.smoothing, num_classes=cfg.num_classes)
        self.mixup = mixup if mixup.active and not self.segment else None
        self.state = dict(model=cfg.model, num_classes=cfg.num_classes, global_batch=cfg.global_batch,
                          steps_per_epoch=self.steps_per_epoch, has_ema=cfg.model_ema, epoch=0,
                          step_in_epoch=0, global_step=0, epoch_sums=dict.fromkeys(EPOCH_SUMS, 0.0),
                          history=[], config=cfg.to_dict())

    def resume(self, ckpt: Path) -> None:
        cfg = self.cfg
        saved = checkpoint.read_train_state(ckpt)
        checkpoint.check_compatible(saved, model=cfg.model, num_classes=cfg.num_classes,
                                    global_batch=cfg.global_batch, ckpt=ckpt)
        if saved["step_in_epoch"] and saved["steps_per_epoch"] != self.steps_per_epoch:
            raise checkpoint.ResumeError(
                f"cannot resume mid-epoch from {ckpt}: it had {saved['steps_per_epoch']} steps per epoch, this "
                f"run has {self.steps_per_epoch} (the training set or batch size changed)")
        if cfg.model_ema and not saved.get("has_ema"):
            raise checkpoint.ResumeError(f"{ckpt} holds no EMA weights; resume without --model-ema")
        checkpoint.load_checkpoint(ckpt, self.model, self.optimizer, self.ema, self.env)
        for key in ("epoch", "step_in_epoch", "global_step", "epoch_sums", "history"):
            self.state[key] = saved[key]
        self.log(f"resumed from {ckpt}: epoch {saved['epoch'] + 1}, step {saved['step_in_epoch']} of "
                 f"{self.steps_per_epoch} (global step {saved['global_step']})")

    # ---- training -----------------------------------------------------------------------------------
    def save(self) -> Path:
        return checkpoint.save_checkpoint(self.cfg.output_dir, self.model, self.optimizer, self.ema,
                                          self.state, self.env, keep=self.cfg.keep_checkpoints)

    def train(self, writer: MetricsWriter) -> dict | None:
        cfg, state = self.cfg, self.state
        kind, at = parse_fault(cfg.fault) or (None, None)
        nan_step = at if kind == "nan" else None  # the other hooks run in faults.fault_hook
        record = state["history"][-1] if state["history"] else None
        if state["global_step"] >= self.total_steps:  # a finished run, resumed: nothing left to train
            return record
        for epoch in range(state["epoch"], self.num_epochs):
            first = state["step_in_epoch"]
            self.train_sampler.set_epoch(epoch)
            self.train_sampler.set_start(first * self.step_batch)
            sums = dict(state["epoch_sums"])
            self.model.train(not cfg.model_eval_mode)
            tick = time.perf_counter()
            batches = iter(self.train_loader)
            for k in range(first, self.steps_per_epoch):
                images, targets, skipped = next(batches)
                images = self.train_ds.transform.device_stage(images, self.env.device)
                step = state["global_step"]
                lr = self.schedule(step)
                set_lr(self.optimizer, lr)
                try:
                    stats = engine.train_step(self.model, self.optimizer, images, targets, env=self.env, cfg=cfg,
                                              mixup=self.mixup, step=step, skipped=skipped,
                                              fault_nan=step == nan_step)
                except engine.NonFiniteLossError as e:
                    raise engine.NonFiniteLossError(
                        f"{e} (epoch {epoch + 1}, step {k + 1}/{self.steps_per_epoch}); stopping. The last good "
                        f"checkpoint is in {cfg.output_dir} (continue with --resume {cfg.output_dir}, perhaps "
                        f"with a lower --lr or with --clip-grad)") from None
                if self.ema is not None:
                    self.ema.update(self.model)
                now = time.perf_counter()
                sums["train_time"] += now - tick
                tick = now
                sums["loss_sum"] += stats.loss_sum
                sums["images"] += stats.images
                sums["skipped"] += stats.skipped
                state.update(global_step=step + 1, step_in_epoch=k + 1, epoch_sums=sums)
                self.report_progress(epoch, k, lr, stats, sums, writer)
                faults.fault_hook(cfg.fault, step + 1, self.env, self.stop_signals)  # test hooks
                self.stop_if_preempted(epoch, k)
                last_step = k + 1 == self.steps_per_epoch
                if cfg.iters:  # iteration-based (segmentation): evaluate on its own schedule
                    if last_step:  # the next step opens the sampler's next epoch
                        state.update(epoch=epoch + 1, step_in_epoch=0)
                    done = step + 1
                    stop = done >= self.total_steps or (cfg.max_steps is not None and done >= cfg.max_steps)
                    if stop or (cfg.eval_every and done % cfg.eval_every == 0):
                        record = self.finish_period(epoch, sums, lr, writer)
                        sums = dict(state["epoch_sums"])
                        self.save()
                        if stop:
                            if done < self.total_steps:
                                self.log(f"--max-steps {cfg.max_steps} reached; evaluated and checkpoint saved")
                            return record
                        tick = time.perf_counter()  # the evaluation is not training time
                    elif cfg.ckpt_every and done % cfg.ckpt_every == 0:
                        self.save()
                    continue
                if cfg.max_steps is not None and step + 1 >= cfg.max_steps and not last_step:
                    self.save()
                    self.log(f"--max-steps {cfg.max_steps} reached mid-epoch; checkpoint saved")
                    return None
                if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0 and not last_step:
                    self.save()
            if cfg.iters:
                continue  # an iteration-based run's epochs end without an evaluation (done above)
            record = self.finish_epoch(epoch, sums, lr)
            self.save()
            writer.log_epoch(record, state["global_step"])
            if cfg.max_steps is not None and state["global_step"] >= cfg.max_steps:
                self.log(f"--max-steps {cfg.max_steps} reached")
                break
        return record

    def stop_if_preempted(self, epoch: int, k: int) -> None:
        """Collective, after every step: when any process received SIGTERM / SIGUSR1, all save and stop."""
        stop = faults.agree_to_stop(self.stop_signals, self.env)
        if stop is None:
            return
        signame, rank = stop
        path = self.save()
        self.log(f"{signame} received (by process {rank}): stopped after epoch {epoch + 1} step {k + 1}/"
                 f"{self.steps_per_epoch} (global step {self.state['global_step']}); checkpoint {path} written. "
                 f"Run the same command again to continue (--resume auto), or --resume {self.cfg.output_dir}; "
                 f"exit status {faults.EXIT_PREEMPTED}")
        raise faults.Preempted(f"{signame} at global step {self.state['global_step']}")

    def report_progress(self, epoch, k, lr, stats, sums, writer) -> None:
        cfg = self.cfg
        loss = stats.loss_sum / max(stats.images, 1)
        writer.log_step(self.state["global_step"], {"loss": loss, "lr": lr})
        if cfg.iters:
            step = self.state["global_step"]
            if step % cfg.log_every and step != self.total_steps:
                return
            rate = sums["images"] / max(sums["train_time"], 1e-9)
            eta = (self.total_steps - step) * cfg.global_batch / max(rate, 1e-9)
            self.log(f"step {step}/{self.total_steps}  loss {loss:.4f} (since last evaluation "
                     f"{sums['loss_sum'] / max(sums['images'], 1):.4f})  lr {lr:.3g}  {rate:.0f} img/s  eta {eta:.0f}s")
            return
        done = k + 1
        if done % cfg.log_every and done != self.steps_per_epoch:
            return
        rate = sums["images"] / max(sums["train_time"], 1e-9)
        eta = (self.steps_per_epoch - done) * cfg.global_batch / max(rate, 1e-9)
        self.log(f"epoch {epoch + 1}/{cfg.epochs}  step {done}/{self.steps_per_epoch}  loss {loss:.4f} "
                 f"(epoch mean {sums['loss_sum'] / max(sums['images'], 1):.4f})  lr {lr:.3g}  "
                 f"{rate:.0f} img/s  epoch eta {eta:.0f}s")

    def finish_period(self, epoch: int, sums: dict, lr: float, writer: MetricsWriter) -> dict:
        """An iteration-based run's evaluation: mIoU over the validation split, one record (in the
        history, metrics.jsonl and TensorBoard) for the steps since the last one."""
        distributed.average_buffers(self.model)
        val = self.evaluate()
        step = self.state["global_step"]
        record = {"step": step, "epoch": epoch + 1, "train_loss": sums["loss_sum"] / max(sums["images"], 1),
                  **{k: val[k] for k in ("mIoU", "mAcc", "aAcc")}, "lr": lr, **_images_seen(sums, val),
                  "train_time": sums["train_time"], "global_step": step}
        skipped = _skipped_note(record)
        self.log(f"step {step}/{self.total_steps} evaluated: train loss {record['train_loss']:.4f}  mIoU "
                 f"{record['mIoU']:.2f}  mAcc {record['mAcc']:.2f}  aAcc {record['aAcc']:.2f} on {val['val_images']} "
                 f"val images ({self.cfg.eval_mode})  {record['images_per_sec']:.0f} img/s{skipped}")
        self.state["history"].append(record)
        self.state["epoch_sums"] = dict.fromkeys(EPOCH_SUMS, 0.0)
        writer.log_epoch(record, step, group="eval")
        return record

    def evaluate(self) -> dict:
        """The validation pass of the run's task."""
        cfg = self.cfg
        if self.segment:
            return engine.evaluate_segmentation(self.model, self.val_loader, self.env, num_classes=cfg.num_classes,
                                                mode=cfg.eval_mode, crop_size=cfg.input_size,
                                                stride=max(1, cfg.input_size * 2 // 3),
                                                finish=self.val_ds.transform.device_stage)
        return engine.evaluate(self.model, self.val_loader, self.env, cfg.input_size, self.val_ds.transform.device_stage)

    def finish_epoch(self, epoch: int, sums: dict, lr: float) -> dict:
        distributed.average_buffers(self.model)
        val = self.evaluate()
        record = {"epoch": epoch + 1, "train_loss": sums["loss_sum"] / max(sums["images"], 1),
                  **{k: val[k] for k in ("val_loss", "val_acc1", "val_acc5")}, "lr": lr, **_images_seen(sums, val),
                  "epoch_time": sums["train_time"], "global_step": self.state["global_step"]}
        skipped = _skipped_note(record)
        self.log(f"epoch {epoch + 1}/{self.cfg.epochs} done: train loss {record['train_loss']:.4f}  val loss "
                 f"{record['val_loss']:.4f}  val top-1 {record['val_acc1']:.2f}%  top-5 {record['val_acc5']:.2f}%  "
                 f"{record['images_per_sec']:.0f} img/s{skipped}")
        self.state["history"].append(record)
        self.state.update(epoch=epoch + 1, step_in_epoch=0, epoch_sums=dict.fromkeys(EPOCH_SUMS, 0.0))
        return record


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_output_dir(cfg: TrainConfig, env: DistEnv) -> None:
    if env.is_main:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(cfg.output_dir) / "config.json", cfg.to_json() + "\n")
    distributed.barrier()


def run(cfg: TrainConfig, env: DistEnv) -> dict | None:
    """Train (or with ``cfg.eval_only`` evaluate) as configured; returns the last epoch's record."""
    seed_everything(cfg.seed + env.rank)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    r = Run(cfg, env)
    ckpt = faults.starting_checkpoint(cfg, env, r.log)  # fail fast on a wrong path or another run's folder
    r.build_data()
    r.build_model()
    if cfg.eval_only:
        return evaluate_only(r, ckpt)
    r.build_training()
    faults.check_storage(cfg.output_dir, env, faults.checkpoint_bytes(r.model, r.optimizer, r.ema))
    if ckpt is not None:
        r.resume(ckpt)
    prepare_output_dir(cfg, env)
    r.log("configuration (saved as config.json):\n" + "\n".join(
        f"  {key:<20} {json.dumps(value)}" for key, value in sorted(cfg.to_dict().items())))
    what = f"{cfg.model} + {cfg.head}" if r.segment else cfg.model
    schedule = (f"{r.total_steps} steps ({r.steps_per_epoch} per pass over the data)" if cfg.iters
                else f"{r.steps_per_epoch} steps per epoch")
    r.log(f"{what}: {r.num_params / 1e6:.2f} M parameters, {cfg.num_classes} classes, {len(r.train_ds)} train "
          f"/ {len(r.val_ds)} val images, {schedule} on {env.world_size} process(es) "
          f"({env.device.type}{', FSDP2' if env.use_fsdp else ''}{', bf16 mixed precision' if r.bf16 else ''}), "
          f"peak lr {cfg.lr:.3g}; writing to {cfg.output_dir}")
    writer = MetricsWriter(cfg.output_dir, enabled=env.is_main, history=r.state["history"],
                           purge_step=r.state["global_step"] if ckpt is not None else None)
    try:
        start = time.perf_counter()
        with faults.StopSignals() as r.stop_signals:
            record = r.train(writer)
        path = checkpoint.save_final(cfg.output_dir, r.model, r.ema,
                                     {"config": cfg.to_dict(), "epoch": r.state["epoch"],
                                      "global_step": r.state["global_step"]}, env, r.log)
        also = path.with_name(checkpoint.FINAL_SAFETENSORS) if path else None
        written = f"{path}" + (f" and {also.name}" if also and also.is_file() else "")
        if record is not None and r.segment:
            r.log(f"finished in {time.perf_counter() - start:.0f}s: val mIoU {record['mIoU']:.2f}, mAcc "
                  f"{record['mAcc']:.2f}, aAcc {record['aAcc']:.2f}; weights: {written}")
        elif record is not None:
            r.log(f"finished in {time.perf_counter() - start:.0f}s: val top-1 {record['val_acc1']:.2f}%, "
                  f"top-5 {record['val_acc5']:.2f}%; weights: {written}")
        return record
    finally:
        writer.close()


def evaluate_only(r: Run, ckpt: Path | None) -> dict:
    cfg = r.cfg
    if ckpt is not None:
        saved = checkpoint.read_train_state(ckpt)
        checkpoint.check_compatible(saved, model=cfg.model, num_classes=cfg.num_classes,
                                    global_batch=saved.get("global_batch"), ckpt=ckpt)
        checkpoint.load_model_weights(ckpt, r.model)
        source = ckpt
    else:
        source = cfg.checkpoint
    val = r.evaluate()
    skipped = f" ({val['val_skipped']} unreadable images skipped)" if val["val_skipped"] else ""
    if r.segment:
        r.log(f"{cfg.model} + {cfg.head} from {source} on {val['val_images']} val images ({cfg.eval_mode}): mIoU "
              f"{val['mIoU']:.2f}  mAcc {val['mAcc']:.2f}  aAcc {val['aAcc']:.2f}{skipped}")
        return val
    r.log(f"{cfg.model} from {source} on {val['val_images']} val images at {cfg.input_size}px: top-1 "
          f"{val['val_acc1']:.2f}%  top-5 {val['val_acc5']:.2f}%  loss {val['val_loss']:.4f}{skipped}")
    return val


KNOWN_ERRORS = (ConfigError, DataError, checkpoint.ResumeError, checkpoint.CheckpointWriteError,
                stvit.CheckpointError, engine.NonFiniteLossError)


def main_entry(cfg: TrainConfig) -> int:
    """Initialise the process group, run, and turn failures into a clear message and an exit status:
    0 done, 1 failed, :data:`faults.EXIT_PREEMPTED` stopped by SIGTERM / SIGUSR1 after a checkpoint.

    A process that fails does not wait for the others (no barrier, no process-group teardown: a peer
    may be blocked in a collective with it): it returns at once — a torchrun worker then leaves with
    ``os._exit`` — and its peers fail in their next collective, at the latest after ``--dist-timeout``;
    torchrun then stops the group, or restarts it with ``--max-restarts``."""
    env = distributed.init_distributed(timeout=cfg.dist_timeout)
    prefix = f"[rank {env.rank}] " if env.world_size > 1 else ""
    try:
        run(cfg, env)
        code = 0
    except faults.Preempted:
        code = faults.EXIT_PREEMPTED
        if env.world_size > 1:
            faults.ignore_stop_signals()
    except KNOWN_ERRORS as e:
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        code = 1
    except Exception as e:
        if env.world_size == 1:
            distributed.shutdown()
            raise
        print(f"{prefix}{traceback.format_exc()}{prefix}error: {type(e).__name__}: {e}\n{prefix}this process stops; "
              f"the others stop at their next collective (after --dist-timeout {cfg.dist_timeout:g} s at most)",
              file=sys.stderr, flush=True)
        return 1
    if code == 1 and env.world_size > 1:
        return code
    try:
        distributed.barrier()  # leave together: no rank tears down while another still communicates
        distributed.shutdown()
    except Exception as e:  # a peer died after this process had finished
        print(f"{prefix}error while leaving the process group: {type(e).__name__}: {e}", file=sys.stderr,
              flush=True)
        return code or 1
    return code
