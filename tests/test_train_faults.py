"""Runs that survive cluster faults (issue #12): preemption, elastic restarts, hangs, two nodes,
damaged checkpoints, disk trouble — each on 1–2 CPU processes (gloo) with the tiny model on a
tiny synthetic ImageFolder (16 train / 8 val images of 32 px, 2 epochs of 4 steps).

Every interrupted run is compared with an uninterrupted one: final weights (BatchNorm statistics
included) bit for bit, and the per-epoch metrics.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import needs_cpu_fsdp2
from train import checkpoint, faults
from train.__main__ import main
from train.synthetic import ensure_demo_dataset

ROOT = Path(__file__).resolve().parents[1]
# 2 epochs of 4 steps at a global batch of 4 (2 processes × 2, or 1 process × 4); a checkpoint every 3
# steps and at each epoch end; collectives give up after 60 s.
ARGS = ["--model", "tiny", "--input-size", "32", "--num-workers", "0", "--log-every", "1", "--seed", "3",
        "--epochs", "2", "--warmup-epochs", "1", "--lr", "0.5", "--ckpt-every", "3", "--dist-timeout", "60"]
METRIC_KEYS = ("epoch", "train_loss", "val_loss", "val_acc1", "val_acc5", "lr", "train_images", "train_skipped",
               "val_images", "val_skipped", "global_step")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return ensure_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", num_classes=4, train_per_class=4,
                               val_per_class=2, image_size=32)


def torchrun(*args: str, nproc: int = 2, launcher: tuple = ("--standalone",), timeout: int = 300):
    return subprocess.run([*TORCHRUN, *launcher, "--nproc-per-node", str(nproc), "-m", "train", *args], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


class Launch:
    """A torchrun started in the background, its output collected line by line."""

    def __init__(self, *args: str, launcher: tuple = ("--standalone",), nproc: int = 2):
        self.proc = subprocess.Popen([*TORCHRUN, *launcher, "--nproc-per-node", str(nproc), "-m", "train", *args],
                                     cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"{text!r} never appeared:\n{self.output[-4000:]}")

    def workers(self) -> list[int]:
        pids = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            pids += [int(p) for p in (task / "children").read_text().split()]
        return pids

    def finish(self, timeout: float = 300) -> int:
        try:
            code = self.proc.wait(timeout)
        finally:
            self.kill()
        self.reader.join(10)
        return code

    def kill(self) -> None:
        """SIGKILL the launcher and its workers (a node lost)."""
        if self.proc.poll() is None:
            for pid in self.workers():
                _kill(pid)
            _kill(self.proc.pid)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(ours: Path, reference: Path) -> None:
    """Bit-identical final weights (BatchNorm statistics included) and the same metrics."""
    assert [{k: r[k] for k in METRIC_KEYS} for r in metrics(ours)] == \
        [{k: r[k] for k in METRIC_KEYS} for r in metrics(reference)]
    got = torch.load(ours / "model_final.pt", weights_only=True)["model"]
    want = torch.load(reference / "model_final.pt", weights_only=True)["model"]
    assert got.keys() == want.keys()
    assert [name for name in got if not torch.equal(got[name], want[name])] == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> tuple[list[str], Path]:
    """One process, uninterrupted: the command line and its run folder (checkpoints 6 and 8 kept)."""
    out = tmp_path_factory.mktemp("single") / "run"
    args = ARGS + ["--data-path", str(data), "--batch-size", "4"]
    assert main(args + ["--output-dir", str(out)]) == 0
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-00000006", "ckpt-00000008"]  # --keep-checkpoints 2
    return args, out


@pytest.fixture(scope="module")
def pair(data, tmp_path_factory) -> tuple[list[str], Path]:
    """Two processes (torchrun --nproc-per-node 2), uninterrupted."""
    out = tmp_path_factory.mktemp("pair") / "run"
    args = ARGS + ["--data-path", str(data), "--batch-size", "2"]
    result = torchrun(*args, "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return args, out


# ---- preemption ------------------------------------------------------------------------------------
def test_stop_signals_only_raise_a_flag():
    with faults.StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the previous handler is back


def test_sigterm_checkpoints_exits_143_and_the_same_command_continues(single, tmp_path, capsys):
    args, reference = single
    out = tmp_path / "run"
    assert main(args + ["--output-dir", str(out), "--fault", "term@5"]) == faults.EXIT_PREEMPTED == 143
    log = capsys.readouterr().out
    assert "SIGTERM received (by process 0): stopped after epoch 2 step 1/4 (global step 5)" in log
    assert (out / "latest").read_text().strip() == "ckpt-00000005" and not (out / "model_final.pt").exists()
    assert main(args + ["--output-dir", str(out), "--fault", "term@5"]) == 0  # the same command line
    assert f"continuing from {out / 'ckpt-00000005'}" in capsys.readouterr().out
    assert_same_run(out, reference)


# ---- elastic restarts, hangs, two nodes -------------------------------------------------------------
@needs_cpu_fsdp2
def test_torchrun_restarts_a_killed_worker_and_the_run_continues(pair, tmp_path):
    args, reference = pair
    out = tmp_path / "run"
    run = Launch(*args, "--output-dir", str(out), "--fault", "stall@4", launcher=("--standalone", "--max-restarts", "1"))
    paused = int(run.wait_for("pauses").split("pid ")[1].split(")")[0])  # process 0, after step 4
    victims = [pid for pid in run.workers() if pid != paused]
    assert len(victims) == 1
    os.kill(victims[0], signal.SIGKILL)  # process 1 dies without warning
    assert run.finish() == 0, run.output[-4000:]
    assert "TORCHELASTIC_RESTART_COUNT=1" in run.output
    assert f"continuing from {out / 'ckpt-00000003'}" in run.output
    assert_same_run(out, reference)


@needs_cpu_fsdp2
def test_a_hung_process_fails_the_run_after_dist_timeout(pair, tmp_path):
    args, _ = pair
    start = time.monotonic()
    result = torchrun(*args, "--output-dir", str(tmp_path / "run"), "--fault", "stall@1", "--dist-timeout", "5")
    assert result.returncode != 0
    assert time.monotonic() - start < 100  # the stall lasts 120 s: the other process gave up long before
    assert "[rank 1] error: RuntimeError" in result.stderr and "--dist-timeout 5 s" in result.stderr, \
        result.stderr[-3000:]


def two_nodes(*args: str) -> list[Launch]:
    """Two torchrun "nodes" of one process each on this machine (c10d rendezvous on loopback)."""
    nodes = ("--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
             "--rdzv-id", "faults")
    return [Launch(*args, launcher=nodes, nproc=1) for _ in range(2)]


@needs_cpu_fsdp2
def test_sigterm_at_one_of_two_nodes_stops_both_and_two_nodes_train_like_one(pair, tmp_path):
    """Two nodes × 1 process against one node × 2 processes; process 1 (on one node only) gets SIGTERM
    after step 5: both save, leave with 143, and the same two commands again finish the run."""
    args, reference = pair
    out = tmp_path / "run"
    nodes = two_nodes(*args, "--output-dir", str(out), "--fault", "term@5")
    assert [node.finish() for node in nodes] == [1, 1]  # torchrun reports the workers' failure
    output = "".join(node.output for node in nodes)
    assert "SIGTERM received (by process 1): stopped after epoch 2 step 1/4 (global step 5)" in output
    assert output.count("exitcode  : 143") == 2, output[-3000:]  # every worker, after the checkpoint
    assert (out / "latest").read_text().strip() == "ckpt-00000005" and not (out / "model_final.pt").exists()
    nodes = two_nodes(*args, "--output-dir", str(out), "--fault", "term@5")  # the same command lines
    assert [node.finish() for node in nodes] == [0, 0], nodes[0].output[-3000:] + nodes[1].output[-3000:]
    assert f"continuing from {out / 'ckpt-00000005'}" in nodes[0].output + nodes[1].output
    assert_same_run(out, reference)


@needs_cpu_fsdp2
def test_a_lost_node_brings_the_other_down(pair, tmp_path):
    args, _ = pair
    nodes = two_nodes(*args, "--output-dir", str(tmp_path / "run"), "--fault", "stall@2")
    deadline = time.monotonic() + 180
    while not any("pauses" in node.output for node in nodes):
        assert time.monotonic() < deadline and all(node.proc.poll() is None for node in nodes), nodes[0].output
        time.sleep(0.05)
    stalled, other = nodes if "pauses" in nodes[0].output else nodes[::-1]
    start = time.monotonic()
    stalled.kill()  # the node of process 0, launcher and worker, without warning
    assert other.finish(timeout=120) != 0
    assert time.monotonic() - start < 60  # --dist-timeout is 60 s; a closed connection is noticed at once
    assert "[rank 1] error: RuntimeError" in other.output, other.output[-3000:]


# ---- where a run starts ------------------------------------------------------------------------------
def test_another_runs_folder_is_refused_and_never_mixed(single, tmp_path, capsys):
    args, reference = single
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = sorted(p.name for p in out.iterdir())
    assert main([*args[:args.index("--seed") + 1], "4", *args[args.index("--seed") + 2:], "--output-dir",
                 str(out)]) == 1
    err = capsys.readouterr().err
    assert f"--output-dir {out} already holds a run with another configuration (seed 3 → 4)" in err
    assert "--resume never" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == before
    # --resume never: start over there, the earlier run's files moved aside
    assert main(args + ["--output-dir", str(out), "--resume", "never", "--max-steps", "1"]) == 0
    assert "were moved to" in capsys.readouterr().out
    assert (out / "latest").read_text().strip() == "ckpt-00000001"
    [aside] = out.glob("replaced-*")
    assert (aside / "ckpt-00000008").is_dir() and (aside / "model_final.pt").is_file()


def test_a_finished_run_is_not_trained_again(single, tmp_path, capsys):
    args, reference = single
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    assert main(args + ["--output-dir", str(out)]) == 0
    assert f"continuing from {out / 'ckpt-00000008'}" in capsys.readouterr().out
    assert_same_run(out, reference)


# ---- damaged checkpoints -------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["shard cut short", "train_state.json garbled"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(damage, single, tmp_path, capsys):
    args, reference = single
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "model_final.pt").unlink()
    newest = out / "ckpt-00000008"
    if damage == "shard cut short":
        bad = newest / "__0_0.distcp"
        bad.write_bytes(bad.read_bytes()[:1000])
    else:
        bad = newest / "train_state.json"
        bad.write_text("junk")
    assert main(args + ["--output-dir", str(out)]) == 0
    log = capsys.readouterr().out
    assert f"warning: checkpoint {newest} is damaged and is skipped: {bad}" in log
    assert f"continuing from {out / 'ckpt-00000006'}" in log
    assert_same_run(out, reference)
    assert checkpoint.verify(out / "ckpt-00000008") is None  # written again, whole


# ---- disk trouble -------------------------------------------------------------------------------------
def test_an_unwritable_output_folder_is_reported_before_training(data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(ARGS + ["--data-path", str(data), "--batch-size", "4", "--output-dir", str(blocker / "run")]) == 1
    err = capsys.readouterr().err
    assert f"--output-dir {blocker / 'run'} is not writable" in err and "free space on" in err


def test_too_little_free_space_is_reported_before_training(data, tmp_path, capsys, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1 << 20))
    out = tmp_path / "run"
    assert main(ARGS + ["--data-path", str(data), "--batch-size", "4", "--output-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "too little free space for a checkpoint" in err and "free space on" in err and "1.0 MiB" in err
    assert not list(out.glob("ckpt-*"))


def test_a_full_disk_at_a_checkpoint_stops_the_run_and_keeps_the_last_complete_one(single, tmp_path, capsys,
                                                                                   monkeypatch):
    args, _ = single
    out = tmp_path / "run"
    real_save, calls = checkpoint.dcp.save, []

    def save(state, checkpoint_id):
        calls.append(checkpoint_id)
        real_save(state, checkpoint_id=checkpoint_id)
        if len(calls) == 2:  # the second checkpoint (step 4): written in part, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.dcp, "save", save)
    assert main(args + ["--output-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"cannot write checkpoint {out / 'ckpt-00000004'}: [Errno 28] No space left on device" in err
    assert "free space on" in err and f"the last complete checkpoint is {out / 'ckpt-00000003'}" in err
    assert not list(out.glob(".ckpt-*")) and sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-00000003"]
    assert checkpoint.verify(out / "ckpt-00000003") is None
