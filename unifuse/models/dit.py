"""DiT (Peebles & Xie): a transformer denoiser over latent patches with adaLN-Zero conditioning,
text-conditioned by joint attention.

* Latents (B, C, H, W) are cut into p x p patches, projected to ``dim`` and run through blocks
  whose attention and SwiGLU MLP are the shared backbone's (:mod:`unifuse.models.transformer`);
  each block is modulated by adaLN-Zero: shift/scale before attention and MLP and a gate on each
  residual branch, regressed from the conditioning vector and zero-initialised, so every block
  starts as the identity. The final layer (adaLN + linear, zero-initialised) maps patches back.
* Positions: a fixed 2D sin-cos embedding is added to every patch (DiT's absolute positions: an
  emoji's border and centre are places, not just relations) and attention rotates queries and keys
  by 2D RoPE (row, col) for the relative ones.
* Conditioning vector: timestep embedding (+ class embedding, + pooled text).
* Text: the caption's tokens go through a small **bidirectional** text encoder (the shared
  :class:`~unifuse.models.transformer.Transformer`, trained jointly), are projected to ``dim`` and
  **attend jointly** with the image patches (one sequence, full attention; padding masked out by
  ``doc_id = -1``). Joint attention rather than cross-attention: no second attention module, every
  layer can route between text and image in both directions (SD3's MMDiT does the same), and it is
  the layout Transfusion uses. Text tokens enter the DiT at rotary position (0, 0), i.e. unrotated:
  their order is already in the encoder's states; patches use 2D (row, col) rotary positions.
* An empty caption (``""`` or None) is the unconditional input for classifier-free guidance: the
  encoder then sees only BOS.

The network's output is whatever its ``diffusion`` config says it predicts (eps, v, x0 or a flow
velocity), which is why that config is part of the net's own: a checkpoint knows how to be sampled.
Times: what the transport's ``network_time`` makes of its own (DDPM: the integer timestep; flow:
1000 t for t in [0, 1]).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from unifuse.diffusion import DiffusionConfig
from unifuse.models.attention import MaskSpec
from unifuse.models.rows import right_padded
from unifuse.models.transformer import (
    Attention,
    SwiGLU,
    Transformer,
    TransformerConfig,
    attention_flops,
    linear_flops,
    rope_rotation,
)
from unifuse.text.tokenizer import ByteTokenizer, TextTokenizer, load_tokenizer
from unifuse.text.vocab import VocabLayout


@dataclass
class DiTConfig:
    latent_channels: int = 4
    latent_size: int = 8  # latent height = width
    patch_size: int = 2
    dim: int = 384
    n_layers: int = 12
    n_heads: int = 6
    mlp_hidden: int | None = None
    qk_norm: bool = True
    text_layers: int = 2  # bidirectional text encoder depth (0: no text conditioning)
    text_dim: int = 256
    text_heads: int = 4
    max_text_len: int = 48
    num_classes: int = 0  # > 0: class-conditional (class id instead of a caption)
    attn_impl: str = "auto"
    grad_checkpointing: bool = False
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    @property
    def grid(self) -> int:
        return self.latent_size // self.patch_size


# name -> (n_layers, dim, n_heads): DiT's ladder (use with patch_size 2, 4 or 8) plus CPU sizes
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (4, 128, 4),
    "mini": (6, 256, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


def dit_config(size: str, **overrides) -> DiTConfig:
    """``dit_config("XL", patch_size=2)`` is DiT-XL/2."""
    if size not in SIZES:
        raise KeyError(f"unknown DiT size {size!r}; known: {', '.join(SIZES)}")
    n_layers, dim, n_heads = SIZES[size]
    return DiTConfig(n_layers=n_layers, dim=dim, n_heads=n_heads, **overrides)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], -1)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) fixed position embedding, row-major: half the channels encode the row,
    half the column, each as sin/cos at geometric frequencies (as DiT and MAE)."""
    if dim % 4:
        raise ValueError(f"dim {dim} must be a multiple of 4 for the 2D sin-cos position embedding")
    coords = torch.arange(grid, dtype=torch.float32)
    row = timestep_embedding(coords.repeat_interleave(grid), dim // 2)
    col = timestep_embedding(coords.repeat(grid), dim // 2)
    return torch.cat([row, col], -1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` per sample, as one fused elementwise kernel."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


class DiTBlock(nn.Module):
    """Pre-norm attention + MLP of the shared backbone, with adaLN-Zero modulation."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps, elementwise_affine=False)
        self.attn = Attention(cfg)
        self.norm2 = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps, elementwise_affine=False)
        self.mlp = SwiGLU(cfg)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x, c, rot, spec):
        s1, sc1, g1, s2, sc2, g2 = self.ada(c).chunk(6, -1)
        x = torch.addcmul(x, g1[:, None], self.attn(modulate(self.norm1(x), s1, sc1), rot, spec, None, 0, None))
        return torch.addcmul(x, g2[:, None], self.mlp(modulate(self.norm2(x), s2, sc2)))


class DiT(nn.Module):
    config_key = "model.net.dit"  # where its latent_channels / latent_size are set (error messages)

    def __init__(self, dit: DiTConfig, text_tokenizer: TextTokenizer | None = None):
        super().__init__()
        cfg = dit
        if cfg.latent_size % cfg.patch_size:
            raise ValueError(f"latent_size {cfg.latent_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.diffusion = cfg.diffusion.build()
        self.text_tokenizer = text_tokenizer or ByteTokenizer()
        self.tcfg = TransformerConfig(vocab_size=1, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                                      mlp_hidden=cfg.mlp_hidden, qk_norm=cfg.qk_norm, rope_2d=True,
                                      attn_impl=cfg.attn_impl)
        p, c = cfg.patch_size, cfg.latent_channels
        self.patch_in = nn.Linear(c * p * p, cfg.dim)
        self.register_buffer("pos_emb", sincos_2d(cfg.grid, cfg.dim), persistent=False)
        self.t_mlp = nn.Sequential(nn.Linear(256, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.blocks = nn.ModuleList(DiTBlock(self.tcfg) for _ in range(cfg.n_layers))
        self.norm_out = nn.RMSNorm(cfg.dim, eps=1e-6, elementwise_affine=False)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 2 * cfg.dim))
        self.patch_out = nn.Linear(cfg.dim, c * p * p)
        for lin in (self.ada_out[1], self.patch_out):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.vocab = VocabLayout(text_size=max(self.text_tokenizer.vocab_size, 1), num_classes=cfg.num_classes)
        self.text = None
        if cfg.text_layers > 0:
            self.text = Transformer(TransformerConfig(vocab_size=self.vocab.size, dim=cfg.text_dim,
                                                      n_layers=cfg.text_layers, n_heads=cfg.text_heads,
                                                      max_seq_len=cfg.max_text_len + 1, attn_impl=cfg.attn_impl,
                                                      lm_head=False))
            self.text_proj = nn.Linear(cfg.text_dim, cfg.dim)
            self.text_pool = nn.Linear(cfg.text_dim, cfg.dim)
        if cfg.num_classes > 0:
            self.class_emb = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # last row: unconditional

    # ------------------------------------------------------------------ config
    def config(self) -> dict:
        return {"dit": asdict(self.cfg), "text_tokenizer": self.text_tokenizer.to_config()}

    @classmethod
    def from_config(cls, config: dict) -> DiT:
        d = dict(config["dit"])
        d["diffusion"] = DiffusionConfig(**d.get("diffusion") or {})
        return cls(DiTConfig(**d), load_tokenizer(config.get("text_tokenizer")))

    def latent_shape(self) -> tuple[int, int, int]:
        return self.cfg.latent_channels, self.cfg.latent_size, self.cfg.latent_size

    # ------------------------------------------------------------------ conditioning
    def encode_conditions(self, conds: list, device) -> dict:
        """Captions (str; "" or None = unconditional) or class ids (int; None = unconditional) ->
        the tensors :meth:`forward` takes, batched along dim 0. Captions are padded to the longest
        in the list (padding is masked out, so a caption gives the same output whatever it is
        batched with): encode the conditional and unconditional rows of guidance in one call so
        they share a width."""
        if self.cfg.num_classes > 0:
            ids = [self.cfg.num_classes if c is None or c == "" else int(c) for c in conds]
            return {"class_id": torch.tensor(ids, device=device)}
        if self.text is None:
            return {}
        rows = right_padded([[self.vocab.bos, *(self.text_tokenizer.encode(c)[: self.cfg.max_text_len] if c else [])]
                             for c in conds], self.vocab.pad, device)
        return {"text_tokens": rows.tokens, "text_doc": rows.doc_id}

    def text_states(self, cond: dict) -> dict:
        """``cond`` with the caption encoder already run (``text_states``, ``text_pooled``): what a
        sampler passes to every step, since the caption does not change between steps."""
        if "text_tokens" not in cond:
            return cond
        doc = cond["text_doc"]
        h = self.text.forward_hidden(self.text.tok_emb(cond["text_tokens"]), causal=False, doc_id=doc)
        valid = (doc >= 0).unsqueeze(-1).to(h.dtype)
        pooled = self.text_pool((h * valid).sum(1) / valid.sum(1).clamp_min(1))
        return {"text_states": self.text_proj(h), "text_pooled": pooled, "text_doc": doc}

    def _condition(self, t: torch.Tensor, cond: dict, b: int):
        t = self.diffusion.network_time(t)
        c = self.t_mlp(timestep_embedding(t.expand(b), 256))
        text = None
        if "class_id" in cond:
            c = c + self.class_emb(cond["class_id"])
        elif "text_tokens" in cond or "text_states" in cond:
            cond = self.text_states(cond)
            c = c + cond["text_pooled"]
            text = (cond["text_states"], cond["text_doc"])
        return c, text

    # ------------------------------------------------------------------ forward
    def patchify(self, z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = z.shape
        p = self.cfg.patch_size
        return z.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), -1)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b, p, g, c = x.shape[0], self.cfg.patch_size, self.cfg.grid, self.cfg.latent_channels
        return x.reshape(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, g * p, g * p)

    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        """z (B, C, H, W) noisy latents, t (B,) times, cond from :meth:`encode_conditions` ->
        the prediction (B, C, H, W), in float32."""
        b, g = z.shape[0], self.cfg.grid
        c, text = self._condition(t, cond or {}, b)
        x = self.patch_in(self.patchify(z.to(self.patch_in.weight.dtype))) + self.pos_emb.to(self.patch_in.weight.dtype)
        rows = torch.arange(g, device=z.device).repeat_interleave(g)
        pos = torch.stack([rows, torch.arange(g, device=z.device).repeat(g)], -1).expand(b, g * g, 2)
        doc = None
        if text is not None:
            th, tdoc = text
            x = torch.cat([th, x], 1)
            pos = torch.cat([torch.zeros(b, th.shape[1], 2, dtype=pos.dtype, device=z.device), pos], 1)
            doc = torch.cat([tdoc, torch.zeros(b, g * g, dtype=tdoc.dtype, device=z.device)], 1)
        rot = rope_rotation(pos, self.tcfg.head_dim, self.tcfg.rope_theta, True)
        spec = MaskSpec(False, doc, None)
        for blk in self.blocks:
            if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, c, rot, spec, use_reentrant=False)
            else:
                x = blk(x, c, rot, spec)
        x = x[:, -g * g:]
        shift, scale = self.ada_out(c).chunk(2, -1)
        return self.unpatchify(self.patch_out(modulate(self.norm_out(x), shift, scale))).float()

    # ------------------------------------------------------------------ accounting
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_sample(self, text_len: int = 0) -> int:
        """Forward FLOPs (matmuls, 2 per multiply-add) of one sample whose caption row has
        ``text_len`` positions (BOS and padding included; 0: no caption): the caption encoder and its
        projections, the time MLP, the patch embedding, every block over caption + patches (attention
        over all pairs) with its adaLN projection, and the output layer."""
        patches, seq = self.cfg.grid**2, self.cfg.grid**2 + text_len
        flops = sum(seq * (linear_flops(b.attn) + linear_flops(b.mlp) + attention_flops(seq, self.cfg.dim))
                    + linear_flops(b.ada) for b in self.blocks)
        flops += patches * (linear_flops(self.patch_in) + linear_flops(self.patch_out))
        flops += linear_flops(self.t_mlp) + linear_flops(self.ada_out)
        if self.text is not None and text_len:
            flops += text_len * (self.text.flops_per_token(text_len, training=False) + linear_flops(self.text_proj))
            flops += linear_flops(self.text_pool)
        return flops


