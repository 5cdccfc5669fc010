"""Streaming webdataset shards with equal batch counts on every rank.

Why not a plain ``wds.WebDataset(...).with_epoch(n)``: under DDP every rank must run exactly the
same number of batches, or training hangs at the next collective (DESIGN.md section 5); and in an
epoch no sample should be seen twice. Knowing each shard's sample count (``shards._index.json``)
lets every rank compute the same plan without talking to the others:

* ``mode="epoch"`` (default): each epoch the shard order is shuffled with ``seed + epoch`` (the same
  permutation on all ranks), the shards are laid end to end, and rank r reads the contiguous slice
  ``[r * n, (r + 1) * n)`` with ``n = total // world_size``; its slice is cut again between the
  DataLoader workers. Slices are disjoint, so no sample is seen twice in an epoch; the few samples
  past ``world_size * n`` (and past the last full batch) wait for another epoch's permutation.
  Every rank yields exactly ``len(stream)`` batches. Samples lost to bad data are replaced by
  repeats from the same worker's slice (counted as ``refill``), so batch counts stay equal.
* ``mode="resampled"``: shards are drawn at random with replacement per rank and worker (for
  corpora too large to care about exact epochs); ``batches_per_epoch`` batches per rank.

Several sources (pairs, text-only, interleaved, image-only) mix by weight: each source streams its
own slice and the next sample comes from source s with probability weight_s / sum(weights).

Batches are assembled inside the workers by a collator (``collate.py``), so a DataLoader with
``batch_size=None`` passes them through; every batch carries ``data_stats``, the skip/convert
counters since the previous batch, which ``DataStatsCallback`` sums across workers and ranks.
"""

from __future__ import annotations

import logging
import os
import random
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from unifuse.data.samples import DecodeConfig, SkipSample, decode_sample
from unifuse.data.shards import expand_shards, shard_info

log = logging.getLogger("unifuse.data")


@dataclass
class Source:
    name: str
    shards: list[str]
    weight: float = 1.0
    counts: list[int] | None = None
    damaged: list[bool] | None = None

    def __post_init__(self) -> None:
        self.shards = expand_shards(self.shards)
        if self.counts is None:
            self.counts, self.damaged = shard_info(self.shards)
        if self.damaged is None:
            self.damaged = [False] * len(self.shards)

    @property
    def total(self) -> int:
        return int(sum(self.counts))


class _TarErrors:
    """webdataset exception handler that counts and logs instead of raising."""

    def __init__(self, stats: Counter):
        self.stats = stats

    def __call__(self, exn: Exception) -> bool:
        self.stats["tar_error"] += 1
        log.warning("skipping unreadable tar data: %s", exn)
        return True


def _local_tar_files(path: str, handler) -> Iterator[dict]:
    """Members of a local tar via random access (seek past what is not read); the same records
    webdataset's ``tar_file_expander`` yields, ~25% less overhead than its stream mode."""
    try:
        with tarfile.open(path, "r:") as tar:
            while True:
                info = tar.next()
                if info is None:
                    break
                tar.members = []  # don't keep every header of a large shard in memory
                name = info.name
                if not info.isreg() or (name.startswith("__") and name.endswith("__")):
                    continue
                yield {"fname": name, "data": tar.extractfile(info).read(), "__url__": path}
    except Exception as e:  # unreadable or damaged shard: keep what was read
        handler(e)


def _raw_samples(url: str, skip: int, take: int | None, stats: Counter) -> Iterator[dict]:
    """Raw samples ``[skip, skip + take)`` of one shard, grouped by key with webdataset."""
    handler = _TarErrors(stats)
    if os.path.isfile(url):
        files = _local_tar_files(url, handler)
    else:  # pipe:, http(s):, s3 via pipe: ... through webdataset's opener and tar expander

        def streams():
            try:
                yield {"url": url, "stream": gopen(url)}
            except Exception as e:  # missing / unreadable shard
                handler(e)

        files = tar_file_expander(streams(), handler=handler)
    for i, raw in enumerate(group_by_keys(files, handler=handler)):
        if i < skip:
            continue
        if take is not None and i >= skip + take:
            break
        yield raw


def iter_decoded(spec, cfg: DecodeConfig, stats: Counter, drop_exts: tuple[str, ...] = ()) -> Iterator:
    """Every usable sample of a shard spec in shard order, skips counted in ``stats``.
    ``drop_exts``: member endings not to decode at all (e.g. images when only text is wanted)."""
    for url in expand_shards(spec):
        for raw in _raw_samples(url, 0, None, stats):
            if drop_exts:
                raw = {k: v for k, v in raw.items() if not k.endswith(drop_exts)}
            try:
                yield decode_sample(raw, cfg, stats)
            except SkipSample as e:
                stats[e.reason] += 1


def _slice(counts: list[int], order: list[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """(shard index, skip, take) pieces covering [start, stop) of the shards laid end to end in ``order``."""
    pieces, offset = [], 0
    for si in order:
        n = counts[si]
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            pieces.append((si, lo - offset, hi - lo))
        offset += n
        if offset >= stop:
            break
    return pieces


def _shuffled(it: Iterator, bufsize: int, rng: random.Random) -> Iterator:
    if bufsize <= 1:
        yield from it
        return
    buf: list = []
    for x in it:
        buf.append(x)
        if len(buf) >= bufsize:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class ShardStream(IterableDataset):
    def __init__(
        self,
        sources: list[Source],
        collator,
        decode: DecodeConfig | None = None,
        *,
        mode: str = "epoch",
        batches_per_epoch: int | None = None,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        drop_last: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        max_warnings: int = 50,
    ):
        if mode not in ("epoch", "resampled"):
            raise ValueError(f"data mode must be 'epoch' or 'resampled', not {mode!r}")
        if not sources:
            raise ValueError("no data sources given")
        self.sources, self.collator = sources, collator
        self.decode = decode or DecodeConfig()
        self.mode, self.shuffle, self.shuffle_buffer = mode, shuffle, shuffle_buffer
        self.drop_last, self.seed, self.max_warnings = drop_last, seed, max_warnings
        if rank is None or world_size is None:
            on = dist.is_available() and dist.is_initialized()
            rank, world_size = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
        self.rank, self.world_size = rank, world_size
        self.base_epoch = 0
        self._iterations = 0  # epochs this copy has run (persistent workers keep their copy)
        self.num_batches = self._plan_batches(batches_per_epoch)

    # ------------------------------------------------------------------ planning
    def per_rank(self, source: Source) -> int:
        return source.total // self.world_size

    def _plan_batches(self, batches_per_epoch: int | None) -> int:
        bs = self.collator.batch_size
        if batches_per_epoch is not None:
            nb = int(batches_per_epoch)
        else:
            n = sum(self.per_rank(s) for s in self.sources)
            nb = n // bs if self.drop_last else -(-n // bs)
        if nb <= 0:
            total = sum(s.total for s in self.sources)
            raise ValueError(
                f"{total} samples cannot fill one batch of {bs} on each of {self.world_size} ranks; "
                "lower the batch size or add data"
            )
        return nb

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.base_epoch = epoch
        self._iterations = 0

    # ------------------------------------------------------------------ iteration
    def _worker_batches(self, wid: int, nw: int) -> tuple[int, int, int]:
        """(batches of this worker, batches of the workers before it, all batches)."""
        nb = self.num_batches
        mine = [nb // nw + (i < nb % nw) for i in range(nw)]
        return mine[wid], sum(mine[:wid]), nb

    def _epoch_source(self, src: Source, epoch: int, wid: int, nw: int, rng: random.Random,
                      stats: Counter) -> Iterator:
        order = list(range(len(src.shards)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        n = self.per_rank(src)
        mine, before, nb = self._worker_batches(wid, nw)
        lo = self.rank * n + (n * before) // nb
        hi = self.rank * n + (n * (before + mine)) // nb
        if wid == nw - 1:
            hi = (self.rank + 1) * n
        pieces = _slice(src.counts, order, lo, hi)
        for si, _, _ in pieces:
            if src.damaged[si]:
                stats["truncated_tar"] += 1
                log.warning("reading the intact part of damaged shard %s", src.shards[si])
        passes = 0
        while True:
            got = 0
            raw = (r for si, skip, take in pieces for r in _raw_samples(src.shards[si], skip, take, stats))
            for sample in _shuffled(self._decoded(raw, stats), self.shuffle_buffer if self.shuffle else 0, rng):
                got += 1
                if passes:
                    stats["refill"] += 1
                yield sample
            if got == 0:
                if hi <= lo and nb > 0:
                    return  # this worker's slice of this source is empty (small source, many workers)
                raise RuntimeError(
                    f"no usable samples in source {src.name!r} slice [{lo}, {hi}) of rank {self.rank}; "
                    f"skip counts so far: {dict(stats)}"
                )
            passes += 1

    def _resampled_source(self, src: Source, rng: random.Random, stats: Counter) -> Iterator:
        while True:
            got = 0
            si = rng.randrange(len(src.shards))
            raw = _raw_samples(src.shards[si], 0, None, stats)
            for sample in _shuffled(self._decoded(raw, stats), self.shuffle_buffer, rng):
                got += 1
                yield sample
            if got == 0 and all(c == 0 for c in src.counts):
                raise RuntimeError(f"source {src.name!r} has no samples")

    def _decoded(self, raws: Iterator[dict], stats: Counter) -> Iterator:
        for raw in raws:
            try:
                yield decode_sample(raw, self.decode, stats)
            except SkipSample as e:
                stats[e.reason] += 1
                if sum(stats.values()) <= self.max_warnings:
                    log.warning("skipped sample %s in %s: %s", raw.get("__key__"), raw.get("__url__"), e)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        epoch = self.base_epoch + self._iterations
        self._iterations += 1
        rng = random.Random(hash((self.seed, epoch, self.rank, wid)) & 0xFFFFFFFF)
        stats: Counter = Counter()
        my_batches = self._worker_batches(wid, nw)[0]
        if my_batches == 0:
            return
        if self.mode == "epoch":
            streams = [self._epoch_source(s, epoch, wid, nw, rng, stats) for s in self.sources]
        else:
            streams = [self._resampled_source(s, rng, stats) for s in self.sources]
        weights = np.array([s.weight for s in self.sources], dtype=float)
        live = list(range(len(streams)))
        collator = self.collator.fresh()
        made = 0
        while made < my_batches:
            if len(live) == 1:
                k = live[0]
            else:
                w = weights[live] / weights[live].sum()
                k = live[int(np.searchsorted(np.cumsum(w), rng.random(), side="right").clip(0, len(live) - 1))]
            try:
                sample = next(streams[k])
            except StopIteration:
                live.remove(k)
                if not live:
                    raise RuntimeError("all data sources ran dry before the epoch's batches were made") from None
                continue
            reason = collator.add(sample)
            if reason:
                stats[reason] += 1
            while collator.ready() and made < my_batches:
                batch = collator.pop()
                batch["data_stats"] = dict(stats)
                stats.clear()
                made += 1
                yield batch


def worker_init_threads(_: int) -> None:
    """DataLoader workers decode images; one intra-op thread each avoids oversubscribing cores."""
    torch.set_num_threads(1)
