"""Samplers: DDPM ancestral, DDIM, DPM-Solver++(2M) for the Gaussian transport; Euler and Heun for
flow matching.

Every sampler is driven by ``model(x, t) -> output`` (the network's raw output in its transport's
prediction type, guidance already applied; see :mod:`unifuse.sampling.guidance`), so latent
diffusion and Transfusion run the same code. ``t`` is a (B,) tensor: integer timesteps for the
Gaussian transport, floats in [0, 1] for flow matching. A sampler is also usable one step at a
time (``grid()``, ``step(i, x, out, noise)``), which is how the tests hold each step against
diffusers' schedulers; Heun, whose steps call the model twice, only runs whole (``run``'s callback
gives the state after each step). The state is float32 throughout.

Noise for stochastic steps comes from ``generator``: one ``torch.Generator``, or a list with one
per row so a prompt gives the same image alone or in a batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from unifuse.diffusion.flow import FlowMatching
from unifuse.diffusion.schedule import GaussianDiffusion
from unifuse.sampling.guidance import Guidance
from unifuse.sampling.settings import SamplingSettings

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def randn_like(x: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for {x.shape[0]} rows")
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device).to(x.device)
                            for g in generator])
    return torch.randn(x.shape, generator=generator, device=x.device if generator is None else generator.device
                       ).to(x.device)


class Sampler:
    """Base: ``run`` walks ``grid()`` calling the model ``calls_per_step`` times per step and
    ``last_step_calls`` on the last one."""

    stochastic = False
    calls_per_step = 1
    last_step_calls = 1

    def grid(self) -> list:
        raise NotImplementedError

    def step(self, i: int, x: torch.Tensor, out: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget multistep history (before a new run)."""

    @property
    def model_calls(self) -> int:
        """Model calls of one ``run`` (guidance schedules measure sampling progress in them)."""
        return self.calls_per_step * (len(self.grid()) - 1) + self.last_step_calls

    def _t(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0],), self.grid()[i], device=x.device)

    @torch.no_grad()
    def run(self, model: Model, x: torch.Tensor, generator=None,
            callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Denoise ``x`` (pure noise at the grid's first time) to a sample."""
        self.reset()
        x = x.float()
        for i in range(len(self.grid())):
            out = model(x, self._t(i, x)).float()
            noise = randn_like(x, generator) if self.stochastic and self.needs_noise(i) else None
            x = self.step(i, x, out, noise)
            if callback is not None:
                callback(i, x)
        return x

    def needs_noise(self, i: int) -> bool:
        return True


# ----------------------------------------------------------------------------- Gaussian transport
class _Discrete(Sampler):
    def __init__(self, diffusion: GaussianDiffusion, steps: int, spacing: str = "trailing",
                 clip_x0: float | None = None):
        self.d, self.steps, self.spacing, self.clip_x0 = diffusion, int(steps), spacing, clip_x0
        self._grid = diffusion.timesteps(self.steps, spacing)

    def grid(self) -> list[int]:
        return self._grid

    def _prev(self, i: int) -> int:
        return self._grid[i + 1] if i + 1 < len(self._grid) else -1  # -1: abar = 1, the clean sample

    def _x0_eps(self, i: int, x: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = torch.full((x.shape[0],), self._grid[i], device=x.device)
        x0, eps = self.d.to_x0_eps(out, x, t)
        a = self.d.schedule.abar(t[:1]).to(x.device).float()
        if self.clip_x0 is not None:  # pixel-space models: keep x0 in range, and eps consistent with it
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return x0, eps, a


class DDPM(_Discrete):
    """Ancestral sampling (Ho et al.) over any subset of the timesteps: the posterior
    q(x_prev | x_t, x0) with x0 predicted, variance ``(1 - abar_prev)/(1 - abar_t) * beta_t``
    ("fixed small"), where ``beta_t = 1 - abar_t / abar_prev`` for strided grids."""

    stochastic = True

    def __init__(self, diffusion: GaussianDiffusion, steps: int = 1000, spacing: str = "leading",
                 clip_x0: float | None = None):
        super().__init__(diffusion, steps, spacing, clip_x0)

    def needs_noise(self, i: int) -> bool:
        return self._grid[i] > 0

    def step(self, i, x, out, noise=None):
        x = x.float()
        x0, _, a = self._x0_eps(i, x, out)
        a_prev = self.d.schedule.abar(torch.tensor([self._prev(i)])).to(x.device).float()
        beta = 1 - a / a_prev
        mean = (a_prev.sqrt() * beta / (1 - a)) * x0 + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a)) * x
        if self._grid[i] > 0 and noise is not None:
            var = ((1 - a_prev) / (1 - a) * beta).clamp_min(1e-20)
            mean = mean + var.sqrt() * noise.float()
        return mean


class DDIM(_Discrete):
    """DDIM (Song et al.): ``eta = 0`` is deterministic; ``eta = 1`` matches DDPM's variance. The
    last step goes to abar = 1, i.e. returns the predicted x0."""

    def __init__(self, diffusion: GaussianDiffusion, steps: int = 50, eta: float = 0.0, spacing: str = "trailing",
                 clip_x0: float | None = None):
        super().__init__(diffusion, steps, spacing, clip_x0)
        self.eta = float(eta)
        self.stochastic = self.eta > 0

    def step(self, i, x, out, noise=None):
        x = x.float()
        x0, eps, a = self._x0_eps(i, x, out)
        a_prev = self.d.schedule.abar(torch.tensor([self._prev(i)])).to(x.device).float()
        var = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        std = self.eta * var.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp_min(0).sqrt() * eps
        if self.eta > 0 and noise is not None:
            x = x + std * noise.float()
        return x


class DPMSolverPP(_Discrete):
    """DPM-Solver++(2M) (Lu et al. 2022), multistep second order in x0 prediction, for ~20-step
    sampling. Runs in sigma = sqrt((1 - abar)/abar); the first step is first order (no history
    yet) and so is the last, which lands on sigma = 0, the clean sample."""

    def __init__(self, diffusion: GaussianDiffusion, steps: int = 20, spacing: str = "trailing"):
        super().__init__(diffusion, steps, spacing)
        a = diffusion.schedule.abar(torch.tensor(self._grid)).double()
        self.sigmas = torch.cat([((1 - a) / a).sqrt(), torch.zeros(1, dtype=torch.float64)]).float()
        self.reset()

    def reset(self) -> None:
        self._prev_x0: torch.Tensor | None = None

    @staticmethod
    def _alpha_sigma(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = 1 / (s**2 + 1).sqrt()
        return alpha, s * alpha

    def step(self, i, x, out, noise=None):
        x = x.float()
        x0, _, _ = self._x0_eps(i, x, out)
        s_now, s_next = self.sigmas[i].to(x.device), self.sigmas[i + 1].to(x.device)
        a_t, sig_t = self._alpha_sigma(s_next)
        a_s, sig_s = self._alpha_sigma(s_now)
        h = (a_t.log() - sig_t.log()) - (a_s.log() - sig_s.log())
        last = i == len(self._grid) - 1
        if self._prev_x0 is None or last:
            d = x0
        else:
            a_p, sig_p = self._alpha_sigma(self.sigmas[i - 1].to(x.device))
            h_prev = (a_s.log() - sig_s.log()) - (a_p.log() - sig_p.log())
            r = h_prev / h
            d = x0 + 0.5 * (1 / r) * (x0 - self._prev_x0)
        self._prev_x0 = x0
        return (sig_t / sig_s) * x - (a_t * (torch.exp(-h) - 1.0)) * d


# ----------------------------------------------------------------------------- flow matching
class _Flow(Sampler):
    def __init__(self, flow: FlowMatching, steps: int = 50, shift: float | None = None):
        self.flow, self.steps = flow, int(steps)
        self.ts = flow.grid(self.steps, shift)

    def grid(self) -> list[float]:
        return self.ts[:-1].tolist()

    def _t(self, i, x):
        return self.ts[i].expand(x.shape[0]).to(x.device)


class FlowEuler(_Flow):
    """Euler steps of dx/dt = v from t = 1 (noise) to t = 0 (data)."""

    def step(self, i, x, out, noise=None):
        return x.float() + (self.ts[i + 1] - self.ts[i]).to(x.device) * out.float()


class FlowHeun(_Flow):
    """Heun's second-order steps (two model calls per step; the last step, landing on t = 0, is Euler)."""

    calls_per_step = 2

    @torch.no_grad()
    def run(self, model, x, generator=None, callback=None):
        x = x.float()
        for i in range(self.steps):
            t0, t1 = self.ts[i].to(x.device), self.ts[i + 1].to(x.device)
            v0 = model(x, t0.expand(x.shape[0])).float()
            x_euler = x + (t1 - t0) * v0
            if float(t1) > 0:
                v1 = model(x_euler, t1.expand(x.shape[0])).float()
                x = x + (t1 - t0) * 0.5 * (v0 + v1)
            else:
                x = x_euler
            if callback is not None:
                callback(i, x)
        return x


@dataclass(frozen=True)
class SamplerSpec:
    """What a sampler name means: its class, the transport it serves, the options it takes beyond
    the number of steps (settings of the same name) and its default number of steps."""

    cls: type[Sampler]
    transport: type
    options: tuple[str, ...] = ()
    default_steps: int = 50


SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(DDPM, GaussianDiffusion, default_steps=1000),
    "ddim": SamplerSpec(DDIM, GaussianDiffusion, options=("eta",)),
    "dpmpp_2m": SamplerSpec(DPMSolverPP, GaussianDiffusion),
    "euler": SamplerSpec(FlowEuler, FlowMatching),
    "heun": SamplerSpec(FlowHeun, FlowMatching),
}


def _takers(option: str) -> str:
    """The samplers that declare ``option``, for error messages."""
    return ", ".join(sorted(n for n, s in SAMPLERS.items() if option in s.options)) or "none"


def sampler_spec(name: str, transport) -> SamplerSpec:
    """The registry entry of ``name``, refused (one line) when unknown or made for another transport."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, not {name!r}")
    spec = SAMPLERS[name]
    if not isinstance(transport, spec.transport):
        ok = sorted(n for n, s in SAMPLERS.items() if isinstance(transport, s.transport))
        raise ValueError(f"sampler {name!r} needs a {spec.transport.__name__} transport; for "
                         f"{type(transport).__name__}: {ok}")
    return spec


def sampler_defaults(transport, sampler: str | None, steps: int | None) -> tuple[str, int]:
    """(sampler, steps) with the transport's default sampler and that sampler's default steps
    where unset (None or 0)."""
    name = sampler or transport.default_sampler
    spec = sampler_spec(name, transport)
    return name, int(steps or spec.default_steps)


def make_sampler(name: str, transport, steps: int, **options) -> Sampler:
    """A sampler by name for ``transport`` (a GaussianDiffusion or FlowMatching) with ``options``
    among those it declares."""
    spec = sampler_spec(name, transport)
    for key in options:
        if key not in spec.options:
            raise ValueError(f"sampler {name!r} takes no {key!r} (only {_takers(key)})")
    return spec.cls(transport, steps=steps, **options)


def sampler_options(name: str, settings: SamplingSettings) -> dict:
    """The settings that sampler ``name`` declares as options (``eta`` for ddim). A setting that is
    only another sampler's option, set away from its default, is refused: ``eta=0.5`` with euler
    would silently do nothing."""
    defaults = SamplingSettings()
    options = {}
    for key in sorted({o for spec in SAMPLERS.values() for o in spec.options}):
        if key in SAMPLERS[name].options:
            options[key] = getattr(settings, key)
        elif getattr(settings, key) != getattr(defaults, key):
            raise ValueError(f"sampling.{key}={getattr(settings, key)} does nothing with sampler {name!r} "
                             f"(only {_takers(key)} takes it)")
    return options


def guided_sample(transport, net, shape: tuple[int, ...], settings: SamplingSettings, generator=None, device=None,
                  cond=None, uncond=None, callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Noise of ``shape`` -> a sample: the sampler of ``settings`` (the transport's default when
    unset) for ``transport`` driving ``net(x, t, cond)`` under the classifier-free guidance of
    ``settings`` (cond and uncond rows batched). ``settings.seed`` is not read: ``generator`` is
    the noise."""
    sampler, steps = sampler_defaults(transport, settings.sampler, settings.steps)
    smp = make_sampler(sampler, transport, steps, **sampler_options(sampler, settings))
    model = Guidance.of(settings).denoiser(net, cond, uncond, smp.model_calls)
    x = randn_like(torch.empty(shape, device=device), generator)
    return smp.run(model, x, generator=generator, callback=callback)
