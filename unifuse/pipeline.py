"""Prompts -> images: what the sampling CLI, the evaluation harness and the online FID callback call
for a generator, whatever its paradigm. A pipeline holds the net, the image tokenizer that decodes
its output and the sampling settings the training run chose (overridable per call).

Each generator kind names its pipeline class in ``unifuse.run.checkpoint``; the discrete-token
generators (AR GPT, MaskGIT) share :class:`TokenImagePipeline`.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from unifuse.run.progress import interactive


class Pipeline:
    """What every pipeline holds: the net, the image tokenizer / autoencoder that decodes its
    output, the conditioning type and the stored sampling settings."""

    def __init__(self, net: nn.Module, tokenizer: nn.Module, cond: str = "text", sampling: dict | None = None):
        if cond not in ("text", "class"):
            raise ValueError(f"cond must be 'text' or 'class', not {cond!r}")
        self.net, self.tokenizer, self.cond = net, tokenizer, cond
        self.sampling = dict(sampling or {})

    def conditions(self, prompts: list) -> list:
        """Prompt strings -> the net's conditions (class-conditional nets take integers); an empty
        prompt or None is the unconditional branch."""
        return [None if p is None or p == "" else (int(p) if self.cond == "class" else p) for p in prompts]

    def to(self, device):
        self.net.to(device)
        self.tokenizer.to(device)
        return self


class TokenImagePipeline(Pipeline):
    """A discrete-token generator (``generate(conds, **sampling) -> codes``) + its VQ tokenizer."""

    def __init__(self, net: nn.Module, tokenizer: nn.Module, cond: str = "text", sampling: dict | None = None):
        super().__init__(net, tokenizer, cond, sampling)
        codes = getattr(tokenizer, "codebook_size", None)
        if codes is not None and codes != net.vocab.image_codes:
            raise ValueError(f"the image tokenizer has {codes} codes but the generator's vocabulary has "
                             f"{net.vocab.image_codes} image codes: pass the tokenizer it was trained with")

    @property
    def kind(self) -> str:
        return self.net.kind

    def settings(self, **overrides) -> dict:
        """The stored sampling settings with ``overrides`` applied, reduced to what this net takes."""
        return self.net.sampling_kwargs({**self.sampling, **overrides})

    @torch.no_grad()
    def generate(self, prompts: list, **overrides) -> torch.Tensor:
        """(len(prompts), 3, H, W) images in [-1, 1]. ``overrides``: sampling settings (cfg_scale,
        temperature, steps, seed, ...) over the stored ones; ``progress=True`` shows a bar."""
        was_training = self.net.training
        self.net.eval()
        try:
            codes = self.net.generate(self.conditions(prompts), **self.settings(**overrides))
        finally:
            self.net.train(was_training)
        return self.tokenizer.decode(codes).clamp(-1, 1)


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
        from unifuse.models.sampling import row_generators

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
        was_training = self.net.training
        self.net.eval()
        try:
            z = self.latents(prompts, **self.settings(**overrides))
        finally:
            self.net.train(was_training)
        return self.tokenizer.decode_latents(z).clamp(-1, 1)


class TransfusionPipeline(LatentDiffusionPipeline):
    """A Transfusion model (``unifuse.models.transfusion``) + the KL autoencoder of its image blocks:
    text -> image (``generate``), image -> text (``caption``) and interleaved documents
    (``document``), all through the model's KV-cached decoding."""

    @property
    def kind(self) -> str:
        return "transfusion"

    @torch.no_grad()
    def latents(self, prompts: list, sampler: str = "ddim", steps: int = 50, cfg_scale: float | None = None,
                cfg_schedule: str = "constant", eta: float = 0.0, seed: int | list[int] | None = None,
                progress: bool = False) -> torch.Tensor:
        return self.net.generate(self.conditions(prompts), sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                                 cfg_schedule=cfg_schedule, eta=eta, seed=seed)

    @torch.no_grad()
    def caption(self, images: torch.Tensor, max_new_tokens: int = 48, temperature: float = 0.0,
                seed: int | None = 0) -> list[str]:
        """Images in [-1, 1] (B, 3, H, W) -> captions (greedy by default)."""
        z = self.tokenizer.encode_latents(images.to(next(self.net.parameters()).device))
        was_training = self.net.training
        self.net.eval()
        try:
            return self.net.caption(z, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        finally:
            self.net.train(was_training)

    @torch.no_grad()
    def document(self, parts: list[str | None], max_new_tokens: int = 0, temperature: float = 1.0,
                 **overrides) -> list[dict]:
        """Interleaved generation (see ``Transfusion.document``); image segments come back decoded,
        as (3, H, W) images in [-1, 1]."""
        s = self.settings(**overrides)
        s.pop("progress", None)
        was_training = self.net.training
        self.net.eval()
        try:
            segs = self.net.document(parts, max_new_tokens=max_new_tokens, temperature=temperature,
                                     **{k: v for k, v in s.items() if v is not None or k == "cfg_scale"})
        finally:
            self.net.train(was_training)
        for seg in segs:
            if "image" in seg:
                seg["image"] = self.tokenizer.decode_latents(seg["image"][None]).clamp(-1, 1)[0]
        return segs
