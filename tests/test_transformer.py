"""The backbone: attention paths agree, KV cache == recomputation, sampling filters per row."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import packed
from unifuse.decoding.ar import generate as ar_generate
from unifuse.decoding.maskgit import generate as maskgit_generate
from unifuse.models.attention import MaskSpec, attend, dense_mask
from unifuse.models.image_gpt import ImageGPT
from unifuse.models.maskgit import MaskGIT
from unifuse.models.transformer import SIZES, Transformer, TransformerConfig, config_for
from unifuse.sampling.guidance import guidance_scale
from unifuse.sampling.tokens import filter_logits, sample_logits
from unifuse.text.vocab import VocabLayout

TINY = TransformerConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm=True)


def random_layout(b: int, n: int, g: torch.Generator):
    """Packed documents with padding and image blocks at random places."""
    doc = torch.full((b, n), -1)
    img = torch.full((b, n), -1)
    for r in range(b):
        at, d, blk = int(torch.randint(0, 4, (1,), generator=g)), 0, 0
        while at < n - 2:
            ln = int(torch.randint(3, 15, (1,), generator=g))
            doc[r, at : at + ln] = d
            if ln > 6:
                s = at + int(torch.randint(1, ln - 4, (1,), generator=g))
                e = min(at + ln, s + int(torch.randint(2, 6, (1,), generator=g)))
                img[r, s:e] = blk
                blk += 1
            at, d = at + ln, d + 1
    return doc, img


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flex_equals_dense_on_random_layouts(causal, seed):
    g = torch.Generator().manual_seed(seed)
    b, h, n, d = 2, 4, 70, 16
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    doc, img = random_layout(b, n, g)
    spec = MaskSpec(causal, doc, img)
    dense = attend(q, k, v, spec, "dense")
    flex = attend(q, k, v, spec, "flex")
    torch.testing.assert_close(flex, dense, atol=2e-5, rtol=1e-4)
    # and the dense reference is what the rules say, for every (query, key) pair of every row
    # (tests/test_claims_attention.py also checks cached query offsets and longer sequences)
    m = dense_mask(spec, n, n, "cpu")[:, 0]
    for r in range(b):
        dr, ir = doc[r].tolist(), img[r].tolist()
        for qi in range(n):
            for ki in range(n):
                ok = ((ki <= qi or not causal or (ir[qi] >= 0 and ir[qi] == ir[ki]))
                      and dr[qi] == dr[ki] and dr[ki] >= 0)
                if dr[qi] < 0:
                    ok = ki == qi  # padding sees itself only
                assert bool(m[r, qi, ki]) == ok, (r, qi, ki)


def test_causal_fast_path_equals_flex_causal_mask():
    q, k, v = (torch.randn(2, 4, 50, 16) for _ in range(3))
    fast = attend(q, k, v, MaskSpec(True), "dense")  # SDPA is_causal
    flex = attend(q, k, v, MaskSpec(True, torch.zeros(2, 50, dtype=torch.long)), "flex")
    torch.testing.assert_close(fast, flex, atol=2e-5, rtol=1e-4)


def test_kv_cache_prefill_and_steps_match_full_forward():
    torch.manual_seed(0)
    keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "qk_norm")
    m = Transformer(TransformerConfig(vocab_size=97, **{k: getattr(TINY, k) for k in keys})).eval()
    x = torch.randint(0, 97, (3, 20))
    doc = torch.zeros(3, 20, dtype=torch.long)
    doc[1, :4] = -1  # a left-padded row
    full = m(x, doc_id=doc)
    cache = m.new_cache(3, 24)
    parts = [m(x[:, :9], doc_id=doc[:, :9], cache=cache)]
    parts.append(m(x[:, 9:10], doc_id=doc[:, 9:10], cache=cache))  # one position
    parts.append(m(x[:, 10:], doc_id=doc[:, 10:], cache=cache))  # several positions
    torch.testing.assert_close(torch.cat(parts, 1)[doc >= 0], full[doc >= 0], atol=1e-5, rtol=1e-5)


def test_image_blocks_are_bidirectional_in_the_backbone():
    torch.manual_seed(0)
    m = Transformer(TransformerConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2)).eval()
    x = torch.randint(0, 50, (1, 12))
    img = torch.full((1, 12), -1)
    img[0, 4:8] = 0
    base = m(x, image_id=img)
    x2 = x.clone()
    x2[0, 7] = (x[0, 7] + 1) % 50  # change the last image position
    out = m(x2, image_id=img)
    assert not torch.allclose(out[0, 4], base[0, 4])  # earlier positions of the same image see it
    torch.testing.assert_close(out[0, :4], base[0, :4])  # text before the image does not


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=60, dim=32, n_layers=2, n_heads=2)
    a = Transformer(cfg)
    b = Transformer(TransformerConfig(**{**cfg.__dict__, "grad_checkpointing": True}))
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 60, (2, 10))
    for m in (a, b):
        m(x).logsumexp(-1).mean().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_dropout_acts_only_in_training():
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=60, dim=32, n_layers=2, n_heads=2)
    plain, dropped = Transformer(cfg), Transformer(TransformerConfig(**{**cfg.__dict__, "dropout": 0.5}))
    dropped.load_state_dict(plain.state_dict())
    x = torch.randint(0, 60, (2, 10))
    torch.testing.assert_close(dropped.eval()(x), plain.eval()(x))  # inference and cached decoding untouched
    dropped.train()
    a, b = dropped(x), dropped(x)
    assert not torch.allclose(a, b) and not torch.allclose(a, plain(x))


def test_size_registry_and_flops():
    cfg = config_for("0.16B", vocab_size=32000)
    assert (cfg.n_layers, cfg.dim) == (16, 768) and set(SIZES) >= {"0.37B", "0.76B", "1.4B", "7B", "tiny"}
    m = Transformer(TransformerConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4))
    n = m.num_params()
    assert m.flops_per_token(128) == 3 * (2 * n + 4 * 2 * 128 * 64)
    with pytest.raises(KeyError, match="unknown transformer size"):
        config_for("3B")


# ----------------------------------------------------------------------------- sampling
def test_top_k_top_p_are_applied_per_row():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0],  # peaked
                           [1.0, 1.0, 1.0, 1.0, 1.0],  # flat
                           [0.0, 5.0, 0.0, 4.9, 0.0]])  # two modes
    k = filter_logits(logits, top_k=2)
    assert (k.isfinite().sum(1) == 2).all()
    assert k[2].isfinite().tolist() == [False, True, False, True, False]
    p = filter_logits(logits, top_p=0.7)
    for r in range(3):  # reference: row by row, the smallest prefix whose mass reaches 0.7
        probs, order = logits[r].softmax(-1).sort(descending=True)
        keep = int((probs.cumsum(0) < 0.7).sum()) + 1
        assert set(p[r].isfinite().nonzero().flatten().tolist()) == set(order[:keep].tolist())
    assert p[1].isfinite().sum() == 4 and p[0].isfinite().sum() == 2
    # sampling respects each row's own filter
    g = [torch.Generator().manual_seed(i) for i in range(3)]
    for _ in range(200):
        tok = sample_logits(logits, 1.0, top_k=2, generator=g)
        assert k[torch.arange(3), tok].isfinite().all()


def test_sampling_draws_from_the_distribution_and_ignores_float_noise():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).log_softmax(-1)
    g = torch.Generator().manual_seed(0)
    draws = sample_logits(logits.expand(40000, 4), 1.0, generator=g)
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(freq, logits.softmax(-1)[0], atol=0.01, rtol=0)  # 4 sigma ~ 0.01
    # the same seed under a small perturbation of near-uniform logits over 1024 codes (cached vs
    # recomputed attention differ by ~1e-6; 1e-4 here to make flips countable) keeps the tokens:
    # ~1 row in 32768 changes, where an inverse-CDF lookup on the same uniforms changes ~30
    torch.manual_seed(0)
    base = torch.randn(32768, 1024) * 0.1
    noisy = base + 1e-4 * torch.randn_like(base)
    a = sample_logits(base, 1.0, generator=torch.Generator().manual_seed(1))
    b = sample_logits(noisy, 1.0, generator=torch.Generator().manual_seed(1))
    assert (a != b).sum() <= 6


def gpt(cls=ImageGPT, grid=4, codes=32):
    torch.manual_seed(0)
    return cls(TINY, VocabLayout(image_codes=codes), grid=grid, max_text_len=16).eval()


def test_kv_cached_generation_matches_naive_recomputation():
    m = gpt()
    conds = ["dog face", "a much longer caption here", ""]
    a, la = ar_generate(m, conds, cfg_scale=3.0, seed=7, top_p=0.9, return_logits=True)
    b, lb = ar_generate(m, conds, cfg_scale=3.0, seed=7, top_p=0.9, use_cache=False, return_logits=True)
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)
    assert torch.equal(a, b)


def test_batched_prompts_of_different_lengths_equal_one_at_a_time():
    m = gpt()
    conds = ["x", "red heart with a long tail", "cat"]
    batch, lb = ar_generate(m, conds, cfg_scale=2.0, seed=3, return_logits=True)
    for i, c in enumerate(conds):
        one, lo = ar_generate(m, [c], cfg_scale=2.0, seed=3 + i, return_logits=True)
        torch.testing.assert_close(lo[0], lb[i], atol=1e-4, rtol=1e-4)
        assert torch.equal(one[0], batch[i])


def test_cfg_scale_one_equals_conditional_sampling():
    m = gpt()
    conds = ["dog face", "pizza"]
    plain = ar_generate(m, conds, cfg_scale=None, seed=11)
    guided = ar_generate(m, conds, cfg_scale=1.0, seed=11)
    assert torch.equal(plain, guided)
    assert not torch.equal(plain, ar_generate(m, conds, cfg_scale=5.0, seed=11))


def test_linear_guidance_schedule_ramps_from_conditional_to_the_scale():
    assert guidance_scale(4.0, "linear", 0.25) == 1.75 and guidance_scale(4.0, "linear", 1.0) == 4.0
    assert guidance_scale(4.0, "constant", 0.25) == 4.0 and guidance_scale(None, "linear", 0.5) is None
    with pytest.raises(ValueError, match="cfg_schedule"):
        guidance_scale(4.0, "cosine", 0.5)
    m = gpt()  # 16 tokens: token i is guided at 1 + 3 * (i + 1) / 16
    conds = ["dog face", "pizza"]
    tokens, ramp = ar_generate(m, conds, cfg_scale=4.0, cfg_schedule="linear", seed=5, return_logits=True)
    _, first = ar_generate(m, conds, cfg_scale=1.0 + 3.0 / 16, seed=5, return_logits=True)
    torch.testing.assert_close(ramp[:, 0], first[:, 0])
    assert not torch.equal(tokens, ar_generate(m, conds, cfg_scale=4.0, seed=5))
    mg = gpt(MaskGIT)  # MaskGIT ramps over its K steps; scale 1 throughout is conditional sampling
    assert torch.equal(maskgit_generate(mg, conds, steps=4, cfg_scale=1.0, cfg_schedule="linear", seed=2),
                       maskgit_generate(mg, conds, steps=4, cfg_scale=None, seed=2))


def test_tokens_outside_the_image_range_are_never_sampled_inside_an_image():
    m = gpt()
    with torch.no_grad():  # make every text/special id far likelier than any image code
        lo, hi = m.vocab.image_range()
        m.net.lm_head.weight[:lo] *= 50
        m.net.lm_head.weight[:lo] += m.net.norm.weight.sign() * 0.5
    full = m.net(m.prompts(["dog"], "cpu").tokens)[0, -1]
    assert full.argmax() < lo  # unrestricted, a text id would win
    codes = ar_generate(m, ["dog", "cat"], seed=0, temperature=1.5)
    assert codes.min() >= 0 and codes.max() < m.vocab.image_codes


def test_maskgit_k_forward_passes_each_position_decoded_once(monkeypatch):
    """K passes; each position is decoded at exactly one step, to the token sampled at that step, and
    never changes afterwards: the image fed to pass k+1 keeps every code pass k was given."""
    import unifuse.decoding.maskgit as mg

    m = gpt(MaskGIT, grid=4)
    lengths, fed, sampled = [], [], []
    m.net.norm.register_forward_hook(lambda mod, inp, out: lengths.append(out.shape[1]))
    m.net.tok_emb.register_forward_hook(lambda mod, inp, out: fed.append(inp[0][:3, -16:].clone()))
    real = mg.sample_logits
    monkeypatch.setattr(mg, "sample_logits", lambda *a, **kw: sampled.append(real(*a, **kw).view(3, 16)) or
                        sampled[-1].flatten())
    mask_id, code_id = m.vocab.mask, m.vocab.code_to_id
    for k in (4, 8, 12):
        for use_cache in (False, True):
            lengths.clear(), fed.clear(), sampled.clear()
            codes, trace = maskgit_generate(m, ["dog", "cat", ""], steps=k, cfg_scale=2.0, seed=0,
                                            return_trace=True, use_cache=use_cache)
            # cond + uncond share one batched pass per step; cached: the caption once, then the image K times
            assert lengths == ([5] + [16] * k if use_cache else [5 + 16] * k)
            assert codes.shape == (3, 4, 4) and (trace >= 0).all() and (trace < k).all()
            per_step = torch.stack([(trace == s).sum(1) for s in range(k)], 1)
            assert (per_step.sum(1) == 16).all() and (per_step > 0).all()  # every step decodes something
            inputs = fed[1:] if use_cache else fed  # the image ids of each pass (cached: after the caption)
            assert len(inputs) == len(sampled) == k
            final = code_id(codes.flatten(1))
            for s in range(k):
                known = trace < s  # decoded before pass s
                assert torch.equal(inputs[s] != mask_id, known), f"pass {s} sees the wrong positions"
                assert torch.equal(inputs[s][known], final[known]), f"a decoded code changed before pass {s}"
                new = trace == s
                assert torch.equal(codes.flatten(1)[new], sampled[s][new]), f"step {s} kept other tokens"


def test_maskgit_cached_caption_matches_full_recomputation():
    m = gpt(MaskGIT, grid=4)
    conds = ["dog face", "a much longer caption here", ""]
    a, ta = maskgit_generate(m, conds, steps=6, cfg_scale=3.0, seed=3, top_p=0.9, return_trace=True)
    b, tb = maskgit_generate(m, conds, steps=6, cfg_scale=3.0, seed=3, top_p=0.9, return_trace=True, use_cache=False)
    assert torch.equal(a, b) and torch.equal(ta, tb)
    # the caption is causal and never sees the image: its hidden states do not depend on the codes
    x1, x2 = torch.randint(0, 32, (2, 3, 16))
    h = []
    for x in (x1, x2):
        batch = packed(m, x, conds, seq_len=80, rows=1)  # all three documents in one row
        hidden = m.net.forward_hidden(m.net.tok_emb(batch["tokens"]), batch["position"], doc_id=batch["doc_id"],
                                      image_id=batch["image_id"])
        tok = batch["tokens"][0]
        before_image = (batch["image_id"][0] < 0) & (batch["doc_id"][0] >= 0)
        before_image &= (tok != m.vocab.eoi) & (tok != m.vocab.eos)
        h.append(hidden[0][before_image])  # BOS, caption, BOI of each document
    torch.testing.assert_close(h[0], h[1])


def test_losses_train_the_models():
    for cls in (ImageGPT, MaskGIT):
        m = gpt(cls, grid=2, codes=8).train()
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        batch = packed(m, torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]]), ["ab", "cd"], seq_len=24, rows=1)
        first = m.loss(batch)["loss"].item()
        for _ in range(60):
            loss = m.loss(batch)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < 0.3 * first, cls


def test_position_conditioning_touches_only_its_positions_and_starts_as_identity():
    """adaLN on some positions (Transfusion's image patches): zero-initialised it changes nothing;
    trained, it changes the conditioned positions and what attends to them, never what comes before."""
    from unifuse.models.transformer import PositionCond

    torch.manual_seed(0)
    plain = Transformer(TransformerConfig(vocab_size=32, dim=32, n_layers=2, n_heads=2))
    condd = Transformer(TransformerConfig(vocab_size=32, dim=32, n_layers=2, n_heads=2, cond_dim=8))
    condd.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 10, 32)
    cond = PositionCond.at(torch.randn(2, 8), torch.tensor([4, 5, 6, 7, 14, 15, 16, 17]), (2, 10))  # 4..7 per row
    ref = plain.forward_hidden(x)
    torch.testing.assert_close(condd.forward_hidden(x, cond=cond), ref)
    with torch.no_grad():
        for layer in condd.layers:
            layer.ada.proj.weight.normal_(0, 0.1)
    out = condd.forward_hidden(x, cond=cond)
    torch.testing.assert_close(out[:, :4], ref[:, :4])
    assert (out[:, 4:] - ref[:, 4:]).abs().amax(-1).min() > 1e-4
    torch.testing.assert_close(condd.forward_hidden(x), ref)  # no cond: the plain block


def test_rotary_embedding_matches_the_pairwise_rotation_and_depends_on_offsets_only():
    """RoPE rotates each pair (x[2i], x[2i+1]) by pos * theta^(-2i/d); scores q.k then depend only
    on the distance between the two positions."""
    from unifuse.models.transformer import apply_rope, rope_rotation

    torch.manual_seed(0)
    d, theta = 8, 10_000.0
    x = torch.randn(1, 1, 5, d)
    pos = torch.tensor([[0, 1, 2, 7, 30]])
    out = apply_rope(x, rope_rotation(pos, d, theta, False))
    ref = torch.empty_like(x)
    for j, p in enumerate(pos[0].tolist()):
        for i in range(d // 2):
            a = p * theta ** (-2 * i / d)
            c, s = math.cos(a), math.sin(a)
            x0, x1 = x[0, 0, j, 2 * i].item(), x[0, 0, j, 2 * i + 1].item()
            ref[0, 0, j, 2 * i], ref[0, 0, j, 2 * i + 1] = x0 * c - x1 * s, x0 * s + x1 * c
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    q, k = torch.randn(2, 1, 1, 1, d)

    def score(pq, pk):
        rq = apply_rope(q, rope_rotation(torch.tensor([[pq]]), d, theta, False))
        rk = apply_rope(k, rope_rotation(torch.tensor([[pk]]), d, theta, False))
        return (rq * rk).sum().item()

    assert abs(score(3, 1) - score(12, 10)) < 1e-4 and abs(score(3, 1) - score(3, 2)) > 1e-3
