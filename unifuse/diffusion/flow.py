"""Flow matching (rectified flow) as a second transport.

Convention: **t = 0 is data, t = 1 is noise** (diffusers' sigma convention; SiT uses the opposite):
``x_t = (1 - t) * x0 + t * eps``, and the network predicts the velocity ``dx_t/dt = eps - x0``.
Sampling integrates from t = 1 to t = 0; a network sees ``1000 t`` (:meth:`FlowMatching.network_time`),
the scale of the DDPM timesteps its time embedding was designed for. Training times are uniform or logit-normal
(``t = sigmoid(N(mean, std))``, SD3's default), and a ``shift`` s > 1 moves them (and the
sampling grid) towards the noise end, ``t -> s t / (1 + (s - 1) t)``, which larger images need
(their pixels are more redundant, so a given t destroys less of them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

TIME_SAMPLING = ("uniform", "logit_normal")


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


# what a network's time embedding sees for a flow time in [0, 1]: the range of DDPM's timesteps
NETWORK_TIME_SCALE = 1000.0


@dataclass
class FlowMatching:
    time_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0

    default_sampler = "euler"  # class attribute, not a field

    def __post_init__(self):
        if self.time_sampling not in TIME_SAMPLING:
            raise ValueError(f"flow time sampling must be one of {TIME_SAMPLING}, not {self.time_sampling!r}")
        if self.shift <= 0:
            raise ValueError(f"flow shift must be > 0, not {self.shift}")

    @staticmethod
    def network_time(t: torch.Tensor) -> torch.Tensor:
        """The time a network embeds for flow times ``t`` in [0, 1]: ``1000 t``. Integer times are
        already on that scale and pass through."""
        return t * NETWORK_TIME_SCALE if t.is_floating_point() else t

    @staticmethod
    def clean_time(batch: int, device) -> torch.Tensor:
        """(batch,) times of a clean sample: 0.0 (float, as every flow time)."""
        return torch.zeros(batch, device=device)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.float().reshape(t.shape + (1,) * (x0.dim() - t.dim()))
        return ((1 - t) * x0.float() + t * eps.float()).to(x0.dtype)

    @staticmethod
    def target(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return eps.float() - x0.float()

    def to_x0_eps(self, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from a velocity at (x_t, t): x0 = x_t - t v, eps = x_t + (1 - t) v."""
        t = t.float().reshape(t.shape + (1,) * (x_t.dim() - t.dim()))
        return x_t.float() - t * v.float(), x_t.float() + (1 - t) * v.float()

    def sample_t(self, batch: int, device, generator: torch.Generator | None = None,
                 max_frac: torch.Tensor | None = None) -> torch.Tensor:
        """Training times; ``max_frac`` (B,) in (0, 1] scales row i's time into [0, max_frac[i]]
        (towards the data end)."""
        if self.time_sampling == "uniform":
            t = torch.rand(batch, device=device, generator=generator)
        else:
            t = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(batch, device=device, generator=generator))
        t = shift_time(t, self.shift)
        return t if max_frac is None else t * max_frac.to(t.device, t.dtype)

    def loss(self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
             t: torch.Tensor | None = None, eps: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample velocity MSE (B,), in float32; ``model`` gets float times in [0, 1]."""
        t = self.sample_t(x0.shape[0], x0.device) if t is None else t
        eps = torch.randn_like(x0) if eps is None else eps
        return self.prediction_loss(model(self.noised(x0, t, eps), t), x0, eps, t)

    def noised(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The training input x_t of clean ``x0`` at times ``t`` with noise ``eps``."""
        return self.add_noise(x0, eps, t)

    def prediction_loss(self, out: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample velocity MSE (B,) of a network's output ``out`` at :meth:`noised`, in float32
        (:meth:`loss` in two halves, for a network that returns more)."""
        with torch.autocast(x0.device.type, enabled=False):
            return F.mse_loss(out.float(), self.target(x0, eps), reduction="none").flatten(1).mean(1)

    def grid(self, steps: int, shift: float | None = None) -> torch.Tensor:
        """steps + 1 times from 1 to 0 (float32), evenly spaced then shifted."""
        if steps < 1:
            raise ValueError(f"sampling steps must be >= 1, not {steps}")
        t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        return shift_time(t, self.shift if shift is None else float(shift)).float()
