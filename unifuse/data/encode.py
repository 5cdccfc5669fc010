"""Pre-encoding image shards with a trained autoencoder, so generators train without running it
each step (as LlamaGen does for codes and latent-diffusion recipes do for latents). Output samples
keep the caption/cls/json and carry ``KEY.npy``:

* VQ-VAE tokenizer: the code indices (h, w), int16 when the codebook allows;
* KL autoencoder: float16 (2C, h, w), the posterior mean stacked on its std (raw, not normalised),
  so training samples the posterior as it would on the fly, and normalises with the checkpoint's
  own latent statistics.

Everything is written into a partial directory next to ``out`` and moved into place when complete;
``_encoded_with.json`` records the checkpoint, and pairing the shards with another one is an error."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from unifuse.data.read import raw_samples
from unifuse.data.samples import DecodeConfig, SkipSample, decode_sample, image_batch
from unifuse.data.shards import expand_shards, shard_counts
from unifuse.data.staging import Staging
from unifuse.data.writer import ShardWriter
from unifuse.models.kl_autoencoder import KLAutoencoder
from unifuse.models.vqvae import VQVAE
from unifuse.run.checkpoint import load_net

STAMP = "_encoded_with.json"


def _splits(src: Path) -> list[tuple[str, Path]]:
    subs = [(n, src / n) for n in ("train", "val") if (src / n).is_dir()]
    return subs or [("", src)]


def encode_shards(tokenizer: str | Path, src: str | Path, out: str | Path, batch_size: int = 256,
                  shard_size: int = 10_000, device: str = "cpu", image_size: int | None = None) -> dict:
    tokenizer, src, out = Path(tokenizer), Path(src), Path(out)
    net = load_net(tokenizer, map_location=device, expect=(VQVAE, KLAutoencoder)).to(device)
    if hasattr(net, "codebook_size"):
        dtype = np.int16 if net.codebook_size <= np.iinfo(np.int16).max else np.int32
    else:
        dtype = np.float16
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
        prefix = "latents" if dtype == np.float16 else "codes"
        with ShardWriter(staging.path(split), prefix=prefix, max_samples=shard_size) as w:
            pending: list = []

            def flush():
                x = image_batch([s.images[0] for s in pending])
                x = x.float().div(127.5).sub(1).to(device)
                if dtype == np.float16:  # KL autoencoder: posterior mean and std, stacked on channels
                    with torch.no_grad():
                        q = net.posterior(x)
                    codes = torch.cat([q.mean, q.std], 1).cpu().numpy().astype(dtype)
                else:
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
                    for raw in raw_samples(url, 0, None, stats):
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
