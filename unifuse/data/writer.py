"""Writing webdataset shards: :class:`ShardWriter`.

Layout written (the img2dataset layout, readable by any webdataset reader)::

    KEY.png|jpg|webp   image bytes, stored as given (or re-encoded PNG when resizing)
    KEY.txt            caption / text
    KEY.json           metadata; for interleaved documents {"segments": [{"text": ...}, {"image": i}, ...]}
    KEY.cls            optional integer class
    KEY.0.png, KEY.1.png, ...   the images of an interleaved document
    KEY.npy            pre-encoded codes or latents (numpy, never pickled)

Each shard is published only when complete (see ``staging.py``) and its sample count goes into the
directory's ``_index.json`` (see ``shards.py``).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unifuse.data.shards import update_index
from unifuse.data.staging import TMP_SUFFIX


@dataclass
class WriteSummary:
    samples: int = 0
    shards: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)
    paths: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"wrote {self.samples} samples in {self.shards} shards ({self.bytes / 1e6:.1f} MB); "
            f"skipped: {skipped}"
        )


class ShardWriter:
    """Writes samples (dicts of member name -> bytes/str/int/ndarray) into numbered tar shards.

    Each shard is written as ``PREFIX-NNNNNN.tar.tmp`` and renamed to ``.tar`` once it is full (or
    on ``close``); ``close`` then updates ``_index.json``. Leaving the ``with`` block on an exception
    drops the unfinished shard instead of publishing it."""

    def __init__(self, out_dir: str | Path, prefix: str = "shard", max_samples: int = 10_000,
                 max_bytes: int = 1 << 30):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_samples, self.max_bytes = prefix, max_samples, max_bytes
        self.summary = WriteSummary()
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._bytes = 0
        self._counts: dict[str, int] = {}
        self._mtime = time.time()

    def _open(self) -> None:
        name = f"{self.prefix}-{self.summary.shards:06d}.tar"
        self._path = self.out_dir / name
        self._tmp = self.out_dir / (name + TMP_SUFFIX)
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count, self._bytes = 0, 0
        self.summary.shards += 1
        self.summary.paths.append(str(self._path))

    def _close_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            os.replace(self._tmp, self._path)
            self._counts[self._path.name] = self._count
            self.summary.bytes += self._path.stat().st_size

    @staticmethod
    def _encode(value) -> bytes:
        if isinstance(value, bytes):
            return value
        if isinstance(value, str):
            return value.encode("utf-8")
        if isinstance(value, (int, np.integer)):
            return str(int(value)).encode()
        if isinstance(value, np.ndarray):
            buf = io.BytesIO()
            np.save(buf, value, allow_pickle=False)
            return buf.getvalue()
        if isinstance(value, (dict, list)):
            return json.dumps(value, ensure_ascii=False).encode("utf-8")
        raise TypeError(f"cannot store a {type(value).__name__} in a shard")

    def write(self, key: str, members: dict) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if self._tar is None or self._count >= self.max_samples or self._bytes >= self.max_bytes:
            self._close_shard()
            self._open()
        for ext, value in members.items():
            data = self._encode(value)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), self._mtime, 0o444
            self._tar.addfile(info, io.BytesIO(data))
            self._bytes += len(data)
        self._count += 1
        self.summary.samples += 1

    def close(self) -> WriteSummary:
        self._close_shard()
        update_index(self.out_dir, self._counts)
        return self.summary

    def abort(self) -> None:
        """Drop the unfinished shard; the finished ones stay (and are indexed)."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            self._tmp.unlink(missing_ok=True)
            self.summary.samples -= self._count
            self.summary.shards -= 1
            self.summary.paths.pop()
        update_index(self.out_dir, self._counts)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
