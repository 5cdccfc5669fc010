"""Convolutional autoencoder body shared by the VQ tokenizer and (later) the KL autoencoder.

Encoder: conv-in, then one stage per entry of ``ch_mult`` (``num_res_blocks`` residual blocks each,
GroupNorm + SiLU), downsampling by 2 between stages, a middle block, then a projection to
``z_channels``. The decoder mirrors it. Downsampling factor = 2 ** (len(ch_mult) - 1).
Both are plain ``nn.Module``s; what sits between them (a quantizer, a Gaussian posterior) is the
caller's business.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class AutoencoderConfig:
    """Architecture of the conv encoder/decoder pair (typed so Hydra rejects unknown keys)."""

    in_channels: int = 3
    channels: int = 64
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    z_channels: int = 64
    norm_groups: int = 32
    dropout: float = 0.0

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    # GroupNorm needs groups | channels; fall back to the largest divisor <= groups for tiny widths.
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels, eps=1e-6)


class ResBlock(nn.Module):
    """Pre-activation residual block. ``emb_dim > 0`` adds conditioning (e.g. a diffusion timestep):
    a per-channel scale and shift regressed from the embedding after the second norm (ADM's
    scale-shift norm)."""

    def __init__(self, c_in: int, c_out: int, groups: int, dropout: float = 0.0, emb_dim: int = 0):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.emb = nn.Linear(emb_dim, 2 * c_out) if emb_dim > 0 else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm2(self.conv1(F.silu(self.norm1(x))))
        if self.emb is not None:
            scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, 1)
            h = torch.addcmul(shift, h, 1 + scale)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Residual self-attention over the positions of a feature map (ADM's attention block): a
    norm, 1x1 query/key/value projections, multi-head attention among all H x W positions and a
    zero-initialised 1x1 output projection, so a fresh block is the identity."""

    def __init__(self, c: int, groups: int, heads: int = 1):
        super().__init__()
        if c % heads:
            raise ValueError(f"attention over {c} channels cannot be split into {heads} heads")
        self.heads = heads
        self.norm = _norm(c, groups)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, h * w, c / heads)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad keeps H/2 exactly


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        c = widths[0]
        for i, w in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(c, w, cfg.norm_groups, cfg.dropout))
                c = w
            if i != len(widths) - 1:
                blocks.append(Downsample(c))
        blocks.append(ResBlock(c, c, cfg.norm_groups, cfg.dropout))  # middle
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = _norm(c, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.conv_in(x))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.ch_mult]
        c = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        blocks: list[nn.Module] = [ResBlock(c, c, cfg.norm_groups, cfg.dropout)]  # middle
        for i, w in reversed(list(enumerate(widths))):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(c, w, cfg.norm_groups, cfg.dropout))
                c = w
            if i != 0:
                blocks.append(Upsample(c))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = _norm(c, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.conv_in(z))
        return self.conv_out(F.silu(self.norm_out(h)))
