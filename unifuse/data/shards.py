"""Writing webdataset shards and counting their samples.

Layout written (the img2dataset layout, readable by any webdataset reader)::

    KEY.png|jpg|webp   image bytes, stored as given (or re-encoded PNG when resizing)
    KEY.txt            caption / text
    KEY.json           metadata; for interleaved documents {"segments": [{"text": ...}, {"image": i}, ...]}
    KEY.cls            optional integer class
    KEY.0.png, KEY.1.png, ...   the images of an interleaved document
    KEY.npy            pre-encoded codes or latents (numpy, never pickled)

Sample counts per shard are kept in ``_index.json`` next to the shards (written by the writer, or
computed once from the tar headers for shards made elsewhere, e.g. by img2dataset). The data
stream needs them to give every rank the same number of batches.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from webdataset.tariterators import base_plus_ext

INDEX_NAME = "_index.json"
log = logging.getLogger("unifuse.data")


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
    """Writes samples (dicts of member name -> bytes/str/int/ndarray) into numbered tar shards."""

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
        self._tar = tarfile.open(self._path, "w", format=tarfile.USTAR_FORMAT)
        self._count, self._bytes = 0, 0
        self.summary.shards += 1
        self.summary.paths.append(str(self._path))

    def _close_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._counts[self._path.name] = self._count
            self.summary.bytes += self._path.stat().st_size
            self._tar = None

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

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- counting
def count_tar_samples(path: str | Path) -> tuple[int, bool]:
    """(number of samples (distinct consecutive keys), whether the tar is damaged).

    A truncated or damaged tar counts the samples before the damage; its last one may be torn."""
    n, last, damaged = 0, None, False
    size = os.path.getsize(path)
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if info.offset_data + info.size > size:  # member data cut off: a torn last sample
                    damaged = True
                    break
                if not info.isreg():
                    continue
                prefix, _ = base_plus_ext(info.name)
                if prefix is None or os.path.basename(info.name).startswith("__"):
                    continue
                if prefix != last:
                    n, last = n + 1, prefix
            if tar.offset + 1024 > size:  # no end-of-archive blocks: the file was cut
                damaged = True
    except (tarfile.TarError, OSError, EOFError):
        damaged = True
    return n, damaged


def _read_index(d: Path) -> dict:
    try:
        return json.loads((d / INDEX_NAME).read_text())
    except (OSError, ValueError):
        return {}


def update_index(d: Path, counts: dict[str, int], damaged: set[str] = frozenset()) -> None:
    idx = _read_index(d)
    for name, n in counts.items():
        st = (d / name).stat()
        idx[name] = {"samples": n, "size": st.st_size}
        if name in damaged:
            idx[name]["damaged"] = True
    try:
        (d / INDEX_NAME).write_text(json.dumps(idx, indent=1, sort_keys=True))
    except OSError:
        pass  # read-only shard directory: counts are recomputed next time


def shard_info(paths: list[str]) -> tuple[list[int], list[bool]]:
    """(sample counts, damaged flags) for local shards, from ``_index.json`` when it is current,
    else from the tar headers (and then cached in the index)."""
    out, bad, fresh, fresh_bad = [], [], {}, {}
    by_dir: dict[Path, dict] = {}
    for p in paths:
        path = Path(p)
        d = path.parent
        if d not in by_dir:
            by_dir[d] = _read_index(d)
        entry = by_dir[d].get(path.name)
        size = path.stat().st_size
        if entry and entry.get("size") == size:
            out.append(int(entry["samples"]))
            bad.append(bool(entry.get("damaged", False)))
        else:
            n, damaged = count_tar_samples(path)
            fresh.setdefault(d, {})[path.name] = n
            if damaged:
                fresh_bad.setdefault(d, set()).add(path.name)
                log.warning("shard %s is truncated or damaged: using its first %d samples", path, n)
            out.append(n)
            bad.append(damaged)
    for d, counts in fresh.items():
        update_index(d, counts, fresh_bad.get(d, set()))
    return out, bad


def shard_counts(paths: list[str]) -> list[int]:
    return shard_info(paths)[0]


def expand_shards(spec: str | list[str]) -> list[str]:
    """Shard list from a directory, a glob, a brace pattern (``a-{000..009}.tar``) or a list of those."""
    from braceexpand import braceexpand

    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for s in specs:
        s = os.path.expanduser(str(s))
        if os.path.isdir(s):
            out.extend(sorted(glob.glob(os.path.join(s, "*.tar"))))
            continue
        for pat in braceexpand(s):
            hits = sorted(glob.glob(pat))
            out.extend(hits if hits else ([pat] if os.path.exists(pat) else []))
    if not out:
        raise FileNotFoundError(f"no shards found for {spec!r}")
    return out
