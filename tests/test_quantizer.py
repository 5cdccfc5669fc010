from __future__ import annotations

import torch
from torch.nn import functional as F

from unifuse.models.autoencoder import AutoencoderConfig
from unifuse.models.quantize import QuantizerConfig, VectorQuantizer, nearest_code, squared_distances
from unifuse.models.vqvae import VQVAE


def test_distances_match_cdist():
    z, e = torch.randn(300, 8), torch.randn(64, 8)
    torch.testing.assert_close(squared_distances(z, e), torch.cdist(z, e).pow(2), rtol=1e-4, atol=1e-4)
    # chunked nearest-code search: same answer whatever the chunk size
    for chunk in (7, 64, 4096):
        assert torch.equal(nearest_code(z, e, chunk=chunk), torch.cdist(z, e).argmin(1))


def test_nearest_code_losses_and_straight_through():
    q = VectorQuantizer(QuantizerConfig(codebook_size=16, code_dim=4, l2_norm=False, beta=0.25))
    z = torch.randn(2, 5, 4, requires_grad=True)
    zq, idx, loss = q(z)
    expected = torch.cdist(z.detach().reshape(-1, 4), q.codebook().detach()).argmin(1).reshape(2, 5)
    assert torch.equal(idx, expected)
    e = q.codebook()[idx]
    ref = F.mse_loss(e, z.detach()) + 0.25 * F.mse_loss(z, e.detach())
    torch.testing.assert_close(loss, ref)
    zq.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))  # straight-through: identity gradient


def test_gradient_reaches_encoder_and_codebook():
    net = VQVAE(AutoencoderConfig(channels=8, ch_mult=[1, 2], z_channels=8),
                QuantizerConfig(codebook_size=32, code_dim=4))
    x = torch.randn(2, 3, 16, 16)
    recon, idx, qloss = net(x)
    assert recon.shape == x.shape and idx.shape == (2, 8, 8)
    ((recon - x).abs().mean() + qloss).backward()
    assert net.encoder.conv_in.weight.grad.abs().sum() > 0
    assert net.quantizer.embedding.grad.abs().sum() > 0


def test_usage_metric_on_constructed_case():
    q = VectorQuantizer(QuantizerConfig(codebook_size=8, code_dim=2, l2_norm=False))
    with torch.no_grad():
        q.embedding.copy_(torch.tensor([[i * 10.0, 0.0] for i in range(8)]))
    q.eval()
    # hit codes 0 and 3 equally often, nothing else: usage 2/8, perplexity exactly 2
    z = torch.tensor([[0.1, 0.0], [30.2, 0.0]] * 50)
    q(z)
    stats = q.usage_stats("eval")
    assert stats["usage"] == 0.25 and abs(stats["perplexity"] - 2.0) < 1e-5 and stats["tokens"] == 100
    assert q.usage_stats("eval")["tokens"] == 0  # reset after reading


def _collapsed(threshold: float) -> VectorQuantizer:
    cfg = QuantizerConfig(codebook_size=32, code_dim=4, l2_norm=True, dead_code_threshold=threshold, usage_decay=0.5)
    q = VectorQuantizer(cfg)
    with torch.no_grad():  # code 0 sits on the data, the other 31 point the opposite way
        q.embedding.copy_(torch.full((32, 4), -0.5))
        q.embedding[0] = 0.5
    return q.train()


def test_dead_code_restart_revives_unused_codes():
    torch.manual_seed(0)
    data = F.normalize(torch.rand(512, 4) + 0.5, dim=1)  # positive orthant only
    counts = {}
    for threshold in (0.0, 0.05):
        q = _collapsed(threshold)
        q(data)
        assert (q.train_counts > 0).sum() == 1  # collapsed: a single code in use
        q.usage_stats("train")
        for _ in range(10):
            q(data[torch.randperm(512)[:256]])
        counts[threshold] = int((q.train_counts > 0).sum())
    assert counts[0.0] == 1 and counts[0.05] >= 16


def test_spread_restarts_avoid_the_mode_a_live_code_already_covers():
    """90% of the encoder outputs sit on one point that a live code covers: "spread" restarts land on
    the other 10% (no near-duplicates of the mode), "uniform" ones mostly on the mode."""
    torch.manual_seed(0)
    mode = F.normalize(torch.ones(1, 4), dim=1)
    rest = F.normalize(torch.randn(100, 4), dim=1)
    z = torch.cat([mode.repeat(900, 1), rest])
    on_mode = {}
    for sampling in ("spread", "uniform"):
        q = VectorQuantizer(QuantizerConfig(codebook_size=32, code_dim=4, dead_code_threshold=0.5,
                                            restart_sampling=sampling))
        q.embedding.data[0] = mode[0]
        q.usage.fill_(0.0)
        q.usage[0] = 1.0  # only code 0 is alive
        assert q.restart_dead_codes(z) == 31
        on_mode[sampling] = int(((q.embedding[1:] - mode).norm(dim=1) < 1e-2).sum())
    assert on_mode["spread"] == 0 and on_mode["uniform"] >= 20


def test_ema_codebook_moves_toward_data():
    q = VectorQuantizer(QuantizerConfig(codebook_size=4, code_dim=2, l2_norm=False, ema_decay=0.5))
    target = torch.tensor([[3.0, 3.0]])
    before = (q.embedding - target).norm(dim=1).min()
    q.train()
    for _ in range(20):
        q(target.repeat(16, 1))
    after = (q.embedding - target).norm(dim=1).min()
    assert after < 0.05 < before
    assert not isinstance(q.embedding, torch.nn.Parameter)
