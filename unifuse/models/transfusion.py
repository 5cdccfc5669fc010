"""Transfusion (Zhou et al. 2024, arXiv 2408.11039): one transformer trained with next-token loss
on text and a diffusion loss on continuous image patches.

Sequences are the packed rows of :class:`unifuse.data.collate.PackingCollator`: documents
``[BOS] text [BOI] image [EOI] text ... [EOS]``, several per row, with per-position ``doc_id``,
``image_id`` and ``position`` (restarting at 0 in each document). An image block holds the
patches of one (normalised) autoencoder latent, noised before patchifying with **its own**
timestep.

* Backbone: the shared :class:`~unifuse.models.transformer.Transformer` (token embedding, blocks,
  final norm, LM head). Text and special tokens enter through the token embedding; an image
  position enters through the patch encoder, with the image's timestep embedding (computed for
  image positions only, one per image). ``time_embedding=before`` (the paper's, its footnote 6):
  the embedding, brought to the size of a patch vector, is added to every patch vector before the
  encoder: ``patch_in(patch + tau(t))``. ``after``: it is added to the encoder's output in model
  width, ``patch_in(patch) + time_mlp(t)``; for patch size 1 a patch vector has only
  ``latent_channels`` entries, and the after version carries every signal the before version can.
  ``pos_emb_2d`` adds a 2D sin-cos position to each patch's input vector; the paper has only the
  backbone's rotary positions. ``time_conditioning=adaln`` also feeds the embedding to every block
  as a scale, shift and gate at that image's positions (DiT's adaLN; not in the paper).
* Patch encoders (``patch_encoder``): ``linear`` as above, or ``unet``: the paper's U-Net down
  blocks (residual conv blocks of the autoencoder body with plain norms, each followed by a
  self-attention block, one stride-2 stage per factor 2 of ``patch_size``) before the transformer
  and the matching up blocks after it, with a skip from the down path to the output head.
  ``unet_time_norm`` conditions the blocks' norms on the time embedding instead (ADM's; the paper
  replaces that with plain norms), ``unet_attention=false`` drops the attention blocks.
* Attention: causal, bidirectional inside each image, never across documents; one mask function
  (:mod:`unifuse.models.attention`), FlexAttention on GPU, a dense mask on CPU, built once per
  forward.
* Outputs: LM logits at every position; ``patch_out(h)`` at image positions is the diffusion
  prediction (eps by default, or the flow velocity: the net's ``diffusion`` config says which).
* Loss: cross-entropy on text targets (no loss for the prediction made at a BOI input, nor at
  image positions) averaged over tokens, plus ``diffusion_weight`` x the diffusion loss of
  :mod:`unifuse.diffusion` averaged over images. An image that precedes its document's text (a
  captioning example) has its time capped at ``image_first_max_t`` of the noise range, so the
  text that follows it learns from a recognisable image.

Inference (:mod:`unifuse.decoding.transfusion` and :mod:`unifuse.decoding.document`) keeps one KV
cache and runs the net through :meth:`Transfusion.forward_rows` (a prefix, with its image blocks)
and :meth:`Transfusion.cached_image` (one image block after the cached prefix).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from unifuse.diffusion import DiffusionConfig
from unifuse.models.autoencoder import AttnBlock, Downsample, ResBlock, Upsample
from unifuse.models.dit import sincos_2d, timestep_embedding
from unifuse.models.rows import Rows
from unifuse.models.transformer import AdaLN, KVCache, PositionCond, Transformer, TransformerConfig
from unifuse.text.tokenizer import ByteTokenizer, TextTokenizer, load_tokenizer
from unifuse.text.vocab import TEXT, VocabLayout


@dataclass
class TransfusionConfig:
    """The image side of the model and the loss mix (typed; stored with the net)."""

    latent_channels: int = 4  # the autoencoder's (checked at setup)
    latent_size: int = 8  # latent height = width
    patch_size: int = 1
    diffusion_weight: float = 5.0  # lambda: loss = LM + lambda * diffusion
    image_first_max_t: float = 0.5  # images before their text: t <= this fraction of the noise range
    max_text_len: int = 48  # caption tokens kept in prompts
    patch_encoder: str = "linear"  # linear | unet
    # where the timestep embedding joins the image: before: added to every patch vector before the
    # patch encoder (the paper, its footnote 6); after: added to the encoder's output, in model width
    time_embedding: str = "before"
    # input: the timestep reaches the backbone only through the image's input vectors (the paper);
    # adaln: also a scale, shift and gate from it in every block, at the image's positions only (DiT's)
    time_conditioning: str = "input"
    pos_emb_2d: bool = False  # a 2D sin-cos position added to each patch's input vector (the paper: RoPE only)
    unet_channels: int = 64  # unet: conv width
    unet_blocks: int = 2  # unet: residual blocks per level
    unet_attention: bool = True  # unet: self-attention after every residual block (the paper's U-Net has it)
    unet_time_norm: bool = False  # unet: the time embedding scales and shifts the blocks' norms (ADM); off: plain
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(schedule="cosine"))

    @property
    def grid(self) -> int:
        return self.latent_size // self.patch_size


# What a model whose stored config lacks one of these keys (saved before the option existed) was
# built with: Transfusion.from_config fills a missing key from here, not from today's defaults.
STORED_BEFORE_OPTION = {"time_embedding": "after", "pos_emb_2d": True, "unet_attention": False,
                        "unet_time_norm": True}

_CHOICES = {"patch_encoder": ("linear", "unet"), "time_embedding": ("before", "after"),
            "time_conditioning": ("input", "adaln")}


def _check_options(cfg: TransfusionConfig, key: str) -> None:
    """One-line errors naming the setting, before anything is built."""
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ValueError(f"{key}.{name} must be one of {', '.join(choices)}, not {getattr(cfg, name)!r}")
    if cfg.latent_size % cfg.patch_size:
        raise ValueError(f"{key}.latent_size {cfg.latent_size} is not a multiple of patch_size {cfg.patch_size}")


class UNetPatches(nn.Module):
    """U-Net down blocks (latent -> one vector per patch, plus skips) and the matching up blocks
    (transformer outputs + skips -> the prediction). Each residual block is followed by a
    self-attention block (``unet_attention``); the blocks' norms are plain, or scaled and shifted by
    the time embedding (``unet_time_norm``)."""

    def __init__(self, cfg: TransfusionConfig, dim: int):
        super().__init__()
        ch, c, nb = cfg.unet_channels, cfg.latent_channels, cfg.unet_blocks
        levels = cfg.patch_size.bit_length() - 1
        if 1 << levels != cfg.patch_size:
            raise ValueError(f"patch_encoder=unet needs a power-of-two patch_size, not {cfg.patch_size}")
        emb = dim if cfg.unet_time_norm else 0
        self.conv_in = nn.Conv2d(c, ch, 3, padding=1)
        self.down = nn.ModuleList(ResBlock(ch, ch, 32, emb_dim=emb) for _ in range(nb * (levels + 1)))
        self.downsample = nn.ModuleList(Downsample(ch) for _ in range(levels))
        self.to_tokens = nn.Conv2d(ch, dim, 1)
        self.from_tokens = nn.Conv2d(dim, ch, 1)
        self.up = nn.ModuleList(ResBlock(2 * ch, ch, 32, emb_dim=emb) for _ in range(nb * (levels + 1)))
        self.upsample = nn.ModuleList(Upsample(ch) for _ in range(levels))
        self.norm_out = nn.GroupNorm(32 if ch % 32 == 0 else 1, ch)
        self.conv_out = nn.Conv2d(ch, c, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.nb = nb
        attn = cfg.unet_attention
        self.down_attn = nn.ModuleList(AttnBlock(ch, 32) for _ in self.down) if attn else None
        self.up_attn = nn.ModuleList(AttnBlock(ch, 32) for _ in self.up) if attn else None

    def _block(self, i: int, h: torch.Tensor, emb: torch.Tensor, up: bool) -> torch.Tensor:
        h = (self.up if up else self.down)[i](h, emb)
        attn = self.up_attn if up else self.down_attn
        return h if attn is None else attn[i](h)

    def encode(self, z: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h, skips = self.conv_in(z), []
        for i in range(len(self.down)):
            h = self._block(i, h, emb, up=False)
            skips.append(h)
            if (i + 1) % self.nb == 0 and (i + 1) // self.nb <= len(self.downsample):
                h = self.downsample[(i + 1) // self.nb - 1](h)
        return self.to_tokens(h).flatten(2).transpose(1, 2), skips

    def decode(self, tokens: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        n, g = tokens.shape[0], int(round(tokens.shape[1] ** 0.5))
        h = self.from_tokens(tokens.transpose(1, 2).reshape(n, -1, g, g))
        for i in range(len(self.up)):
            if i and i % self.nb == 0:
                h = self.upsample[i // self.nb - 1](h)
            h = self._block(i, torch.cat([h, skips[-1 - i]], 1), emb, up=True)
        return self.conv_out(F.silu(self.norm_out(h)))


class Transfusion(nn.Module):
    config_key = "model.net.image"  # where its latent_channels / latent_size are set (error messages)

    def __init__(self, transformer: TransformerConfig, image: TransfusionConfig | None = None,
                 text_tokenizer: TextTokenizer | None = None):
        super().__init__()
        image = image or TransfusionConfig()
        _check_options(image, self.config_key)
        self.icfg = image
        self.text_tokenizer = text_tokenizer or ByteTokenizer()
        self.vocab = VocabLayout(text_size=max(self.text_tokenizer.vocab_size, 1))
        cond_dim = transformer.dim if image.time_conditioning == "adaln" else 0
        self.net = Transformer(TransformerConfig(**{**asdict(transformer), "vocab_size": self.vocab.size,
                                                    "cond_dim": cond_dim}))
        self.diffusion = image.diffusion.build()
        dim, cpp = self.net.cfg.dim, image.latent_channels * image.patch_size**2
        if image.pos_emb_2d:
            self.register_buffer("pos_emb", sincos_2d(image.grid, dim), persistent=False)
        self.t_mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.unet = UNetPatches(image, dim) if image.patch_encoder == "unet" else None
        if self.unet is None:
            self.patch_in, self.patch_out = nn.Linear(cpp, dim), nn.Linear(dim, cpp)
            nn.init.zeros_(self.patch_out.weight)
            nn.init.zeros_(self.patch_out.bias)
        # before: the time embedding (model width) brought to the size of a patch vector
        self.t_patch = nn.Linear(dim, cpp) if image.time_embedding == "before" else None

    # ------------------------------------------------------------------ config
    def config(self) -> dict:
        return {"transformer": self.net.config(), "image": asdict(self.icfg),
                "text_tokenizer": self.text_tokenizer.to_config()}

    @classmethod
    def from_config(cls, config: dict) -> Transfusion:
        """Rebuild a stored model; a key its config lacks (stored before the option existed) takes
        the value that model was trained with (:data:`STORED_BEFORE_OPTION`), not today's default."""
        image = {**STORED_BEFORE_OPTION, **config["image"]}
        image["diffusion"] = DiffusionConfig(**image.get("diffusion") or {})
        return cls(TransformerConfig(**config["transformer"]), TransfusionConfig(**image),
                   load_tokenizer(config.get("text_tokenizer")))

    def latent_shape(self) -> tuple[int, int, int]:
        return self.icfg.latent_channels, self.icfg.latent_size, self.icfg.latent_size

    @property
    def n_patches(self) -> int:
        return self.icfg.grid**2

    # ------------------------------------------------------------------ images in and out
    def embed_image(self, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """(N, C, H, W) noisy latents at times (N,) -> ((N, patches, dim) input vectors, (the U-Net's
        skips or None, the time embedding (N, dim)) for :meth:`image_output` and the blocks)."""
        b, c, h, w = z.shape
        p, g, dtype = self.icfg.patch_size, self.icfg.grid, self.t_mlp[0].weight.dtype
        t = self.diffusion.network_time(t)
        temb = self.t_mlp(timestep_embedding(t.expand(b), 256).to(dtype))
        z = z.to(dtype)
        if self.t_patch is not None:  # the same (C, p, p) vector added to every patch of the latent
            z = z + self.t_patch(F.silu(temb)).view(b, c, p, p).repeat(1, 1, g, g)
        if self.unet is not None:
            x, skips = self.unet.encode(z, temb)
        else:
            skips = None
            x = self.patch_in(z.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p))
        if self.icfg.pos_emb_2d:
            x = x + self.pos_emb.to(dtype)
        if self.t_patch is None:
            x = x + temb[:, None]
        return x, (skips, temb)

    def image_output(self, h: torch.Tensor, ctx: tuple) -> torch.Tensor:
        """(N, patches, dim) hidden states -> (N, C, H, W) predictions, float32."""
        if self.unet is not None:
            return self.unet.decode(h, *ctx).float()
        n, g, p, c = h.shape[0], self.icfg.grid, self.icfg.patch_size, self.icfg.latent_channels
        x = self.patch_out(h).float()
        return x.reshape(n, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, c, g * p, g * p)

    def hidden_with_images(self, x: torch.Tensor, idx: torch.Tensor, z: torch.Tensor, t: torch.Tensor,
                           **kw) -> tuple[torch.Tensor, tuple]:
        """Backbone hidden states of input embeddings ``x`` (B, L, dim) whose flat positions ``idx``
        (N * patches,) are the patches of ``z`` at times ``t``: those inputs are replaced by the patch
        embeddings and, with ``time_conditioning=adaln``, conditioned on ``t`` in every block.
        ``kw`` goes to :meth:`Transformer.forward_hidden`. Returns (hidden, ctx for image_output)."""
        b, length, _ = x.shape
        img, ctx = self.embed_image(z, t)
        x = x.flatten(0, 1).index_copy(0, idx, img.to(x.dtype).flatten(0, 1)).view(b, length, -1)
        cond = PositionCond.at(ctx[1], idx, (b, length)) if self.net.cfg.cond_dim else None
        return self.net.forward_hidden(x, cond=cond, **kw), ctx

    def _image_index(self, image_pos: torch.Tensor, seq_len: int) -> torch.Tensor:
        """(N, patches) flat indices into (B * L) of every image block's positions."""
        n = self.n_patches
        if image_pos.numel() and bool((image_pos[:, 2] != n).any()):
            raise ValueError(f"image blocks of {image_pos[:, 2].unique().tolist()} positions, but the model "
                             f"patchifies a latent into {n}: set the collator's image_tokens to {n}")
        return (image_pos[:, :1] * seq_len + image_pos[:, 1:2]) + torch.arange(n, device=image_pos.device)

    # ------------------------------------------------------------------ training
    def forward(self, batch: dict, z_t: torch.Tensor | None = None,
                t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Packed rows (``tokens``, ``position``, ``doc_id``, ``image_id``, ``image_pos``) with the
        noisy latents of their image blocks -> (LM logits (B, L, V), image predictions (N, C, H, W)).
        A text-only batch (``z_t`` None) gives no image predictions."""
        tokens = batch["tokens"]
        b, length = tokens.shape
        x = self.net.tok_emb(tokens)
        kw = {"positions": batch["position"], "doc_id": batch["doc_id"], "image_id": batch["image_id"]}
        if z_t is None or not len(z_t):
            return self.net.lm_head(self.net.forward_hidden(x, **kw)), None
        idx = self._image_index(batch["image_pos"], length).flatten()
        h, ctx = self.hidden_with_images(x, idx, z_t, t, **kw)
        return self.net.lm_head(h), self.image_output(h.flatten(0, 1)[idx].view(len(z_t), self.n_patches, -1), ctx)

    def image_parameters(self) -> list[nn.Parameter]:
        """Every parameter only image positions reach: those outside the transformer (time embedding,
        patch encoder and decoder) and the backbone's adaLN projections (they modulate image
        positions only). A batch without an image leaves them without a gradient."""
        image_only = [p for m in self.net.modules() if isinstance(m, AdaLN) for p in m.parameters()]
        text_too = {id(p) for p in self.net.parameters()} - {id(p) for p in image_only}
        return [p for p in self.parameters() if id(p) not in text_too]

    def text_targets(self, batch: dict) -> torch.Tensor:
        """(B, L-1) True where the token at i+1 is a text/special target predicted from a text or
        special input at i of the same document. A BOI input is always followed by an image
        position, so no loss falls on the prediction made at BOI (nor at EOI's from the last patch)."""
        mod, doc = batch["modality"], batch["doc_id"]
        same_doc = (doc[:, 1:] == doc[:, :-1]) & (doc[:, 1:] >= 0)
        return same_doc & (mod[:, :-1] == TEXT) & (mod[:, 1:] == TEXT)

    def sample_times(self, image_first: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-image training times; images that precede their text are capped (see the module doc)."""
        cap = torch.where(image_first.cpu(), self.icfg.image_first_max_t, 1.0).double()
        return self.diffusion.sample_t(len(image_first), "cpu", generator, max_frac=cap).to(image_first.device)

    def loss(self, batch: dict, z: torch.Tensor | None, t: torch.Tensor | None = None,
             eps: torch.Tensor | None = None, per_token: bool = False) -> dict[str, torch.Tensor]:
        """``z``: (N, C, H, W) clean normalised latents of the batch's image blocks, in order (None
        or empty for a text-only batch: LM loss only, the image side kept in the graph with a zero
        gradient so data-parallel ranks agree). ``per_token``: also the text targets' ids and nats
        (``text_ids``, ``text_nats``)."""
        if z is not None and len(z):
            t = self.sample_times(batch["image_first"]) if t is None else t
            eps = torch.randn_like(z) if eps is None else eps
            logits, out = self(batch, self.diffusion.noised(z, t, eps), t)
            image_loss = self.diffusion.prediction_loss(out, z, eps, t).mean()  # (N,) per image, float32
        else:
            logits = self(batch)[0]
            image_loss = sum(p.flatten()[0] for p in self.image_parameters()).float() * 0.0
        target = self.text_targets(batch)
        y = batch["tokens"][:, 1:][target]
        nats = F.cross_entropy(logits[:, :-1][target].float(), y, reduction="none")
        ce = nats.mean() if len(nats) else nats.sum()
        out = {"loss": ce + self.icfg.diffusion_weight * image_loss, "text_loss": ce, "image_loss": image_loss,
               "tokens": torch.tensor(batch["tokens"].numel())}
        return {**out, "text_ids": y, "text_nats": nats} if per_token else out

    # ------------------------------------------------------------------ inference
    def text_ids(self, text: str | None) -> list[int]:
        """A caption's token ids as training saw them: cut to ``max_text_len`` (the collator cuts the
        caption of an image-caption pair there). Text of an interleaved document is never cut."""
        return self.text_tokenizer.encode(text)[: self.icfg.max_text_len] if text else []

    def forward_rows(self, rows: Rows, z: torch.Tensor | None = None, t: torch.Tensor | None = None,
                     cache: KVCache | None = None) -> torch.Tensor:
        """Hidden states (R, L, dim) of inference rows (:class:`unifuse.models.rows.Rows`) whose image
        blocks hold the latents ``z`` at times ``t``, after what ``cache`` holds (then in it)."""
        x = self.net.tok_emb(rows.tokens)
        kw = {"positions": rows.positions, "doc_id": rows.doc_id, "image_id": rows.image_id, "cache": cache}
        if z is None:
            return self.net.forward_hidden(x, **kw)
        return self.hidden_with_images(x, self._image_index(rows.image_pos, rows.width).flatten(), z, t, **kw)[0]

    def cached_image(self, cache: KVCache, z: torch.Tensor, t: torch.Tensor, positions: torch.Tensor,
                     block: int) -> tuple[torch.Tensor, tuple]:
        """One image block per cache row after what ``cache`` holds (then in it): the latents ``z``
        (R, C, H, W) at times ``t`` (R,), at rotary ``positions`` (R, patches), image id ``block``.
        Returns (hidden (R, patches, dim), ctx for :meth:`image_output`)."""
        rows, n = len(z), self.n_patches
        slots = torch.empty(rows, n, self.net.cfg.dim, device=z.device, dtype=self.net.tok_emb.weight.dtype)
        return self.hidden_with_images(slots, torch.arange(rows * n, device=z.device), z, t, positions=positions,
                                       doc_id=torch.zeros_like(positions), image_id=torch.full_like(positions, block),
                                       cache=cache)
