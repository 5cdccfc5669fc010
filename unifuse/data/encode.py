"""Pre-encoding image shards into code shards with a trained VQ-VAE tokenizer, so generators
train without running the tokenizer each step (as LlamaGen does). Output samples keep the
caption/cls/json and carry the codes as ``KEY.npy`` (int16 when the codebook allows). The codes
are written into a partial directory next to ``out`` and moved into place when complete."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from unifuse.data.samples import DecodeConfig, SkipSample, decode_sample
from unifuse.data.shards import ShardWriter, Staging, expand_shards, shard_counts
from unifuse.data.stream import _raw_samples
from unifuse.models.vqvae import load_vqvae

STAMP = "_encoded_with.json"


def _splits(src: Path) -> list[tuple[str, Path]]:
    subs = [(n, src / n) for n in ("train", "val") if (src / n).is_dir()]
    return subs or [("", src)]


def encode_shards(tokenizer: str | Path, src: str | Path, out: str | Path, batch_size: int = 256,
                  shard_size: int = 10_000, device: str = "cpu", image_size: int | None = None) -> dict:
    tokenizer, src, out = Path(tokenizer), Path(src), Path(out)
    net = load_vqvae(tokenizer, map_location=device).to(device)
    dtype = np.int16 if net.codebook_size <= np.iinfo(np.int16).max else np.int32
    splits = _splits(src)
    with Staging(out, [split for split, _ in splits], allowed=(STAMP,)) as staging:
        result = _encode_splits(net, dtype, tokenizer, src, splits, staging, batch_size, shard_size, device,
                                image_size)
        staging.commit(clear=(STAMP,))
    (out / STAMP).write_text(json.dumps({"tokenizer": str(tokenizer.resolve()),
                                         "tokenizer_mtime": tokenizer.stat().st_mtime}))
    return result


def _encode_splits(net, dtype, tokenizer: Path, src: Path, splits: list[tuple[str, Path]], staging: Staging,
                   batch_size: int, shard_size: int, device: str, image_size: int | None) -> dict:
    result = {}
    for split, d in splits:
        paths = expand_shards(str(d))
        total = sum(shard_counts(paths))
        stats: Counter = Counter()
        cfg = DecodeConfig(image_size=image_size, require_image=True)
        with ShardWriter(staging.path(split), prefix="codes", max_samples=shard_size) as w:
            pending: list = []

            def flush():
                x = torch.from_numpy(np.stack([s.images[0] for s in pending])).permute(0, 3, 1, 2)
                x = x.float().div(127.5).sub(1).to(device)
                codes = net.encode(x).cpu().numpy().astype(dtype)
                for s, c in zip(pending, codes):
                    members = {"npy": c, "json": {**s.meta, "tokenizer": str(tokenizer)}}
                    if s.text:
                        members["txt"] = s.text
                    if s.cls is not None:
                        members["cls"] = s.cls
                    w.write(s.key, members)
                pending.clear()

            with tqdm(total=total, desc=f"encode {split or src.name}", unit="img") as bar:
                for url in paths:
                    for raw in _raw_samples(url, 0, None, stats):
                        bar.update(1)
                        try:
                            pending.append(decode_sample(raw, cfg, stats))
                        except SkipSample as e:
                            stats[e.reason] += 1
                            continue
                        if len(pending) >= batch_size:
                            flush()
                if pending:
                    flush()
        print(f"encoded {split or src}: {w.summary}; input skipped: {dict(stats) or 'none'}")
        result[split or "all"] = w.summary.samples
    return result


def check_stamp(out: str | Path, tokenizer: str | Path) -> None:
    """Codes made by another tokenizer than the configured one are an error, not a surprise."""
    stamp = Path(out) / STAMP
    if not stamp.is_file():
        return
    made = json.loads(stamp.read_text())
    if Path(made["tokenizer"]) != Path(tokenizer).resolve():
        raise ValueError(f"codes in {out} were encoded with {made['tokenizer']}, but the configured tokenizer is "
                         f"{Path(tokenizer).resolve()}: delete {out} to re-encode, or point model.tokenizer_ckpt "
                         "at the tokenizer that made them")
