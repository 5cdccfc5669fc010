"""MaskGIT's parallel decoding (:class:`unifuse.models.maskgit.MaskGIT`).

Decoding starts from an all-[MASK] image and runs K forward passes; after pass k it keeps the
N * (1 - cos(pi/2 * (k+1)/K)) most confident positions decoded, choosing among the still-masked
ones by confidence plus Gumbel noise annealed to zero, so every position is decoded exactly once.
The caption is causal and never sees the image, so with the KV cache it runs once and each pass
runs only the image block after it (:meth:`~unifuse.models.transformer.KVCache.scratch` forgets the
block again); ``use_cache=False`` reruns the whole rows (the reference).
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from unifuse.models.maskgit import MaskGIT, cosine_schedule
from unifuse.sampling.guidance import Guidance
from unifuse.sampling.tokens import row_generators, sample_logits


@torch.inference_mode()  # no autograd bookkeeping: per-pass overhead is what a cached step spends
def generate(net: MaskGIT, conds: list, steps: int = 8, cfg_scale: float | None = None, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, noise: float = 4.5,
             seed: int | list[int] | None = None, use_cache: bool = True, progress: bool = False,
             return_trace: bool = False, cfg_schedule: str = "constant"):
    """K = ``steps`` forward passes -> (B, h, w) codes. ``noise``: initial Gumbel temperature of
    the confidence ranking (annealed linearly to 0). ``return_trace``: also the step at which
    each position was decoded (B, N). ``cfg_scale`` / ``cfg_schedule``: classifier-free guidance of
    the logits, ramped over the K passes with ``linear``."""
    backbone, guidance = net.net, Guidance(cfg_scale, cfg_schedule)
    dev, b, n = backbone.tok_emb.weight.device, len(conds), net.n_image_tokens
    rows = guidance.rows(conds)
    gens = row_generators(seed, b, dev)
    codes = torch.zeros(b, n, dtype=torch.long, device=dev)
    known = torch.zeros(b, n, dtype=torch.bool, device=dev)
    decoded_at = torch.full((b, n), -1, dtype=torch.long, device=dev)
    if use_cache:  # the caption's keys/values once, for all K steps
        prompts = net.prompts(rows, dev)
        cache = backbone.new_cache(len(rows), prompts.width + n)
        backbone.forward_rows(prompts, cache)
    for k in tqdm(range(steps), desc="maskgit", unit="step", disable=not progress):
        inp = torch.where(known, net.vocab.code_to_id(codes), torch.full_like(codes, net.vocab.mask))
        inp = inp.repeat(len(rows) // b, 1)
        if use_cache:  # only the image runs after the cached caption, then is forgotten
            with cache.scratch():
                h = backbone.forward_rows(prompts.following(inp, image=True), cache)
            logits = net.image_logits(backbone.lm_head(h))
        else:
            logits = net.image_forward(inp, rows)
        logits = guidance.combine(logits.float(), (k + 1) / steps)
        new, sampled = _decoded_now(logits, known, k, steps, noise, temperature, top_k, top_p, gens)
        codes = torch.where(new, sampled, codes)
        decoded_at[new] = k
        known |= new
    out = codes.view(b, net.grid, net.grid)
    return (out, decoded_at) if return_trace else out


def _decoded_now(logits: torch.Tensor, known: torch.Tensor, k: int, steps: int, noise: float, temperature: float,
                 top_k: int | None, top_p: float | None, gens) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass ``k`` of ``steps``: sample every position from (B, N, codes) ``logits`` and choose which
    still-masked ones are decoded now (by confidence plus annealed Gumbel noise, the count from the
    cosine schedule). Returns the (B, N) mask of the positions decoded now and the sampled tokens."""
    b, n = known.shape
    flat = logits.reshape(b * n, -1)
    sampled = sample_logits(flat, temperature, top_k, top_p, gens).view(b, n)  # gen r draws row r's n
    probs = flat.softmax(-1).gather(1, sampled.view(-1, 1)).view(b, n)
    n_keep_masked = math.floor(n * cosine_schedule((k + 1) / steps)) if k < steps - 1 else 0
    n_keep_masked = min(n_keep_masked, int((~known).sum(1).min()) - 1) if k < steps - 1 else 0
    t = noise * (1 - (k + 1) / steps)
    if gens is None:
        u = torch.rand(b, n, device=known.device)
    else:
        u = torch.stack([torch.rand(n, generator=g, device=known.device) for g in gens])
    gumbel = -torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-10)))
    conf = torch.log(probs.clamp_min(1e-20)) + t * gumbel
    conf = conf.masked_fill(known, float("-inf"))  # only masked positions compete
    n_new = (~known).sum(1) - n_keep_masked  # positions decoded in this step, per row
    rank = conf.argsort(1, descending=True).argsort(1)
    new = (rank < n_new[:, None]) & ~known
    return new, sampled
