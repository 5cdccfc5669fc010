"""Which samples each rank reads: every rank computes the same plan from the seed, the epoch, the
shard sample counts and the sources' weights, without talking to the others (``stream.py`` says
how the modes use it). :func:`weighted_quotas` splits a rank's samples among the sources,
:class:`SourcePlan` places a source's quota in its endless sequence of shuffled passes
(``mode="epoch"``), :class:`OncePlan` cuts the sources into the ranks' parts (``mode="once"``)."""

from __future__ import annotations

import random

import numpy as np

from unifuse.data.read import Source


def shard_pieces(counts: list[int], order: list[int], start: int, stop: int) -> list[tuple[int, int, int]]:
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


def weighted_quotas(n: int, weights: list[float]) -> list[int]:
    """``n`` samples split by weight (largest remainder): they sum to ``n``, each within 1 of its share."""
    total = sum(weights)
    exact = [n * w / total for w in weights]
    out = [int(x) for x in exact]
    by_remainder = sorted(range(len(out)), key=lambda i: (out[i] - exact[i], i))
    for i in by_remainder[: n - sum(out)]:
        out[i] += 1
    return out


def _next_order(counts: list[int], order: list[int], keep: int, rng: random.Random) -> list[int]:
    """A reshuffled shard order whose first ``keep`` samples are the samples before ``keep`` in ``order``.

    Shards wholly before ``keep`` are shuffled to the front, the shard cut at ``keep`` comes next (its
    first part lands exactly on ``[.., keep)``), the shards after it are shuffled to the back; so an
    epoch reading ``order[keep:]`` and then the first ``<= keep`` samples of the new order sees no
    sample twice."""
    head, cut, tail, offset = [], [], [], 0
    for si in order:
        if offset + counts[si] <= keep:
            head.append(si)
        elif offset >= keep:
            tail.append(si)
        else:
            cut.append(si)
        offset += counts[si]
    rng.shuffle(head)
    rng.shuffle(tail)
    return head + cut + tail


class SourcePlan:
    """Which samples of one source rank ``r`` reads in each epoch, derived on every rank alike from the
    seed, the epoch, the shard counts and the source's ``quota`` (samples per rank per epoch).

    * quota <= per-rank share (``total // world``): the source is one endless sequence of passes,
      each pass a fresh shard order; epoch ``e`` reads positions ``[e*Q, (e+1)*Q)`` (``Q = world*quota``),
      rank r the r-th ``quota`` of them. Every sample is read once per pass, none twice in an epoch.
    * quota > per-rank share: upsampled. Each epoch a fresh shard order, rank r reads its own slice
      ``[r*p, (r+1)*p)`` over and over; reads past the first ``p`` are labelled ``upsampled``.
    """

    def __init__(self, src: Source, quota: int, world_size: int, seed: int, shuffle: bool):
        self.src, self.quota, self.world, self.seed, self.shuffle = src, quota, world_size, seed, shuffle
        self.per_rank = src.total // world_size
        self.upsampled = quota > self.per_rank
        if self.upsampled and self.per_rank == 0:
            raise ValueError(f"source {src.name!r} has {src.total} samples, fewer than the {world_size} ranks; "
                             "every rank needs its own samples of it")
        self._pass: tuple[int, list[int]] | None = None  # the last pass order computed (k, order)

    def pieces(self, epoch: int, rank: int, lo: int, hi: int) -> list[tuple[int, int, int, str | None]]:
        """(shard index, skip, take, label) covering positions ``[lo, hi)`` of the rank's quota."""
        runs = self._upsampled_runs(epoch, rank, lo, hi) if self.upsampled else self._pass_runs(epoch, rank, lo, hi)
        return [(si, skip, take, label) for order, start, stop, label in runs
                for si, skip, take in shard_pieces(self.src.counts, order, start, stop)]

    def _upsampled_runs(self, epoch: int, rank: int, lo: int, hi: int) -> list[tuple]:
        p, order, runs = self.per_rank, self._order(f"epoch{epoch}"), []
        while lo < hi:
            n = min(hi - lo, p - lo % p)
            start = rank * p + lo % p
            runs.append((order, start, start + n, "upsampled" if lo >= p else None))
            lo += n
        return runs

    def _pass_runs(self, epoch: int, rank: int, lo: int, hi: int) -> list[tuple]:
        total, first = self.src.total, (epoch * self.world + rank) * self.quota
        g, end, runs = first + lo, first + hi, []
        while g < end:
            k = g // total
            stop = min(end, (k + 1) * total)
            runs.append((self._pass_order(k), g - k * total, stop - k * total, None))
            g = stop
        return runs

    def _order(self, key: str) -> list[int]:
        order = list(range(len(self.src.shards)))
        if self.shuffle:
            self._rng(key).shuffle(order)
        return order

    def _rng(self, key: str) -> random.Random:
        return random.Random(f"{self.seed}/{self.src.name}/{key}")  # str seeds hash the same in every process

    def _pass_order(self, k: int) -> list[int]:
        """Shard order of pass k: pass 0 shuffled, each next one reshuffled by ``_next_order`` so the epoch
        that runs from one pass into the next sees no sample twice. Computed forward from pass 0."""
        if not self.shuffle:
            return self._order("")
        if self._pass is None or self._pass[0] > k:
            self._pass = (0, self._order("pass0"))
        while self._pass[0] < k:
            j, order = self._pass
            keep = self._straddle_start(j)
            self._pass = (j + 1, _next_order(self.src.counts, order, keep, self._rng(f"pass{j + 1}")))
        return self._pass[1]

    def _straddle_start(self, k: int) -> int:
        """Where in pass k the epoch starts that runs on into pass k+1 (the pass length if none does)."""
        total, per_epoch = self.src.total, self.world * self.quota
        end = (k + 1) * total
        start = (end - 1) // per_epoch * per_epoch
        return start - k * total if start + per_epoch > end else total


class OncePlan:
    """The part of the sources rank ``rank`` reads in ``mode="once"``: of each source the ``rank``-th of
    ``world`` contiguous slices in shard order (``first``: where it begins, ``counts``: its length), all
    of them interleaved evenly, each source's samples spread over the part in proportion to its count
    (``order``: the source of each position), so every batch holds about its share of each. ``cuts`` are
    set by the stream: where the rank's batches begin, then where the last one ends."""

    def __init__(self, sources: list[Source], rank: int, world: int):
        self.first = [s.total * rank // world for s in sources]
        self.counts = [s.total * (rank + 1) // world - f for s, f in zip(sources, self.first)]
        spread = np.concatenate([(np.arange(n) + 0.5) / max(n, 1) for n in self.counts])
        self.order = np.repeat(np.arange(len(sources), dtype=np.int32), self.counts)[np.argsort(spread, kind="stable")]
        self.cuts: list[int] = []
