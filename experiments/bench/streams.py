"""Shard specs and source mixing cost nothing per sample: decoded 64x64 samples/s for one worker
through the shard stream when the same shards are given as local paths (the baseline), as
``file://`` URLs, as ``pipe:cat`` commands (both through webdataset's ``gopen``), and split into
three sources mixed by weight in ``data.mode=epoch`` (one of them upsampled). Ratios against the
local-path stream of the same repeat. Targets: every ratio >= 0.9.

    python experiments/bench/streams.py [--shards DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shlex
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from unifuse.data.collate import ImageCollator
from unifuse.data.read import Source
from unifuse.data.samples import DecodeConfig
from unifuse.data.shards import expand_shards, shard_counts
from unifuse.data.stream import ShardStream


def run(sources: list[Source], batch: int) -> tuple[int, dict]:
    stream = ShardStream(sources, ImageCollator(batch), DecodeConfig(image_size=64), shuffle=False, drop_last=True)
    n, stats = 0, {}
    for b in stream:
        n += len(b["key"])
        for k, v in b["data_stats"].items():
            stats[k] = stats.get(k, 0) + v
    return n, stats


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
        build_emoji(tmp / "emoji", size=64, styles=("twemoji",), val_percent=0.0, shard_size=500)
        a.shards = str(tmp / "emoji" / "train")
    paths = expand_shards(a.shards)
    assert len(paths) >= 3, "need at least 3 shards to split into 3 sources"
    counts = shard_counts(paths)
    variants = {
        "local paths": [Source("all", paths)],
        "file:// URLs": [Source("all", ["file://" + str(Path(p).resolve()) for p in paths])],
        "pipe:cat": [Source("all", [f"pipe:cat {shlex.quote(p)}" for p in paths])],
        # three sources: the first shard weighted up (upsampled), the rest split in two
        "3 sources mixed": [Source("a", paths[:1], 2.0), Source("b", paths[1::2], 1.0),
                            Source("c", paths[2::2], 1.0)],
    }
    for v in variants.values():  # counts (file:// and pipe: are counted once and cached), imports, page cache
        run([Source(s.name, s.shards[:1], s.weight) for s in v], a.batch)
    print(f"{len(paths)} shards, {sum(counts)} samples, batch {a.batch}, one worker")
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(a.repeats):
        line = []
        for name, sources in variants.items():
            t = time.perf_counter()
            n, stats = run(sources, a.batch)
            rate = n / (time.perf_counter() - t)
            rates[name].append(rate)
            extra = f" (upsampled {stats.get('upsampled', 0)})" if "upsampled" in stats else ""
            line.append(f"{name} {rate:6.0f}/s{extra}")
        print(f"repeat {r}: " + " | ".join(line))
    base = np.median(rates["local paths"])
    for name, rs in rates.items():
        ratios = [x / y for x, y in zip(rs, rates["local paths"])]
        print(f"median {name:16s} {np.median(rs):7.0f} samples/s, ratio to local paths {np.median(ratios):.2f}"
              + ("" if name == "local paths" else " (target >= 0.9)"))
    print(f"baseline: {base:.0f} samples/s")


if __name__ == "__main__":
    main()
