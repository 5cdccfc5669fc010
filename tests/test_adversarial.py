"""The autoencoders' adversarial term (VQGAN / KL-GAN: PatchGAN, hinge, adaptive weight, start step,
two optimizers under manual optimisation) and LPIPS from a local weights file the test makes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import compose_cfg, kl_overrides, tiny_overrides
from unifuse.models.discriminator import PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss
from unifuse.models.lpips import LPIPS, convert_official


def test_hinge_losses_and_adaptive_weight():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # D: relu(1 - real) = [0, 0.5] -> 0.25; relu(1 + fake) = [0, 1.5] -> 0.75; halved sum 0.5
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5)
    assert hinge_g_loss(fake).item() == pytest.approx(0.75)
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    rec, g = (3 * w).sum(), (w**2).sum()  # grads: [3, 3] and [2, 4]
    expected = (3 * 2**0.5) / (20**0.5 + 1e-4)
    assert adaptive_weight(rec, g, w).item() == pytest.approx(expected, rel=1e-5)


def test_patch_discriminator_gives_patch_logits():
    d = PatchDiscriminator(3, 8, 3)
    out = d(torch.randn(2, 3, 32, 32))
    assert out.shape[0] == 2 and out.shape[1] == 1 and out.shape[-1] > 1


@pytest.mark.parametrize("model", ["vqvae", "kl_autoencoder"])
def test_adversarial_training_starts_at_its_step_and_trains_both_nets(model, tiny_emoji, tmp_path):
    from unifuse.run.checkpoint import load_net
    from unifuse.train import train

    over = tiny_overrides(tiny_emoji) if model == "vqvae" else kl_overrides(tiny_emoji)
    over += ["model.adversarial.channels=8", "model.adversarial.layers=1"]  # 16x16 images
    cfg = compose_cfg(over + ["trainer=debug_limit", "trainer.max_epochs=2", "logger=csv",
                              "callbacks.fidelity.enabled=false", "model.adversarial.weight=0.5",
                              "model.adversarial.start_step=2"], tmp_path)
    r = train(cfg)
    ck = torch.load(r["checkpoint"], weights_only=True)
    disc = {k: v for k, v in ck["state_dict"].items() if k.startswith("discriminator.")}
    assert disc and len(ck["optimizer_states"]) == 2
    assert "train/d_loss" in r["metrics"] and "train/g_loss" in r["metrics"] and "train/adaptive_weight" in r["metrics"]
    fresh = PatchDiscriminator(3, 8, 1)
    torch.manual_seed(0)
    assert any(not torch.equal(v, fresh.state_dict()[k[len("discriminator."):]]) for k, v in disc.items()
               if v.is_floating_point())
    net = load_net(r["checkpoint"])  # the discriminator is not part of the net
    assert not any("discriminator" in k for k in net.state_dict())
    # before start_step: no adversarial loss, the discriminator untouched (1 training batch only)
    cfg = compose_cfg(over + ["trainer=debug_limit", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                              "logger=csv", "callbacks.fidelity.enabled=false", "model.adversarial.weight=0.5",
                              "model.adversarial.start_step=100"], tmp_path / "late")
    torch.manual_seed(123)
    r = train(cfg)
    assert "train/d_loss" not in r["metrics"] and "train/g_loss" not in r["metrics"]


def test_lpips_needs_its_weights_file_naming_the_setting(tiny_emoji, tmp_path):
    from hydra.errors import InstantiationException

    from unifuse.train import train

    with pytest.raises((FileNotFoundError, InstantiationException), match="model.lpips_weights"):
        train(compose_cfg(tiny_overrides(tiny_emoji) + ["model.perceptual_weight=0.1",
                                                        f"model.lpips_weights={tmp_path}/none.pt"], tmp_path))


def test_lpips_from_a_local_file_trains_with_the_perceptual_term(tiny_emoji, tmp_path):
    from torchvision.models import vgg16

    from unifuse.train import train

    # the official layout: torchvision's VGG16 checkpoint + lpips' linear heads, converted once
    torch.manual_seed(0)
    vgg = tmp_path / "vgg16.pth"
    torch.save(vgg16(weights=None).state_dict(), vgg)
    lin = tmp_path / "lpips_vgg.pth"
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, w, 1, 1) for i, w in enumerate((64, 128, 256, 512, 512))},
               lin)
    weights = convert_official(vgg, lin, tmp_path / "lpips.pt")
    lp = LPIPS.from_file(weights)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert lp(x, x).abs().max() < 1e-6
    d = lp(x, x.flip(0))
    assert (d > 0).all() and torch.allclose(d, lp(x.flip(0), x))
    with pytest.raises(ValueError, match="not an LPIPS weights file"):
        LPIPS.from_file(vgg)
    r = train(compose_cfg(tiny_overrides(tiny_emoji) + [
        "trainer=debug_limit", "trainer.max_epochs=1", "logger=csv", "callbacks.fidelity.enabled=false",
        "model.perceptual_weight=0.1", f"model.lpips_weights={weights}"], tmp_path / "run"))
    assert r["metrics"]["train/lpips"] > 0
    assert r["metrics"]["train/loss"] > r["metrics"]["train/recon"]


def test_ddp_two_processes_adversarial(tiny_emoji, tmp_path):
    """Two nets optimised in turn under DDP: plain ``ddp`` is refused before training naming the
    strategy setting; with ``ddp_find_unused_parameters_true`` both nets train on 2 ranks."""
    from tests.test_distributed import ROOT, run, run_dirs

    args = kl_overrides(tiny_emoji) + [
        "model.adversarial.channels=8", "model.adversarial.layers=1", "model.adversarial.weight=0.5",
        "model.adversarial.start_step=1", f"paths.root_dir={tmp_path}", "logger=csv", "trainer=ddp",
        "trainer.devices=2", "trainer.max_epochs=1", "+trainer.limit_val_batches=1", "callbacks.fidelity.enabled=false"]
    plain = subprocess.run([sys.executable, "-m", "unifuse.train", *args], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert plain.returncode != 0 and "trainer.strategy=ddp_find_unused_parameters_true" in plain.stderr + plain.stdout
    run(args + ["trainer.strategy=ddp_find_unused_parameters_true", f"paths.root_dir={tmp_path}/ok"], tmp_path)
    dirs = run_dirs(tmp_path / "ok" / "outputs")
    ck = torch.load(dirs[0] / "checkpoints" / "last.ckpt", weights_only=True)
    assert len(ck["optimizer_states"]) == 2
    assert all(s["state"] for s in ck["optimizer_states"]), "a net was never stepped"
