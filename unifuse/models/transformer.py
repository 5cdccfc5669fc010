"""The one transformer backbone (LLaMA style) for the AR image GPT, MaskGIT and Transfusion.

RMSNorm, rotary position embeddings (1D over the sequence, or 2D (row, col) for image grids),
SwiGLU MLP, no biases, optional QK-norm, grouped-query attention. Masks beyond causal go through
:func:`unifuse.models.attention.attend` (document ids, bidirectional image blocks). A
:class:`KVCache` makes decoding incremental: prefill a (left-padded) batch of prompts, then add
one or more positions per step. Plain ``nn.Module``; parallelism is applied outside.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from unifuse.models.attention import MaskSpec, attend
from unifuse.models.rows import Rows


@dataclass
class TransformerConfig:
    vocab_size: int = 512
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # < n_heads: grouped-query attention
    mlp_hidden: int | None = None  # default: 8/3 * dim rounded up to a multiple of 64 (SwiGLU)
    max_seq_len: int = 2048
    rope_theta: float = 10_000.0
    rope_2d: bool = False  # (row, col) rotary angles for positions given as pairs
    qk_norm: bool = False
    norm_eps: float = 1e-5
    dropout: float = 0.0  # on each residual branch's output while training (small-data regularizer)
    grad_checkpointing: bool = False
    attn_impl: str = "auto"  # auto (unifuse.models.attention.choose_kernel) | dense | flex
    lm_head: bool = True  # false: an encoder giving hidden states only (e.g. the DiT's caption encoder)
    cond_dim: int = 0  # > 0: blocks modulate the positions given a conditioning vector (PositionCond)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or 64 * math.ceil(8 * self.dim / 3 / 64)


# name -> (n_layers, dim, n_heads); the Transfusion paper's ladder plus small sizes for CPU
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 64, 4),
    "small": (4, 256, 4),
    "base": (8, 512, 8),
    "0.16B": (16, 768, 12),
    "0.37B": (24, 1024, 16),
    "0.76B": (24, 1536, 24),
    "1.4B": (24, 2048, 16),
    "7B": (32, 4096, 32),
}


def config_for(size: str, **overrides) -> TransformerConfig:
    if size not in SIZES:
        raise KeyError(f"unknown transformer size {size!r}; known: {', '.join(SIZES)}")
    n_layers, dim, n_heads = SIZES[size]
    return TransformerConfig(n_layers=n_layers, dim=dim, n_heads=n_heads, **overrides)


# ----------------------------------------------------------------------------- rotary embeddings
def rope_angles(positions: torch.Tensor, head_dim: int, theta: float, two_d: bool) -> torch.Tensor:
    """Rotation angles (B, L, head_dim // 2). positions: (B, L) or, for 2D, (B, L, 2) as (row, col)."""
    if not two_d:
        inv = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
        return positions.float()[..., None] * inv
    if positions.dim() == 2:  # sequence positions in a 2D model: same index on both axes
        positions = torch.stack([positions, positions], -1)
    half = head_dim // 2
    inv = theta ** (-torch.arange(0, half, 2, device=positions.device, dtype=torch.float32) / half)
    return torch.cat([positions[..., 0:1].float() * inv, positions[..., 1:2].float() * inv], -1)


def rope_rotation(positions: torch.Tensor, head_dim: int, theta: float, two_d: bool) -> torch.Tensor:
    """The unit complex rotations (B, 1, L, head_dim // 2) of :func:`rope_angles`, computed once per
    forward and shared by every layer."""
    angles = rope_angles(positions, head_dim, theta, two_d)
    return torch.polar(torch.ones_like(angles), angles)[:, None]


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x: (B, H, L, D); rot: (B, 1, L, D/2) complex. Rotates pairs (x[2i], x[2i+1]) as complex numbers."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * rot).flatten(-2).type_as(x)


# ----------------------------------------------------------------------------- KV cache
class KVCache:
    """Preallocated keys/values per layer, plus the ids the mask needs for cached positions.

    All rows share one write index: prompts of different lengths are left-padded, with
    ``doc_id = -1`` on the padding so it is never attended to. A forward writes its positions with
    :meth:`reserve` (ids), :meth:`update` (each layer's keys and values) and :meth:`advance`; decoding
    programs move the write index back (:meth:`truncate`, :meth:`scratch`), keep some rows
    (:meth:`select`) or join two caches row-wise (:meth:`stacked`), and read ``length`` and ``rows``."""

    def __init__(self, cfg: TransformerConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.cfg = cfg
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.doc_id = torch.full((batch, max_len), -1, device=device, dtype=torch.long)
        self.image_id = torch.full((batch, max_len), -1, device=device, dtype=torch.long)
        self._length = 0
        self.max_len = max_len
        self._plain = True  # no padding and no image blocks so far: the causal fast path applies

    @property
    def length(self) -> int:
        """Positions written so far (the write index of the next position)."""
        return self._length

    @property
    def rows(self) -> int:
        return self.doc_id.shape[0]

    @property
    def plain(self) -> bool:
        """No padding and no image block cached: attention is plain causal."""
        return self._plain

    def reserve(self, n: int, doc_id: torch.Tensor | None, image_id: torch.Tensor | None) -> tuple[int, int]:
        """The span (start, end) of ``n`` new positions, their ids written (None: document 0, no
        image, which keeps a plain cache plain); :meth:`advance` makes them part of the cache."""
        start, end = self._length, self._length + n
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} > {self.max_len} positions")
        self.doc_id[:, start:end] = 0 if doc_id is None else doc_id
        self.image_id[:, start:end] = -1 if image_id is None else image_id
        if doc_id is not None or image_id is not None:
            self._plain = False
        return start, end

    def advance(self, end: int) -> None:
        """The positions reserved up to ``end`` hold their keys and values: the cache now ends there."""
        if not self._length <= end <= self.max_len:
            raise ValueError(f"cannot advance a cache of {self._length} positions to {end}")
        self._length = end

    def mask(self, causal: bool, end: int) -> MaskSpec:
        if self._plain:
            return MaskSpec(causal)
        return MaskSpec(causal, self.doc_id[:, :end], self.image_id[:, :end])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int, end: int):
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (e.g. MaskGIT rewrites its image after a cached
        prompt at every step)."""
        if not 0 <= length <= self._length:
            raise ValueError(f"cannot truncate a cache of {self._length} positions to {length}")
        self._length = length

    @contextmanager
    def scratch(self) -> Iterator[KVCache]:
        """Positions added inside the block are forgotten when it ends: a block of positions run
        against the cached prefix and then replaced (MaskGIT's image at every pass, an image being
        denoised)."""
        length = self._length
        try:
            yield self
        finally:
            self.truncate(length)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only some batch rows (e.g. after a beam or early stop)."""
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]
        self.doc_id, self.image_id = self.doc_id[rows], self.image_id[rows]

    def stacked(self, other: KVCache) -> KVCache:
        """A new cache of this cache's rows followed by ``other``'s, as long as this one: ``other``'s
        positions are right-aligned to end where this cache ends, its earlier positions empty
        (doc_id -1, never attended). E.g. an unconditional ``[BOS] [BOI]`` row beside a document."""
        if other.length > self._length:
            raise ValueError(f"cannot align a cache of {other.length} positions to one of {self._length}")
        both = KVCache(self.cfg, self.rows + other.rows, self.max_len, self.doc_id.device, self.k[0].dtype)
        a, b, end = self.rows, other.length, self._length
        for i in range(len(both.k)):
            both.k[i][:a], both.v[i][:a] = self.k[i], self.v[i]
            both.k[i][a:, :, end - b:end], both.v[i][a:, :, end - b:end] = other.k[i][:, :, :b], other.v[i][:, :, :b]
        both.doc_id[:a], both.image_id[:a] = self.doc_id, self.image_id
        both.doc_id[a:, end - b:end], both.image_id[a:, end - b:end] = other.doc_id[:, :b], other.image_id[:, :b]
        both._length, both._plain = end, False
        return both


# ----------------------------------------------------------------------------- conditioning
@dataclass
class PositionCond:
    """A conditioning vector for groups of positions (e.g. Transfusion's timestep, one per image,
    for that image's patches): ``vec`` (N, cond_dim) and ``slot`` (B, L), 0 at unconditioned
    positions and k + 1 at the positions of group k. Unconditioned positions are computed exactly
    as an unconditioned block computes them."""

    vec: torch.Tensor
    slot: torch.Tensor

    @classmethod
    def at(cls, vec: torch.Tensor, index: torch.Tensor, shape: tuple[int, int]) -> PositionCond:
        """``index`` (N * group,): the flat indices into (B * L) of each group's positions, in order."""
        group = index.numel() // len(vec)
        slot = torch.zeros(shape[0] * shape[1], dtype=torch.long, device=index.device)
        slot[index] = torch.arange(1, len(vec) + 1, device=index.device).repeat_interleave(group)
        return cls(vec, slot.view(shape))


class AdaLN(nn.Module):
    """Per-block scale, shift and gate for the conditioned positions, (1 + s) x + b before the
    attention and MLP and (1 + g) on their outputs; zero-initialised, so a fresh block computes
    what an unconditioned one does. The N vectors are looked up per position (an embedding lookup,
    whose backward is a scatter-add), and the modulation is dense elementwise work."""

    def __init__(self, cond_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(cond_dim, 6 * dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, cond: PositionCond) -> tuple[torch.Tensor, ...]:
        """Six (B, L, dim) tensors: shift, scale, gate for the attention, then for the MLP; zero at
        unconditioned positions."""
        m = self.proj(F.silu(cond.vec))
        table = torch.cat([torch.zeros_like(m[:1]), m])  # slot 0: no modulation
        return F.embedding(cond.slot, table).chunk(6, -1)


# ----------------------------------------------------------------------------- blocks
class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.wkv = nn.Linear(cfg.dim, 2 * cfg.kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        self.q_norm = nn.RMSNorm(hd, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(hd, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x, rot, spec: MaskSpec, cache: KVCache | None, layer: int, span):
        b, l, _ = x.shape
        hd, nh, nkv = self.cfg.head_dim, self.cfg.n_heads, self.cfg.kv_heads
        q = self.wq(x).view(b, l, nh, hd).transpose(1, 2)
        k, v = self.wkv(x).view(b, l, 2, nkv, hd).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(self.q_norm(q), rot), apply_rope(self.k_norm(k), rot)
        if cache is not None:
            k, v = cache.update(layer, k, v, *span)
        out = attend(q, k, v, spec, self.cfg.attn_impl)
        return self.wo(out.transpose(1, 2).reshape(b, l, nh * hd))


class SwiGLU(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.hidden, bias=False)
        self.w2 = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def forward(self, x):
        a, g = self.w13(x).chunk(2, -1)
        return self.w2(F.silu(a) * g)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.ada = AdaLN(cfg.cond_dim, cfg.dim) if cfg.cond_dim > 0 else None

    def forward(self, x, rot, spec, cache, layer, span, cond: PositionCond | None = None):
        if self.ada is None or cond is None:
            x = x + self.drop(self.attn(self.attn_norm(x), rot, spec, cache, layer, span))
            return x + self.drop(self.mlp(self.mlp_norm(x)))
        sh1, sc1, g1, sh2, sc2, g2 = (m.to(x.dtype) for m in self.ada(cond))
        a = self.attn(torch.addcmul(sh1, self.attn_norm(x), 1 + sc1), rot, spec, cache, layer, span)
        x = x + self.drop(a * (1 + g1))
        return x + self.drop(self.mlp(torch.addcmul(sh2, self.mlp_norm(x), 1 + sc2)) * (1 + g2))


class Transformer(nn.Module):
    """Token (or embedding) sequence -> hidden states or logits."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if cfg.dim % cfg.n_heads or cfg.n_heads % cfg.kv_heads:
            raise ValueError(f"dim {cfg.dim} / heads {cfg.n_heads} / kv heads {cfg.kv_heads} do not divide")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False) if cfg.lm_head else None
        self.apply(self._init)
        for layer in self.layers:  # scaled init of residual projections (GPT-2)
            for w in (layer.attn.wo.weight, layer.mlp.w2.weight):
                nn.init.normal_(w, std=0.02 / math.sqrt(2 * cfg.n_layers))
            if layer.ada is not None:
                layer.ada.reset_parameters()  # zero again after the normal init above

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def config(self) -> dict:
        return asdict(self.cfg)

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        p = self.tok_emb.weight
        return KVCache(self.cfg, batch, max_len, device or p.device, dtype or p.dtype)

    def forward_hidden(self, x: torch.Tensor, positions: torch.Tensor | None = None, *, causal: bool = True,
                       doc_id: torch.Tensor | None = None, image_id: torch.Tensor | None = None,
                       cache: KVCache | None = None, cond: PositionCond | None = None) -> torch.Tensor:
        """x: (B, L, dim) input embeddings. positions: (B, L) or (B, L, 2) rotary positions
        (default 0..L-1 after what the cache holds). doc_id/image_id: (B, L) for the new positions.
        ``cond``: conditioning for some of the new positions (needs ``cond_dim`` > 0)."""
        b, l, _ = x.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + l, device=x.device).expand(b, l)
        rot = rope_rotation(positions, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_2d)
        span = None
        if cache is not None:
            span = cache.reserve(l, doc_id, image_id)
            spec = cache.mask(causal, span[1])
        else:
            spec = MaskSpec(causal, doc_id, image_id)
        for i, layer in enumerate(self.layers):
            if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, rot, spec, cache, i, span, cond, use_reentrant=False)
            else:
                x = layer(x, rot, spec, cache, i, span, cond)
        if cache is not None:
            cache.advance(span[1])
        return self.norm(x)

    def forward_rows(self, rows: Rows, cache: KVCache | None = None, ids: bool = False) -> torch.Tensor:
        """Hidden states (R, L, dim) of inference rows (:class:`unifuse.models.rows.Rows`) after what
        ``cache`` holds. Their document ids reach the mask when they have padding or an image block
        (then their image ids too), or with ``ids``; otherwise a plain causal run keeps its fast path."""
        image = bool(rows.blocks)
        return self.forward_hidden(self.tok_emb(rows.tokens), rows.positions,
                                   doc_id=rows.doc_id if ids or image or rows.padded else None,
                                   image_id=rows.image_id if image else None, cache=cache)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, **kw) -> torch.Tensor:
        """tokens (B, L) -> logits (B, L, vocab)."""
        return self.lm_head(self.forward_hidden(self.tok_emb(tokens), positions, **kw))

    # ------------------------------------------------------------------ accounting
    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Matmul FLOPs per token: 2 * params (forward) + attention scores/values 2 * 2 * L * d per
        layer (causal halves it on average, not counted: the kernels compute most of it anyway).
        Training = 3x forward (forward + backward). The adaLN projections run once per conditioning
        vector, not per token: :meth:`flops_per_cond`."""
        per_image = sum(p.numel() for layer in self.layers if layer.ada is not None for p in layer.ada.parameters())
        attention = self.cfg.n_layers * attention_flops(seq_len, self.cfg.dim)
        fwd = 2 * (self.num_params(non_embedding=True) - per_image) + attention
        return 3 * fwd if training else fwd

    def flops_per_cond(self) -> int:
        """Forward FLOPs of the adaLN projections of every block for one conditioning vector
        (:class:`PositionCond`: e.g. one per Transfusion image); 0 without ``cond_dim``."""
        return sum(linear_flops(layer.ada) for layer in self.layers if layer.ada is not None)


def linear_flops(module: nn.Module) -> int:
    """Forward FLOPs of every ``nn.Linear`` in ``module`` for one input vector each (2 per
    multiply-add; the bias adds are not counted, as torch's FlopCounterMode does not)."""
    return 2 * sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def attention_flops(keys: int, dim: int) -> int:
    """Forward FLOPs of one query's attention over ``keys`` keys in one layer of width ``dim`` (all
    heads): scores q.k and the weighted sum of values, 2 * 2 * keys * dim, whatever the mask."""
    return 4 * keys * dim
