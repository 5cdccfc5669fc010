"""Prompts -> images, images -> captions and interleaved documents for a Transfusion model."""

from __future__ import annotations

import torch

from unifuse.decoding import document, transfusion
from unifuse.pipelines.latent import LatentDiffusionPipeline
from unifuse.sampling import eval_mode
from unifuse.sampling.settings import SamplingSettings


class TransfusionPipeline(LatentDiffusionPipeline):
    """A Transfusion model (``unifuse.models.transfusion``) + the KL autoencoder of its image blocks:
    text -> image (``generate``), image -> text (``caption``) and interleaved documents
    (``document``), all through its KV-cached decoding (:mod:`unifuse.decoding.transfusion`)."""

    @torch.no_grad()
    def latents(self, prompts: list, settings: SamplingSettings, progress: bool = False) -> torch.Tensor:
        return transfusion.generate(self.net, self.conditions(prompts), **self.arguments(self.with_defaults(settings)))

    @torch.no_grad()
    def caption(self, images: torch.Tensor, max_new_tokens: int = 48, temperature: float = 0.0,
                seed: int | None = 0) -> list[str]:
        """Images in [-1, 1] (B, 3, H, W) -> captions (greedy by default)."""
        z = self.tokenizer.encode_latents(images.to(next(self.net.parameters()).device))
        with eval_mode(self.net):
            return transfusion.caption(self.net, z, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)

    @torch.no_grad()
    def document(self, parts: list[str | None], max_new_tokens: int = 0, temperature: float = 1.0,
                 **overrides) -> list[dict]:
        """Interleaved generation (see :func:`unifuse.decoding.document.document`); image segments
        come back decoded, as (3, H, W) images in [-1, 1]."""
        s = self.arguments(self.settings(**overrides))
        with eval_mode(self.net):
            segs = document.document(self.net, parts, max_new_tokens=max_new_tokens, temperature=temperature, **s)
        for seg in segs:
            if "image" in seg:
                seg["image"] = self.tokenizer.decode_latents(seg["image"][None]).clamp(-1, 1)[0]
        return segs
