"""The identity autoencoder: diffusion over raw pixels, for tiny images (``autoencoder=identity``,
``model.tokenizer_ckpt=identity``). It has the KL autoencoder's interface, so latent diffusion and
Transfusion use it unchanged: the "latents" are the images themselves in [-1, 1] (3 channels,
downsampling 1, no normalisation: [-1, 1] is already the range pixel-space DDPM/flow recipes use),
the posterior is a point mass and decoding returns its input."""

from __future__ import annotations

import torch
from torch import nn

IDENTITY = "identity"  # the model.tokenizer_ckpt value that selects it (no checkpoint file)


class PointPosterior:
    """A posterior without noise: ``sample()`` is the mean."""

    def __init__(self, mean: torch.Tensor):
        self.mean = mean.float()
        self.std = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean


class PixelSpace(nn.Module):
    downsample_factor = 1
    has_latent_stats = True

    def __init__(self, channels: int = 3):
        super().__init__()
        self.latent_channels = int(channels)

    def config(self) -> dict:
        return {"channels": self.latent_channels}

    @classmethod
    def from_config(cls, config: dict) -> PixelSpace:
        return cls(**config)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        return self.latent_channels, image_size, image_size

    def posterior(self, images: torch.Tensor) -> PointPosterior:
        return PointPosterior(images)

    def encode_latents(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        return images.float()

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        return z.float()

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z.float()
