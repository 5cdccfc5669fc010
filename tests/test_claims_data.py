"""Data claims (data/samples.py): ``.npy`` members are loaded with ``allow_pickle=False``, so an object
array in a shard is a skipped, counted sample, never unpickled."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from unifuse.data.collate import ImageCollator
from unifuse.data.samples import DecodeConfig, SkipSample, decode_sample
from unifuse.data.shards import ShardWriter
from unifuse.data.stream import ShardStream, Source


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
