"""The one diffusion module: noise schedules and prediction targets (:mod:`.schedule`), the flow
matching transport (:mod:`.flow`), samplers driven by a ``model output at (x, t)`` callable
(:mod:`.samplers`; classifier-free guidance is :mod:`unifuse.sampling.guidance`). Latent diffusion and
Transfusion both use it; nothing here knows about networks, text or Lightning."""

from unifuse.diffusion.config import DiffusionConfig
from unifuse.diffusion.flow import FlowMatching
from unifuse.diffusion.samplers import SAMPLERS, make_sampler
from unifuse.diffusion.schedule import GaussianDiffusion, NoiseSchedule

__all__ = ["SAMPLERS", "DiffusionConfig", "FlowMatching", "GaussianDiffusion", "NoiseSchedule",
           "make_sampler"]
