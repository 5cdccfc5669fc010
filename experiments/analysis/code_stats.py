"""How learnable are a tokenizer's codes? Prints, for pre-encoded code shards and the image shards
they came from: codes used, unigram code perplexity, and how many distinct codes encode a plain
background patch (all pixels >= ``--bg``), with their perplexity. Near-duplicate background codes
cost nothing in reconstruction but make the generators' targets noisy.

    python experiments/analysis/code_stats.py --codes data/emoji32_codes/<tag>/train --images data/emoji32/train
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np

from unifuse.data.read import iter_decoded
from unifuse.data.samples import DecodeConfig


def perplexity(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codes", required=True, help="code shards (directory or brace pattern)")
    ap.add_argument("--images", required=True, help="the image shards they were encoded from")
    ap.add_argument("--bg", type=int, default=250, help="a patch whose pixels are all >= this is background")
    a = ap.parse_args()
    stats: Counter = Counter()
    codes = {s.key: np.asarray(s.codes) for s in iter_decoded(a.codes, DecodeConfig(), stats)}
    if not codes:
        raise SystemExit(f"no codes in {a.codes}")
    grid = next(iter(codes.values())).reshape(-1).size
    side = int(round(grid ** 0.5))
    all_codes = np.concatenate([c.reshape(-1) for c in codes.values()])
    used = np.bincount(all_codes)
    print(f"{len(codes)} images, {side}x{side} codes: {int((used > 0).sum())} codes used, "
          f"unigram perplexity {perplexity(used):.1f}")
    bg: Counter = Counter()
    patches = 0
    for s in iter_decoded(a.images, DecodeConfig(image_size=None), stats):
        c = codes.get(s.key)
        if c is None or not s.images:
            continue
        im, c = s.images[0], c.reshape(side, side)
        ps = im.shape[0] // side
        blocks = im[: ps * side, : ps * side].reshape(side, ps, side, ps, -1).min(axis=(1, 3, 4))
        for code in c[blocks >= a.bg]:
            bg[int(code)] += 1
        patches += side * side
    n_bg = sum(bg.values())
    if not n_bg:
        print("no background patches found")
        return
    print(f"background patches: {n_bg} of {patches} ({n_bg / patches:.0%}) use {len(bg)} distinct codes, "
          f"perplexity {perplexity(np.array(list(bg.values()))):.1f}; top shares "
          f"{[round(v / n_bg, 3) for _, v in bg.most_common(5)]}")


if __name__ == "__main__":
    main()
