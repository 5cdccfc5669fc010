"""VQ-VAE image tokenizer: conv encoder -> 1x1 projection to low-dim codes -> vector quantizer ->
1x1 projection back -> conv decoder. Usable without Lightning; ``load_vqvae`` rebuilds it from a
training checkpoint or an exported directory (weights-only load, architecture from the stored
config, see ``unifuse.run.checkpoint``)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from unifuse.models.autoencoder import AutoencoderConfig, Decoder, Encoder
from unifuse.models.quantize import QuantizerConfig, VectorQuantizer
from unifuse.run.checkpoint import load_net


class VQVAE(nn.Module):
    def __init__(self, autoencoder: AutoencoderConfig, quantizer: QuantizerConfig):
        super().__init__()
        self.ae_cfg, self.q_cfg = autoencoder, quantizer
        self.encoder = Encoder(autoencoder)
        self.quant_proj = nn.Conv2d(autoencoder.z_channels, quantizer.code_dim, 1)
        self.quantizer = VectorQuantizer(quantizer)
        self.post_quant_proj = nn.Conv2d(quantizer.code_dim, autoencoder.z_channels, 1)
        self.decoder = Decoder(autoencoder)

    @property
    def downsample_factor(self) -> int:
        return self.ae_cfg.downsample_factor

    @property
    def codebook_size(self) -> int:
        return self.q_cfg.codebook_size

    def config(self) -> dict:
        return {"autoencoder": asdict(self.ae_cfg), "quantizer": asdict(self.q_cfg)}

    @classmethod
    def from_config(cls, config: dict) -> VQVAE:
        """The inverse of :meth:`config` (what checkpoints store)."""
        return cls(AutoencoderConfig(**config["autoencoder"]), QuantizerConfig(**config["quantizer"]))

    def token_grid(self, image_size: int) -> tuple[int, int]:
        s = image_size // self.downsample_factor
        return s, s

    def quantize(self, images: torch.Tensor):
        z = self.quant_proj(self.encoder(images))  # B, D, h, w
        zq, idx, loss = self.quantizer(z.permute(0, 2, 3, 1))
        return zq.permute(0, 3, 1, 2).contiguous(), idx, loss

    def decode_latent(self, zq: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_proj(zq))

    def forward(self, images: torch.Tensor):
        """images in [-1, 1] -> (reconstruction, indices (B, h, w), quantizer loss)."""
        zq, idx, loss = self.quantize(images)
        return self.decode_latent(zq), idx, loss

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> code indices (B, H/f, W/f)."""
        return self.quantize(images)[1]

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """code indices (B, h, w) -> images (B, 3, h*f, w*f) in [-1, 1] (not clamped)."""
        zq = self.quantizer.lookup(indices).permute(0, 3, 1, 2).contiguous()
        return self.decode_latent(zq)


def load_vqvae(path: str | Path, map_location: str | torch.device = "cpu") -> VQVAE:
    """Rebuild a trained tokenizer from a unifuse checkpoint or export directory, without Lightning."""
    return load_net(path, map_location, expect=VQVAE)
