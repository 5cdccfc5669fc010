"""Progress for long steps (FID generation and features, evaluation, domain-extractor training, BPE
training, counting shard samples): a tqdm bar when stderr is a terminal, otherwise a log line every
``every_s`` seconds (and at the end), so batch jobs and CI logs show that something is moving and
how long it will take. Only rank 0 reports (``RANK`` / ``LOCAL_RANK`` unset or 0)."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator

log = logging.getLogger("unifuse")


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def interactive() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)()) and is_rank_zero()


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def progress(iterable: Iterable, total: int | None = None, desc: str = "", unit: str = "it",
             every_s: float = 10.0, enabled: bool = True) -> Iterator:
    """Yield from ``iterable`` while reporting progress and an ETA (when ``total`` is known)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not enabled or not is_rank_zero():
        yield from iterable
        return
    if interactive():
        from tqdm import tqdm

        yield from tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True)
        return
    start = last = time.perf_counter()
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= every_s:
            last = now
            log.info("%s", _line(desc, done, total, unit, now - start))
    if done and time.perf_counter() - start >= every_s:
        log.info("%s (done)", _line(desc, done, total, unit, time.perf_counter() - start))


def _line(desc: str, done: int, total: int | None, unit: str, elapsed: float) -> str:
    rate = done / max(elapsed, 1e-9)
    if total:
        eta = (total - done) / max(rate, 1e-9)
        return f"{desc}: {done}/{total} {unit} ({100 * done / total:.0f}%), {rate:.2f} {unit}/s, " \
               f"elapsed {_fmt(elapsed)}, ETA {_fmt(eta)}"
    return f"{desc}: {done} {unit}, {rate:.2f} {unit}/s, elapsed {_fmt(elapsed)}"
