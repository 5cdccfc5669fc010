"""One attention entry point for every mask the framework needs.

A :class:`MaskSpec` describes the mask by per-position ids instead of a dense matrix:

* ``doc_id`` (B, L): positions attend only within their document (packed sequences); -1 marks
  padding, which attends to nothing real and is attended by nothing real.
* ``image_id`` (B, L): positions of one image block (>= 0) see each other bidirectionally
  (Transfusion); -1 elsewhere.
* ``causal``: key index <= query index (plus the image-block exception); ``False`` gives
  bidirectional attention within each document (MaskGIT).

The same mask function is executed by four kernels (and they give the same numbers);
:func:`choose_kernel` picks one from the device type, the query and key lengths, the spec and the
requested ``impl`` alone:

* ``sdpa_causal``: no ids, no cache offset -> SDPA with ``is_causal=True`` (flash on GPUs);
* ``sdpa_unmasked``: one new position after a plain causal cache sees every key: SDPA, no mask;
* ``dense``: a boolean (B, 1, Lq, Lk) mask built from the mask function, through SDPA. Every CPU
  call (FlexAttention has no CPU backward), and on GPUs the KV-cached steps with fewer than
  :data:`FLEX_MIN_CACHED_QUERIES` new positions (decoding, captioning, caption scoring);
* ``flex``: a FlexAttention ``BlockMask`` from the same mask function, skipping fully masked
  blocks, through the compiled kernel. On GPUs for full sequences with ids (training, prefill) and
  for cached steps of at least one query block; ``impl="flex"`` asks for it anywhere (on CPU it runs
  the eager reference, inference only).

Why cached steps leave flex on GPUs: ``torch.compile`` specialises the flex kernel on the shapes
it sees, and a KV-cached step has a new key length (and query offset) every time. Compiled with
static shapes, each step recompiled until dynamo's recompile limit
(``torch._dynamo.config.recompile_limit``, 8), after which torch runs flex_attention's unfused eager
path, which materialises every score. A step of fewer queries than one 128-row query block has a
single row of blocks, so the BlockMask can skip only key blocks that none of its queries sees, and
its dense mask is small (Lq x Lk booleans per row): SDPA with that mask serves it. Where flex
still meets new lengths (prompts of other lengths, image blocks of 128+ positions against a
growing cache), the kernel is compiled with automatic dynamic shapes: see :func:`compile_flex`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# On CPU, SDPA's default (flash) kernel is slow in bf16 for short keys: forward+backward with a mask,
# 3 heads of 64, it took 3.5x the math kernel's time at 44 keys, 1.6x at 128 and 0.73x at 256
# (experiments/bench/attention.py prints the table). Below this many keys, CPU bf16 attention runs
# SDPA's math kernel, which computes in fp32 on CPU; fp32 inputs and GPUs keep SDPA's own choice.
CPU_BF16_MATH_BELOW = 256

# On GPUs, a KV-cached call (queries after cached keys) with fewer new positions than this runs
# dense SDPA instead of FlexAttention: one query block of create_block_mask's default BLOCK_SIZE.
FLEX_MIN_CACHED_QUERIES = 128

IMPLS = ("auto", "dense", "flex")


@dataclass
class MaskSpec:
    causal: bool = True
    doc_id: torch.Tensor | None = None  # (B, Lk) for keys; queries use the last Lq entries
    image_id: torch.Tensor | None = None  # (B, Lk)
    # masks built from this spec, by (impl, Lq, Lk): a forward builds its spec once, so every layer
    # after the first reuses the dense mask / BlockMask instead of rebuilding it
    built: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def plain_causal(self) -> bool:
        return self.causal and self.doc_id is None and self.image_id is None


def mask_function(spec: MaskSpec, q_offset: int):
    """mask_mod(b, h, q_idx, kv_idx) -> bool, with query i at absolute index q_offset + i."""
    doc, img, causal = spec.doc_id, spec.image_id, spec.causal

    def mask_mod(b, h, q_idx, kv_idx):
        qa = q_idx + q_offset
        allowed = (kv_idx <= qa) if causal else (kv_idx >= 0)
        if img is not None:
            qi, ki = img[b, qa], img[b, kv_idx]
            allowed = allowed | ((qi == ki) & (qi >= 0))
        if doc is not None:
            allowed = allowed & (doc[b, qa] == doc[b, kv_idx]) & (doc[b, kv_idx] >= 0)
        return allowed

    return mask_mod


def dense_mask(spec: MaskSpec, lq: int, lk: int, device) -> torch.Tensor:
    """Boolean (B or 1, 1, lq, lk) mask: True = attend. Queries are the last lq of lk positions."""
    q_offset = lk - lq
    ids = spec.doc_id if spec.doc_id is not None else spec.image_id
    b = ids.shape[0] if ids is not None else 1
    bi = torch.arange(b, device=device)[:, None, None]
    qi = torch.arange(lq, device=device)[None, :, None]
    ki = torch.arange(lk, device=device)[None, None, :]
    m = mask_function(spec, q_offset)(bi, None, qi, ki)
    m = m.expand(b, lq, lk)
    # a padding query that may attend to nothing would give NaN: let it see itself only
    if spec.doc_id is not None:
        empty = ~m.any(-1, keepdim=True)
        self_ = (ki == qi + q_offset).expand(b, lq, lk)
        m = m | (empty & self_)
    return m[:, None]


def compile_flex(backend="inductor"):
    """flex_attention under ``torch.compile`` with automatic dynamic shapes (``dynamic=None``, not
    ``False``): the first shapes get a specialised kernel (training keeps one packed length); a
    size that changes for the first time (key length, number of key blocks, ...) recompiles once
    with that size symbolic, and sizes and integers of 0 or 1 stay specialised (a query offset of
    0, a single query block). After those few recompiles one kernel serves every later length;
    static shapes recompiled at each new length."""
    from torch.nn.attention.flex_attention import flex_attention  # deferred: 0.8 s to import, only flex runs need it

    return torch.compile(flex_attention, dynamic=None, backend=backend)


_COMPILED_FLEX = None


def _flex_kernel(cuda: bool):
    """Compiled flex_attention on GPUs (fused kernel); the eager reference on CPU (inference only)."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention  # deferred: 0.8 s to import, only flex runs need it

    if not cuda:
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = compile_flex()
    return _COMPILED_FLEX


def _flex(q, k, v, spec: MaskSpec, q_offset: int):
    from torch.nn.attention.flex_attention import create_block_mask  # deferred: 0.8 s to import, only flex needs it

    b, _, lq, _ = q.shape
    lk = k.shape[2]
    mask_mod = mask_function(spec, q_offset)
    if spec.doc_id is not None:  # padding rows with no key at all: see themselves (as in dense)
        inner = mask_mod

        def mask_mod(b_, h, q_idx, kv_idx):  # noqa: F811
            qa = q_idx + q_offset
            return inner(b_, h, q_idx, kv_idx) | ((spec.doc_id[b_, qa] < 0) & (kv_idx == qa))

    key = ("flex", lq, lk)
    if key not in spec.built:
        spec.built[key] = create_block_mask(
            mask_mod, B=b if (spec.doc_id is not None or spec.image_id is not None) else None,
            H=None, Q_LEN=lq, KV_LEN=lk, device=q.device)
    bm = spec.built[key]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return _flex_kernel(q.is_cuda)(q, k, v, block_mask=bm, enable_gqa=q.shape[1] != k.shape[1])


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with the CPU bf16 kernel rule above."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.shape[2] < CPU_BF16_MATH_BELOW:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def choose_kernel(device_type: str, lq: int, lk: int, spec: MaskSpec, impl: str = "auto") -> str:
    """The kernel :func:`attend` runs for ``lq`` queries that are the last of ``lk`` keys:
    ``sdpa_causal``, ``sdpa_unmasked``, ``dense`` or ``flex`` (see the module docstring).
    ``impl``: ``auto``, or ``dense`` / ``flex`` to force that path where a mask is needed."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be auto, dense or flex, not {impl!r}")
    if spec.plain_causal and lq == 1:  # one new position sees the whole cache
        return "sdpa_unmasked"
    if spec.plain_causal and lq == lk and impl != "flex":
        return "sdpa_causal"
    if impl != "auto":
        return impl
    if device_type != "cuda":
        return "dense"
    if lq < lk and lq < FLEX_MIN_CACHED_QUERIES:  # a KV-cached step: its key length changes every call
        return "dense"
    return "flex"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec, impl: str = "auto") -> torch.Tensor:
    """q: (B, H, Lq, D); k, v: (B, Hkv, Lk, D) with the queries at the last Lq key positions."""
    lq, lk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    kernel = choose_kernel(q.device.type, lq, lk, spec, impl)
    if kernel == "sdpa_causal":
        return sdpa(q, k, v, is_causal=True, enable_gqa=gqa)
    if kernel == "sdpa_unmasked":
        return sdpa(q, k, v, enable_gqa=gqa)
    if kernel == "flex":
        return _flex(q, k, v, spec, lk - lq)
    key = ("dense", lq, lk)
    if key not in spec.built:
        spec.built[key] = dense_mask(spec, lq, lk, q.device)
    return sdpa(q, k, v, attn_mask=spec.built[key], enable_gqa=gqa)
