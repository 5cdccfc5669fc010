"""The adversarial term of the autoencoders (VQ-VAE -> VQGAN, KL autoencoder): a PatchGAN
discriminator (Isola et al.; taming-transformers' ``NLayerDiscriminator``), hinge losses and the
adaptive generator weight of taming-transformers (the ratio of the reconstruction loss's gradient
norm to the adversarial loss's at the decoder's last layer), switched on after ``start_step`` so
the reconstruction has converged first (early GAN losses ruin reconstructions)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class AdversarialConfig:
    weight: float = 0.5  # scale on the adaptive weight (taming: disc_weight)
    start_step: int = 5000  # generator and discriminator losses are off before this step
    layers: int = 3  # strided conv layers of the PatchGAN
    channels: int = 64
    adaptive: bool = True  # taming's adaptive weight; False: the adversarial loss times `weight`
    lr: float | None = None  # discriminator learning rate (default: the autoencoder's)


class PatchDiscriminator(nn.Module):
    """Per-patch real/fake logits (B, 1, h, w) for images in [-1, 1]."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = channels
        for i in range(1, layers + 1):
            c_out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(c, c_out, 4, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, True)]
            c = c_out
        mods.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """||d rec / d W|| / (||d g / d W|| + 1e-4) at the decoder's last layer W, detached."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()
