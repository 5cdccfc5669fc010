"""Long steps are never silent: a bar on a terminal, periodic log lines with an ETA otherwise, and
nothing from ranks other than 0."""

from __future__ import annotations

import logging

from unifuse.run.progress import progress


def test_progress_logs_lines_with_eta_when_not_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="unifuse")
    out = list(progress(range(4), desc="count shards", unit="shard", every_s=0))
    assert out == [0, 1, 2, 3]  # every item passes through, in order
    lines = [r.getMessage() for r in caplog.records]
    assert any("count shards: 2/4 shard (50%)" in m and "ETA" in m for m in lines), lines
    assert any(m.endswith("(done)") for m in lines)


def test_progress_without_total_and_on_other_ranks(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="unifuse")
    list(progress(iter(range(3)), desc="read texts", every_s=0))
    assert any("read texts: 3 it" in r.getMessage() for r in caplog.records)
    caplog.clear()
    monkeypatch.setenv("RANK", "1")
    assert list(progress(range(3), desc="quiet", every_s=0)) == [0, 1, 2]
    assert not caplog.records


def test_fid_reports_what_it_computes(tiny_emoji, domain_weights, caplog):
    from unifuse.eval.fidelity import EvalConfig, evaluate_tokenizer
    from unifuse.models.autoencoder import AutoencoderConfig
    from unifuse.models.quantize import QuantizerConfig
    from unifuse.models.vqvae import VQVAE

    caplog.set_level(logging.INFO)
    net = VQVAE(AutoencoderConfig(channels=8, ch_mult=[1, 2], z_channels=8), QuantizerConfig(codebook_size=16))
    cfg = EvalConfig(domain_weights=str(domain_weights), reference=str(tiny_emoji / "val"), n=8, batch_size=4)
    evaluate_tokenizer(net, cfg)
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("features of 8 + 8 images with unifuse-domain") for m in msgs), msgs
