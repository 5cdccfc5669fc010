"""Prompts -> images for the discrete-token generators (AR GPT, MaskGIT) and their VQ tokenizer."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from unifuse.paradigms import paradigm_of
from unifuse.pipelines.base import Pipeline
from unifuse.sampling import eval_mode
from unifuse.sampling.settings import SamplingSettings


class TokenImagePipeline(Pipeline):
    """A discrete-token generator + its VQ tokenizer; codes come from the decoding program its
    paradigm names (``decode(net, conds, **sampling) -> codes``, e.g. :mod:`unifuse.decoding.ar`)."""

    def __init__(self, net: nn.Module, tokenizer: nn.Module, cond: str = "text",
                 sampling: SamplingSettings | dict | None = None):
        super().__init__(net, tokenizer, cond, sampling)
        codes = getattr(tokenizer, "codebook_size", None)
        if codes is not None and codes != net.vocab.image_codes:
            raise ValueError(f"the image tokenizer has {codes} codes but the generator's vocabulary has "
                             f"{net.vocab.image_codes} image codes: pass the tokenizer it was trained with")
        self.decode = paradigm_of(net).decoder_function()
        # the settings the decoding program takes (the AR GPT's has no steps)
        params = inspect.signature(self.decode).parameters
        self.setting_names = tuple(k for k in SamplingSettings.names() if k in params)

    @torch.no_grad()
    def generate(self, prompts: list, progress: bool = False, **overrides) -> torch.Tensor:
        """(len(prompts), 3, H, W) images in [-1, 1]. ``overrides``: sampling settings (cfg_scale,
        temperature, steps, seed, ...) over the stored ones; ``progress=True`` shows a bar."""
        settings = self.arguments(self.settings(**overrides))
        with eval_mode(self.net):
            codes = self.decode(self.net, self.conditions(prompts), progress=progress, **settings)
        return self.tokenizer.decode(codes).clamp(-1, 1)
