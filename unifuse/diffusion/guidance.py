"""Classifier-free guidance, separate from samplers and networks (the sgm split): it turns a
conditional network into the ``model(x, t)`` callable a sampler drives.

``out = uncond + s * (cond - uncond)``, with cond and uncond rows run as one batch of 2B. The scale
can ramp linearly from 1 to s over sampling (the schedule the AR and MaskGIT generators use) and
can be limited to an interval of the sampling progress (guidance only in the middle of sampling
helps quality, Kynkäänniemi et al. 2024); outside it the conditional output alone is used, at the
cost of one B-row forward instead of 2B."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from unifuse.models.sampling import guidance_scale

# net(x, t, cond) -> output; ``cond`` is whatever the network takes (embeddings, ids), batched on dim 0
Net = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


def _cat(a, b):
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        return type(a)(list(a) + list(b))
    raise TypeError(f"cannot batch conditions of type {type(a).__name__}")


@dataclass
class Guidance:
    scale: float | None = None  # None or 1.0: no guidance (one conditional forward)
    schedule: str = "constant"  # or "linear": 1 -> scale over sampling
    interval: tuple[float, float] = (0.0, 1.0)  # guided part of sampling progress, in [0, 1]

    def wrap(self, net: Net, cond, uncond, steps: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A sampler's ``model(x, t)``; ``steps``: the sampler's number of model calls, for the
        progress the schedule and interval are measured in."""
        calls = {"n": 0}

        def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            progress = min(calls["n"] + 1, steps) / steps
            calls["n"] += 1
            s = guidance_scale(self.scale, self.schedule, progress)
            lo, hi = self.interval
            if s is None or s == 1.0 or not lo <= progress <= hi:
                return net(x, t, cond)
            c, u = net(torch.cat([x, x]), torch.cat([t, t]), _cat(cond, uncond)).chunk(2)
            return u + s * (c - u)

        return model
