"""Exact resume, atomic checkpoints and preemption, the way a cluster and a user do it to a run:
training subprocesses killed with SIGKILL (in the middle of writing a checkpoint), stopped with SIGTERM
or SLURM's SIGUSR1, stopped by ``trainer.max_epochs`` / ``trainer.max_steps`` and continued by a longer
run, all resumed with ``ckpt_path=last`` / ``auto``; the batches and losses of every step, on every
rank, must be those of the run that was never interrupted. The runs train epochs of a user's own
uneven shards (``trainer.max_epochs``, not ``max_steps`` alone: with epochs, ``configure_optimizers``
plans the LR schedule from the train loader's length, and Lightning builds that loader before it
restores the checkpoint)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.conftest import ROOT, compose_cfg
from unifuse.run.checkpoint_io import AtomicCheckpointIO
from unifuse.run.preemption import EXIT_PREEMPTED
from unifuse.run.resume import complete_checkpoints, resolve_ckpt_path

TIMEOUT = 600  # generous: the machine may be busy; a hung run still fails


# ----------------------------------------------------------------------------- helpers the runs load
class StepLog(L.Callback):
    """Appends {pid, step, epoch, loss, keys} of every training step to ``<out>/steps_rank<r>.jsonl``.
    With ``pause_at``, rank 0 touches ``<out>/paused`` after that step and waits for ``<out>/go``."""

    def __init__(self, out: str, pause_at: int = 0):
        self.out, self.pause_at = Path(out), pause_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        rec = {"pid": os.getpid(), "step": trainer.global_step, "epoch": trainer.current_epoch,
               "loss": float(loss), "keys": list(batch["key"])}
        with open(self.out / f"steps_rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if trainer.global_step == self.pause_at and trainer.is_global_zero:
            (self.out / "paused").touch()
            while not (self.out / "go").exists():
                time.sleep(0.05)


class SlowSaveIO(AtomicCheckpointIO):
    """Save number ``hang_on`` writes half the checkpoint, touches ``marker`` and hangs (to be killed)."""

    def __init__(self, hang_on: int = 0, marker: str = ""):
        super().__init__()
        self.hang_on, self.marker, self.saves = hang_on, marker, 0

    def _write(self, checkpoint, f) -> None:
        self.saves += 1
        if self.saves != self.hang_on:
            return super()._write(checkpoint, f)
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        Path(self.marker).touch()
        while True:
            time.sleep(1)


# ----------------------------------------------------------------------------- running them
def overrides(shards: Path, root: Path, world: int) -> list[str]:
    """The tiny KL autoencoder on ``shards`` (``write_uneven_shards``) in epochs of 4 batches per rank
    (``trainer.max_epochs`` is the caller's), with an EMA that moves and every step logged by StepLog."""
    return [*shard_overrides(shards, 3 - world),
            f"paths.root_dir={root}", "data.batches_per_epoch=4", "+trainer.enable_model_summary=false",
            "callbacks.ema.update_starting_at_step=2", "callbacks.ema.decay=0.5",  # an EMA that moves
            # last.ckpt after every epoch's last step (1 rank), at every epoch's end (2 ranks, the default):
            # Lightning resumes from the two differently
            *(["+callbacks.last_checkpoint.every_n_train_steps=4"] if world == 1
              else ["trainer=ddp", "trainer.devices=2"])]


def shard_overrides(shards: Path, workers: int) -> list[str]:
    """A user's run of ``data=shards`` with the tiny KL autoencoder (16x16 images, batches of 8) and the
    default callbacks (throughput, data stats, image grids, ...), its training steps logged by StepLog;
    no logger, progress bar, online FID or best-by-val/loss checkpoint."""
    return [
        "model=kl_autoencoder", "data=shards", f"data.train.main.shards={shards}/train", f"data.val={shards}/val",
        "data.decode.image_size=16", "data.collator.batch_size=8", f"data.num_workers={workers}",
        "model.net.autoencoder.channels=8", "model.net.autoencoder.ch_mult=[1,2]", "model.net.latent_channels=4",
        "model.latent_stats_images=32", "logger=none", "callbacks.progress=null", "callbacks.fidelity=null",
        "callbacks.model_checkpoint=null",
        # the learning rate warms up over the first 100 steps, more than any run here trains: the cosine
        # horizon each launch plans from its own max_epochs / max_steps does not change a step's rate
        "model.scheduler.warmup_steps=100",
        "+callbacks.steps._target_=tests.test_resume.StepLog", "+callbacks.steps.out=${paths.output_dir}",
    ]


def start(args: list[str], run_id: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    full.update(WANDB_MODE="offline", PYTHONPATH=str(ROOT), UNIFUSE_RUN_ID=run_id, **(env or {}))
    out = open(log, "a")
    return subprocess.Popen([sys.executable, "-m", "unifuse.train", *args], cwd=ROOT, env=full, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)  # own group: kill it as a whole


def finish(proc: subprocess.Popen, log: Path, code: int = 0) -> None:
    try:
        got = proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"run did not finish in {TIMEOUT}s:\n{log.read_text()[-4000:]}")
    assert got == code, f"exit code {got}, expected {code}:\n{log.read_text()[-6000:]}"
    deadline = time.time() + 60
    while time.time() < deadline:  # every rank and worker of the run exits, none hangs on
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"processes of the run were still alive 60s after it exited:\n{log.read_text()[-4000:]}")


def wait_until(cond, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + TIMEOUT
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"run exited ({proc.returncode}) before it got there:\n{log.read_text()[-6000:]}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"run did not get there in {TIMEOUT}s:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def steps(run_dir: Path, world: int) -> list[list[dict]]:
    """Per rank, the records of every step; a step run again after a resume replaces the lost one."""
    out = []
    for r in range(world):
        path = run_dir / f"steps_rank{r}.jsonl"
        recs = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        out.append(list({rec["step"]: rec for rec in recs}.values()))
    return out


def rank0_steps_of(run_dir: Path, pid: int) -> list[int]:
    """The steps that process ``pid`` (rank 0 of one launch) ran."""
    path = run_dir / "steps_rank0.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [rec["step"] for rec in recs if rec["pid"] == pid]


def step_of(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


# ----------------------------------------------------------------------------- the golden-loss chain
@pytest.mark.parametrize("world", [1, 2], ids=["1rank", "2ranks_ddp"])
@pytest.mark.timeout(1200)  # 10 training processes; about 2.5 min on an idle 2-core machine, far more on a busy one
def test_killed_mid_save_then_signalled_run_matches_the_uninterrupted_one(tmp_path, uneven_shards, world):
    """One run interrupted four ways against one that never was (4 epochs of 4 steps, last.ckpt at the
    end of each; 2 data workers per rank with 1 rank, 1 with 2): SIGKILL while the checkpoint of step 8 is
    half-written; ``ckpt_path=last`` resumes from step 4 (the complete file, not the half-written one) and
    gets signals at step 11 (1 rank: SIGUSR1 and SIGTERM to every process, data workers included, as SLURM
    sends them, with SLURM's requeue; 2 ranks: SIGTERM to rank 0 alone); it saves last.ckpt at step 11 and
    exits 75; ``ckpt_path=auto`` goes on until ``trainer.max_steps=14`` stops it inside epoch 4; a run
    without it takes it to the end."""
    n = 16
    args = [*overrides(uneven_shards, tmp_path, world), "trainer.max_epochs=4"]
    base_dir, run_dir = tmp_path / "outputs" / "runs" / "base", tmp_path / "outputs" / "runs" / "chain"
    ckpts, logf = run_dir / "checkpoints", tmp_path / "chain.log"

    base = start([*args, "ckpt_path=auto"], "base", tmp_path / "base.log")  # auto, nothing there: fresh
    finish(base, tmp_path / "base.log")

    # 1. SIGKILL in the middle of writing the second checkpoint (step 8)
    marker = tmp_path / "hanging"
    slow = [f"trainer.plugins=[{{_target_:tests.test_resume.SlowSaveIO,hang_on:2,marker:'{marker}'}}]"]
    proc = start([*args, *slow], "chain", logf)
    wait_until(marker.exists, proc, logf)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(TIMEOUT)
    assert complete_checkpoints(run_dir) == [ckpts / "last.ckpt"] and step_of(ckpts / "last.ckpt") == 4
    partial = list(ckpts.glob(".last.ckpt.tmp-*"))
    assert len(partial) == 1 and not zipfile.is_zipfile(partial[0]), "the half-written save is not where expected"

    # 2. resume with ckpt_path=last; the signals come while it waits after step 11
    env = {}
    if world == 1:  # a SLURM job of one task, with an scontrol that records what it is asked
        fake = tmp_path / "bin"
        fake.mkdir()
        (fake / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.txt\n")
        (fake / "scontrol").chmod(0o755)
        env = {"PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "unifuse",
               "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    proc = start([*args, "ckpt_path=last", "+callbacks.steps.pause_at=11"], "chain", logf, env)
    wait_until((run_dir / "paused").exists, proc, logf)
    if world == 1:  # to every process, as SLURM does: main process and data workers
        os.killpg(proc.pid, signal.SIGUSR1)  # the warning of sbatch --signal=USR1@<lead>
        os.killpg(proc.pid, signal.SIGTERM)  # and what comes at the time limit
    else:
        os.kill(proc.pid, signal.SIGTERM)  # rank 0 only: rank 1 learns it from the all-reduce
    (run_dir / "go").touch()
    finish(proc, logf, EXIT_PREEMPTED)
    done = rank0_steps_of(run_dir, proc.pid)
    assert done[0] == 5, "resumed from another checkpoint than the last complete one"
    assert done[-1] == step_of(ckpts / "last.ckpt") == 11, "the signal's checkpoint is not of the step it stopped at"
    assert not list(ckpts.glob(".last.ckpt.tmp-*")), "the unfinished save was not cleaned up"
    if world == 1:
        assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]

    # 3. the requeued job: ckpt_path=auto finds last.ckpt; it stops at max_steps in the middle of epoch 4
    proc = start([*args, "ckpt_path=auto", "+trainer.max_steps=14"], "chain", logf)
    finish(proc, logf)
    assert rank0_steps_of(run_dir, proc.pid) == [12, 13, 14] and step_of(ckpts / "last.ckpt") == 14

    # 4. and a longer run takes it to the end
    proc = start([*args, "ckpt_path=last"], "chain", logf)
    finish(proc, logf)
    assert rank0_steps_of(run_dir, proc.pid) == [15, 16]

    got, want = steps(run_dir, world), steps(base_dir, world)
    for r in range(world):
        assert [s["step"] for s in got[r]] == [s["step"] for s in want[r]] == list(range(1, n + 1))
        bad = [(s["step"], s["loss"], w["loss"]) for s, w in zip(got[r], want[r]) if abs(s["loss"] - w["loss"]) > 1e-6]
        assert not bad, f"rank {r}: losses (step, resumed, uninterrupted) differ: {bad}"
        for epoch in {s["epoch"] for s in want[r]}:
            seen = [k for s in got[r] if s["epoch"] == epoch for k in s["keys"]]
            ref = [k for s in want[r] if s["epoch"] == epoch for k in s["keys"]]
            assert len(seen) == len(set(seen)), f"rank {r} epoch {epoch}: a sample was trained on twice"
            assert set(seen) == set(ref), f"rank {r} epoch {epoch}: samples skipped or added by the resume"
            assert [s["keys"] for s in got[r] if s["epoch"] == epoch] == \
                   [s["keys"] for s in want[r] if s["epoch"] == epoch], "batches came in another order"
    # the end states: EMA weights (state_dict), trained weights and buffers, optimizer moments
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (base_dir, run_dir))
    assert a["global_step"] == b["global_step"] == n and "averaging_state" in a
    for key in ("state_dict", "current_model_state"):
        differ = [k for k in a[key] if not torch.allclose(a[key][k].double(), b[key][k].double(), atol=1e-6)]
        assert not differ, f"{key} differs from the uninterrupted run's in {differ}"
    moments = [(p, k) for p, st in a["optimizer_states"][0]["state"].items() for k in st
               if not torch.allclose(st[k].double(), b["optimizer_states"][0]["state"][p][k].double(), atol=1e-6)]
    assert not moments, f"optimizer state differs: {moments}"


# ----------------------------------------------------------------------------- a user's stops, in-process
def step_records(run_dir: Path) -> list[dict]:
    """Every step record of a run's launches, in the order they were trained."""
    return [json.loads(line) for line in (run_dir / "steps_rank0.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_stopped_runs_continued_longer_train_what_the_uninterrupted_one_did(tmp_path, uneven_shards, workers):
    """A user's run on uneven shards (40, 47, 54 samples; 5 batches an epoch, 3 epochs), stopped twice the
    ordinary way and each time continued by a longer run with ``ckpt_path=last``: ``trainer.max_epochs=1``
    (stops at the end of epoch 1; last.ckpt is the default one of the epoch's end), then
    ``trainer.max_epochs=3 trainer.max_steps=8`` (stops in the middle of epoch 2), then
    ``trainer.max_epochs=3``. Each step is trained once, on the batch and with the loss of the run that
    trained the 3 epochs in one go."""
    from unifuse.train import train

    def fit(out: Path, *extra: str) -> None:
        out.mkdir(exist_ok=True)
        train(compose_cfg([*shard_overrides(uneven_shards, workers), "data.batches_per_epoch=5", *extra], out))

    fit(tmp_path / "base", "trainer.max_epochs=3")
    run = tmp_path / "run"
    fit(run, "trainer.max_epochs=1")
    assert step_of(run / "checkpoints" / "last.ckpt") == 5
    fit(run, "trainer.max_epochs=3", "+trainer.max_steps=8", "ckpt_path=last")
    assert step_of(run / "checkpoints" / "last.ckpt") == 8
    fit(run, "trainer.max_epochs=3", "ckpt_path=last")

    got, want = step_records(run), step_records(tmp_path / "base")
    assert [s["step"] for s in got] == [s["step"] for s in want] == list(range(1, 16)), "steps repeated or skipped"
    for g, w in zip(got, want):
        assert (g["epoch"], g["keys"]) == (w["epoch"], w["keys"]), f"step {g['step']} trained on other samples"
        assert abs(g["loss"] - w["loss"]) <= 1e-6, f"step {g['step']}: loss {g['loss']} != {w['loss']}"


# ----------------------------------------------------------------------------- the pieces, in-process
def _stream(data: Path, collator, epoch: int):
    from unifuse.data.read import Source
    from unifuse.data.samples import DecodeConfig
    from unifuse.data.stream import ShardStream

    s = ShardStream([Source("emoji", str(data / "train"))], collator, DecodeConfig(image_size=16), seed=3,
                    shuffle_buffer=20)
    s.set_epoch(epoch)
    return s


def _batches(stream, workers: int, field: str) -> list:
    from unifuse.data.datamodule import StreamLoader

    return [b[field] for b in StreamLoader(stream, batch_size=None, num_workers=workers)]


@pytest.mark.parametrize("workers", [0, 3])
@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_stream_resumed_at_any_batch_gives_the_rest_of_the_epoch_in_order(tiny_emoji, workers):
    """17 batches; with 3 workers they hold 6, 6 and 5 and the loader takes them in turn: after a
    resume at batch k the loader starts with worker 0 again, which must carry on as worker k % 3."""
    from unifuse.data.collate import ImageCollator

    full = _batches(_stream(tiny_emoji, ImageCollator(8), 1), workers, "key")
    assert len(full) == 17 and len({k for b in full for k in b}) == 17 * 8
    for k in (range(18) if workers == 0 else (1, 2, 4, 8, 16, 17)):
        s = _stream(tiny_emoji, ImageCollator(8), 0)
        s.resume_at(1, k)
        assert _batches(s, workers, "key") == full[k:], f"resumed at batch {k}"
    s = _stream(tiny_emoji, ImageCollator(8), 0)
    s.resume_at(1, 5)
    list(s)  # the resume applies to one epoch: the next is whole
    assert [b["key"] for b in s] == _batches(_stream(tiny_emoji, ImageCollator(8), 2), 0, "key")


@pytest.mark.parametrize("workers", [0, 2])
def test_train_loader_starts_where_the_fit_loop_stands_at_its_first_batch(tiny_emoji, workers):
    """Lightning builds and iterates the train loader before it restores a checkpoint's loops when
    ``configure_optimizers`` asks for ``trainer.estimated_stepping_batches``: the loader must take its
    start (epoch 1 after 5 batches) from the fit loop when the first batch is asked for, not before."""
    from unifuse.data.collate import ImageCollator
    from unifuse.data.datamodule import StreamLoader

    full = _batches(_stream(tiny_emoji, ImageCollator(8), 1), workers, "key")
    position = [(0, 0)]
    loader = StreamLoader(_stream(tiny_emoji, ImageCollator(8), 0), position=lambda: position[0], batch_size=None,
                          num_workers=workers)
    batches = iter(loader)
    position[0] = (1, 5)  # the checkpoint's loops, restored after iter()
    assert [b["key"] for b in batches] == full[5:]
    assert [b["key"] for b in loader] == full[5:], "the next iteration starts there again"


def test_a_checkpoint_of_another_rank_count_is_resumed_with_a_warning(tiny_emoji, caplog):
    """The datamodule's checkpoint state records how many ranks split the data; resuming it with
    another count says that the rest of the interrupted epoch comes from the new split."""
    import logging
    from types import SimpleNamespace

    from unifuse.data.collate import ImageCollator
    from unifuse.data.datamodule import ShardDataModule

    dm = ShardDataModule({"emoji": {"shards": str(tiny_emoji / "train")}}, ImageCollator(8))
    dm.trainer = SimpleNamespace(global_rank=0, world_size=2)
    assert dm.state_dict() == {"world_size": 2}
    with caplog.at_level(logging.WARNING, logger="unifuse.data"):
        dm.load_state_dict({"world_size": 2})
        assert not caplog.records
        dm.load_state_dict({"world_size": 4})
    assert "written by 4 ranks, this run has 2" in caplog.text


def test_packed_stream_resumes_with_the_same_rows(tiny_emoji):
    """Packing draws caption-first / unconditional choices: a worker resumed at epoch 2 makes the same
    ones as the persistent worker of the uninterrupted run did in its third epoch."""
    from unifuse.data.collate import PackingCollator
    from unifuse.data.datamodule import StreamLoader

    def col():
        return PackingCollator(4, 48, image_tokens=4, caption_first=0.5, p_uncond=0.3, seed=7)

    loader = StreamLoader(_stream(tiny_emoji, col(), 0), batch_size=None, num_workers=2, persistent_workers=True)
    full = [[b["tokens"] for b in loader] for _ in range(3)][2]
    assert len(full) >= 8
    for k in (1, 4):
        s = _stream(tiny_emoji, col(), 0)
        s.resume_at(2, k)
        got = _batches(s, 2, "tokens")
        assert len(got) == len(full) - k and all(torch.equal(a, b) for a, b in zip(got, full[k:]))


def test_ckpt_path_last_auto_and_file(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="ckpt_path=last: no complete last.ckpt"):
        resolve_ckpt_path("last", run)
    assert resolve_ckpt_path("auto", run) is None and resolve_ckpt_path(None, run) is None
    with pytest.raises(FileNotFoundError, match="ckpt_path=nope.ckpt"):
        resolve_ckpt_path("nope.ckpt", run)
    (run / "checkpoints").mkdir(parents=True)
    old, new = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "last-v1.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, old)
    AtomicCheckpointIO().save_checkpoint({"step": 2}, new)
    os.utime(old, (time.time() - 60, time.time() - 60))
    assert resolve_ckpt_path("last", run) == resolve_ckpt_path("auto", run) == str(new)
    new.write_bytes(new.read_bytes()[:100])  # cut short by some other writer: not a checkpoint
    assert resolve_ckpt_path("last", run) == str(old)
    assert resolve_ckpt_path(str(new), run) == str(new)  # a file named explicitly is taken as it is


def test_atomic_save_keeps_the_old_file_when_the_write_fails(tmp_path):
    class Failing(AtomicCheckpointIO):
        def _write(self, checkpoint, f):
            f.write(b"half a checkpoint")
            raise OSError("disk full")

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    with pytest.raises(OSError, match="disk full"):
        Failing().save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1} and os.listdir(tmp_path) == ["last.ckpt"]
    (tmp_path / ".last.ckpt.tmp-otherhost-1").write_bytes(b"left by a killed writer")
    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=True) == {"step": 3} and os.listdir(tmp_path) == ["last.ckpt"]


def test_rng_state_restores_each_rank_its_own(tmp_path):
    """Rank 1 of 2 gets rank 1's generators back, through a weights_only round trip."""
    import random
    from types import SimpleNamespace

    import numpy as np

    from unifuse.run.resume import RngState, _rng_state

    states = []
    for seed in (1, 2):
        L.seed_everything(seed)
        states.append(_rng_state())
    want = (torch.rand(3), np.random.rand(3), random.random())
    torch.save({"rng_states": states}, tmp_path / "c.ckpt")
    cb = RngState()
    cb.on_load_checkpoint(None, None, torch.load(tmp_path / "c.ckpt", weights_only=True))
    L.seed_everything(0)
    cb.on_train_start(SimpleNamespace(global_rank=1, world_size=2), None)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]


def test_wandb_run_continues_when_resuming_in_the_run_directory(tmp_path):
    from unifuse.config import WANDB_RUN_FILE, wandb_run

    (tmp_path / WANDB_RUN_FILE).write_text(json.dumps({"id": "abc123", "name": "t/exp1"}))
    assert wandb_run("id", "auto", "t", str(tmp_path)) == wandb_run("id", "last", "t", str(tmp_path)) == "abc123"
    assert wandb_run("id", None, "t", str(tmp_path)) != "abc123"


class SignalSelf(L.Callback):
    def __init__(self, at: int, signum: int):
        self.at, self.signum = at, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            os.kill(os.getpid(), self.signum)


def test_signal_saves_the_step_and_exits_75_then_handlers_are_put_back(uneven_shards, tmp_path):
    """In-process: SIGUSR1 during step 2 -> last.ckpt of step 2, SystemExit(75); afterwards the process's
    own SIGTERM / SIGUSR1 handlers are back (a later fit or a kill is not swallowed)."""
    from unifuse.train import train

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    over = [o for o in overrides(uneven_shards, tmp_path, 1) if "callbacks.steps" not in o] + ["trainer.max_epochs=2"]
    cfg = compose_cfg([*over, "data.num_workers=0", "+callbacks.kill._target_=tests.test_resume.SignalSelf",
                       "+callbacks.kill.at=2", f"+callbacks.kill.signum={int(signal.SIGUSR1)}"], tmp_path)
    with pytest.raises(SystemExit) as exit_:
        train(cfg)
    assert exit_.value.code == EXIT_PREEMPTED
    assert step_of(tmp_path / "checkpoints" / "last.ckpt") == 2
    assert {s: signal.getsignal(s) for s in before} == before


def test_requeue_runs_for_the_requeue_signal_unless_the_launcher_handles_it(tmp_path, monkeypatch):
    """SIGUSR1 + SIGTERM with only a logging launcher handler on SIGTERM (submitit's): scontrol requeues
    and the SIGTERM handler is called; SIGUSR1 with a launcher handler of its own: that handler alone."""
    from types import SimpleNamespace

    from lightning.fabric.plugins.environments import SLURMEnvironment

    from unifuse.run.preemption import PreemptionCheckpoint

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.txt\n")
    (fake / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    saved, called = [], []
    trainer = SimpleNamespace(
        is_global_zero=True, global_step=3, checkpoint_callback=None, checkpoint_callbacks=[],
        default_root_dir=str(tmp_path), save_checkpoint=lambda path: saved.append(path),
        _accelerator_connector=SimpleNamespace(cluster_environment=SLURMEnvironment(auto_requeue=True)))
    cb = PreemptionCheckpoint()
    for launcher, received, requeued in (({signal.SIGTERM: lambda s, f: called.append(s)}, cb.signals, True),
                                         ({signal.SIGUSR1: lambda s, f: called.append(s)}, [signal.SIGUSR1], False)):
        (tmp_path / "scontrol.txt").unlink(missing_ok=True)
        called.clear()
        cb._launcher_handlers = launcher
        with pytest.raises(SystemExit) as exit_:
            cb._stop(trainer, received)
        assert exit_.value.code == EXIT_PREEMPTED and saved[-1] == tmp_path / "checkpoints" / "last.ckpt"
        assert called == list(launcher)
        assert (tmp_path / "scontrol.txt").is_file() == requeued
