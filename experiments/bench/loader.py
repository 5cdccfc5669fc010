"""Loader throughput: decoded 64x64 samples/s for one worker through unifuse's shard stream
(webdataset tar grouping + safe decode + batching), against a bare PIL decode loop over the same
tar bytes, in the same run. Targets: >= 1,500 samples/s per worker, ratio >= 0.8.

    python experiments/bench/loader.py [--shards DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unifuse.data.collate import ImageCollator
from unifuse.data.read import Source
from unifuse.data.samples import DecodeConfig
from unifuse.data.shards import expand_shards
from unifuse.data.stream import ShardStream


def bare_pil(paths: list[str]) -> int:
    n = 0
    for p in paths:
        with tarfile.open(p, "r:") as tar:
            for info in tar:
                if info.name.endswith(".png"):
                    im = Image.open(io.BytesIO(tar.extractfile(info).read())).convert("RGB")
                    np.asarray(im)
                    n += 1
    return n


def unifuse_stream(paths: list[str], batch: int) -> int:
    stream = ShardStream([Source("bench", paths)], ImageCollator(batch), DecodeConfig(image_size=64),
                         shuffle=False, drop_last=True)
    return sum(len(b["key"]) for b in stream)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", default=None, help="64x64 shards; default: build twemoji at 64 in a temp dir")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.shards is None:
        from unifuse.data.builders import build_emoji

        tmp = Path(tempfile.mkdtemp())
        build_emoji(tmp, size=64, styles=("twemoji",), val_percent=0.0)
        a.shards = str(tmp / "train")
    paths = expand_shards(a.shards)
    bare_pil(paths[:1]), unifuse_stream(paths[:1], a.batch)  # warm page cache and imports
    rows = []
    for r in range(a.repeats):
        t = time.perf_counter()
        n_bare = bare_pil(paths)
        t_bare = time.perf_counter() - t
        t = time.perf_counter()
        n_ours = unifuse_stream(paths, a.batch)
        t_ours = time.perf_counter() - t
        rows.append((n_bare / t_bare, n_ours / t_ours))
        print(f"repeat {r}: bare PIL {n_bare / t_bare:7.0f} samples/s ({n_bare} samples) | "
              f"unifuse stream {n_ours / t_ours:7.0f} samples/s ({n_ours} samples) | "
              f"ratio {n_ours / t_ours / (n_bare / t_bare):.2f}")
    bare, ours = np.median(np.array(rows), axis=0)
    print(f"median: unifuse {ours:.0f} samples/s per worker (target >= 1500), bare PIL {bare:.0f}, "
          f"ratio {ours / bare:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
