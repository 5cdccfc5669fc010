"""Nothing half-written is ever published.

A file is replaced through a hidden temporary file and ``os.replace`` (:func:`atomic_write_text`); a
shard is written as ``NAME.tar.tmp`` and renamed to ``NAME.tar`` when it is complete (``TMP_SUFFIX``);
whole datasets are built in ``OUT.partial-<host>-<pid>/`` (:class:`Staging`) and moved into place
at the end, after which ``_complete.json`` (``COMPLETE_NAME``) marks the build finished.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # deferred: cycle staging<->writer (the writer publishes through staging); an annotation only
    from unifuse.data.writer import WriteSummary

COMPLETE_NAME = "_complete.json"  # written last into a finished build
TMP_SUFFIX = ".tmp"
log = logging.getLogger("unifuse.data")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``path`` through a hidden temporary file and ``os.replace``: readers see the old
    content or the new one, never a torn file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_PARTIAL = re.compile(r"\.partial-(?P<host>.+)-(?P<pid>\d+)(?:\.old)?$")
# the files of a shard directory: shards, their temporaries, `_index.json` and the completion marker
_SHARD_FILE = re.compile(r"\.tar$|\.tar\.tmp$|\.tmp-\d+$|^_index\.json$|^_complete\.json$")


def partial_dirs(out: str | Path) -> list[Path]:
    """Directories left next to ``out`` by builds of it that are running or were interrupted."""
    out = Path(out)
    return sorted(p for p in out.parent.glob(glob.escape(out.name) + ".partial-*") if _PARTIAL.search(p.name))


def _stale(p: Path) -> bool:
    """A partial directory whose builder (on this host) is gone. Those of other hosts are left alone."""
    m = _PARTIAL.search(p.name)
    if not m or m["host"] != socket.gethostname():
        return False
    try:
        os.kill(int(m["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        return False
    return False


def check_replaceable(d: Path, allowed: Iterable[str] = ()) -> None:
    """``d`` may be replaced by a new build: it is absent, or holds nothing but shards."""
    if not d.exists() and not d.is_symlink():
        return
    if d.is_symlink() or not d.is_dir():
        raise FileExistsError(f"{d} exists and is not a directory")
    allowed = set(allowed)
    others = sorted(p.name for p in d.iterdir() if not (_SHARD_FILE.search(p.name) or p.name in allowed))
    if others:
        raise FileExistsError(
            f"{d} already holds other files than shards ({', '.join(others[:5])}"
            f"{', ...' if len(others) > 5 else ''}): write somewhere else or remove it first"
        )


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished ``src`` to ``dst``; an older ``dst`` is moved aside first, then deleted."""
    if not dst.exists() and not dst.is_symlink():
        os.replace(src, dst)
        return
    old = dst.with_name(f"{dst.name}.partial-{socket.gethostname()}-{os.getpid()}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


class Staging:
    """Build a dataset in ``OUT.partial-<host>-<pid>/`` and move it into place when it is complete.

    ``path(part)`` is where to write what becomes ``OUT/part`` (``part=""``: ``OUT`` itself);
    ``commit()`` moves every part into place (a previous copy of a part is replaced, other files in
    ``OUT`` are kept) and then writes the ``marker`` file, if any, into ``OUT``. An exception inside
    the ``with`` block removes the partial directory; one left by a killed run is removed by the
    next run on the same host. Parts to be replaced must hold nothing but shards (and ``allowed``).
    """

    def __init__(self, out: str | Path, parts: Iterable[str], allowed: Iterable[str] = ()):
        self.out, self.parts = Path(os.path.abspath(out)), list(parts)
        for part in self.parts:
            target = self.out / part if part else self.out
            for stale in partial_dirs(target):
                if _stale(stale):
                    log.info("removing %s, left by an interrupted run", stale)
                    shutil.rmtree(stale, ignore_errors=True)
            check_replaceable(target, allowed)
        for stale in partial_dirs(self.out):
            if _stale(stale):
                shutil.rmtree(stale, ignore_errors=True)
        self.dir = self.out.with_name(f"{self.out.name}.partial-{socket.gethostname()}-{os.getpid()}")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.committed = False

    def path(self, part: str = "") -> Path:
        return self.dir / part if part else self.dir

    def final(self, part: str = "") -> Path:
        return self.out / part if part else self.out

    def commit(self, marker: dict | None = None, clear: Iterable[str] = ()) -> None:
        """Move the parts into place. ``clear``: files of ``OUT`` that describe the old content
        (stamps, markers), removed before anything moves."""
        if any(self.parts):
            self.out.mkdir(parents=True, exist_ok=True)
        for name in [COMPLETE_NAME, *clear]:
            if self.out.is_dir():
                (self.out / name).unlink(missing_ok=True)
        for part in self.parts:
            src = self.path(part)
            src.mkdir(parents=True, exist_ok=True)
            _replace_dir(src, self.final(part))
        if marker is not None:
            atomic_write_text(self.out / COMPLETE_NAME, json.dumps(marker, indent=1, sort_keys=True))
        shutil.rmtree(self.dir, ignore_errors=True)
        self.committed = True

    def published(self, summary: WriteSummary, part: str = "") -> WriteSummary:
        """``summary`` with its shard paths where they are after ``commit``."""
        summary.paths = [str(self.final(part) / Path(p).name) for p in summary.paths]
        return summary

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if not self.committed:
            shutil.rmtree(self.dir, ignore_errors=True)
