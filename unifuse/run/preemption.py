"""Preemption: SIGTERM or SIGUSR1 make a run save ``last.ckpt`` and exit, so ``ckpt_path=auto`` resumes it.

What Lightning 2.6 does by itself, and why this callback takes over while training runs:

* SIGTERM: its handler forwards the signal to the ranks it launched, broadcasts a flag from inside the
  handler and has the loops raise ``SIGTERMException`` after the current batch. No checkpoint is
  written, the exit code is 0, and a rank that got the flag can raise on its own while the others
  wait in the next collective.
* SIGUSR1 (``SLURMEnvironment.requeue_signal``), on SLURM with ``auto_requeue``: its handler saves
  ``hpc_ckpt_<n>.ckpt`` and runs ``scontrol requeue`` from inside the handler, i.e. in the middle of
  whatever step was running, collectives included (Lightning issue #21406).

Here the handlers only note the signal. At the end of each training step (after gradient accumulation
completes) the ranks agree, with one small all-reduce, whether any of them got one; if so every rank
takes part in writing the run's ``last.ckpt`` (rank 0 writes the file, atomically) and all ranks exit
with :data:`EXIT_PREEMPTED`. Before that, rank 0 requeues the job: with ``scontrol requeue`` when the
requeue signal of a SLURM environment with ``auto_requeue`` came (Lightning's setting, SIGUSR1 by
default; off with the ``SLURMEnvironment(auto_requeue=False)`` plugin), unless the launcher had
installed a handler for that signal before training; such handlers (submitit's) are called instead,
after the save. SIGTERM alone never requeues: it is also what ``scancel`` sends. A signal that comes
before the first training step (setup, sanity check) gets Lightning's handling.

DataLoader workers get the signals too (SLURM signals every process of the job step). They ignore
SIGUSR1, and SIGTERM unless it comes from their parent (see :func:`shield_worker`), so the main
process can finish the step and save; the workers stop when the loader shuts them down.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger("unifuse")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving last.ckpt; run again with ckpt_path=auto
LAST = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION


def _signum(name: str | int) -> signal.Signals:
    if isinstance(name, int):
        return signal.Signals(name)
    name = name.upper()
    return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]


class PreemptionCheckpoint(Checkpoint):
    """On any of ``signals``: finish the step, save ``<dirpath>/last.ckpt``, requeue, exit ``exit_code``.
    ``dirpath`` defaults to the ModelCheckpoint's directory (else ``<default_root_dir>/checkpoints``).
    A ``Checkpoint`` callback, so Lightning runs it after the others (EMA updates, ...) of each step."""

    def __init__(self, signals: list[str | int] = ("SIGTERM", "SIGUSR1"), dirpath: str | None = None,
                 exit_code: int = EXIT_PREEMPTED):
        self.signals = [_signum(s) for s in signals]
        self.dirpath, self.exit_code = dirpath, exit_code
        self._received: set[int] = set()
        self._launcher_handlers: dict[signal.Signals, object] = {}

    def _note(self, signum, frame) -> None:
        self._received.add(signum)  # nothing else in a handler: it may run in the middle of any step

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":  # before Lightning registers its handlers: the ones the launcher (submitit) set
            self._launcher_handlers = {s: signal.getsignal(s) for s in self.signals}

    def on_train_start(self, trainer, pl_module) -> None:
        # Over Lightning's handlers, from the first training step on; at the end of fit (also on an
        # exception) Lightning puts back the ones it found, i.e. the launcher's.
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                signal.signal(s, self._note)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop._should_accumulate():  # no saving halfway through an accumulated step
            return
        got = [s in self._received for s in self.signals]
        if trainer.world_size > 1:  # a signal one rank got, all ranks act on
            flags = torch.tensor(got, dtype=torch.int32, device=trainer.strategy.root_device)
            got = trainer.strategy.reduce(flags, reduce_op="max").tolist()
        if any(got):
            self._stop(trainer, [s for s, g in zip(self.signals, got) if g])

    def last_path(self, trainer) -> Path:
        ckpt = trainer.checkpoint_callback
        d = self.dirpath or getattr(ckpt, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        return Path(d) / LAST

    def _stop(self, trainer, received: list[signal.Signals]) -> None:
        path = self.last_path(trainer)
        for cb in trainer.checkpoint_callbacks:  # the file is theirs too: no last-v1.ckpt after the resume
            if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath and Path(cb.dirpath) == path.parent:
                cb.last_model_path = str(path)
        if trainer.is_global_zero:
            log.warning("%s received: saving %s at step %d", "+".join(s.name for s in received), path,
                        trainer.global_step)
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            log.warning("saved %s; exiting with code %d (resume with ckpt_path=auto)", path, self.exit_code)
            handlers = {s: self._launcher_handlers.get(s) for s in received}
            _requeue_on_slurm(trainer, [s for s, h in handlers.items() if not callable(h)])
            for s, handler in handlers.items():
                if callable(handler):
                    handler(s, None)  # the launcher's own: submitit's requeues on its signal (and exits)
        raise SIGTERMException(self.exit_code)


def _requeue_on_slurm(trainer, received: list[signal.Signals]) -> None:
    env = trainer._accelerator_connector.cluster_environment  # as Lightning's own signal connector reads it
    if not (isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal in received):
        return
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]
    code = subprocess.call(["scontrol", "requeue", job])
    if code == 0:
        log.warning("requeued SLURM job %s", job)
    else:
        log.error("`scontrol requeue %s` failed with exit code %d", job, code)


def shield_worker() -> None:
    """In a DataLoader worker: ignore SIGUSR1, and SIGTERM unless sent by the parent process.

    PyTorch's workers exit on their parent's SIGTERM and die on anyone else's, which the parent then
    reports as a failed worker, in the middle of the step it was finishing. A Python handler cannot
    see the sender, so SIGTERM is blocked and a thread reads it with its sender (``sigwaitinfo``)."""
    from torch.utils.data import get_worker_info

    if get_worker_info() is None:  # not in a worker process
        return
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent or os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=wait, name="sigterm", daemon=True).start()
