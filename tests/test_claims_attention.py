"""The attention claims, checked against references that do not share code with the implementation:

* the dense mask equals a plain Python double loop over every (query, key) pair, written from the
  rules (causal unless both in the same image block, never across documents, never to padding;
  a padding query sees itself only), for every position of every row, also with a query offset;
* FlexAttention equals the dense path at lengths above one 128-position block, with and without
  a query offset, and its block mask skips whole blocks without dropping an allowed pair;
* the backbone with ``attn_impl="flex"`` and a KV cache (prefill, one-token and multi-token steps)
  equals a full dense forward, with padding, several documents and image blocks;
* the kernel routing (a pure function of device type, lengths, mask and impl): GPUs run flex for
  training-size calls and dense SDPA for KV-cached steps below one query block, CPU runs dense, plain
  causal runs SDPA's causal kernel; ``attend`` runs the kernel chosen; and the compiled flex kernel
  stops recompiling after a few new lengths, each call equal to the dense path.
"""

from __future__ import annotations

import pytest
import torch

from unifuse.models.attention import MaskSpec, attend, dense_mask
from unifuse.models.transformer import Transformer, TransformerConfig


def layout(b: int, n: int, seed: int, images: bool = True):
    """Left padding, packed documents of 3..40 positions, image blocks of 2..12 inside documents,
    trailing padding: different on every row."""
    g = torch.Generator().manual_seed(seed)
    doc = torch.full((b, n), -1)
    img = torch.full((b, n), -1)
    for r in range(b):
        at, d, blk = int(torch.randint(1, 6, (1,), generator=g)), 0, 0
        while at < n - 8:
            ln = min(int(torch.randint(3, 41, (1,), generator=g)), n - 4 - at)
            doc[r, at:at + ln] = d
            if images and ln > 8:
                s = at + int(torch.randint(1, ln - 6, (1,), generator=g))
                e = min(at + ln - 1, s + int(torch.randint(2, 13, (1,), generator=g)))
                img[r, s:e] = blk
                blk += 1
            at, d = at + ln, d + 1
    return doc, img


def reference_allowed(doc, img, causal: bool, q: int, k: int) -> bool:
    """The mask rules, one (query, key) pair at a time; doc/img: python lists or None."""
    if doc is not None:
        if doc[q] < 0:
            return k == q  # padding attends to itself only (no NaN row), nothing real
        if doc[k] < 0 or doc[k] != doc[q]:
            return False  # never to padding, never across documents
    if not causal or k <= q:
        return True
    return img is not None and img[q] >= 0 and img[q] == img[k]  # bidirectional inside one image


def reference_mask(spec: MaskSpec, lq: int, lk: int) -> torch.Tensor:
    ids = spec.doc_id if spec.doc_id is not None else spec.image_id
    b = ids.shape[0] if ids is not None else 1
    out = torch.zeros(b, lq, lk, dtype=torch.bool)
    for r in range(b):
        doc = spec.doc_id[r].tolist() if spec.doc_id is not None else None
        img = spec.image_id[r].tolist() if spec.image_id is not None else None
        for i in range(lq):
            q = lk - lq + i
            for k in range(lk):
                out[r, i, k] = reference_allowed(doc, img, spec.causal, q, k)
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ids", ["doc+img", "doc", "img"])
def test_dense_mask_equals_the_rules_for_every_pair(causal, seed, ids):
    n = 150
    doc, img = layout(2, n, seed)
    spec = MaskSpec(causal, doc if "doc" in ids else None, img if "img" in ids else None)
    for lq in (n, 1, 9):  # full sequence, one cached step, several cached steps (query offset n - lq)
        m = dense_mask(spec, lq, n, "cpu")
        assert m.shape == (2, 1, lq, n)
        ref = reference_mask(spec, lq, n)
        bad = (m[:, 0] != ref).nonzero().tolist()
        assert not bad, f"lq={lq}: (row, query, key) disagree with the rules, first: {bad[:5]}"
    # the rules are not vacuous on this layout (bidirectional without documents is all-True)
    assert ref.any() and (ref.all() == (not causal and spec.doc_id is None))


def test_dense_mask_plain_causal_and_bidirectional_without_ids():
    for causal in (True, False):
        spec = MaskSpec(causal)
        for lq in (20, 1, 6):
            ref = reference_mask(spec, lq, 20)
            assert torch.equal(dense_mask(spec, lq, 20, "cpu")[:, 0], ref)


def _qkv(b, h, hkv, lq, lk, d, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g)
    k, v = (torch.randn(b, hkv, lk, d, generator=g) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("causal", [True, False])
def test_flex_equals_dense_beyond_one_block_with_query_offset(causal):
    n = 300  # three 128-position blocks
    doc, img = layout(2, n, seed=5)
    spec = MaskSpec(causal, doc, img)
    for lq in (n, 1, 37):  # the queries are the last lq of the n keys (KV-cached decoding)
        q, k, v = _qkv(2, 4, 2, lq, n, 16, seed=lq)  # grouped-query attention too
        dense = attend(q, k, v, spec, "dense")
        flex = attend(q, k, v, spec, "flex")
        torch.testing.assert_close(flex, dense, atol=2e-5, rtol=1e-4, msg=f"lq={lq}")


def test_flex_plain_causal_with_query_offset_equals_dense():
    n = 260
    for lq in (n, 40):  # 40: several new positions after a cache, the causal offset matters
        q, k, v = _qkv(1, 2, 2, lq, n, 8, seed=lq)
        torch.testing.assert_close(attend(q, k, v, MaskSpec(True), "flex"),
                                   attend(q, k, v, MaskSpec(True), "dense"), atol=2e-5, rtol=1e-4)


def test_flex_block_mask_skips_whole_blocks_but_no_allowed_pair(monkeypatch):
    """The compiled kernel on GPUs never looks inside a block the BlockMask leaves out: every allowed
    (query, key) pair must lie in a kept block of its own row, and with several short documents
    some blocks must be left out (otherwise nothing is skipped)."""
    import torch.nn.attention.flex_attention as fa

    made = []
    real = fa.create_block_mask
    monkeypatch.setattr(fa, "create_block_mask", lambda *a, **kw: made.append(real(*a, **kw)) or made[-1])
    n, bs = 384, 128
    doc, img = layout(2, n, seed=2)
    for causal in (True, False):
        spec = MaskSpec(causal, doc, img)
        for lq in (n, 1, 130):
            made.clear()
            q, k, v = _qkv(2, 2, 2, lq, n, 8, seed=0)
            attend(q, k, v, spec, "flex")
            (bm,) = made
            blocks = bm.to_dense()  # (B, H, q blocks, kv blocks): 1 where the block is visited
            assert blocks.shape[0] == 2, "per-row ids need a per-row block mask"
            ref = reference_mask(spec, lq, n)
            r, qi, ki = ref.nonzero(as_tuple=True)
            assert blocks[r, 0, qi // bs, ki // bs].all(), f"causal={causal} lq={lq}: an allowed pair is skipped"
            if lq == n:
                assert not blocks.bool().all(), "no block is skipped"


def _pair(attn: str, **kw) -> tuple[Transformer, Transformer]:
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm=True, max_seq_len=512, **kw)
    dense = Transformer(TransformerConfig(attn_impl="dense", **cfg)).eval()
    other = Transformer(TransformerConfig(attn_impl=attn, **cfg)).eval()
    other.load_state_dict(dense.state_dict())
    return dense, other


def _cuts(img: torch.Tensor, n: int) -> list[int]:
    """Chunk boundaries for cached decoding that never split an image block (an image is added to
    the cache whole): prefill past one block, two single positions, a multi-position step, the rest."""
    ok = [c for c in range(1, n) if not ((img[:, c - 1] >= 0) & (img[:, c - 1] == img[:, c])).any()]
    first = next(c for c in ok if c >= 140 and c + 1 in ok and c + 2 in ok)
    multi = next(c for c in ok if c >= first + 30)
    return [0, first, first + 1, first + 2, multi, n]


@torch.no_grad()  # FlexAttention on CPU: inference only
@pytest.mark.parametrize("ids", ["doc+img", "plain"])
def test_flex_kv_cache_prefill_and_steps_equal_full_dense_forward(ids):
    dense, flex = _pair("flex")
    n = 290
    x = torch.randint(0, 97, (2, n), generator=torch.Generator().manual_seed(1))
    doc, img = layout(2, n, seed=3) if ids == "doc+img" else (None, None)
    full = dense(x, doc_id=doc, image_id=img)
    cuts = _cuts(img if img is not None else torch.full((2, n), -1), n)
    assert any(b - a == 1 for a, b in zip(cuts, cuts[1:])) and any(b - a > 1 for a, b in zip(cuts[1:], cuts[2:]))
    cache = flex.new_cache(2, n)
    parts = []
    for a, b in zip(cuts, cuts[1:]):
        parts.append(flex(x[:, a:b], doc_id=None if doc is None else doc[:, a:b],
                          image_id=None if img is None else img[:, a:b], cache=cache))
    assert cache.length == n
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)
    # and the uncached flex forward too
    torch.testing.assert_close(flex(x, doc_id=doc, image_id=img), full, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_dense_kv_cache_with_image_blocks_equals_full_forward():
    dense, _ = _pair("dense")
    n = 200
    x = torch.randint(0, 97, (2, n), generator=torch.Generator().manual_seed(2))
    doc, img = layout(2, n, seed=4)
    full = dense(x, doc_id=doc, image_id=img)
    cache = dense.new_cache(2, n + 5)
    cuts = _cuts(img, n)
    out = torch.cat([dense(x[:, a:b], doc_id=doc[:, a:b], image_id=img[:, a:b], cache=cache)
                     for a, b in zip(cuts, cuts[1:])], 1)
    torch.testing.assert_close(out, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n,math", [(44, True), (300, False)])
def test_cpu_bf16_attention_runs_the_math_kernel_below_the_threshold(n, math):
    """CPU bf16 with few keys runs SDPA's math kernel (the flash kernel was 2-4x slower there), and
    SDPA's own choice from the threshold on: the output equals that kernel's, bit for bit."""
    from torch.nn import functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from unifuse.models.attention import CPU_BF16_MATH_BELOW

    assert (n < CPU_BF16_MATH_BELOW) == math
    doc, img = layout(2, n, seed=3)
    q, k, v = (torch.randn(2, 2, n, 16, generator=torch.Generator().manual_seed(i)).bfloat16() for i in range(3))
    spec = MaskSpec(True, doc, img)
    out = attend(q, k, v, spec, impl="dense")
    mask = dense_mask(spec, n, n, q.device)
    with sdpa_kernel(SDPBackend.MATH if math else SDPBackend.FLASH_ATTENTION):
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION if math else SDPBackend.MATH):
        other = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out, ref)
    assert not torch.equal(out, other)  # the two kernels differ in bf16: the test can tell which ran


# ----------------------------------------------------------------------------- kernel routing
_IDS = (torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), -1))  # any ids: not plain causal


@pytest.mark.parametrize("device,lq,lk,spec,impl,kernel", [
    ("cuda", 300, 300, MaskSpec(True, *_IDS), "auto", "flex"),  # packed training rows with images
    ("cuda", 256, 256, MaskSpec(False, _IDS[0]), "auto", "flex"),  # MaskGIT / DiT: bidirectional in documents
    ("cuda", 1, 301, MaskSpec(False, *_IDS), "auto", "dense"),  # one cached step, non-causal mask
    ("cuda", 1, 301, MaskSpec(True, *_IDS), "auto", "dense"),  # captioning / left-padded prompts
    ("cuda", 16, 1000, MaskSpec(True, *_IDS), "auto", "dense"),  # an image block against a long cache
    ("cuda", "min-1", 1000, MaskSpec(True, *_IDS), "auto", "dense"),
    ("cuda", "min", 1000, MaskSpec(True, *_IDS), "auto", "flex"),  # one query block and more: flex
    ("cuda", 5, 100, MaskSpec(True), "auto", "dense"),  # several new positions after a plain causal cache
    ("cuda", 300, 300, MaskSpec(True), "auto", "sdpa_causal"),
    ("cuda", 1, 300, MaskSpec(True), "auto", "sdpa_unmasked"),
    ("cpu", 300, 300, MaskSpec(True, *_IDS), "auto", "dense"),
    ("cpu", 1, 301, MaskSpec(False, *_IDS), "auto", "dense"),
    ("cpu", 300, 300, MaskSpec(True), "auto", "sdpa_causal"),
    ("cpu", 300, 300, MaskSpec(True, *_IDS), "flex", "flex"),  # asked for: CPU inference runs eager flex
    ("cpu", 300, 300, MaskSpec(True), "flex", "flex"),
    ("cuda", 300, 300, MaskSpec(True, *_IDS), "dense", "dense"),
    ("cuda", 1, 300, MaskSpec(True), "flex", "sdpa_unmasked"),
])
def test_kernel_routing(device, lq, lk, spec, impl, kernel):
    from unifuse.models.attention import FLEX_MIN_CACHED_QUERIES, choose_kernel

    lq = {"min": FLEX_MIN_CACHED_QUERIES, "min-1": FLEX_MIN_CACHED_QUERIES - 1}.get(lq, lq)
    assert choose_kernel(device, lq, lk, spec, impl) == kernel


def test_kernel_routing_refuses_an_unknown_impl():
    from unifuse.models.attention import choose_kernel

    with pytest.raises(ValueError, match="auto, dense or flex, not 'flash'"):
        choose_kernel("cpu", 4, 4, MaskSpec(True), "flash")  # even where no mask is needed


@pytest.mark.parametrize("kernel", ["sdpa_causal", "sdpa_unmasked", "dense", "flex"])
def test_attend_runs_the_kernel_chosen(kernel, monkeypatch):
    import unifuse.models.attention as attention

    ran = []
    monkeypatch.setattr(attention, "choose_kernel", lambda *a: kernel)
    monkeypatch.setattr(attention, "_flex", lambda *a: ran.append("flex") or a[0])

    def sdpa(q, k, v, is_causal=False, attn_mask=None, enable_gqa=False):
        ran.append("dense" if attn_mask is not None else "sdpa_causal" if is_causal else "sdpa_unmasked")
        return q

    monkeypatch.setattr(attention, "sdpa", sdpa)
    q, k, v = _qkv(1, 2, 2, 3, 9, 8, seed=0)
    attention.attend(q, k, v, MaskSpec(True, *layout(1, 9, seed=0)))
    assert ran == [kernel]


@torch.no_grad()
@torch._dynamo.config.patch(recompile_limit=64)  # config's own patch: a monkeypatched config breaks later tests
def test_compiled_flex_serves_new_lengths_without_compiling_again(monkeypatch):
    """The calls GPUs run through flex with new lengths (prefill of prompts of other lengths, image
    blocks of one query block and more against a growing cache) stop compiling after a few lengths:
    with static shapes every new length compiled (then dynamo's recompile limit fell back to the
    unfused eager flex). Each call also equals the dense path. The kernel is compiled with a
    counting backend that runs the traced graph eagerly, and a recompile limit too high to hide
    a compile per length."""
    from torch._dynamo.testing import CompileCounter

    import unifuse.models.attention as attention
    from unifuse.models.attention import FLEX_MIN_CACHED_QUERIES, choose_kernel, compile_flex

    torch._dynamo.reset()
    counter = CompileCounter()
    kernel = compile_flex(counter)
    monkeypatch.setattr(attention, "_flex_kernel", lambda cuda: kernel)
    doc, img = layout(2, 420, seed=6)
    m = FLEX_MIN_CACHED_QUERIES
    # dynamo specialises sizes of 0 and 1 (a query offset of 0, a single query block): the first
    # calls meet each such case once; the later ones are new lengths only
    first = [(140, 140), (160, 160)] + [(m, lk) for lk in (200, 231, 262)] + [(m + 22, 300)]
    later = [(180, 180), (199, 199), (m, 345), (m, 410), (m + 40, 380), (m + 5, 290)]
    try:
        for i, (lq, lk) in enumerate(first + later):
            if i == len(first):
                warm = counter.frame_count
            spec = MaskSpec(True, doc[:, :lk], img[:, :lk])
            assert choose_kernel("cuda", lq, lk, spec) == "flex"
            q, k, v = _qkv(2, 4, 2, lq, lk, 16, seed=lk)
            torch.testing.assert_close(attend(q, k, v, spec, "flex"), attend(q, k, v, spec, "dense"),
                                       atol=2e-5, rtol=1e-4, msg=f"lq={lq} lk={lk}")
        assert warm < len(first) and counter.frame_count == warm, (
            f"{warm} compilations for the first {len(first)} lengths, {counter.frame_count - warm} for "
            f"{len(later)} more")
    finally:
        torch._dynamo.reset()
