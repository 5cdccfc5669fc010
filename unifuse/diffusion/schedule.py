"""Discrete-time Gaussian diffusion (DDPM): noise schedules, the forward process, prediction
targets and the training loss.

Forward process, for integer t in [0, T): ``x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps`` with
``abar_t = prod_{s <= t} (1 - beta_s)``. The network predicts one of

* ``eps``: the noise,
* ``x0``: the clean sample,
* ``v``: ``sqrt(abar_t) * eps - sqrt(1 - abar_t) * x0`` (Salimans & Ho),

and :meth:`GaussianDiffusion.to_x0_eps` turns any of them into the (x0, eps) pair the samplers use.
Everything here runs in float32, whatever autocast says: schedules and losses in bf16 are a known
source of NaNs in diffusion-loss models. The schedule tables are built in float64 and stored as
float32 (so ``alphas_cumprod`` agrees with diffusers' float32 tables to ~1e-7).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTIONS = ("eps", "x0", "v")
WEIGHTINGS = ("uniform", "min_snr")


def make_betas(kind: str, steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """float64 betas. ``linear``: DDPM's, from ``beta_start`` to ``beta_end``. ``scaled_linear``:
    linear in sqrt(beta) (Stable Diffusion's, usually with 0.00085 -> 0.012). ``cosine``: Nichol &
    Dhariwal's ``abar(t) = cos^2((t/T + 0.008) / 1.008 * pi/2)``, betas clipped at 0.999."""
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    if kind == "cosine":
        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor([min(1 - abar((i + 1) / steps) / abar(i / steps), 0.999) for i in range(steps)],
                            dtype=torch.float64)
    raise ValueError(f"noise schedule must be one of {SCHEDULES}, not {kind!r}")


class NoiseSchedule:
    """Betas and the cumulative products derived from them, as float32 tables (index = timestep)."""

    def __init__(self, kind: str = "linear", steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.kind, self.steps = kind, int(steps)
        betas = make_betas(kind, self.steps, beta_start, beta_end)
        abar = torch.cumprod(1.0 - betas, 0)
        self.betas = betas.float()
        self.alphas_cumprod = abar.float()

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """abar at integer timesteps ``t`` (any shape); t < 0 means "before the first step": 1."""
        t = torch.as_tensor(t)
        table = self.alphas_cumprod.to(t.device)
        return torch.where(t >= 0, table[t.clamp_min(0).long()], torch.ones((), device=t.device))

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        a = self.abar(t)
        return a / (1 - a)


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample values (B,) broadcast over the other dims of ``like`` (B, ...)."""
    return v.float().reshape(v.shape + (1,) * (like.dim() - v.dim()))


@dataclass
class GaussianDiffusion:
    """The DDPM transport: a schedule, what the network predicts and how the loss is weighted.

    ``min_snr`` weighting (Hang et al. 2023) caps each timestep's weight at ``gamma`` in
    signal-to-noise terms, expressed for the chosen target: eps ``min(snr, g)/snr``, v
    ``min(snr, g)/(snr + 1)``, x0 ``min(snr, g)``."""

    schedule: NoiseSchedule
    prediction: str = "eps"
    weighting: str = "uniform"
    min_snr_gamma: float = 5.0

    default_sampler = "ddim"  # class attribute, not a field

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, not {self.prediction!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"loss weighting must be one of {WEIGHTINGS}, not {self.weighting!r}")

    @property
    def steps(self) -> int:
        return self.schedule.steps

    @staticmethod
    def network_time(t: torch.Tensor) -> torch.Tensor:
        """The time a network embeds: the integer timestep itself."""
        return t

    @staticmethod
    def clean_time(batch: int, device) -> torch.Tensor:
        """(batch,) times of a clean sample: timestep 0, the least noise the network was trained on
        (integer, as every DDPM time)."""
        return torch.zeros(batch, device=device, dtype=torch.long)

    # ------------------------------------------------------------------ forward process
    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x0) sampled with the given noise; t: (B,) integer timesteps."""
        a = _expand(self.schedule.abar(t), x0)
        return (a.sqrt() * x0.float() + (1 - a).sqrt() * eps.float()).to(x0.dtype)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction == "eps":
            return eps.float()
        if self.prediction == "x0":
            return x0.float()
        a = _expand(self.schedule.abar(t), x0)
        return a.sqrt() * eps.float() - (1 - a).sqrt() * x0.float()

    def to_x0_eps(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from a network output of this transport's prediction type at (x_t, t)."""
        a = _expand(self.schedule.abar(t), x_t)
        sa, s1 = a.sqrt(), (1 - a).sqrt()
        out, x_t = out.float(), x_t.float()
        if self.prediction == "eps":
            return (x_t - s1 * out) / sa, out
        if self.prediction == "x0":
            return out, (x_t - sa * out) / s1
        return sa * x_t - s1 * out, sa * out + s1 * x_t

    # ------------------------------------------------------------------ training
    def sample_t(self, batch: int, device, generator: torch.Generator | None = None,
                 max_frac: torch.Tensor | None = None) -> torch.Tensor:
        """Uniform integer timesteps; ``max_frac`` (B,) in (0, 1] limits row i to
        ``t <= round(max_frac[i] * (T - 1))`` (e.g. 0.5: t <= 500 of 1000)."""
        if max_frac is None:
            return torch.randint(0, self.steps, (batch,), device=device, generator=generator)
        top = torch.round(max_frac.to(device).double() * (self.steps - 1)) + 1
        u = torch.rand(batch, device=device, generator=generator, dtype=torch.float64)
        return (u * top).floor().long().clamp_max(self.steps - 1)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        if self.weighting == "uniform":
            return torch.ones(t.shape, device=t.device)
        snr = self.schedule.snr(t)
        capped = snr.clamp_max(self.min_snr_gamma)
        return {"eps": capped / snr, "v": capped / (snr + 1), "x0": capped}[self.prediction]

    def loss(self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
             t: torch.Tensor | None = None, eps: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample weighted MSE (B,) of ``model(x_t, t)`` against this transport's target, in
        float32. ``model`` gets integer timesteps."""
        t = self.sample_t(x0.shape[0], x0.device) if t is None else t
        eps = torch.randn_like(x0) if eps is None else eps
        return self.prediction_loss(model(self.noised(x0, t, eps), t), x0, eps, t)

    def noised(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The training input x_t of clean ``x0`` at timesteps ``t`` with noise ``eps`` (float32 math)."""
        with torch.autocast(x0.device.type, enabled=False):
            return self.add_noise(x0, eps, t)

    def prediction_loss(self, out: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weighted MSE (B,) of a network's output ``out`` at :meth:`noised` against this
        transport's target, in float32 (:meth:`loss` in two halves, for a network that returns more)."""
        with torch.autocast(x0.device.type, enabled=False):
            mse = F.mse_loss(out.float(), self.target(x0, eps, t), reduction="none").flatten(1).mean(1)
            return mse * self.loss_weight(t)

    # ------------------------------------------------------------------ sampling
    def timesteps(self, n: int, spacing: str = "trailing") -> list[int]:
        """n of the T training timesteps, descending. ``trailing`` starts at T-1 (pure noise) and
        ends at T/n - 1; ``leading`` starts at (n-1) * T//n and ends at 0; ``linspace`` spans
        [T-1, 0] evenly (the spacings of diffusers' schedulers, which name them so)."""
        T = self.steps
        if not 0 < n <= T:
            raise ValueError(f"sampling steps must be in [1, {T}], not {n}")
        if spacing == "trailing":
            ts = torch.round(torch.arange(T, 0, -T / n, dtype=torch.float64)) - 1
        elif spacing == "leading":
            ts = torch.arange(n - 1, -1, -1, dtype=torch.float64) * (T // n)
        elif spacing == "linspace":
            ts = torch.round(torch.linspace(0, T - 1, n, dtype=torch.float64)).flip(0)
        else:
            raise ValueError(f"timestep spacing must be trailing, leading or linspace, not {spacing!r}")
        return [int(t) for t in ts]
