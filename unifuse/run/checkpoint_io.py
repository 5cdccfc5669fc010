"""Checkpoint files that are never half-written.

Lightning's ``TorchCheckpointIO`` (2.6) serialises the whole checkpoint into memory, writes it to a
temporary file made by ``tempfile.mkstemp()`` (the system temp directory) and moves it into place
with ``shutil.move``, without fsync. Where the temp directory is another file system than the run
directory (a node-local /tmp, checkpoints on Lustre or NFS), the move is a copy into the final name:
a kill during it leaves a truncated ``last.ckpt``. :class:`AtomicCheckpointIO` writes the checkpoint
straight into a temporary file in the target's own directory, fsyncs it, renames it over the target
(``os.replace``: atomic on POSIX file systems) and fsyncs the directory. A reader sees the old file or
the new one, never a mix, and a crash leaves at most a stray temporary file, which the next save of
the same target removes.

It is the trainer's checkpoint IO plugin (``trainer.plugins`` in conf/trainer/default.yaml), so every
checkpoint Lightning writes goes through it: ModelCheckpoint's top-k files and ``last.ckpt``
(``save_last: true`` saves it in full; ``save_last: link`` would remove and re-create a symlink, which
is not atomic), the preemption checkpoint, ``trainer.save_checkpoint``.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger("unifuse")

TMP_TAG = ".tmp-"


def temp_path(path: str | os.PathLike) -> Path:
    """Where a save of ``path`` is written before the rename: a hidden file in the same directory, named
    after the writer, so it never matches ``*.ckpt`` and two writers never share one."""
    p = Path(path)
    return p.with_name(f".{p.name}{TMP_TAG}{socket.gethostname()}-{os.getpid()}")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are temp file + fsync + rename in the target's directory.
    Remote paths (``s3://`` ...) go to Lightning's writer, which uploads them as one object."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(target)
        try:
            with open(tmp, "wb") as f:
                self._write(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)
        for stale in target.parent.glob(f".{target.name}{TMP_TAG}*"):  # left by a writer that was killed
            log.info("removing %s, an unfinished save", stale)
            stale.unlink(missing_ok=True)

    def _write(self, checkpoint: dict[str, Any], f) -> None:
        torch.save(checkpoint, f)
