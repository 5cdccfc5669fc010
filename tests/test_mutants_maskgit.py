"""Tests written to kill mutmut survivors in unifuse/models/maskgit.py (see `make mutation`)."""

from __future__ import annotations

import torch

import unifuse.models.maskgit as mg
from tests.conftest import packed
from unifuse.models.maskgit import MaskGIT
from unifuse.models.transformer import TransformerConfig
from unifuse.text.vocab import VocabLayout


def test_training_masks_at_least_one_code_and_no_more_than_the_schedule(monkeypatch):
    """u close to 1 gives a masking ratio cos(pi/2 * u) near 0: ceil(ratio * N) = 1 code masked per image,
    not more (and never 0, or the image would have no loss)."""
    torch.manual_seed(0)
    m = MaskGIT(TransformerConfig(dim=32, n_layers=1, n_heads=2), VocabLayout(image_codes=16), grid=4,
                max_text_len=8)
    real_rand = torch.rand

    def rand(*size, **kw):  # the per-image ratio draw is the (rows, images per row) one
        if tuple(size) == (2, 2):
            return torch.full((2, 2), 0.99)
        return real_rand(*size, **kw)

    batch = packed(m, torch.randint(0, 16, (4, 16)), ["a", "b", "c", "d"], seq_len=42, rows=2)
    monkeypatch.setattr(mg.torch, "rand", rand)
    out = m.loss(batch)
    assert out["masked_fraction"].item() == 1 / 16
    assert torch.isfinite(out["loss"])
