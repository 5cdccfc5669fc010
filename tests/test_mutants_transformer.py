"""Tests written to kill mutmut survivors in unifuse/models/transformer.py (see `make mutation`):
the KV cache's bookkeeping (reserve, mask, truncate, select) and the accounting helpers."""

from __future__ import annotations

import pytest
import torch

from unifuse.models.transformer import SIZES, Transformer, TransformerConfig, config_for

CFG = TransformerConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)


def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG).eval()


def test_truncate_accepts_exactly_zero_to_length_and_says_why_not():
    m = model()
    cache = m.new_cache(2, 10)
    m(torch.randint(0, 61, (2, 5)), cache=cache)
    cache.truncate(5)  # the whole cache: a no-op
    assert cache.length == 5
    cache.truncate(0)  # everything
    assert cache.length == 0
    m(torch.randint(0, 61, (2, 3)), cache=cache)
    for bad in (-1, 4):
        with pytest.raises(ValueError, match=f"^cannot truncate a cache of 3 positions to {bad}$"):
            cache.truncate(bad)


def test_truncate_then_decode_equals_a_fresh_cache():
    m = model()
    x = torch.randint(0, 61, (2, 8))
    cache = m.new_cache(2, 8)
    m(x[:, :6], cache=cache)
    cache.truncate(0)
    out = m(x[:, :4], cache=cache)
    torch.testing.assert_close(out, m(x[:, :4]), atol=1e-5, rtol=1e-5)


def test_select_keeps_rows_and_decoding_goes_on_as_for_those_rows_alone():
    m = model()
    x = torch.randint(0, 61, (3, 9))
    doc = torch.zeros(3, 9, dtype=torch.long)
    doc[1, :2] = -1  # a left-padded row, so the cache is not on the plain path
    cache = m.new_cache(3, 9)
    m(x[:, :6], doc_id=doc[:, :6], cache=cache)
    rows = torch.tensor([2, 1])
    cache.select(rows)
    assert cache.doc_id.shape == (2, 9) and torch.equal(cache.doc_id[:, :6], doc[rows, :6])
    assert all(k.shape[0] == 2 for k in cache.k + cache.v)
    out = m(x[rows, 6:], doc_id=doc[rows, 6:], cache=cache)
    full = m(x[rows], doc_id=doc[rows])
    torch.testing.assert_close(out, full[:, 6:], atol=1e-5, rtol=1e-5)


def test_reserve_refuses_to_overflow_and_fills_ids():
    m = model()
    cache = m.new_cache(1, 4)
    assert cache.plain
    m(torch.randint(0, 61, (1, 3)), cache=cache)
    assert cache.plain and cache.doc_id[0, :3].tolist() == [0, 0, 0] and cache.image_id[0].tolist() == [-1] * 4
    with pytest.raises(ValueError, match=r"^KV cache full: 5 > 4 positions$"):
        m(torch.randint(0, 61, (1, 2)), cache=cache)
    m(torch.randint(0, 61, (1, 1)), image_id=torch.zeros(1, 1, dtype=torch.long), cache=cache)
    assert not cache.plain and cache.length == 4 and cache.image_id[0].tolist() == [-1, -1, -1, 0]


def test_config_for_sizes():
    for name, (layers, dim, heads) in SIZES.items():
        cfg = config_for(name, vocab_size=7)
        assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.vocab_size) == (layers, dim, heads, 7)
    with pytest.raises(KeyError, match="unknown transformer size 'huge'; known: tiny, small, base, 0.16B"):
        config_for("huge")


def test_config_is_the_dataclass_as_a_dict():
    m = model()
    c = m.config()
    assert c["dim"] == 32 and c["n_kv_heads"] == 2 and TransformerConfig(**c) == CFG


def test_parameter_count_and_flops():
    m = model()
    total = sum(p.numel() for p in m.parameters())
    emb = m.tok_emb.weight.numel()
    assert m.num_params(non_embedding=False) == total
    assert m.num_params() == m.num_params(non_embedding=True) == total - emb
    fwd = 2 * (total - emb) + 4 * CFG.n_layers * 16 * CFG.dim
    assert m.flops_per_token(16, training=False) == fwd
    assert m.flops_per_token(16) == 3 * fwd


def test_cache_takes_the_model_dtype():
    m = model().double()
    x = torch.randint(0, 61, (2, 7))
    cache = m.new_cache(2, 7)
    assert all(t.dtype == torch.float64 for t in cache.k + cache.v)
    out = torch.cat([m(x[:, :4], cache=cache), m(x[:, 4:], cache=cache)], 1)
    torch.testing.assert_close(out, m(x), atol=1e-10, rtol=1e-10)
    half = model().new_cache(1, 3, dtype=torch.float16)
    assert half.k[0].dtype == half.v[1].dtype == torch.float16
