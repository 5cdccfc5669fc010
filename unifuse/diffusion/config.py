"""The typed description of a transport: what a denoiser predicts and how noise is added. Networks
store it with their own config (a checkpoint knows how it is sampled) and call :meth:`build`."""

from __future__ import annotations

from dataclasses import dataclass

from unifuse.diffusion.flow import FlowMatching
from unifuse.diffusion.schedule import GaussianDiffusion, NoiseSchedule


@dataclass
class DiffusionConfig:
    """What the denoiser predicts and how noise is added (typed; stored with the net)."""

    transport: str = "ddpm"  # ddpm (discrete Gaussian diffusion) | flow (flow matching)
    schedule: str = "linear"  # ddpm: linear | scaled_linear | cosine
    steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: str = "eps"  # ddpm: eps | v | x0 (flow: always the velocity)
    weighting: str = "uniform"  # ddpm: uniform | min_snr
    min_snr_gamma: float = 5.0
    time_sampling: str = "logit_normal"  # flow: uniform | logit_normal
    shift: float = 1.0  # flow: timestep shift (> 1 for larger images)

    def build(self) -> GaussianDiffusion | FlowMatching:
        if self.transport == "ddpm":
            return GaussianDiffusion(NoiseSchedule(self.schedule, self.steps, self.beta_start, self.beta_end),
                                     self.prediction, self.weighting, self.min_snr_gamma)
        if self.transport == "flow":
            return FlowMatching(self.time_sampling, shift=self.shift)
        raise ValueError(f"diffusion.transport must be 'ddpm' or 'flow', not {self.transport!r}")
