"""Token sampling shared by every generator: temperature, top-k and top-p applied per row, and an
exponential-race draw from per-row seeded noise, so a seeded generator gives the same tokens on any
code path and for any batch composition."""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Mask (to -inf) what top-k / top-p exclude, independently for each row of (B, V) logits."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, torch.topk(logits, top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))  # exactly k per row, ties included
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def exponentials(shape: tuple[int, int], generator, device) -> torch.Tensor:
    """(B, V) Exp(1) noise. ``generator``: None, one ``torch.Generator``, or a list of G generators
    with B divisible by G, where generator g draws the g-th block of B/G consecutive rows; a row's
    noise therefore does not depend on what else is in the batch."""
    if isinstance(generator, (list, tuple)):
        b, v = shape
        if b % len(generator):
            raise ValueError(f"{len(generator)} generators for {b} rows")
        per = b // len(generator)
        return torch.cat([torch.empty(per, v, device=g.device).exponential_(generator=g)
                          for g in generator]).to(device)
    return torch.empty(shape, device=device).exponential_(generator=generator)


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator=None) -> torch.Tensor:
    """(B, V) logits -> (B,) token indices. temperature 0 is greedy. ``generator``: None, one
    ``torch.Generator``, or a list (see :func:`exponentials` and :func:`row_generators`).

    Sampling is the exponential race argmax_i p_i / E_i with E_i ~ Exp(1), an exact draw from p
    (the Gumbel-max trick). Unlike inverse-CDF sampling it only changes its answer when the two best
    scores are within float noise of each other, so two code paths whose logits agree to ~1e-6
    (KV-cached vs full recomputation) give the same tokens under the same seed."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return (probs / exponentials(tuple(probs.shape), generator, probs.device)).argmax(-1)


def row_generators(seed: int | list[int] | None, rows: int, device) -> list[torch.Generator] | None:
    """One generator per row: row r of a batch seeded with s uses seed s + r, so prompt r sampled
    alone with seed s + r gives the same tokens as in the batch. A list gives each row's seed."""
    if seed is None:
        return None
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [int(seed) + r for r in range(rows)]
    if len(seeds) != rows:
        raise ValueError(f"{len(seeds)} seeds for {rows} rows")
    gens = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(s))
        gens.append(g)
    return gens
