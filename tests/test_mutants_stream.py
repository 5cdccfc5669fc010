"""Tests written to kill mutmut survivors in unifuse/data/stream.py, plan.py and read.py (see `make mutation`).

Each test states a property of the epoch plan or of the readers that a surviving mutant broke."""

from __future__ import annotations

import io
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from unifuse.data.collate import ImageCollator
from unifuse.data.datamodule import worker_init_threads
from unifuse.data.plan import SourcePlan, _next_order, shard_pieces
from unifuse.data.read import Source, raw_samples
from unifuse.data.samples import DecodeConfig
from unifuse.data.stream import ShardStream
from unifuse.data.writer import ShardWriter


def one_per_shard(root: Path, name: str, n: int) -> Source:
    """n text samples ``<name>_<i>``, one per shard: sample ids and shard ids coincide."""
    with ShardWriter(root / name, prefix=name, max_samples=1) as w:
        for i in range(n):
            w.write(f"{name}_{i}", {"txt": f"{name} {i}"})
    return Source(name, str(root / name))


def read_ids(plan: SourcePlan, epoch: int, rank: int = 0) -> list[tuple[int, int]]:
    """(shard, index in shard) of every sample the rank reads in one epoch, in order."""
    return [(si, skip + j) for si, skip, take, _ in plan.pieces(epoch, rank, 0, plan.quota) for j in range(take)]


# ----------------------------------------------------------------------------- the epoch plan
def test_slice_pieces_are_never_empty():
    # [3, 6) of three 3-sample shards is exactly shard 1: no zero-length piece of shard 0 (which would
    # open and scan a whole shard for nothing, and count it as read)
    assert shard_pieces([3, 3, 3], [0, 1, 2], 3, 6) == [(1, 0, 3)]
    assert shard_pieces([3, 0, 3], [0, 1, 2], 2, 5) == [(0, 2, 1), (2, 0, 2)]


def test_next_order_keeps_the_head_in_front_and_shuffles_both_sides():
    import random

    counts, order, keep = [1] * 10, list(range(10)), 4
    at_3, at_4 = set(), set()
    for seed in range(12):
        new = _next_order(counts, order, keep, random.Random(seed))
        assert sorted(new[:keep]) == [0, 1, 2, 3], new  # the first `keep` samples stay the first
        assert sorted(new[keep:]) == list(range(4, 10)), new
        at_3.add(new[3])
        at_4.add(new[4])
    # the shard ending exactly at `keep` is shuffled with the head, the one starting there with the tail
    assert len(at_3) > 1 and len(at_4) > 1
    # a shard cut by `keep` comes right after the head
    new = _next_order([2, 2, 3, 2, 2], [0, 1, 2, 3, 4], 5, random.Random(0))
    assert sorted(new[:2]) == [0, 1] and new[2] == 2 and sorted(new[3:]) == [3, 4]


@pytest.mark.parametrize("quota", [3, 4, 6, 7])
def test_epochs_running_across_passes_never_repeat_a_sample(tmp_path: Path, quota: int):
    src = one_per_shard(tmp_path, "s", 10)
    for seed in range(10):
        plan = SourcePlan(src, quota, world_size=1, seed=seed, shuffle=True)
        reads = []
        for epoch in range(12):
            ids = read_ids(plan, epoch)
            assert len(ids) == quota and len(set(ids)) == quota, (seed, epoch, ids)
            reads += ids
        counts = Counter(reads)  # every sample read once per pass
        assert max(counts.values()) - min(counts.values()) <= 1


def test_each_pass_reshuffles_all_shards_when_no_epoch_straddles(tmp_path: Path):
    # 10 samples, 5 per epoch: epoch 2 reads the first half of pass 1. A fresh shard order per pass means it
    # is not (always) the same five samples as epoch 0
    src = one_per_shard(tmp_path, "s", 10)
    for first in (0, 2, 4):  # passes 0/1, 1/2, 2/3
        same = []
        for seed in range(8):
            plan = SourcePlan(src, 5, world_size=1, seed=seed, shuffle=True)
            same.append(set(read_ids(plan, first)) == set(read_ids(plan, first + 2)))
        assert not all(same), f"pass {first // 2 + 1} starts with the same samples as pass {first // 2}"


def test_pass_orders_are_shuffled_only_when_asked(tmp_path: Path):
    src = one_per_shard(tmp_path, "s", 10)
    shuffled = [read_ids(SourcePlan(src, 10, 1, seed, shuffle=True), 0) for seed in range(4)]
    assert any(ids != [(i, 0) for i in range(10)] for ids in shuffled)
    plain = SourcePlan(src, 5, 1, 0, shuffle=False)
    for epoch in range(6):  # unshuffled: every pass in shard order
        assert read_ids(plain, epoch) == [(i, 0) for i in range(5 * (epoch % 2), 5 * (epoch % 2) + 5)]


def test_upsampled_source_gets_a_fresh_order_each_epoch_and_disjoint_rank_slices(tmp_path: Path):
    src = one_per_shard(tmp_path, "s", 10)
    plan = SourcePlan(src, 15, world_size=1, seed=3, shuffle=True)
    assert plan.upsampled
    orders = [tuple(read_ids(plan, e)[:10]) for e in range(5)]
    assert all(sorted(o) == [(i, 0) for i in range(10)] for o in orders)
    assert len(set(orders)) > 1, "the upsampled source is read in the same order every epoch"
    # two ranks: each reads its own half, over and over
    plans = [SourcePlan(src, 8, world_size=2, seed=3, shuffle=True) for _ in range(2)]
    assert plans[0].upsampled
    halves = [read_ids(p, 1, rank) for rank, p in enumerate(plans)]
    for ids in halves:
        assert all(isinstance(x, int) for i in ids for x in i)
        assert len(set(ids)) == 5 and ids[5:] == ids[:3]
    assert set(halves[0]).isdisjoint(halves[1]) and len(set(halves[0]) | set(halves[1])) == 10


# ----------------------------------------------------------------------------- readers
def write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_tar_errors_are_counted_logged_and_reading_goes_on(tmp_path: Path, caplog):
    # a duplicate member is an error in webdataset's grouping: the handler must count it, log it and let
    # the rest of the shard through
    url = write_tar(tmp_path / "dup.tar", [("a.txt", b"A"), ("a.txt", b"A2"), ("b.txt", b"B"), ("c.txt", b"C"),
                                           ("c.txt", b"C2")])
    stats: Counter = Counter()
    with caplog.at_level(logging.WARNING, logger="unifuse.data"):
        keys = [r["__key__"] for r in raw_samples(url, 0, None, stats)]
    assert keys == ["a", "b", "c"]
    assert stats == Counter(tar_error=2)
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("skipping unreadable tar data: ") and "duplicate file name" in m for m in msgs), msgs
    # an unreadable file: counted once
    bad = tmp_path / "garbage.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    stats = Counter()
    assert list(raw_samples(str(bad), 0, None, stats)) == []
    assert stats == Counter(tar_error=1)


def test_worker_init_threads_uses_one_thread():
    before = torch.get_num_threads()
    try:
        worker_init_threads(0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def resampled(sources: list[Source], batches: int, **kw) -> ShardStream:
    return ShardStream(sources, ImageCollator(2, need_image=False), DecodeConfig(), mode="resampled",
                       batches_per_epoch=batches, seed=0, **kw)


def test_resampled_single_source_reads_every_sample_and_counts_skips(tmp_path: Path):
    with ShardWriter(tmp_path / "one", prefix="one", max_samples=3) as w:
        for i in range(6):
            w.write(f"k{i}", {"txt": f"t {i}"})
        w.write("bad", {"txt": "x", "json": b"{not json"})
    dup = write_tar(tmp_path / "one" / "one-dup.tar", [("d.txt", b"D"), ("d.txt", b"D2")])
    shards = sorted(str(p) for p in (tmp_path / "one").glob("one-0*.tar")) + [dup]
    batches = list(resampled([Source("one", shards, counts=[3, 3, 1, 1])], 40, shuffle_buffer=2))
    assert len(batches) == 40
    keys = Counter(k for b in batches for k in b["key"])
    assert set(keys) == {f"k{i}" for i in range(6)} | {"d"}  # the first sample of a shard too
    stats = Counter()
    for b in batches:
        stats.update(b["data_stats"])
    assert stats["bad_json"] > 0 and stats["tar_error"] > 0  # skips in resampled mode are counted too


def test_resampled_sources_go_on_past_shards_without_usable_samples(tmp_path: Path):
    with ShardWriter(tmp_path / "a", prefix="a", max_samples=2) as w:
        for i in range(4):
            w.write(f"a{i}", {"txt": f"a {i}"})
    empty = write_tar(tmp_path / "a" / "zz-empty.tar", [])
    src = Source("a", [str(tmp_path / "a" / "a-000000.tar"), str(tmp_path / "a" / "a-000001.tar"), empty],
                 counts=[2, 2, 0])
    other = one_per_shard(tmp_path, "o", 2)
    batches = list(resampled([src, other], 30))
    assert len(batches) == 30 and sum(k.startswith("a") for b in batches for k in b["key"]) > 0
    # a source whose every shard counts one sample, one of them unusable: the others carry on
    with ShardWriter(tmp_path / "ones", prefix="ones", max_samples=1) as w:
        w.write("ok0", {"txt": "fine"})
        w.write("bad", {"txt": "x", "json": b"{not json"})
        w.write("ok1", {"txt": "fine too"})
    ones = Source("ones", str(tmp_path / "ones"))
    assert ones.counts == [1, 1, 1]
    keys = {k for b in resampled([ones], 10) for k in b["key"]}
    assert keys == {"ok0", "ok1"}


# ----------------------------------------------------------------------------- ShardStream in epoch mode
def coded_source(root: Path, name: str, n: int, weight: float = 1.0, bad_every: int = 0, per_shard: int = 4) -> Source:
    """n samples ``<name><i>`` with VQ codes (an 'image' for the collator); every ``bad_every``-th one has
    text only, which ImageCollator(need_image=True) rejects."""


    with ShardWriter(root / name, prefix=name, max_samples=per_shard) as w:
        for i in range(n):
            member = {"txt": f"{name} {i}"}
            if not (bad_every and i % bad_every == 0):
                member["npy"] = np.full(4, i, dtype=np.int64)
            w.write(f"{name}{i}", member)
    return Source(name, str(root / name), weight)


def epoch_keys(stream: ShardStream, epoch: int = 0) -> tuple[list[str], Counter]:
    stream.set_epoch(epoch)
    batches = list(iter(stream))
    assert len(batches) == len(stream)
    stats: Counter = Counter()
    for b in batches:
        stats.update(b["data_stats"])
    return [k for b in batches for k in b["key"]], stats


def test_two_sources_interleave_and_the_mixing_order_depends_on_the_seed(tmp_path: Path):
    a, b = coded_source(tmp_path, "a", 20), coded_source(tmp_path, "b", 20)
    orders = []
    for seed in range(4):
        keys, _ = epoch_keys(ShardStream([a, b], ImageCollator(4), seed=seed, shuffle_buffer=1))
        first_half = {k[0] for k in keys[:20]}
        assert first_half == {"a", "b"}, "the sources are not mixed along the epoch"
        orders.append("".join(k[0] for k in keys))
    assert len(set(orders)) == 4, "different seeds gave the same mixing order"


def test_a_weight_zero_source_after_the_others_is_never_read(tmp_path: Path):
    a, z = coded_source(tmp_path, "a", 12), coded_source(tmp_path, "z", 8, weight=0.0)
    stream = ShardStream([a, z], ImageCollator(4), seed=0)
    keys, _ = epoch_keys(stream)
    assert keys and all(k.startswith("a") for k in keys)


def test_damaged_shards_are_each_counted(tmp_path: Path):
    src = coded_source(tmp_path, "d", 12)  # three shards of 4
    src = Source("d", src.shards, counts=src.counts, damaged=[True, True, False])
    _, stats = epoch_keys(ShardStream([src], ImageCollator(4), seed=0, shuffle=False))
    assert stats["truncated_tar"] == 2


@pytest.mark.timeout(30)
def test_samples_the_collator_rejects_are_refilled_from_the_sources_by_weight(tmp_path: Path):
    heavy = coded_source(tmp_path, "h", 36, weight=9.0, bad_every=2)  # half rejected by the collator
    light = coded_source(tmp_path, "l", 4, weight=1.0)
    for seed in (0, 1):
        stream = ShardStream([heavy, light], ImageCollator(4), seed=seed, shuffle_buffer=1)
        keys, stats = epoch_keys(stream)
        assert len(keys) == 40 and stats["no_image"] > 0 and stats["refill"] > 0
        # refills are drawn 9:1 like the epoch (about 3 of ~30 from "l"), not uniformly (about 15)
        assert sum(k.startswith("l") for k in keys) < 12, Counter(k[0] for k in keys)


@pytest.mark.timeout(30)
def test_a_source_with_a_single_draw_can_refill(tmp_path: Path):
    # one draw per source per epoch: "t" (text only, always rejected) and "c"; the batch of two is completed
    # with a refill, which may come from either (the text-only one keeps being rejected)
    t = coded_source(tmp_path, "t", 2, bad_every=1, per_shard=1)
    c = coded_source(tmp_path, "c", 2, per_shard=1)
    stream = ShardStream([t, c], ImageCollator(2), batches_per_epoch=1, seed=0, shuffle_buffer=1)
    keys, stats = epoch_keys(stream)
    assert len(keys) == 2 and all(k.startswith("c") for k in keys) and stats["refill"] >= 1


def test_quotas_split_by_largest_remainder():
    from unifuse.data.plan import weighted_quotas

    assert weighted_quotas(10, [1, 2]) == [3, 7]
    assert weighted_quotas(10, [1, 1, 1]) == [4, 3, 3]  # ties: the first source
    assert weighted_quotas(7, [0.5, 0.25, 0.25]) == [3, 2, 2]  # 3.5, 1.75, 1.75: the larger remainders
    for n, w in [(11, [3, 2, 1]), (5, [1, 0, 4]), (100, [0.1, 0.7, 0.2])]:
        q = weighted_quotas(n, w)
        assert sum(q) == n and all(abs(x - n * wi / sum(w)) < 1 for x, wi in zip(q, w)), q


def test_shuffle_buffer_of_two_shuffles_locally():
    import random

    from unifuse.data.stream import _shuffled

    outs = [list(_shuffled(iter(range(20)), 2, random.Random(seed))) for seed in range(8)]
    assert all(sorted(o) == list(range(20)) for o in outs)
    assert all(o[0] in (0, 1) for o in outs)  # a buffer of two holds the first two items only
    assert any(o != list(range(20)) for o in outs)


def test_constructor_checks_and_defaults(tmp_path: Path, monkeypatch):
    import unifuse.data.stream as st

    a = coded_source(tmp_path, "a", 12)
    with pytest.raises(ValueError, match="data mode must be 'epoch', 'resampled' or 'once', not 'bogus'"):
        ShardStream([a], ImageCollator(4), mode="bogus")
    with pytest.raises(ValueError, match="^no data sources given$"):
        ShardStream([], ImageCollator(4))
    for weights in ([-1.0, 2.0], [0.0, 0.0]):
        srcs = [Source("a", a.shards, w) for w in weights]
        with pytest.raises(ValueError, match="source weights must be >= 0 and not all 0"):
            ShardStream(srcs, ImageCollator(4))
    ShardStream([Source("a", a.shards, 0.5), Source("b", a.shards, 0.25)], ImageCollator(4))  # fractions are fine
    with pytest.raises(ValueError, match="^12 samples cannot fill one batch of 40 on each of 1 ranks; lower the batch "
                                         "size or add data$"):
        ShardStream([a], ImageCollator(40))
    tiny = coded_source(tmp_path, "tiny", 1)
    with pytest.raises(ValueError, match="source 'tiny' has 1 samples, fewer than the 2 ranks; every rank needs"):
        ShardStream([a, tiny], ImageCollator(2), rank=0, world_size=2)
    s = ShardStream([a], ImageCollator(4))
    assert (s.rank, s.world_size) == (0, 1)
    assert (s.shuffle, s.shuffle_buffer, s.seed, s.max_warnings, s.drop_last) == (True, 1000, 0, 50, True)
    s = ShardStream([a], ImageCollator(4), rank=0)  # half given: both come from torch.distributed (not running)
    assert (s.rank, s.world_size) == (0, 1)
    monkeypatch.setattr(st.dist, "is_available", lambda: True)
    monkeypatch.setattr(st.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(st.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(st.dist, "get_world_size", lambda: 2)
    s = ShardStream([a], ImageCollator(2))
    assert (s.rank, s.world_size) == (1, 2)


def test_drop_last_false_rounds_the_batch_count_up(tmp_path: Path):
    a = coded_source(tmp_path, "a", 10)
    stream = ShardStream([a], ImageCollator(4), drop_last=False, seed=0)
    assert len(stream) == 3
    keys, _ = epoch_keys(stream)
    assert len(keys) == 12 and set(keys) == {f"a{i}" for i in range(10)}


def test_a_fresh_stream_runs_epoch_0_and_then_counts_its_own_epochs(tmp_path: Path):
    a = coded_source(tmp_path, "a", 24)

    def make():
        return ShardStream([a], ImageCollator(4), seed=3, shuffle_buffer=8)

    fresh = make()
    runs = [[k for b in iter(fresh) for k in b["key"]] for _ in range(3)]  # persistent worker: epochs 0, 1, 2
    for epoch, keys in enumerate(runs):
        assert keys == epoch_keys(make(), epoch)[0], epoch
    assert runs[0] != runs[1] != runs[2]


def test_seed_and_shuffle_reach_the_shard_order_and_the_buffer(tmp_path: Path):
    a = coded_source(tmp_path, "a", 24)  # six shards of 4
    shard_order = [epoch_keys(ShardStream([a], ImageCollator(4), seed=s, shuffle_buffer=1))[0] for s in range(4)]
    assert len({tuple(k) for k in shard_order}) == 4, "the seed does not reach the shard order"
    assert any(k != [f"a{i}" for i in range(24)] for k in shard_order)
    one = coded_source(tmp_path, "one", 16, per_shard=16)  # one shard: only the buffer can shuffle
    buffered = [epoch_keys(ShardStream([one], ImageCollator(4), seed=s, shuffle_buffer=100))[0] for s in range(4)]
    assert len({tuple(k) for k in buffered}) == 4, "the shuffle buffer ignores the seed"
    again = epoch_keys(ShardStream([one], ImageCollator(4), seed=0, shuffle_buffer=100))[0]
    assert again == buffered[0], "the same seed and epoch must give the same order"


def test_unshuffled_streams_read_the_first_samples_in_order_every_epoch(tmp_path: Path):
    a = coded_source(tmp_path, "a", 10)
    stream = ShardStream([a], ImageCollator(4), shuffle=False)
    for epoch in (0, 1, 3):
        assert epoch_keys(stream, epoch)[0] == [f"a{i}" for i in range(8)]


def test_rank_slices_rotate_evenly_over_epochs(tmp_path: Path):
    # 11 samples, 2 ranks x 5 per epoch: over 11 epochs every sample is read 10 times, give or take one
    src = one_per_shard(tmp_path, "s", 11)
    plans = [SourcePlan(src, 5, world_size=2, seed=1, shuffle=True) for _ in range(2)]
    assert not plans[0].upsampled
    reads = Counter(i for e in range(11) for r, p in enumerate(plans) for i in read_ids(p, e, r))
    assert max(reads.values()) - min(reads.values()) <= 1, reads


def test_skips_and_rejections_are_counted_exactly_and_logged(tmp_path: Path, caplog):
    with ShardWriter(tmp_path / "s", prefix="s", max_samples=100) as w:
        w.write("t0", {"txt": "text only"})
        w.write("t1", {"txt": "text only"})
        for i in range(2, 6):
            w.write(f"c{i}", {"txt": "ok", "npy": np.array([i])})
        w.write("bad1", {"txt": "x", "json": b"{"})
        w.write("bad2", {"txt": "x", "json": b"["})
        for i in range(8, 12):
            w.write(f"c{i}", {"txt": "ok", "npy": np.array([i])})
    src = Source("s", str(tmp_path / "s"))
    with caplog.at_level(logging.WARNING, logger="unifuse.data"):
        stream = ShardStream([src], ImageCollator(2), shuffle=False, max_warnings=1)
        batches = list(iter(stream))
    assert len(batches) == 6
    assert batches[0]["key"] == ["c2", "c3"] and batches[0]["data_stats"] == {"no_image": 2}
    total = Counter()
    for b in batches:
        total.update(b["data_stats"])
    # the refill pass reads t0, t1 (rejected again) and c2..c5, not the bad ones
    assert total["bad_json"] == 2 and total["no_image"] == 4 and total["refill"] == 6
    assert [b["data_stats"].get("bad_json", 0) for b in batches][2] == 2  # two skips in one batch, counted 2
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped sample")]
    assert warned == [f"skipped sample bad1 in {src.shards[0]}: bad_json: " + warned[0].split("bad_json: ", 1)[1]]
    assert len(warned) == 1  # max_warnings=1


def test_damaged_shards_are_logged_and_unusable_pieces_fail_clearly(tmp_path: Path, caplog):
    src = coded_source(tmp_path, "d", 8)
    damaged = Source("d", src.shards, counts=src.counts, damaged=[True, False])
    with caplog.at_level(logging.WARNING, logger="unifuse.data"):
        epoch_keys(ShardStream([damaged], ImageCollator(4), shuffle=False))
    assert f"reading the intact part of damaged shard {src.shards[0]}" in [r.getMessage() for r in caplog.records]
    with ShardWriter(tmp_path / "x", prefix="x", max_samples=100) as w:
        for i in range(4):
            w.write(f"bad{i}", {"txt": "x", "json": b"{"})
    nothing = Source("x", str(tmp_path / "x"))
    with pytest.raises(RuntimeError, match=r"no usable samples in source 'x' pieces .* of rank 0; skip counts so far: "
                                           r"\{'bad_json': 4\}"):
        list(iter(ShardStream([nothing], ImageCollator(2), shuffle=False)))
    # one usable sample is enough to refill from
    with ShardWriter(tmp_path / "y", prefix="y", max_samples=100) as w:
        w.write("good", {"txt": "ok", "npy": np.array([1])})
        w.write("bad", {"txt": "x", "json": b"{"})
    keys, stats = epoch_keys(ShardStream([Source("y", str(tmp_path / "y"))], ImageCollator(2), shuffle=False))
    assert keys == ["good", "good"] and stats["refill"] == 1


def test_tar_errors_are_counted_in_epoch_mode(tmp_path: Path):
    shards = [write_tar(tmp_path / "dup.tar", [("a.txt", b"A"), ("a.npy", b"x"), ("a.txt", b"A2"), ("b.txt", b"B")])]
    src = Source("dup", shards, counts=[2])
    _, stats = epoch_keys(ShardStream([src], ImageCollator(2, need_image=False), shuffle=False))
    assert stats["tar_error"] >= 1


def test_sources_with_given_counts_are_undamaged_unless_told():
    src = Source("u", ["pipe:cat a.tar", "pipe:cat b.tar"], counts=[3, 4])
    assert src.damaged == [False, False] and src.total == 7


def test_iter_decoded_drops_members_and_counts_into_stats(tmp_path: Path):
    from unifuse.data.read import iter_decoded

    with ShardWriter(tmp_path / "s", prefix="s", max_samples=100) as w:
        w.write("k0", {"txt": "zero", "npy": np.array([1]), "pyd": b"never decoded"})
        w.write("k1", {"txt": "one", "json": b"{"})
    write_tar(tmp_path / "s" / "s-dup.tar", [("d.txt", b"D"), ("d.txt", b"D2")])
    stats: Counter = Counter()
    samples = list(iter_decoded(str(tmp_path / "s"), DecodeConfig(require_caption=False), stats))
    assert [s.key for s in samples] == ["k0", "d"] and samples[0].codes is not None
    assert stats == Counter(ignored_member=1, bad_json=1, tar_error=1)
    stats = Counter()
    samples = list(iter_decoded(str(tmp_path / "s"), DecodeConfig(require_caption=False), stats,
                                drop_exts=("npy", "json")))
    assert [s.key for s in samples] == ["k0", "k1", "d"] and samples[0].codes is None and samples[1].text == "one"
    assert stats == Counter(ignored_member=1, tar_error=1)
