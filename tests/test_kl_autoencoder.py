"""The KL autoencoder: a diagonal-Gaussian bottleneck on the shared conv body, latent statistics
measured from training images and carried by the checkpoint, and the reconstruction harness."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import compose_cfg, kl_overrides
from unifuse.models.autoencoder import AutoencoderConfig
from unifuse.models.kl_autoencoder import KLAutoencoder


@pytest.fixture(scope="module")
def trained_kl(tiny_emoji, domain_weights, tmp_path_factory):
    from unifuse.train import train

    out = tmp_path_factory.mktemp("kl_run")
    cfg = compose_cfg(kl_overrides(tiny_emoji) + ["trainer=debug_limit", "trainer.max_epochs=2", "logger=csv",
                                                  f"eval.domain_weights={domain_weights}"], out)
    return train(cfg)


def test_posterior_samples_in_training_and_decodes_the_mean_in_eval():
    torch.manual_seed(0)
    net = KLAutoencoder(AutoencoderConfig(channels=8, ch_mult=[1, 2], z_channels=8), latent_channels=3)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    net.eval()
    a, kl, q = net(x)
    b, _, _ = net(x)
    assert torch.equal(a, b) and q.mean.shape == (2, 3, 8, 8) and kl.shape == (2,) and (kl >= 0).all()
    net.train()
    c, _, _ = net(x)
    assert not torch.equal(a, c)  # a posterior sample, not the mean
    # KL of N(mu, sigma^2) against N(0, 1), summed over elements
    q.mean, q.logvar = torch.full_like(q.mean, 0.5), torch.full_like(q.logvar, math.log(0.25))
    expected = 0.5 * (0.25 + 0.25 - 1 - math.log(0.25)) * q.mean[0].numel()
    torch.testing.assert_close(q.kl(), torch.full((2,), expected))


def test_normalised_latents_need_measured_statistics():
    net = KLAutoencoder(AutoencoderConfig(channels=8, ch_mult=[1, 2], z_channels=8), 4).eval()
    with pytest.raises(ValueError, match="latent statistics"):
        net.encode_latents(torch.zeros(1, 3, 16, 16))
    stats = net.measure_latent_stats([torch.rand(8, 3, 16, 16) * 2 - 1])
    z = net.encode_latents(torch.rand(8, 3, 16, 16) * 2 - 1)
    assert stats["images"] == 8 and z.shape == (8, 4, 8, 8)
    raw = net.posterior(torch.zeros(1, 3, 16, 16)).mean
    torch.testing.assert_close(net.decode_latents(net.normalise(raw)), net.decode_raw(raw), atol=1e-5, rtol=1e-4)


def test_trained_checkpoint_carries_latent_stats_that_normalise_held_out_images(trained_kl, tiny_emoji):
    """Latents of held-out (validation) images, normalised with the values stored in the checkpoint,
    have std in [0.9, 1.1] and mean within +-0.1."""
    from unifuse.eval.fidelity import reference_set
    from unifuse.models.kl_autoencoder import load_kl_autoencoder
    from unifuse.run.checkpoint import read_checkpoint

    ck = read_checkpoint(trained_kl["checkpoint"])
    assert ck.kind == "kl_autoencoder" and 32 <= int(ck.state_dict["latent_stats_images"]) < 48
    assert float(ck.state_dict["latent_scale"]) != 1.0  # measured, not the default
    net = load_kl_autoencoder(trained_kl["checkpoint"])
    val, _ = reference_set(str(tiny_emoji / "val"), 64)
    z = net.encode_latents(val.float() / 127.5 - 1)
    assert 0.9 <= z.std().item() <= 1.1, z.std()
    assert abs(z.mean().item()) <= 0.1, z.mean()
    # and the raw latents are far from unit scale: the normalisation is doing the work
    raw = net.posterior(val.float() / 127.5 - 1).mean
    assert abs(raw.std().item() - 1) > 0.1 or abs(raw.mean().item()) > 0.1


def test_online_rfid_and_the_evaluate_cli_take_kl_checkpoints(trained_kl):
    from unifuse.evaluate import main as evaluate_main

    online = {k: v for k, v in trained_kl["metrics"].items() if k.startswith("eval/rfid@domain-")}
    assert len(online) == 1 and trained_kl["metrics"]["eval/psnr"] > 0
    (name, value), = online.items()
    res = evaluate_main([f"ckpt={trained_kl['checkpoint']}"])
    assert res["kind"] == "kl_autoencoder" and res["metric_names"]["rfid"] == name
    assert res["metrics"]["rfid"] == pytest.approx(value, rel=1e-5, abs=1e-6)
    assert res["metrics"]["psnr"] > 0 and 0 < res["metrics"]["ssim"] <= 1
