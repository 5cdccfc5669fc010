"""Tests written to kill mutmut survivors in unifuse/models/maskgit.py (see `make mutation`)."""

from __future__ import annotations

import torch

import unifuse.models.maskgit as mg
from unifuse.models.maskgit import MaskGIT
from unifuse.models.transformer import TransformerConfig
from unifuse.text.vocab import VocabLayout


def test_training_masks_at_least_one_code_and_no_more_than_the_schedule(monkeypatch):
    """u close to 1 gives a masking ratio cos(pi/2 * u) near 0: ceil(ratio * N) = 1 code masked per image,
    not more (and never 0, or the row would have no loss)."""
    torch.manual_seed(0)
    m = MaskGIT(TransformerConfig(dim=32, n_layers=1, n_heads=2), VocabLayout(image_codes=16), grid=4,
                max_text_len=8)
    real_rand = torch.rand

    def rand(*size, **kw):  # the per-row ratio draw is the (B, 1) one
        if tuple(size) == (3, 1):
            return torch.full((3, 1), 0.99)
        return real_rand(*size, **kw)

    monkeypatch.setattr(mg.torch, "rand", rand)
    out = m.loss(torch.randint(0, 16, (3, 4, 4)), ["a", "b", "c"])
    assert out["masked_fraction"].item() == 1 / 16
    assert torch.isfinite(out["loss"])
