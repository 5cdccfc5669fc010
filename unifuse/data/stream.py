"""Streaming webdataset shards with equal batch counts on every rank.

Why not a plain ``wds.WebDataset(...).with_epoch(n)``: under DDP every rank must run exactly the
same number of batches, or training hangs at the next collective (a rank with one batch fewer
never joins the gradient all-reduce the others wait in); and in an epoch no sample should be seen
twice. Knowing each shard's sample count (``shards._index.json``) lets every rank compute the same
plan without talking to the others:

* ``mode="epoch"`` (default): an epoch has ``len(stream)`` batches per rank (what the sources
  together fill, or ``batches_per_epoch``). Each source gets a share of a rank's samples by its
  weight (largest-remainder quotas) and the sources are interleaved in a seeded order. A source
  is one endless sequence of passes, each pass a fresh shard permutation laid end to end; epoch e
  reads the next ``world_size * quota`` positions and rank r its own contiguous part, cut again
  between DataLoader workers, so no sample repeats within an epoch and over epochs every sample
  comes equally often. A source asked for more than its per-rank share is *upsampled*: each rank
  re-reads its own slice, and the repeats are counted as ``upsampled`` / ``upsampled/<name>``.
  Samples lost to bad data are replaced by re-reads (counted as ``refill``), so batch counts stay
  equal; a collator that refuses every sample is an error, not a hang. A collator that packs
  several samples into a row (``PackingCollator``) is asked how many samples a batch holds on
  average (``samples_per_batch``, measured by packing the sources' first samples), and epochs are
  planned in samples from that: an epoch is still one pass, not one pass per document in a row.
* ``mode="resampled"``: shards are drawn at random with replacement per rank and worker (for
  corpora too large to care about exact epochs), from source s with probability
  weight_s / sum(weights); ``batches_per_epoch`` batches per rank.
* ``mode="once"`` (validation): every sample of the sources exactly once per iteration, in shard
  order. Rank r reads the r-th contiguous part of each source (the ranks' parts differ by at most one
  sample), the sources interleaved evenly, and the last batch holds what is left (a packing
  collator's last batch has only the rows begun), so no sample is dropped and none read twice; ranks
  may differ by a batch. ``len(stream)`` is the batches the collator makes of the rank's part, found by
  batching it once when the stream is built (for a packing collator: reading and packing the part);
  ``batches_per_epoch`` keeps the first that many of them.

Batches are assembled inside the workers by a collator (``collate.py``), so a DataLoader with
``batch_size=None`` passes them through; every batch carries ``data_stats``, the skip/convert
counters since the previous batch, which ``DataStatsCallback`` sums across workers and ranks.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from unifuse.data.plan import OncePlan, SourcePlan, shard_pieces, weighted_quotas
from unifuse.data.read import Source, raw_samples
from unifuse.data.samples import DecodeConfig, SkipSample, decode_sample

log = logging.getLogger("unifuse.data")
PLAN_SAMPLES = 1024  # samples a packing collator packs to measure how many a batch holds


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
        if mode not in ("epoch", "resampled", "once"):
            raise ValueError(f"data mode must be 'epoch', 'resampled' or 'once', not {mode!r}")
        if not sources:
            raise ValueError("no data sources given")
        if any(s.weight < 0 for s in sources) or sum(s.weight for s in sources) <= 0:
            raise ValueError(f"source weights must be >= 0 and not all 0: {[(s.name, s.weight) for s in sources]}")
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
        self._resume: tuple[int, int] | None = None  # (epoch, batches of it already trained on)
        self.once = OncePlan(sources, rank, world_size) if mode == "once" else None
        if self.once is not None:
            self.once.cuts = self._cut_once(batches_per_epoch)
            self.num_batches = len(self.once.cuts) - 1
            self.samples_per_batch = self.once.cuts[-1] / self.num_batches
        else:
            self.samples_per_batch = self._samples_per_batch()
            self.num_batches = self._plan_batches(batches_per_epoch)
        # samples per rank per epoch of each source, and which of them each rank reads (mode="epoch")
        self.quotas = (self.once.counts if self.once is not None else
                       weighted_quotas(round(self.num_batches * self.samples_per_batch), [s.weight for s in sources]))
        self.plans = ([SourcePlan(s, q, world_size, seed, shuffle) for s, q in zip(sources, self.quotas)]
                      if mode == "epoch" else [])  # resampled mode draws shards at random: no per-rank slices

    # ------------------------------------------------------------------ planning
    def per_rank(self, source: Source) -> int:
        return source.total // self.world_size

    def _samples_per_batch(self) -> float:
        """Samples one batch takes: the collator's batch size, or, for a collator that packs samples
        into rows (it has ``samples_per_batch``), its average over the sources' first samples."""
        measure = getattr(self.collator, "samples_per_batch", None)
        return float(self.collator.batch_size) if measure is None else measure(self._first_samples())

    def _first_samples(self, n: int = PLAN_SAMPLES) -> Iterator:
        """Up to ``n`` decoded samples from the start of the sources, mixed by weight (the same on
        every rank and in a resumed run)."""
        stats: Counter = Counter()

        def source(src: Source) -> Iterator:
            for shard in src.shards:
                yield from self._decoded(raw_samples(shard, 0, None, stats), stats)

        live = [(source(s), s.weight) for s in self.sources if s.weight > 0]
        rng = random.Random(self.seed)
        for _ in range(n):
            if not live:
                return
            i = rng.choices(range(len(live)), weights=[w for _, w in live])[0]
            sample = next(live[i][0], None)
            if sample is None:
                live.pop(i)
            else:
                yield sample

    def _plan_batches(self, batches_per_epoch: int | None) -> int:
        per_batch = self.samples_per_batch
        if batches_per_epoch is not None:
            nb = int(batches_per_epoch)
        else:
            n = sum(self.per_rank(s) for s in self.sources) / per_batch
            nb = int(n) if self.drop_last else math.ceil(n)
        if nb <= 0:
            total, bs = sum(s.total for s in self.sources), self.collator.batch_size
            size = f"{bs}" if per_batch == bs else f"{bs} rows (~{per_batch:.1f} samples)"
            raise ValueError(
                f"{total} samples cannot fill one batch of {size} on each of {self.world_size} ranks; "
                "lower the batch size or add data"
            )
        return nb

    def _cut_once(self, limit: int | None) -> list[int]:
        """``mode="once"``: the positions of the rank's part where its batches begin, then where the last
        one ends. A collator of a fixed size begins one every ``batch_size`` samples; a packing collator
        is fed the part in order, and a batch begins at the first sample it holds back after a pop (a
        worker that starts there with a fresh collator makes the same batches). ``limit``: keep the
        first that many batches."""
        n = len(self.once.order)
        if n == 0:
            raise ValueError(f"{sum(s.total for s in self.sources)} samples cannot give each of "
                             f"{self.world_size} ranks one")
        if getattr(self.collator, "samples_per_batch", None) is None:
            starts = list(range(0, n, self.collator.batch_size))
        else:
            starts, c = [0], self.collator.fresh(key=("plan",))
            for p, sample in enumerate(self._once_samples(0, n, Counter())):
                if sample is not None:
                    c.add(sample)
                while c.ready():
                    c.pop()
                    starts.append(p + 1 - c.held())
            starts = [p for p in starts if p < n]
        if limit is not None and 0 < int(limit) < len(starts):
            return starts[: int(limit) + 1]
        return [*starts, n]

    def _once_samples(self, lo: int, hi: int, stats: Counter) -> Iterator:
        """Positions ``[lo, hi)`` of the rank's part (``mode="once"``) decoded, None where a sample is
        unusable: one item per position, so a worker that starts at a position reads from there on."""
        order, first = self.once.order, self.once.first
        before, upto = (np.bincount(order[:k], minlength=len(self.sources)) for k in (lo, hi))

        def raws(src: Source, start: int, stop: int) -> Iterator[dict]:
            for si, skip, take in shard_pieces(src.counts, list(range(len(src.shards))), start, stop):
                yield from raw_samples(src.shards[si], skip, take, stats)

        streams = [self._decoded(raws(src, f + int(a), f + int(b)), stats, gaps=True)
                   for src, f, a, b in zip(self.sources, first, before, upto)]
        for k in order[lo:hi].tolist():
            yield next(streams[k], None)

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.base_epoch = epoch
        self._iterations = 0

    def resume_at(self, epoch: int, batches: int) -> None:
        """The next iteration is epoch ``epoch`` without its first ``batches`` batches (a run resumed
        mid-epoch): the rest come in the order the interrupted run would have given them. The skipped
        batches are built again and dropped (shuffle buffers and packing depend on what came before),
        which costs their loading time, not their training time."""
        self.set_epoch(epoch)
        self._resume = (epoch, batches)

    # ------------------------------------------------------------------ iteration
    def _worker_batches(self, wid: int, nw: int) -> tuple[int, int, int]:
        """(batches of this worker, batches of the workers before it, all batches)."""
        nb = self.num_batches
        mine = [nb // nw + (i < nb % nw) for i in range(nw)]
        return mine[wid], sum(mine[:wid]), nb

    def _draws(self, epoch: int) -> np.ndarray:
        """The rank's sequence of source indices for one epoch: each source exactly its quota of times,
        in a seeded random order that every worker of the rank computes alike."""
        seq = np.repeat(np.arange(len(self.sources), dtype=np.int32), self.quotas)
        if len(self.sources) > 1:
            np.random.default_rng([self.seed % 2**32, epoch, self.rank]).shuffle(seq)
        return seq

    def _epoch_samples(self, epoch: int, before: int, mine: int, rng: random.Random, stats: Counter) -> Iterator:
        """This worker's samples: its part of the rank's draws (for batches ``[before, before + mine)``),
        each source read from its own disjoint slice; then, if bad data left batches short, refills."""
        per_batch, n = self.samples_per_batch, len(self.sources)
        draws = self._draws(epoch)
        start, stop = round(before * per_batch), round((before + mine) * per_batch)
        lo = np.bincount(draws[:start], minlength=n)
        count = np.bincount(draws[start:stop], minlength=n)
        streams = [self._epoch_source(plan, plan.pieces(epoch, self.rank, int(lo[i]), int(lo[i] + count[i])),
                                      rng, stats) for i, plan in enumerate(self.plans)]
        for k in draws[start:stop].tolist():
            yield next(streams[k])
        live = [i for i in range(n) if count[i] > 0]
        while True:  # only reached when skipped samples (bad data, collator) left the batches short
            yield next(streams[rng.choices(live, weights=[int(count[i]) for i in live])[0]])

    def _epoch_source(self, plan: SourcePlan, pieces: list[tuple], rng: random.Random,
                      stats: Counter) -> Iterator:
        """One source's samples for this worker: its pieces once (planned repeats labelled
        ``upsampled``), then over again as ``refill`` for as long as more are asked for."""
        src = plan.src
        for si in sorted({p[0] for p in pieces}):
            if src.damaged[si]:
                stats["truncated_tar"] += 1
                log.warning("reading the intact part of damaged shard %s", src.shards[si])
        passes = 0
        while True:
            got = 0
            for sample, label in _shuffled(self._read(src, pieces, stats), self.shuffle_buffer if self.shuffle else 0,
                                           rng):
                got += 1
                label = "refill" if passes else label
                if label:
                    stats[label] += 1
                if label == "upsampled":
                    stats[f"upsampled/{src.name}"] += 1
                yield sample
            if got == 0:
                raise RuntimeError(
                    f"no usable samples in source {src.name!r} pieces {pieces} of rank {self.rank}; "
                    f"skip counts so far: {dict(stats)}"
                )
            passes += 1

    def _read(self, src: Source, pieces: list[tuple], stats: Counter) -> Iterator[tuple]:
        for si, skip, take, label in pieces:
            for sample in self._decoded(raw_samples(src.shards[si], skip, take, stats), stats):
                yield sample, label

    def _resampled_source(self, src: Source, rng: random.Random, stats: Counter) -> Iterator:
        if all(c == 0 for c in src.counts):
            raise RuntimeError(f"source {src.name!r} has no samples")
        empty = 0  # shards read in a row that gave no usable sample
        while True:
            got = 0
            si = rng.randrange(len(src.shards))
            raw = raw_samples(src.shards[si], 0, None, stats)
            for sample in _shuffled(self._decoded(raw, stats), self.shuffle_buffer, rng):
                got += 1
                yield sample
            empty = 0 if got else empty + 1
            if empty >= max(10, 2 * len(src.shards)):
                raise RuntimeError(f"no usable samples in source {src.name!r} after {empty} shard reads in a row; "
                                   f"skip counts so far: {dict(stats)}")

    def _resampled_samples(self, rng: random.Random, stats: Counter) -> Iterator:
        """Samples drawn from source s with probability weight_s / sum(weights)."""
        streams = [self._resampled_source(s, rng, stats) for s in self.sources]
        if len(streams) == 1:
            yield from streams[0]
        cdf = np.cumsum([s.weight for s in self.sources]) / sum(s.weight for s in self.sources)
        while True:
            yield next(streams[int(np.searchsorted(cdf, rng.random(), side="right").clip(0, len(streams) - 1))])

    def _decoded(self, raws: Iterator[dict], stats: Counter, gaps: bool = False) -> Iterator:
        """The usable samples of ``raws``, skips counted; with ``gaps``, None in place of each unusable one."""
        for raw in raws:
            try:
                yield decode_sample(raw, self.decode, stats)
            except SkipSample as e:
                stats[e.reason] += 1
                if sum(stats.values()) <= self.max_warnings:
                    log.warning("skipped sample %s in %s: %s", raw.get("__key__"), raw.get("__url__"), e)
                if gaps:
                    yield None

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        if self.once is not None:
            yield from self._once_batches(wid, nw)
            return
        epoch = self.base_epoch + self._iterations
        resume, self._resume = self._resume, None  # for the first iteration after resume_at only
        done = resume[1] if resume is not None and resume[0] == epoch else 0
        self._iterations += 1
        if self.mode == "epoch" and not self.shuffle:
            epoch = 0  # unshuffled (validation): the same samples in the same order every time
        # The DataLoader takes batches from its workers in turn, starting with worker 0. After `done`
        # batches worker k has given done // nw + (k < done % nw) of its own, and the next one is due from
        # worker done % nw: so a resumed worker plays the part of worker (wid + done) % nw and replays
        # (builds, does not yield) the batches that part had given.
        wid = (wid + done) % nw
        skip = done // nw + (wid < done % nw)
        rng = random.Random(hash((self.seed, epoch, self.rank, wid)) & 0xFFFFFFFF)
        stats: Counter = Counter()
        mine, before, _ = self._worker_batches(wid, nw)
        if mine == 0:
            return
        if self.mode == "epoch":
            samples = self._epoch_samples(epoch, before, mine, rng, stats)
        else:
            samples = self._resampled_samples(rng, stats)
        collator = self.collator.fresh(key=(epoch, self.rank, wid))
        made, rejected = 0, 0
        limit = 2 * sum(s.total for s in self.sources) + 100  # every readable sample refused, twice over
        while made < mine:
            reason = collator.add(next(samples))
            if reason:
                stats[reason] += 1
                rejected += 1
                if rejected > limit:
                    raise RuntimeError(f"the collator refused {rejected} samples in a row ({dict(stats)}): none of "
                                       f"this data fits it (e.g. text-only samples for an image model, documents "
                                       f"longer than the row); check the data sources and data.collator")
            else:
                rejected = 0
            while collator.ready() and made < mine:
                batch = _stamped(collator.pop(), stats)
                made += 1
                if made > skip:
                    yield batch

    def _once_batches(self, wid: int, nw: int) -> Iterator[dict]:
        """This worker's batches of the rank's part (``mode="once"``): the positions of its batches read
        once and batched as they come, what is left at the end as a last batch."""
        mine, before, _ = self._worker_batches(wid, nw)
        if mine == 0:
            return
        stats: Counter = Counter()
        collator, cuts = self.collator.fresh(key=(0, self.rank, wid)), self.once.cuts
        for sample in self._once_samples(cuts[before], cuts[before + mine], stats):
            reason = None if sample is None else collator.add(sample)
            if reason:
                stats[reason] += 1
            while collator.ready():
                yield _stamped(collator.pop(), stats)
        last = collator.flush()
        if last is not None:
            yield _stamped(last, stats)


def _stamped(batch: dict, stats: Counter) -> dict:
    """``batch`` with the skip/convert counters since the previous batch (``data_stats``), which it takes."""
    batch["data_stats"] = dict(stats)
    stats.clear()
    return batch
