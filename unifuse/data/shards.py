"""Finding webdataset shards (local or remote) and counting their samples.

Sample counts per shard are kept in ``_index.json`` next to the shards (written by the writer, or
computed once from the tar headers for shards made elsewhere, e.g. by img2dataset). The data
stream needs them to give every rank the same number of batches. Remote shards (``http(s)://``,
``s3://``, ``gs://``, ``file://`` URLs and ``pipe:`` commands, all opened with webdataset's
``gopen``) take their counts from the ``_index.json`` beside them, or are streamed once and counted;
those counts are cached under ``$UNIFUSE_CACHE`` (default ``~/.cache/unifuse``) ``/shard_counts``.
The index is replaced atomically (``staging.atomic_write_text``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from webdataset.gopen import Pipe, gopen, gopen_schemes
from webdataset.tariterators import base_plus_ext

from unifuse.data.staging import COMPLETE_NAME, atomic_write_text
from unifuse.run.progress import progress

INDEX_NAME = "_index.json"
log = logging.getLogger("unifuse.data")


def build_complete(out: str | Path, splits: Iterable[str] = ("train", "val")) -> bool:
    """Whether ``out`` holds a finished build: its completion marker, or (for builds made before
    markers existed) an ``_index.json`` in every split listing each of its shards at its size."""
    out = Path(out)
    if (out / COMPLETE_NAME).is_file():
        return all((out / s).is_dir() for s in splits)
    for s in splits:
        d = out / s
        idx = _read_index(d)
        if not idx or any(idx.get(t.name, {}).get("size") != t.stat().st_size for t in d.glob("*.tar")):
            return False
    return True


# ----------------------------------------------------------------------------- remote shards
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_TAR_NAME = re.compile(r"[^/\s'\"=]+\.tar(?=$|[\s'\"?#;|])")


def is_url(spec: str) -> bool:
    """A shard read through webdataset's ``gopen`` (``pipe:`` commands, ``scheme://`` URLs)."""
    return str(spec).startswith("pipe:") or bool(_URL.match(str(spec)))


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192):
    """``s3://`` URLs through the AWS CLI (webdataset has no s3 opener of its own)."""
    if mode[0] == "r":
        return Pipe(["aws", "s3", "cp", url, "-"], mode=mode, bufsize=bufsize, ignore_status=[141])
    return Pipe(["aws", "s3", "cp", "-", url], mode=mode, bufsize=bufsize, ignore_status=[141])


gopen_schemes.setdefault("s3", _gopen_s3)


def index_location(url: str) -> tuple[str, str] | None:
    """(where the ``_index.json`` beside a remote shard is, the shard's file name): the last
    ``*.tar`` name in the URL or ``pipe:`` command is replaced by ``_index.json``."""
    matches = list(_TAR_NAME.finditer(url))
    if not matches:
        return None
    m = matches[-1]
    return url[: m.start()] + INDEX_NAME + url[m.end():], m.group(0)


def _fetch_index(url: str) -> dict:
    try:
        f = gopen(url)
        try:
            data = f.read()
        finally:
            f.close()
        idx = json.loads(data)
    except Exception as e:  # no index there (or unreadable): the shards are counted instead
        log.debug("no shard index at %s: %s", url, e)
        return {}
    return idx if isinstance(idx, dict) else {}


def counts_cache_dir() -> Path:
    return Path(os.environ.get("UNIFUSE_CACHE") or "~/.cache/unifuse").expanduser() / "shard_counts"


def _cache_path(url: str) -> Path:
    return counts_cache_dir() / (hashlib.sha1(url.encode("utf-8")).hexdigest() + ".json")


def _cached_count(url: str) -> dict | None:
    try:
        entry = json.loads(_cache_path(url).read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(entry, dict) and entry.get("url") == url and "samples" in entry):
        return None
    if url.startswith("file:") and entry.get("size") != _local_size(url):  # the file changed
        return None
    return entry


class _CountingReader:
    def __init__(self, f):
        self.f, self.n = f, 0

    def read(self, size: int = -1) -> bytes:
        b = self.f.read(size)
        self.n += len(b)
        return b


def count_stream_samples(url: str) -> tuple[int, bool]:
    """(samples, damaged) of a remote shard, streamed once through ``gopen``; same rules as
    :func:`count_tar_samples`. The result is cached (keyed by the URL) unless reading failed."""
    n, last, damaged, transport = 0, None, False, None
    end, last_started_key, offset, tar = 0, False, 0, None
    try:
        f = gopen(url)
    except Exception as e:
        raise OSError(f"cannot open shard {url}: {e}") from e
    r = _CountingReader(f)
    try:
        try:
            tar = tarfile.open(fileobj=r, mode="r|*")
            while (info := tar.next()) is not None:
                tar.members = []
                end, last_started_key = info.offset_data + info.size, False
                prefix = _sample_key(info)
                if prefix is None:
                    continue
                if prefix != last:
                    n, last, last_started_key = n + 1, prefix, True
            offset = tar.offset
        except (tarfile.TarError, EOFError):
            damaged = True
        rest = tar.fileobj if tar is not None else r
        while rest.read(1 << 20):  # padding and end blocks (and lets a pipe exit cleanly)
            pass
    except (tarfile.TarError, EOFError):
        damaged = True
    except OSError as e:  # the transfer failed (pipe exit status, network)
        transport = e
    finally:
        try:
            f.close()
        except Exception as e:
            transport = transport or e
    total = tar.fileobj.pos if tar is not None else r.n  # bytes of tar data (after decompression)
    if end > total:  # the last member's data was cut off: a torn last sample
        damaged = True
        n -= int(last_started_key)
    elif not damaged and offset + 1024 > total:  # no end-of-archive blocks: the stream was cut
        damaged = True
    if transport is not None:
        if r.n == 0:
            raise OSError(f"cannot read shard {url}: {transport}") from transport
        log.warning("reading %s failed after %d bytes (%s): not caching its count", url, r.n, transport)
        return n, True
    try:
        path = _cache_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"url": url, "samples": n, "damaged": damaged}
        if url.startswith("file:"):
            entry["size"] = _local_size(url)
        atomic_write_text(path, json.dumps(entry))
    except OSError:
        pass  # no writable cache: counted again next time
    return n, damaged


# ----------------------------------------------------------------------------- counting
def _sample_key(info: tarfile.TarInfo) -> str | None:
    """The sample a tar member belongs to (webdataset's grouping by key), or None for members that
    are not sample data (directories, links, ``__``-prefixed files)."""
    if not info.isreg():
        return None
    prefix, _ = base_plus_ext(info.name)
    if prefix is None or os.path.basename(info.name).startswith("__"):
        return None
    return prefix


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
                prefix = _sample_key(info)
                if prefix is None:
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
        idx = json.loads((d / INDEX_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return idx if isinstance(idx, dict) else {}


def update_index(d: Path, counts: dict[str, int], damaged: set[str] = frozenset()) -> None:
    idx = _read_index(d)
    for name, n in counts.items():
        st = (d / name).stat()
        idx[name] = {"samples": n, "size": st.st_size}
        if name in damaged:
            idx[name]["damaged"] = True
    try:
        atomic_write_text(d / INDEX_NAME, json.dumps(idx, indent=1, sort_keys=True))
    except OSError:
        pass  # read-only shard directory: counts are recomputed next time


def _entry(e) -> tuple[int, bool] | None:
    if isinstance(e, dict) and isinstance(e.get("samples"), int):
        return e["samples"], bool(e.get("damaged", False))
    return None


def _local_size(url: str) -> int | None:
    try:
        return os.path.getsize(url2pathname(urlparse(url).path))
    except OSError:
        return None


def shard_info(paths: list[str]) -> tuple[list[int], list[bool]]:
    """(sample counts, damaged flags) for shards, local or remote.

    Local shards: from ``_index.json`` when it is current (same file size), else from the tar
    headers (and then cached in the index). Remote shards: from the ``_index.json`` beside them,
    else from the count cache, else streamed once and counted (with progress) and cached."""
    out: list[int] = [0] * len(paths)
    bad: list[bool] = [False] * len(paths)
    todo: list[int] = []
    local_idx: dict[Path, dict] = {}
    remote_idx: dict[str, dict] = {}
    for i, p in enumerate(paths):
        got = None
        if is_url(p):
            loc = index_location(p)
            if loc is not None:
                if loc[0] not in remote_idx:
                    remote_idx[loc[0]] = _fetch_index(loc[0])
                e = remote_idx[loc[0]].get(loc[1])
                if not (p.startswith("file:") and isinstance(e, dict) and "size" in e
                        and e["size"] != _local_size(p)):  # a file:// shard changed since indexed
                    got = _entry(e)
            got = got or _entry(_cached_count(p))
        else:
            path = Path(p)
            if path.parent not in local_idx:
                local_idx[path.parent] = _read_index(path.parent)
            e = local_idx[path.parent].get(path.name)
            if isinstance(e, dict) and e.get("size") == path.stat().st_size:
                got = _entry(e)
        if got is None:
            todo.append(i)
        else:
            out[i], bad[i] = got
    n_remote = sum(is_url(paths[i]) for i in todo)
    if n_remote:
        log.info("%d remote shards have no _index.json beside them: counting their samples by reading them "
                 "once (cached in %s)", n_remote, counts_cache_dir())
    fresh: dict[Path, dict[str, int]] = {}
    fresh_bad: dict[Path, set[str]] = {}
    for i in progress(todo, desc="counting shard samples", unit="shard"):
        p = paths[i]
        if is_url(p):
            n, damaged = count_stream_samples(p)
        else:
            path = Path(p)
            n, damaged = count_tar_samples(path)
            fresh.setdefault(path.parent, {})[path.name] = n
            if damaged:
                fresh_bad.setdefault(path.parent, set()).add(path.name)
        if damaged:
            log.warning("shard %s is truncated or damaged: using its first %d samples", p, n)
        out[i], bad[i] = n, damaged
    for d, counts in fresh.items():
        update_index(d, counts, fresh_bad.get(d, set()))
    return out, bad


def shard_counts(paths: list[str]) -> list[int]:
    return shard_info(paths)[0]


def _expand_url(spec: str) -> list[str]:
    from braceexpand import braceexpand

    out: list[str] = []
    for url in braceexpand(spec):
        if url.startswith("file:"):  # local after all: directories and globs work as for paths
            path = url2pathname(urlparse(url).path)
            if os.path.isdir(path):
                out.extend("file://" + p for p in sorted(glob.glob(os.path.join(path, "*.tar"))))
                continue
            if glob.has_magic(path):
                out.extend("file://" + p for p in sorted(glob.glob(path)))
                continue
        out.append(url)
    return out


def expand_shards(spec: str | list[str]) -> list[str]:
    """Shard list from a directory, a glob, a brace pattern (``a-{000..009}.tar``), a URL
    (``https://host/a-{000..009}.tar``, ``s3://``, ``gs://``, ``file://``) or a ``pipe:`` command
    (``pipe:aws s3 cp s3://bucket/a-000000.tar -``), or a list of those. URLs and commands are not
    checked here: they are opened when read."""
    from braceexpand import braceexpand

    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for s in specs:
        s = str(s)
        if is_url(s):
            out.extend(_expand_url(s))
            continue
        s = os.path.expanduser(s)
        if os.path.isdir(s):
            out.extend(sorted(glob.glob(os.path.join(s, "*.tar"))))
            continue
        for pat in braceexpand(s):
            hits = sorted(glob.glob(pat))
            out.extend(hits if hits else ([pat] if os.path.exists(pat) else []))
    if not out:
        raise FileNotFoundError(f"no shards found for {spec!r}")
    return out
