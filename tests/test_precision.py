"""``${unifuse.native_bf16:}``: bf16-mixed only where bf16 matmuls are native."""

from __future__ import annotations

import pytest
import torch

from unifuse.config import native_bf16_precision


@pytest.mark.parametrize(("amx", "avx512_bf16", "expected"), [
    (True, False, "bf16-mixed"),
    (False, True, "bf16-mixed"),
    (False, False, "32-true"),
])
def test_cpu_precision_follows_the_matrix_units(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert native_bf16_precision() == expected


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16-mixed"), (False, "32-true")])
def test_gpu_precision_follows_bf16_support(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert native_bf16_precision() == expected


def test_presets_resolve_it(tmp_path):
    from tests.conftest import compose_cfg

    cfg = compose_cfg(["experiment=transfusion_emoji", "model.tokenizer_ckpt=identity"], tmp_path)
    assert cfg.trainer.precision == native_bf16_precision()
    assert cfg.data.collator.image_tokens == (cfg.model.net.image.latent_size // cfg.model.net.image.patch_size) ** 2
    for preset in ("kl_emoji", "ldm_emoji"):
        assert compose_cfg([f"experiment={preset}"], tmp_path).trainer.precision == native_bf16_precision()
