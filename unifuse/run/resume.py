"""Resuming a run exactly where it stopped.

``ckpt_path`` of ``python -m unifuse.train`` takes

* ``last``: the newest complete ``last*.ckpt`` of this run's directory (``hydra.run.dir``; with
  ``UNIFUSE_RUN_ID`` set, ``<paths.log_dir>/runs/<UNIFUSE_RUN_ID>``, so a requeued job finds it);
  an error if there is none,
* ``auto``: the same, or a fresh start when there is none (what a requeued or restarted job runs),
* a path: that checkpoint.

Lightning restores the model, optimizers, LR schedulers, loops (global step, epoch, batch in the
epoch) and callback states (``EMAWeightAveraging`` keeps its averaged weights and counters). The
data stream starts where the restored loops stand (``unifuse.data.datamodule.StreamLoader``).
:class:`RngState` adds the random generators of every rank (torch, CUDA, numpy, python);
:class:`LastCheckpoint` writes ``last.ckpt`` so that a run stopped in the middle of an epoch resumes
there, and :class:`EpochCounts` sets Lightning's epoch counts right where a resumed run would get them
wrong.
"""

from __future__ import annotations

import logging
import random
import zipfile
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from unifuse.run.sharded import is_complete, is_sharded

log = logging.getLogger("unifuse")

RESUME_SETTINGS = ("last", "auto")


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The ``last*.ckpt`` files under ``run_dir`` that are whole, newest first. ``torch.save`` writes a zip
    whose directory is at the end of the file, so a file cut short by a crash does not read as a zip.
    (Checkpoints are written to a temporary name and renamed into place, see ``unifuse.run.checkpoint_io``;
    this also skips files that some other writer left half-written.)"""
    found = [p for p in Path(run_dir).rglob("last*.ckpt") if p.is_file() or is_sharded(p)]
    whole = [p for p in found if (zipfile.is_zipfile(p) if p.is_file() else is_complete(p))]  # dirs: trainer=fsdp
    for p in sorted(set(found) - set(whole)):
        log.warning("ignoring %s: not a complete checkpoint", p)
    return sorted(whole, key=lambda p: p.stat().st_mtime, reverse=True)


def resolve_ckpt_path(setting: str | None, run_dir: str | Path) -> str | None:
    """The checkpoint ``trainer.fit`` resumes from for ``ckpt_path=<setting>`` (None: a fresh start)."""
    if setting in (None, "", "null", "None"):
        return None
    if setting not in RESUME_SETTINGS:
        if "://" in setting:  # s3://, gs://, ...: Lightning reads it through fsspec
            return setting
        if not (Path(setting).expanduser().is_file() or is_sharded(Path(setting).expanduser())):
            raise FileNotFoundError(f"ckpt_path={setting}: no such checkpoint file")
        return str(Path(setting).expanduser())
    found = complete_checkpoints(run_dir)
    if found:
        log.info("ckpt_path=%s: resuming from %s", setting, found[0])
        return str(found[0])
    if setting == "auto":
        log.info("ckpt_path=auto: no checkpoint in %s, starting fresh", run_dir)
        return None
    raise FileNotFoundError(
        f"ckpt_path=last: no complete last.ckpt under the run directory {run_dir}. Name the run to resume with "
        f"UNIFUSE_RUN_ID=<its id> or hydra.run.dir=<its directory>, give ckpt_path=<file>, or use ckpt_path=auto "
        f"to start fresh when there is none")


def _rng_state() -> dict:
    """This process's generators, as tensors and plain values (a checkpoint loads with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def as_tuples(x):
    """``random.setstate`` wants the nested tuples that a checkpoint round trip may turn into lists."""
    return tuple(as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


class RngState(L.Callback):
    """Saves the random generators of every rank in the checkpoint and restores them when training
    resumes, so a resumed run draws the same noise, dropout and masks as the uninterrupted one.

    Saved when the checkpoint is written (all ranks take part: Lightning builds the checkpoint on every
    rank and rank 0 writes it); restored at ``on_train_start``, after the sanity check and the creation
    of the train iterator, i.e. just before the first training step, where the interrupted run went on."""

    def __init__(self):
        self._loaded: list[dict] | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        states = [_rng_state()]
        if trainer.world_size > 1:
            states = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, _rng_state())
        checkpoint["rng_states"] = states

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._loaded = checkpoint.get("rng_states")
        if self._loaded is None:
            log.warning("the checkpoint holds no random generator states: the resumed run draws other random "
                        "numbers than the interrupted one would have")

    def on_train_start(self, trainer, pl_module) -> None:
        states, self._loaded = self._loaded, None
        if not states:
            return
        if len(states) != trainer.world_size:
            log.warning("the checkpoint holds the random generators of %d ranks, this run has %d: ranks "
                        "beyond them keep their seeded generators", len(states), trainer.world_size)
        if trainer.global_rank < len(states):
            state = dict(states[trainer.global_rank])
            state["python"] = as_tuples(state["python"])
            _set_rng_state(state)


def _batches_left(trainer) -> bool:
    """The epoch that is running has batches it has not trained on."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed < trainer.num_training_batches


class LastCheckpoint(ModelCheckpoint):
    """The ModelCheckpoint that writes the run's ``last.ckpt`` (``callbacks.last_checkpoint``), such that a
    run stopped before the end of an epoch (``trainer.max_steps`` reached, ``trainer.should_stop`` set by a
    callback) resumes with the epoch's next batch.

    Lightning (2.6) runs the epoch-end hooks after such a stop, and ModelCheckpoint saves there by
    default; but a checkpoint saved there records the epoch as finished, so a run resumed from it goes
    on with the next epoch and never trains the rest of the stopped one. This one saves at the end of
    the step the run stops after instead (as ``every_n_train_steps`` does: Lightning resumes that in the
    middle of the epoch), and never at the end of an epoch that was cut short. It saves through
    ModelCheckpoint's own top-k path, which the epoch-end save takes too."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        stops = trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step
        if (stops and _batches_left(trainer) and not trainer.fit_loop._should_accumulate()
                and not self._should_skip_saving_checkpoint(trainer)):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not _batches_left(trainer):
            super().on_train_epoch_end(trainer, pl_module)


class EpochCounts(L.Callback):
    """Sets Lightning's (2.6) epoch counts right at the start of a resumed run, in the two restarts where
    it gets them wrong. Left wrong, the counts hold for the rest of the run: a checkpoint it writes in
    the middle of an epoch reads as one of the epoch's end (a run resumed from that skips the rest of
    the epoch, or starts it over), or the run stops an epoch short of ``max_epochs``.

    * From a checkpoint of the end of an epoch's last step (``every_n_train_steps``, a preemption
      signal): Lightning finishes that epoch and begins the next one as if it resumed in its middle,
      without counting it as begun (nor calling ``on_train_epoch_start``). Here the restart is
      forgotten once the finished epoch is closed, so the next one begins as every epoch does.
    * From a checkpoint of an epoch's end (the default ``last.ckpt``) with ``trainer.max_steps`` set,
      which makes Lightning restart every resumed run where its checkpoint was written: it runs the
      epoch's end again and counts the epoch as processed a second time. Here the first count is taken
      back before that."""

    def on_train_start(self, trainer, pl_module) -> None:
        loop = trainer.fit_loop
        inner = loop.epoch_loop
        if loop.restarted_mid_epoch and inner.restarted_on_train_batch_end and inner.batch_progress.is_last_batch:
            loop.reset_restart_stage()
        elif loop.restarted_on_epoch_end:
            loop.epoch_progress.current.processed -= 1
            loop.epoch_progress.total.processed -= 1
