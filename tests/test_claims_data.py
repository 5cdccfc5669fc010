"""Data claims: ``.npy`` members are loaded with ``allow_pickle=False``, so an object array in a shard
is a skipped, counted sample, never unpickled (data/samples.py); a validation pass reads every sample of
the split once, whatever the ranks, workers and collator (data/stream.py, ``mode="once"``); the data log
line of a split counts that split's batches (callbacks.DataStatsCallback)."""

from __future__ import annotations

import io
import logging
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from unifuse.data.collate import ImageCollator, PackingCollator
from unifuse.data.datamodule import ShardDataModule
from unifuse.data.read import Source
from unifuse.data.samples import DecodeConfig, SkipSample, decode_sample
from unifuse.data.stream import ShardStream
from unifuse.data.writer import ShardWriter
from unifuse.run.callbacks import DataStatsCallback


class Canary:
    """Unpickling this creates a file: proof of code execution if it ever happens."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def object_array(canary: Path) -> np.ndarray:
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = Canary(str(canary)), "x"
    return arr


def test_object_npy_is_skipped_not_unpickled(tmp_path: Path):
    canary = tmp_path / "PWNED"
    raw = {"__key__": "evil", "__url__": "mem", "npy": npy_bytes(object_array(canary)), "txt": b"has codes"}
    stats = Counter()
    with pytest.raises(SkipSample) as e:
        decode_sample(raw, DecodeConfig(), stats)
    assert e.value.reason == "bad_npy" and not canary.exists()
    # a plain integer array in the same member decodes
    good = {"__key__": "ok", "__url__": "mem", "npy": npy_bytes(np.arange(16, dtype=np.int16).reshape(4, 4))}
    s = decode_sample(good, DecodeConfig(), stats)
    assert s.codes.dtype == np.int16 and s.codes.shape == (4, 4) and s.kind == "image"


def test_object_npy_in_a_shard_is_counted_and_the_stream_goes_on(tmp_path: Path):
    canary = tmp_path / "PWNED"
    codes = [np.full((2, 2), i, dtype=np.int16) for i in range(5)]
    with ShardWriter(tmp_path / "codes", prefix="c", max_samples=100) as w:
        for i in range(5):
            w.write(f"ok{i}", {"npy": npy_bytes(codes[i]), "txt": f"caption {i}"})
            if i == 2:
                w.write("evil", {"npy": npy_bytes(object_array(canary)), "txt": "pickled codes"})
    stream = ShardStream([Source("codes", str(tmp_path / "codes"))], ImageCollator(1, need_image=False),
                         DecodeConfig(), shuffle=False)
    batches = list(iter(stream))
    stats = Counter()
    for b in batches:
        stats.update(b["data_stats"])
    keys = [k for b in batches for k in b["key"]]
    assert not canary.exists(), "an object array from a shard was unpickled"
    assert stats["bad_npy"] == 1 and "evil" not in keys
    assert len(batches) == len(stream) == 6 and set(keys) == {f"ok{i}" for i in range(5)}
    assert stats["refill"] == 1  # the lost sample is replaced by a repeat, the batch count stays


# ----------------------------------------------------------------------------- validation: each sample once
def sample_ids(batch: dict) -> list[str]:
    """The samples of a batch: keys of image batches, the caption's number in packed rows."""
    return batch["key"] if "key" in batch else [c.rsplit(" ", 1)[1] for c in batch["image_caption"]]


@pytest.mark.parametrize("world,workers,packed", [(1, 0, False), (1, 3, True), (2, 2, False), (2, 1, True)])
@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_validation_reads_every_sample_of_the_split_once(tmp_path, uneven_shards, world, workers, packed):
    """141 samples in shards of 40, 47 and 54 and a shard with an unreadable image, as the validation
    split: each pass of the ranks' validation loaders holds every readable sample exactly once (the
    last batch of a rank smaller), in as many batches as the loader's length, the same every pass."""
    with ShardWriter(tmp_path / "bad", prefix="bad") as w:
        w.write("broken", {"png": b"not a png", "txt": "a box, picture broken"})
    collator = (PackingCollator(4, 48, image_tokens=4, max_text_len=8, caption_first=1.0) if packed
                else ImageCollator(8))
    want = {f"img{i:04d}" for i in range(141)} if not packed else {str(i) for i in range(141)}
    seen, passes, skipped = [], [], 0
    for rank in range(world):
        dm = ShardDataModule({"main": {"shards": f"{uneven_shards}/train"}}, collator,
                             val=[f"{uneven_shards}/train", str(tmp_path / "bad")],
                             decode=DecodeConfig(image_size=16), num_workers=workers)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)
        loader = dm.val_dataloader()
        for _ in range(2):
            batches = list(loader)
            passes.append([sample_ids(b) for b in batches])
            assert len(batches) == len(loader), f"rank {rank}: {len(batches)} batches, its length {len(loader)}"
            skipped += sum(b["data_stats"].get("corrupt_image", 0) for b in batches)
        seen += [k for ids in passes[-1] for k in ids]
        assert passes[-1] == passes[-2], "validation changed between passes"
    assert len(seen) == len(set(seen)), "a sample was validated twice in one pass"
    assert set(seen) == want, f"samples never validated: {sorted(want - set(seen))[:5]}"
    assert skipped == 2, "the unreadable image is counted once a pass"


def test_validation_batches_keep_the_first_ones_and_each_rank_needs_a_sample(uneven_shards):
    """``data.val_batches`` (the stream's ``batches_per_epoch``) keeps the first batches of the pass; a
    split with fewer samples than ranks is an error, not an empty rank."""
    src = Source("v", f"{uneven_shards}/val")  # 16 samples

    def once(**kw) -> ShardStream:
        return ShardStream([src], ImageCollator(5), DecodeConfig(image_size=16), mode="once", shuffle=False, **kw)

    full = [b["key"] for b in once()]
    assert [len(k) for k in full] == [5, 5, 5, 1]
    assert len(once(batches_per_epoch=2)) == 2 and [b["key"] for b in once(batches_per_epoch=2)] == full[:2]
    with pytest.raises(ValueError, match="^16 samples cannot give each of 17 ranks one$"):
        once(rank=0, world_size=17)


def test_data_log_line_of_a_split_counts_that_splits_batches(caplog):
    """Validation ends inside the training epoch, before it: its line must not take the training
    batches' counts (refills of the training stream once read as validation's)."""
    logged = []
    trainer = SimpleNamespace(is_global_zero=True, current_epoch=3, sanity_checking=False, global_step=7,
                              loggers=[SimpleNamespace(log_metrics=lambda m, step: logged.append(m))])
    cb = DataStatsCallback()
    for _ in range(2):  # two epochs
        cb.on_train_batch_end(trainer, None, None, {"data_stats": {"refill": 5}}, 0)
        cb.on_validation_batch_end(trainer, None, None, {"data_stats": {"no_caption": 1}}, 0)
        with caplog.at_level(logging.INFO, logger="unifuse"):
            cb.on_validation_epoch_end(trainer, None)
            cb.on_train_epoch_end(trainer, None)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data (")]
    assert lines == ["data (val, epoch 3): no_caption=1", "data (train, epoch 3): refill=5"] * 2
    assert logged[-2:] == [{"data/val/no_caption": 2.0}, {"data/refill": 10.0}]  # totals over the epochs
