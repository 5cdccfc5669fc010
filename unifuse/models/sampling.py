"""Token sampling shared by every generator: temperature, top-k and top-p applied per row, and an
exponential-race draw from per-row seeded noise, so a seeded generator gives the same tokens on any
code path and for any batch composition."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Prompts:
    """Token prompts of a batch, left-padded to one length so all rows share a KV-cache write index.
    Padding has ``doc_id = -1`` (never attended) and rotary positions start at 0 on each row's first
    real token, so a row means the same whatever it is batched with."""

    tokens: torch.Tensor  # (R, P)
    doc_id: torch.Tensor  # (R, P) -1 on padding, 0 elsewhere
    positions: torch.Tensor  # (R, P) 0 at the first real token
    lengths: torch.Tensor  # (R,) real prompt lengths

    @property
    def padded(self) -> bool:
        return bool((self.doc_id < 0).any())

    def image_positions(self, n: int) -> torch.Tensor:
        """(R, n) rotary positions of an n-position image block right after each prompt."""
        return self.lengths[:, None] + torch.arange(n, device=self.tokens.device)

    def with_image_block(self, block: torch.Tensor) -> dict[str, torch.Tensor]:
        """The prompts followed by one image block of ``block`` (R, n) token ids: ``tokens``,
        ``position``, ``doc_id`` and ``image_id`` (0 on the block, -1 elsewhere) of the whole rows."""
        return {"tokens": torch.cat([self.tokens, block], 1),
                "position": torch.cat([self.positions, self.image_positions(block.shape[1])], 1),
                "doc_id": torch.cat([self.doc_id, torch.zeros_like(block)], 1),
                "image_id": torch.cat([torch.full_like(self.tokens, -1), torch.zeros_like(block)], 1)}


def left_padded(rows: list[list[int]], pad: int, device, pad_to: int | None = None) -> Prompts:
    """Token-id rows -> :class:`Prompts` (at least ``pad_to`` long)."""
    p = max(pad_to or 0, max(len(r) for r in rows))
    tokens = torch.full((len(rows), p), pad, dtype=torch.long)
    doc = torch.full((len(rows), p), -1, dtype=torch.long)
    pos = torch.zeros((len(rows), p), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, p - len(r):] = torch.tensor(r, dtype=torch.long)
        doc[i, p - len(r):] = 0
        pos[i, p - len(r):] = torch.arange(len(r))
    lengths = torch.tensor([len(r) for r in rows])
    return Prompts(tokens.to(device), doc.to(device), pos.to(device), lengths.to(device))


@dataclass
class SamplingConfig:
    """Sampling settings shared by every generator (``model.sampling`` in training, stored in the
    checkpoint, overridable in ``unifuse.sample`` / ``unifuse.evaluate``); a model uses the fields
    its ``generate`` takes (the AR GPT ignores ``steps``)."""

    cfg_scale: float | None = None  # classifier-free guidance scale; null: no guidance
    cfg_schedule: str = "constant"  # constant | linear (ramp from 1 to cfg_scale)
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    steps: int | None = None  # parallel decoding steps (MaskGIT) / denoising steps (diffusion)
    sampler: str | None = None  # diffusion: ddpm | ddim | dpmpp_2m (ddpm transport), euler | heun (flow)
    eta: float = 0.0  # diffusion, ddim: 0 deterministic, 1 DDPM-like noise
    seed: int = 0


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


def guidance_scale(scale: float | None, schedule: str, progress: float) -> float | None:
    """Classifier-free guidance scale at ``progress`` in (0, 1] of decoding (token i of n: (i+1)/n;
    MaskGIT step k of K: (k+1)/K). ``constant``: ``scale`` throughout. ``linear``: ramps from 1
    (plain conditional) to ``scale``, so the first tokens, which fix the layout, are not pushed off
    the data manifold (MUSE's schedule)."""
    if scale is None or schedule == "constant":
        return scale
    if schedule == "linear":
        return 1.0 + (scale - 1.0) * progress
    raise ValueError(f"cfg_schedule must be 'constant' or 'linear', not {schedule!r}")


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
