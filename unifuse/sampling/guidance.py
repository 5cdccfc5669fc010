"""Classifier-free guidance, the one implementation every generator uses: for the logits of the
token decoders (AR GPT, MaskGIT) and for the outputs of denoisers (latent diffusion, Transfusion).

A guided batch runs its B conditional rows followed by B unconditional rows (one forward of 2B
rows), and ``out = uncond + s * (cond - uncond)``. The scale can ramp linearly from 1 to s over
decoding (``cfg_schedule=linear``) and can be limited to an interval of the progress (guidance only
in the middle of sampling helps quality, Kynkäänniemi et al. 2024); outside it the conditional
output is used."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from unifuse.sampling.settings import CFG_SCHEDULES, SamplingSettings

# net(x, t, cond) -> output; ``cond`` is whatever the network takes (embeddings, ids), batched on dim 0
Net = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


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


def _cat(a, b):
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        return type(a)(list(a) + list(b))
    raise TypeError(f"cannot batch conditions of type {type(a).__name__}")


@dataclass(frozen=True)
class Guidance:
    scale: float | None = None  # None: no guidance (B conditional rows only)
    schedule: str = "constant"  # or "linear": 1 -> scale over decoding
    interval: tuple[float, float] = (0.0, 1.0)  # guided part of the progress, in [0, 1]

    def __post_init__(self):
        if self.schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {', '.join(CFG_SCHEDULES)}, not {self.schedule!r}")

    @classmethod
    def of(cls, settings: SamplingSettings) -> Guidance:
        return cls(settings.cfg_scale, settings.cfg_schedule)

    @property
    def guided(self) -> bool:
        """Whether a batch runs its unconditional rows after the conditional ones."""
        return self.scale is not None

    def rows(self, conds: list, uncond=None) -> list:
        """The rows to run: ``conds``, then one ``uncond`` row per condition when guided."""
        return list(conds) + ([uncond] * len(conds) if self.guided else [])

    def scale_at(self, progress: float) -> float | None:
        """The scale at ``progress`` in (0, 1]; None without guidance or outside the interval."""
        lo, hi = self.interval
        return guidance_scale(self.scale, self.schedule, progress) if lo <= progress <= hi else None

    def combine(self, out: torch.Tensor, progress: float) -> torch.Tensor:
        """Outputs of the rows of :meth:`rows` (2B guided, B otherwise) -> the B guided outputs."""
        return self._mix(out, self.scale_at(progress)) if self.guided else out

    @staticmethod
    def _mix(out: torch.Tensor, scale: float | None) -> torch.Tensor:
        c, u = out.chunk(2)
        return c if scale is None else u + scale * (c - u)

    def denoiser(self, net: Net, cond, uncond, calls: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A sampler's ``model(x, t)`` over ``net(x, t, cond)``. ``calls``: the sampler's number of
        model calls, the unit of progress. Where the scale is 1 (or guidance is off) only the B
        conditional rows run: u + 1 * (c - u) is c up to rounding, at half the cost."""
        count = itertools.count(1)

        def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            progress = min(next(count), calls) / calls
            s = self.scale_at(progress)
            if s is None or s == 1.0:
                return net(x, t, cond)
            return self._mix(net(torch.cat([x, x]), torch.cat([t, t]), _cat(cond, uncond)), s)

        return model
