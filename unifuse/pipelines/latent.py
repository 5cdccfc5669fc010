"""Prompts -> images for a latent denoiser and the KL autoencoder of its latents."""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from unifuse.diffusion.samplers import guided_sample, sampler_defaults
from unifuse.pipelines.base import Pipeline
from unifuse.run.progress import interactive
from unifuse.sampling import eval_mode
from unifuse.sampling.guidance import Guidance
from unifuse.sampling.settings import SamplingSettings
from unifuse.sampling.tokens import row_generators


class LatentDiffusionPipeline(Pipeline):
    """A latent denoiser (``unifuse.models.dit.DiT``: its diffusion config says what it predicts) +
    the KL autoencoder whose normalised latents it was trained on. Sampling: noise -> any sampler of
    :mod:`unifuse.diffusion` -> ``decode_latents``, with classifier-free guidance batched."""

    setting_names = ("sampler", "steps", "cfg_scale", "cfg_schedule", "eta", "seed")

    def __init__(self, net: nn.Module, tokenizer: nn.Module, cond: str = "text",
                 sampling: SamplingSettings | dict | None = None):
        super().__init__(net, tokenizer, cond, sampling)
        channels, want = getattr(tokenizer, "latent_channels", None), net.latent_shape()[0]
        if channels != want:
            raise ValueError(f"the autoencoder has {channels} latent channels but the denoiser was trained on "
                             f"{want}: pass the autoencoder it was trained with (tokenizer=...)")

    def settings(self, **overrides) -> SamplingSettings:
        """The stored settings with ``overrides`` applied; an unset sampler or number of steps is
        the transport's default sampler and that sampler's default steps."""
        return self.with_defaults(super().settings(**overrides))

    def with_defaults(self, settings: SamplingSettings) -> SamplingSettings:
        sampler, steps = sampler_defaults(self.net.diffusion, settings.sampler, settings.steps)
        return settings.override(sampler=sampler, steps=steps)

    @torch.no_grad()
    def latents(self, prompts: list, settings: SamplingSettings, progress: bool = False) -> torch.Tensor:
        """(len(prompts), C, H, W) latents sampled under ``settings``. Row r with seed s uses seed s + r."""
        settings = self.with_defaults(settings)
        net = self.net
        dev = next(net.parameters()).device
        conds = self.conditions(prompts)
        b = len(conds)
        gens = row_generators(settings.seed, b, dev)
        guidance = Guidance.of(settings)
        # cond and uncond rows encoded together (one width), the caption encoder run once for all steps
        both = net.text_states(net.encode_conditions(guidance.rows(conds), dev))
        cond = {k: v[:b] for k, v in both.items()}
        uncond = {k: v[b:] for k, v in both.items()} if guidance.guided else None
        # a step bar on a terminal only: logs and CI output get no carriage-return spam
        with tqdm(total=settings.steps, desc=f"{settings.sampler} {settings.steps} steps", unit="step",
                  disable=not (progress and interactive())) as bar:
            return guided_sample(net.diffusion, net, (b, *net.latent_shape()), settings, gens, dev, cond=cond,
                                 uncond=uncond, callback=lambda i, _: bar.update(1))

    @torch.no_grad()
    def generate(self, prompts: list, progress: bool = False, **overrides) -> torch.Tensor:
        """(len(prompts), 3, H, W) images in [-1, 1]; ``overrides``: sampling settings (sampler,
        steps, cfg_scale, cfg_schedule, eta, seed) over the stored ones; ``progress=True`` shows a bar."""
        with eval_mode(self.net):
            z = self.latents(prompts, self.settings(**overrides), progress=progress)
        return self.tokenizer.decode_latents(z).clamp(-1, 1)
