"""KV-cached sampling of the autoregressive image GPT (:class:`unifuse.models.image_gpt.ImageGPT`).

The prompts ``[BOS] condition [BOI]`` (left-padded rows of :mod:`unifuse.models.rows`) are run
once into the KV cache; then each of the h*w codes is sampled from the logits of the last
position, restricted to the image codes, and fed back as one new position. ``use_cache=False``
reruns the whole rows for every token (the reference the cache is checked against): both paths
build their rows with :class:`~unifuse.models.rows.Rows`; the cached one runs each new position alone.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from unifuse.models.image_gpt import ImageGPT
from unifuse.sampling.guidance import Guidance
from unifuse.sampling.tokens import row_generators, sample_logits


@torch.inference_mode()  # no autograd bookkeeping: per-token overhead is what a cached step spends
def generate(net: ImageGPT, conds: list, cfg_scale: float | None = None, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | list[int] | None = None,
             use_cache: bool = True, progress: bool = False, return_logits: bool = False,
             cfg_schedule: str = "constant"):
    """Sample h*w codes per condition -> (B, h, w) code indices (and the per-step logits (B, h*w, codes)).

    ``cfg_scale`` None: plain conditional sampling; a number: cond and uncond rows run as one
    batch and logits = uncond + s * (cond - uncond), with s constant or ramped over the tokens
    (``cfg_schedule``, see :func:`unifuse.sampling.guidance.guidance_scale`). Row r with seed s
    draws from seed s + r (a list gives each row's seed)."""
    backbone, guidance = net.net, Guidance(cfg_scale, cfg_schedule)
    dev, b, n = backbone.tok_emb.weight.device, len(conds), net.n_image_tokens
    rows = net.prompts(guidance.rows(conds), dev)
    r = rows.tokens.shape[0]
    gen = row_generators(seed, b, dev)
    out = torch.zeros(b, n, dtype=torch.long, device=dev)
    kept = []
    cache = backbone.new_cache(r, rows.width + n) if use_cache else None
    h = backbone.forward_rows(rows, cache) if use_cache else None
    for i in tqdm(range(n), desc="sampling", unit="tok", disable=not progress):
        if not use_cache:  # the naive loop: rerun the whole rows for every token
            h = backbone.forward_rows(rows)
        logits = guidance.combine(net.image_logits(backbone.lm_head(h[:, -1])).float(), (i + 1) / n)
        if return_logits:
            kept.append(logits)
        tok = sample_logits(logits, temperature, top_k, top_p, gen)
        out[:, i] = tok
        if i == n - 1:
            break
        nxt = net.vocab.code_to_id(tok.repeat(r // b))[:, None]
        if use_cache:  # the cache holds the rows so far: run the new position alone
            rows = rows.following(nxt)
            h = backbone.forward_rows(rows, cache)
        else:
            rows = rows.append(nxt)
    codes = out.view(b, net.grid, net.grid)
    return (codes, torch.stack(kept, 1)) if return_logits else codes
