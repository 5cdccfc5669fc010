"""Prompts -> images: what the sampling CLI, the evaluation harness and the online FID callback call
for a generator, whatever its paradigm. A pipeline holds the net, the image tokenizer that decodes
its output and the sampling settings the training run chose (overridable per call).

Each generator kind names its pipeline class in ``unifuse.checkpoint``; the discrete-token
generators (AR GPT, MaskGIT) share :class:`TokenImagePipeline`.
"""

from __future__ import annotations

import torch
from torch import nn


class TokenImagePipeline:
    """A discrete-token generator (``generate(conds, **sampling) -> codes``) + its VQ tokenizer."""

    def __init__(self, net: nn.Module, tokenizer: nn.Module, cond: str = "text", sampling: dict | None = None):
        if cond not in ("text", "class"):
            raise ValueError(f"cond must be 'text' or 'class', not {cond!r}")
        codes = getattr(tokenizer, "codebook_size", None)
        if codes is not None and codes != net.vocab.image_codes:
            raise ValueError(f"the image tokenizer has {codes} codes but the generator's vocabulary has "
                             f"{net.vocab.image_codes} image codes: pass the tokenizer it was trained with")
        self.net, self.tokenizer, self.cond = net, tokenizer, cond
        self.sampling = dict(sampling or {})

    @property
    def kind(self) -> str:
        return self.net.kind

    def settings(self, **overrides) -> dict:
        """The stored sampling settings with ``overrides`` applied, reduced to what this net takes."""
        return self.net.sampling_kwargs({**self.sampling, **overrides})

    def conditions(self, prompts: list) -> list:
        """Prompt strings -> the net's conditions (class-conditional nets take integers); an empty
        prompt or None is the unconditional branch."""
        return [None if p is None or p == "" else (int(p) if self.cond == "class" else p) for p in prompts]

    def to(self, device) -> TokenImagePipeline:
        self.net.to(device)
        self.tokenizer.to(device)
        return self

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
