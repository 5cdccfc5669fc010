"""KL autoencoder (the latent-diffusion VAE): the shared conv encoder/decoder with a diagonal
Gaussian bottleneck.

The encoder's ``z_channels`` output goes through a 1x1 conv to ``2 * latent_channels`` (mean and
log-variance, clamped to [-30, 20]); training decodes a sample of the posterior, inference its
mean. Diffusion models do not see these raw latents but normalised ones:

    encode_latents(x) = (mean - latent_shift) * latent_scale
    decode_latents(z) = decoder(z / latent_scale + latent_shift)

``latent_shift`` and ``latent_scale`` (1 / std) are measured from training images at the end of
training (:meth:`set_latent_stats`) and stored with the weights as buffers, so every checkpoint and
export carries its own values; nothing assumes Stable Diffusion's 0.18215, which belongs to its VAE.
An autoencoder whose statistics were never measured refuses to produce normalised latents.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from unifuse.models.autoencoder import AutoencoderConfig, Decoder, Encoder
from unifuse.run.checkpoint import load_net


class DiagonalGaussian:
    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.float().chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = (0.5 * self.logvar).exp()

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean + self.std * torch.randn(self.mean.shape, generator=generator, device=self.mean.device)

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over the latent's elements: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class KLAutoencoder(nn.Module):
    def __init__(self, autoencoder: AutoencoderConfig, latent_channels: int = 4):
        super().__init__()
        if not 1 <= latent_channels <= 64:
            raise ValueError(f"latent_channels must be in [1, 64], not {latent_channels}")
        self.ae_cfg, self.latent_channels = autoencoder, int(latent_channels)
        self.encoder = Encoder(autoencoder)
        self.moments = nn.Conv2d(autoencoder.z_channels, 2 * self.latent_channels, 1)
        self.post_proj = nn.Conv2d(self.latent_channels, autoencoder.z_channels, 1)
        self.decoder = Decoder(autoencoder)
        self.register_buffer("latent_shift", torch.zeros(()))
        self.register_buffer("latent_scale", torch.ones(()))
        self.register_buffer("latent_stats_images", torch.zeros((), dtype=torch.long))  # 0: never measured

    @property
    def downsample_factor(self) -> int:
        return self.ae_cfg.downsample_factor

    def config(self) -> dict:
        return {"autoencoder": asdict(self.ae_cfg), "latent_channels": self.latent_channels}

    @classmethod
    def from_config(cls, config: dict) -> KLAutoencoder:
        return cls(AutoencoderConfig(**config["autoencoder"]), int(config["latent_channels"]))

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        s = image_size // self.downsample_factor
        return self.latent_channels, s, s

    # ------------------------------------------------------------------ raw latents
    def posterior(self, images: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.moments(self.encoder(images)))

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_proj(z.to(self.post_proj.weight.dtype)))

    def forward(self, images: torch.Tensor, sample: bool | None = None):
        """images in [-1, 1] -> (reconstruction, KL per sample (B,), posterior). Samples the
        posterior in training mode, decodes its mean in eval mode (``sample`` overrides)."""
        q = self.posterior(images)
        sample = self.training if sample is None else sample
        return self.decode_raw(q.sample() if sample else q.mean), q.kl(), q

    # ------------------------------------------------------------------ normalised latents
    @property
    def has_latent_stats(self) -> bool:
        return int(self.latent_stats_images) > 0

    def _check_stats(self) -> None:
        if not self.has_latent_stats:
            raise ValueError("this KL autoencoder has no measured latent statistics (latent_shift/latent_scale): "
                             "train it with unifuse (they are measured at the end of training) or call "
                             "measure_latent_stats(images) first")

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> normalised latents (B, C, H/f, W/f), ~zero mean, unit std."""
        self._check_stats()
        q = self.posterior(images)
        return self.normalise(q.sample() if sample else q.mean)

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        return (z.float() - self.latent_shift) * self.latent_scale

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """normalised latents -> images in [-1, 1] (not clamped)."""
        self._check_stats()
        return self.decode_raw(z.float() / self.latent_scale + self.latent_shift)

    def set_latent_stats(self, count: int, total: float, total_sq: float, images: int) -> None:
        """From sums over posterior-mean elements: shift = mean, scale = 1 / std."""
        mean = total / count
        std = max(total_sq / count - mean * mean, 1e-12) ** 0.5
        self.latent_shift.fill_(mean)
        self.latent_scale.fill_(1.0 / std)
        self.latent_stats_images.fill_(int(images))

    @torch.no_grad()
    def measure_latent_stats(self, batches, max_images: int = 4096) -> dict:
        """Measure shift/scale over posterior means of image batches (B, 3, H, W in [-1, 1])."""
        count, s, s2, n = 0, 0.0, 0.0, 0
        for x in batches:
            x = x[: max_images - n]
            m = self.posterior(x.to(self.latent_shift.device)).mean.double()
            count, s, s2, n = count + m.numel(), s + m.sum().item(), s2 + m.pow(2).sum().item(), n + len(x)
            if n >= max_images:
                break
        if n == 0:
            raise ValueError("no images to measure latent statistics on")
        self.set_latent_stats(count, s, s2, n)
        return {"latent_shift": float(self.latent_shift), "latent_scale": float(self.latent_scale), "images": n}


def load_kl_autoencoder(path: str | Path, map_location: str | torch.device = "cpu") -> KLAutoencoder:
    """Rebuild a trained KL autoencoder from a unifuse checkpoint or export directory, without Lightning."""
    return load_net(path, map_location, expect=KLAutoencoder)
