"""Backbone and sampler figures, each against a baseline timed in the same run:

1. AR sampling of 256 image tokens (16x16) for 8 prompts with CFG (16 rows), width 256, 4 layers:
   KV cache vs the naive loop that reruns the whole prefix for every token (target >= 20x,
   identical tokens).
2. Training throughput (tokens/s) and MFU at width 512 in float32 against this machine's float32
   peak (``unifuse.run.perf``: the best GEMM rate of a few shapes, measured in this run). The four
   generators side by side, in the dtype the presets train in: ``experiments/bench/mfu.py``.
3. MaskGIT (K=8) vs AR sampling time for the same image size, for a batch of 8 prompts (throughput-
   bound on CPU: MaskGIT does K full passes) and for one prompt (latency-bound).

    python experiments/bench/transformer.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch

from unifuse.decoding import ar
from unifuse.decoding import maskgit as maskgit_decoding
from unifuse.models.image_gpt import ImageGPT
from unifuse.models.maskgit import MaskGIT
from unifuse.models.transformer import Transformer, TransformerConfig
from unifuse.run.perf import cpu_peak_flops
from unifuse.text.vocab import VocabLayout


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def sampling(grid: int) -> None:
    torch.manual_seed(0)
    cfg = TransformerConfig(dim=256, n_layers=4, n_heads=4)
    vocab = VocabLayout(image_codes=1024)
    prompts = ["twemoji dog face", "red heart", "openmoji pizza", "a very long caption about a cat", "sun",
               "grinning face with big eyes", "rocket", ""]
    gpt = ImageGPT(cfg, vocab, grid=grid).eval()
    ar.generate(gpt, prompts[:2], cfg_scale=3.0, seed=0)  # warm-up
    cached, t_cache = timed(lambda: ar.generate(gpt, prompts, cfg_scale=3.0, seed=0))
    naive, t_naive = timed(lambda: ar.generate(gpt, prompts, cfg_scale=3.0, seed=0, use_cache=False))
    n = grid * grid
    print(f"[1] AR sampling {n} tokens x {len(prompts)} prompts with CFG (width 256, 4 layers): "
          f"KV cache {t_cache:.2f}s ({len(prompts) * n / t_cache:.0f} tok/s) | naive {t_naive:.2f}s | "
          f"speedup {t_naive / t_cache:.1f}x (target >= 20x) | identical tokens: {torch.equal(cached, naive)}")
    mg = MaskGIT(cfg, vocab, grid=grid).eval()
    for batch in (prompts, prompts[:1]):  # throughput-bound batch of 8, then latency-bound batch of 1
        maskgit_decoding.generate(mg, batch[:2], steps=8, cfg_scale=3.0, seed=0)
        _, t_mg = timed(lambda b=batch: maskgit_decoding.generate(mg, b, steps=8, cfg_scale=3.0, seed=0))
        t_ar = t_cache if len(batch) == len(prompts) else \
            timed(lambda b=batch: ar.generate(gpt, b, cfg_scale=3.0, seed=0))[1]
        print(f"[3] MaskGIT K=8 vs AR with KV cache, {len(batch)} prompt(s) with CFG, {grid}x{grid} images: "
              f"{t_mg:.2f}s vs {t_ar:.2f}s (MaskGIT {t_ar / t_mg:.1f}x faster)")


def mfu(width: int, layers: int, seq: int, batch: int, steps: int) -> None:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=2048, dim=width, n_layers=layers, n_heads=width // 64, max_seq_len=seq)
    m = Transformer(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=False)
    x = torch.randint(0, 2048, (batch, seq + 1))

    def step():
        logits = m(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    _, dt = timed(lambda: [step() for _ in range(steps)])
    tok_s = batch * seq * steps / dt
    achieved = m.flops_per_token(seq) * tok_s
    peak, source = cpu_peak_flops(torch.float32)
    print(f"[2] training width {width}, {layers} layers, seq {seq}, batch {batch}, float32: {tok_s:.0f} tokens/s, "
          f"{achieved / 1e9:.1f} GFLOP/s of {peak / 1e9:.1f} GFLOP/s ({source}) -> MFU {100 * achieved / peak:.0f}%")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="8x8 images and fewer steps")
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    sampling(8 if a.quick else 16)
    mfu(512, 4 if a.quick else 8, 256, 8, 3 if a.quick else 6)


if __name__ == "__main__":
    main()
