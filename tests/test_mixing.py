"""Several sources mixed by weight in ``data.mode=epoch``: shares per epoch, upsampling, rotation
of a large source's slice over epochs, equal batches and disjoint keys across ranks and workers."""

from __future__ import annotations

import copy
import math
from collections import Counter
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

import unifuse.data.stream as st
from unifuse.data.collate import ImageCollator
from unifuse.data.read import Source
from unifuse.data.samples import DecodeConfig
from unifuse.data.stream import ShardStream
from unifuse.data.writer import ShardWriter

BS = 4


def text_source(root: Path, name: str, n: int, weight: float) -> Source:
    """n text-only samples keyed ``<name>_<i>`` in shards of unequal size (7, 7, ..., the rest)."""
    with ShardWriter(root / name, prefix=name, max_samples=7) as w:
        for i in range(n):
            w.write(f"{name}_{i}", {"txt": f"{name} sample {i}"})
    return Source(name, str(root / name), weight)


def make_stream(sources: list[Source], rank: int, world: int) -> ShardStream:
    return ShardStream(sources, ImageCollator(BS, need_image=False), DecodeConfig(), shuffle=True,
                       shuffle_buffer=4, seed=7, rank=rank, world_size=world)


def emulated_workers(stream: ShardStream, workers: int) -> list[dict]:
    """What a DataLoader with ``workers`` workers yields, in one process (each worker holds a copy)."""
    if workers == 1:
        return list(iter(stream))
    batches = []
    orig = st.get_worker_info
    try:
        for w in range(workers):
            st.get_worker_info = lambda w=w: type("I", (), {"id": w, "num_workers": workers})()
            batches += list(iter(copy.deepcopy(stream)))
    finally:
        st.get_worker_info = orig
    return batches


def dataloader_workers(stream: ShardStream, workers: int) -> list[dict]:
    return list(DataLoader(stream, batch_size=None, num_workers=workers))


def source_of(key: str) -> str:
    return key.split("_")[0]


def run_epoch(sources: list[Source], epoch: int, world: int, workers: int, read=emulated_workers) -> list[dict]:
    """One epoch on every rank: per rank, the keys of each source and the summed data_stats."""
    ranks = []
    for rank in range(world):
        stream = make_stream(sources, rank, world)
        stream.set_epoch(epoch)
        batches = read(stream, workers)
        assert len(batches) == len(stream), "a rank yielded a different number of batches than planned"
        stats: Counter = Counter()
        keys: dict[str, list[str]] = {s.name: [] for s in sources}
        for b in batches:
            stats.update(b["data_stats"])
            for k in b["key"]:
                keys[source_of(k)].append(k)
        ranks.append({"batches": len(batches), "keys": keys, "stats": stats})
    return ranks


def check_epoch(sources: list[Source], ranks: list[dict], upsampled: set[str]) -> None:
    world = len(ranks)
    assert len({r["batches"] for r in ranks}) == 1, "ranks yielded different batch counts"
    wsum = sum(s.weight for s in sources)
    for r in ranks:
        n = sum(len(v) for v in r["keys"].values())
        assert n == r["batches"] * BS
        assert r["stats"]["refill"] == 0, "clean data needs no refill"
        for s in sources:
            keys = r["keys"][s.name]
            # each source's share of the epoch follows its weight (within one batch)
            assert abs(len(keys) - n * s.weight / wsum) <= BS, (s.name, len(keys), n)
            repeats = len(keys) - len(set(keys))
            assert r["stats"][f"upsampled/{s.name}"] == repeats, f"repeats of {s.name} not counted as upsampled"
            if s.name in upsampled:
                assert repeats > 0 and len(set(keys)) == s.total // world
            else:
                assert repeats == 0, f"{s.name} repeated a sample in one epoch"
        assert r["stats"]["upsampled"] == sum(r["stats"][f"upsampled/{s.name}"] for s in sources)
    for s in sources:
        if s.name not in upsampled:
            seen = [k for r in ranks for k in r["keys"][s.name]]
            assert len(seen) == len(set(seen)), f"ranks read overlapping samples of {s.name}"


def check_rotation(sources: list[Source], epochs: list[list[dict]], name: str) -> None:
    """A source read below its size serves a new slice each epoch: the first ceil(total / per epoch)
    epochs see all of it, and after E epochs no sample was read twice more often than another."""
    src = next(s for s in sources if s.name == name)
    per_epoch = sum(len(r["keys"][name]) for r in epochs[0])
    k = math.ceil(src.total / per_epoch)
    assert k >= 2 and len(epochs) >= k
    seen = Counter(key for ranks in epochs for r in ranks for key in r["keys"][name])
    first_k = {key for ranks in epochs[:k] for r in ranks for key in r["keys"][name]}
    assert first_k == {f"{name}_{i}" for i in range(src.total)}, "some samples of the large source never came"
    counts = [seen[f"{name}_{i}"] for i in range(src.total)]
    assert max(counts) - min(counts) <= 1, f"uneven reads over {len(epochs)} epochs: {Counter(counts)}"


@pytest.fixture
def two_sources(tmp_path: Path) -> list[Source]:
    return [text_source(tmp_path, "big", 40, 1.0), text_source(tmp_path, "small", 8, 1.0)]


@pytest.fixture
def three_sources(tmp_path: Path) -> list[Source]:
    return [text_source(tmp_path, "a", 36, 1.0), text_source(tmp_path, "b", 12, 1.0),
            text_source(tmp_path, "c", 6, 2.0)]


def test_40_8_single_process_the_reported_case(two_sources):
    """40 + 8 samples, equal weights, batch 4: 48 samples, 24 from each; the 8 are read 3 times."""
    ranks = run_epoch(two_sources, 0, world=1, workers=1)
    (r,) = ranks
    assert r["batches"] == 12
    assert len(r["keys"]["big"]) == 24 and len(set(r["keys"]["big"])) == 24
    assert len(r["keys"]["small"]) == 24 and len(set(r["keys"]["small"])) == 8
    assert r["stats"]["upsampled/small"] == 16 and r["stats"]["refill"] == 0
    check_epoch(two_sources, ranks, upsampled={"small"})


@pytest.mark.parametrize("world,workers", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_40_8_shares_upsampling_rotation(two_sources, world: int, workers: int):
    epochs = [run_epoch(two_sources, e, world, workers) for e in range(5)]
    for ranks in epochs:
        check_epoch(two_sources, ranks, upsampled={"small"})
    check_rotation(two_sources, epochs, "big")
    assert epochs[0][0]["keys"]["big"] != epochs[1][0]["keys"]["big"]


@pytest.mark.parametrize("world,workers,upsampled", [(1, 1, {"b", "c"}), (2, 1, {"c"}), (2, 3, {"c"})])
def test_three_sources(three_sources, world: int, workers: int, upsampled: set[str]):
    # per rank: world 1 -> 52 samples, 13/13/26 (b: 12 held, c: 6 held); world 2 -> 24, 6/6/12 (b: 6 per rank)
    epochs = [run_epoch(three_sources, e, world, workers) for e in range(5)]
    for ranks in epochs:
        check_epoch(three_sources, ranks, upsampled)
    check_rotation(three_sources, epochs, "a")


def test_three_sources_two_ranks_dataloader_workers(three_sources):
    """Real DataLoader worker processes give the same epoch as the emulated ones."""
    for epoch in range(3):
        real = run_epoch(three_sources, epoch, world=2, workers=2, read=dataloader_workers)
        check_epoch(three_sources, real, upsampled={"c"})
        emulated = run_epoch(three_sources, epoch, world=2, workers=2)
        for a, b in zip(real, emulated):
            assert {n: sorted(v) for n, v in a["keys"].items()} == {n: sorted(v) for n, v in b["keys"].items()}


def test_single_source_reads_each_sample_once_per_pass(tmp_path: Path):
    """One source: no repeats in an epoch, nothing counted as upsampled or refill, and the samples
    left over by the batch rounding come first in the next epoch rather than being lost."""
    src = [text_source(tmp_path, "only", 35, 1.0)]
    epochs = [run_epoch(src, e, world=2, workers=2) for e in range(4)]
    for ranks in epochs:
        check_epoch(src, ranks, upsampled=set())
        assert all(r["batches"] == 4 and not r["stats"] for r in ranks)
    check_rotation(src, epochs, "only")


def test_weights_must_be_usable(tmp_path: Path):
    a = text_source(tmp_path, "a", 8, 1.0)
    with pytest.raises(ValueError, match="weight"):
        make_stream([a, text_source(tmp_path, "neg", 8, -1.0)], 0, 1)
    with pytest.raises(ValueError, match="fewer than the 2 ranks"):
        make_stream([a, text_source(tmp_path, "tiny", 1, 1.0)], 0, 2)


def test_packed_rows_plan_epochs_in_samples_not_rows(tmp_path: Path):
    """A PackingCollator puts ~3 short documents in a row: the epoch plan counts samples per batch from
    packing, so an epoch over 2 ranks x 2 workers is about one pass (no sample twice, few left for
    the next epoch), not one pass per document in a row with the rest read again as ``refill``."""
    from unifuse.data.collate import PackingCollator

    src = [text_source(tmp_path, "p", 240, 1.0)]
    collator = PackingCollator(batch_size=2, seq_len=48)  # "p sample 123": 14 positions, 3 per row
    seen: Counter = Counter()
    for rank in range(2):
        stream = ShardStream(src, collator, DecodeConfig(), shuffle=True, shuffle_buffer=4, seed=7, rank=rank,
                             world_size=2)
        assert 6 <= stream.samples_per_batch <= 7  # 3 documents of 14 positions or 4 of 12 in a row of 48
        batches = emulated_workers(stream, 2)
        assert len(batches) == len(stream) == int(120 / stream.samples_per_batch)  # 120 samples per rank
        assert sum(sum(b["data_stats"].values()) for b in batches) <= 2  # at most a refill per worker
        for b in batches:
            for row, docs in zip(b["tokens"], b["doc_id"]):
                for d in docs.unique()[docs.unique() >= 0]:
                    ids = [int(t) for t in row[docs == d] if t < collator.vocab.text_size]
                    seen[collator.tokenizer.decode(ids)] += 1
    assert max(seen.values()) == 1, "a sample was read twice in one epoch"
    assert len(seen) >= 0.95 * 240
