"""Prompts -> images for a latent denoiser and the KL autoencoder of its latents."""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from unifuse.pipelines.base import Pipeline
from unifuse.run.progress import interactive
from unifuse.sampling import eval_mode


class LatentDiffusionPipeline(Pipeline):
    """A latent denoiser (``unifuse.models.dit.DiT``: its diffusion config says what it predicts) +
    the KL autoencoder whose normalised latents it was trained on. Sampling: noise -> any sampler of
    :mod:`unifuse.diffusion` -> ``decode_latents``, with classifier-free guidance batched."""

    SETTINGS = ("sampler", "steps", "cfg_scale", "cfg_schedule", "eta", "seed", "progress")

    def __init__(self, net: nn.Module, tokenizer: nn.Module, cond: str = "text", sampling: dict | None = None):
        super().__init__(net, tokenizer, cond, sampling)
        channels, want = getattr(tokenizer, "latent_channels", None), net.latent_shape()[0]
        if channels != want:
            raise ValueError(f"the autoencoder has {channels} latent channels but the denoiser was trained on "
                             f"{want}: pass the autoencoder it was trained with (tokenizer=...)")

    @property
    def kind(self) -> str:
        return "ldm"

    def settings(self, **overrides) -> dict:
        s = {k: v for k, v in {**self.sampling, **overrides}.items() if k in self.SETTINGS}
        from unifuse.diffusion import FlowMatching

        default = "euler" if isinstance(self.net.diffusion, FlowMatching) else "ddim"
        s["sampler"] = s.get("sampler") or default
        s["steps"] = s.get("steps") or (50 if s["sampler"] in ("ddim", "dpmpp_2m", "euler", "heun") else 1000)
        return s

    @torch.no_grad()
    def latents(self, prompts: list, sampler: str = "ddim", steps: int = 50, cfg_scale: float | None = None,
                cfg_schedule: str = "constant", eta: float = 0.0, seed: int | list[int] | None = None,
                progress: bool = False) -> torch.Tensor:
        from unifuse.diffusion.samplers import guided_sample
        from unifuse.sampling.tokens import row_generators

        net = self.net
        dev = next(net.parameters()).device
        conds = self.conditions(prompts)
        b = len(conds)
        gens = row_generators(seed, b, dev)
        # cond and uncond rows encoded together (one width), the caption encoder run once for all steps
        both = net.text_states(net.encode_conditions(conds + ([None] * b if cfg_scale is not None else []), dev))
        cond = {k: v[:b] for k, v in both.items()}
        uncond = {k: v[b:] for k, v in both.items()} if cfg_scale is not None else None
        # a step bar on a terminal only: logs and CI output get no carriage-return spam
        with tqdm(total=int(steps), desc=f"{sampler} {steps} steps", unit="step",
                  disable=not (progress and interactive())) as bar:
            return guided_sample(net.diffusion, net, (b, *net.latent_shape()), sampler, steps, cfg_scale,
                                 cfg_schedule, eta, gens, dev, cond=cond, uncond=uncond,
                                 callback=lambda i, _: bar.update(1))

    @torch.no_grad()
    def generate(self, prompts: list, **overrides) -> torch.Tensor:
        """(len(prompts), 3, H, W) images in [-1, 1]; ``overrides``: sampler, steps, cfg_scale,
        cfg_schedule, eta, seed over the stored settings. Row r with seed s uses seed s + r."""
        with eval_mode(self.net):
            z = self.latents(prompts, **self.settings(**overrides))
        return self.tokenizer.decode_latents(z).clamp(-1, 1)
