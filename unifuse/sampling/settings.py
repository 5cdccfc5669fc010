"""The sampling settings of every generator as one typed object.

One :class:`SamplingSettings` is the training config's ``model.sampling`` node (its Hydra schema),
the dict a checkpoint stores, what the sampling and evaluation commands override, and what a
pipeline hands to a decoder. A generator uses the fields that apply to it (the AR GPT has no
``steps``; only diffusion has ``sampler`` and ``eta``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

CFG_SCHEDULES = ("constant", "linear")


@dataclass
class SamplingSettings:
    """Sampling settings shared by every generator (``model.sampling`` in training, stored in the
    checkpoint, overridable in ``unifuse.sample`` / ``unifuse.evaluate``)."""

    cfg_scale: float | None = None  # classifier-free guidance scale; null: no guidance
    cfg_schedule: str = "constant"  # constant | linear (ramp from 1 to cfg_scale)
    temperature: float = 1.0  # token sampling; 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    steps: int | None = None  # parallel decoding steps (MaskGIT) / denoising steps (diffusion)
    sampler: str | None = None  # diffusion: ddpm | ddim | dpmpp_2m (ddpm transport), euler | heun (flow)
    eta: float = 0.0  # diffusion, ddim: 0 deterministic, 1 DDPM-like noise
    seed: int = 0  # row r of a batch uses seed + r (a list gives each row's seed)

    def __post_init__(self):
        problem = _problem(self)
        if problem:
            raise ValueError(f"sampling.{problem}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def override(self, **changes: Any) -> SamplingSettings:
        """A copy with ``changes`` applied; an unknown name is refused, naming it."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise ValueError(f"unknown sampling setting {unknown[0]!r}; known: {', '.join(self.names())}")
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, stored: dict | SamplingSettings | None) -> SamplingSettings:
        """Settings from the dict a checkpoint stores (missing fields take their defaults), from a
        config node, or passed through when already settings."""
        if isinstance(stored, SamplingSettings):
            return stored
        return cls().override(**dict(stored or {}))

    def to_dict(self) -> dict:
        """The dict a checkpoint stores: every field except the unset (None) ones, ``cfg_scale``
        kept even when None (it then says: no guidance)."""
        return {k: v for k, v in asdict(self).items() if v is not None or k == "cfg_scale"}

    def only(self, names) -> dict:
        """The set fields among ``names`` (as :meth:`to_dict`): the keyword arguments of a decoder
        that takes those settings, whose own defaults apply to the unset ones."""
        stored = self.to_dict()
        return {k: stored[k] for k in names if k in stored}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _problem(s: SamplingSettings) -> str | None:
    """What is wrong with ``s`` as ``field ...`` (None when nothing is)."""
    if s.cfg_scale is not None and not _number(s.cfg_scale):
        return f"cfg_scale must be a number or null, not {s.cfg_scale!r}"
    if s.cfg_schedule not in CFG_SCHEDULES:
        return f"cfg_schedule must be one of {', '.join(CFG_SCHEDULES)}, not {s.cfg_schedule!r}"
    if not _number(s.temperature) or s.temperature < 0:
        return f"temperature must be a number >= 0, not {s.temperature!r}"
    if s.top_k is not None and not (_integer(s.top_k) and s.top_k >= 0):
        return f"top_k must be an integer >= 0 or null, not {s.top_k!r}"
    if s.top_p is not None and not (_number(s.top_p) and 0 < s.top_p <= 1):
        return f"top_p must be in (0, 1] or null, not {s.top_p!r}"
    if s.steps is not None and not (_integer(s.steps) and s.steps >= 1):
        return f"steps must be an integer >= 1 or null, not {s.steps!r}"
    if s.sampler is not None and not isinstance(s.sampler, str):
        return f"sampler must be a name or null, not {s.sampler!r}"
    if not _number(s.eta) or s.eta < 0:
        return f"eta must be a number >= 0, not {s.eta!r}"
    seeds = s.seed if isinstance(s.seed, (list, tuple)) else [s.seed]
    if s.seed is not None and not all(_integer(x) for x in seeds):
        return f"seed must be an integer (or a list of them, one per row), not {s.seed!r}"
    return None
