"""Token sampling shared by every generator: temperature, top-k and top-p applied per row, and
sampling from explicit uniforms so a seeded generator gives the same tokens on any path."""

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


def uniforms(n: int, generator, device) -> torch.Tensor:
    """(n, 1) uniforms; with a list of generators (one per row) each row draws from its own, so a
    row's samples do not depend on what else is in the batch."""
    if isinstance(generator, (list, tuple)):
        u = torch.cat([torch.rand(1, generator=g, device=g.device) for g in generator]).to(device)
        return u[:, None]
    return torch.rand(n, 1, generator=generator, device=device)


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator=None) -> torch.Tensor:
    """(B, V) logits -> (B,) token indices. temperature 0 is greedy. ``generator``: None, one
    ``torch.Generator``, or one per row (see :func:`row_generators`)."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    u = uniforms(probs.shape[0], generator, probs.device).clamp_min_(1e-7)
    idx = (probs.cumsum(-1) < u * probs.sum(-1, keepdim=True)).sum(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


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
