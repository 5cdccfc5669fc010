"""Decoding outside the nets: every row a net runs at inference comes from the one row builder
(unifuse.models.rows), the KV cache is moved only through its own methods, and the interleaved
document decoder is steered by typed segments, so no given text can pose as an instruction."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import unifuse
from tests.test_ldm import tiny_dit
from tests.test_transformer import gpt
from tests.test_transfusion import tiny_model
from unifuse.decoding import ar, document, maskgit, transfusion
from unifuse.models import rows as rows_module
from unifuse.models.maskgit import MaskGIT
from unifuse.models.rows import left_padded, right_padded
from unifuse.models.transformer import Transformer, TransformerConfig
from unifuse.paradigms import RECONSTRUCTION, Paradigm
from unifuse.pipelines import TokenImagePipeline

CFG = TransformerConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)


def backbone() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG).eval()


# ----------------------------------------------------------------------------- the row builder
def test_left_and_right_padded_rows_mean_the_same_whatever_the_padding():
    left = left_padded([[5, 6, 7], [8]], pad=0, device="cpu")
    assert left.tokens.tolist() == [[5, 6, 7], [0, 0, 8]] and left.doc_id.tolist() == [[0, 0, 0], [-1, -1, 0]]
    assert left.positions.tolist() == [[0, 1, 2], [0, 0, 0]] and left.lengths.tolist() == [3, 1]
    grown = left.append(torch.tensor([[1, 1], [1, 1]]), image=True).append_text([[9], [9, 9, 9]], pad=0)
    # every row continues from its own length; the ragged text is right-padded with doc_id -1
    assert grown.positions.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 1, 2, 3, 4, 5]]
    assert grown.doc_id[:, 5:].tolist() == [[0, -1, -1], [0, 0, 0]]
    assert grown.image_id.tolist() == [[-1, -1, -1, 0, 0, -1, -1, -1]] * 2
    assert grown.image_pos.tolist() == [[0, 3, 2], [1, 3, 2]] and grown.lengths.tolist() == [6, 6]
    step = grown.following(torch.tensor([[3], [4]]))  # a KV-cached step: the next position alone
    assert step.positions.tolist() == [[6], [6]] and step.doc_id.tolist() == [[0], [0]] and not step.padded
    assert grown.padded and step.lengths.tolist() == [7, 7]
    right = right_padded([[5, 6], [7]], pad=0, device="cpu", start=4)
    assert right.tokens.tolist() == [[5, 6], [7, 0]] and right.positions.tolist() == [[4, 5], [4, 5]]
    # a left-padded row and the same row alone give the same hidden states at its real positions
    m = backbone()
    both = m.forward_rows(left)
    alone = m.forward_rows(left_padded([[8]], pad=0, device="cpu"))
    torch.testing.assert_close(both[1, -1], alone[0, -1], atol=1e-5, rtol=1e-5)


def _recorded_rows(monkeypatch) -> list:
    """Every Rows built from now on (through the builders or grown from built rows)."""
    built = []
    real = rows_module.Rows.__init__

    def init(self, *a, **kw):
        real(self, *a, **kw)
        built.append(self)

    monkeypatch.setattr(rows_module.Rows, "__init__", init)
    return built


def _fed_tokens(nets) -> list[torch.Tensor]:
    """The token tensors every given token embedding is called with."""
    fed = []
    for emb in nets:
        emb.register_forward_hook(lambda mod, inp, out: fed.append(inp[0]))
    return fed


def test_every_row_a_net_runs_at_inference_comes_from_the_row_builder(monkeypatch):
    """AR and MaskGIT (cached and uncached), Transfusion's generate (both), caption, caption scores
    and documents, and the DiT's caption rows: each token tensor a net embeds is the token tensor
    of a :class:`Rows` the builder made (the very object, not an equal copy)."""
    built = _recorded_rows(monkeypatch)
    token_nets = {"ar": gpt(), "maskgit": gpt(MaskGIT)}
    tf, dit = tiny_model(), tiny_dit()
    fed = _fed_tokens([*(n.net.tok_emb for n in token_nets.values()), tf.net.tok_emb, dit.text.tok_emb])
    z = torch.randn(2, 4, 4, 4)
    runs = {
        "ar": lambda cache: ar.generate(token_nets["ar"], ["dog", ""], cfg_scale=2.0, seed=0, use_cache=cache),
        "maskgit": lambda cache: maskgit.generate(token_nets["maskgit"], ["dog", "a cat"], steps=2, cfg_scale=2.0,
                                                  seed=0, use_cache=cache),
        "transfusion": lambda cache: transfusion.generate(tf, ["ab", "abcd"], steps=2, cfg_scale=2.0, seed=0,
                                                          use_cache=cache),
    }
    others = {
        "caption": lambda: transfusion.caption_ids(tf, z, max_new_tokens=3),
        "caption_logprob": lambda: (transfusion.caption_logprob(tf, z, ["a", "abc"]),
                                    transfusion.caption_logprob(tf, None, ["a", "abc"])),
        "document": lambda: document.document(tf, ["ab", None], max_new_tokens=3, steps=2, cfg_scale=2.0),
        "dit": lambda: dit.text_states(dit.encode_conditions(["a dog", ""], "cpu")),
    }
    calls = [(f"{k} cached={c}", (lambda f=f, c=c: f(c))) for k, f in runs.items() for c in (True, False)]
    for name, run in calls + list(others.items()):
        built.clear(), fed.clear()
        run()
        assert fed, name
        for x in fed:
            assert any(x is r.tokens for r in built), f"{name}: a {tuple(x.shape)} token tensor not built as rows"


def test_a_token_pipeline_runs_the_decoding_program_its_paradigm_names():
    """AR GPT and MaskGIT share one pipeline; each net's spec names its program, and the settings the
    pipeline passes are the ones that program takes (MaskGIT's steps, none for the AR GPT)."""
    for net, program, steps in ((gpt(), ar.generate, False), (gpt(MaskGIT), maskgit.generate, True)):
        pipe = TokenImagePipeline(net, torch.nn.Identity())
        assert pipe.decode is program and ("steps" in pipe.setting_names) is steps
        codes = pipe.decode(net, ["dog"], seed=0, **({"steps": 2} if steps else {}))
        assert torch.equal(codes, program(net, ["dog"], seed=0, **({"steps": 2} if steps else {})))
    with pytest.raises(ValueError, match="a none net has no decoding program for its pipeline"):
        Paradigm("none", Transformer, RECONSTRUCTION).decoder_function()


# ----------------------------------------------------------------------------- the KV cache
CACHE_FIELDS = {"k", "v", "doc_id", "image_id", "length", "plain", "_length", "_plain", "max_len"}


def cache_field_writes(source: str) -> list[int]:
    """Lines of ``source`` (once per field written) that assign to (an element of) a KV-cache field
    of some object other than ``self``: ``x.length = ...``, ``x.k[i][0] = ...``, ``x.doc_id[1, :2] += ...``."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                while isinstance(t, ast.Subscript):
                    t = t.value
                if isinstance(t, ast.Attribute) and t.attr in CACHE_FIELDS and \
                        not (isinstance(t.value, ast.Name) and t.value.id == "self"):
                    lines.append(node.lineno)
    return lines


def test_the_cache_is_moved_only_through_its_methods():
    """Outside the cache itself no code assigns to a cache's fields (keys, values, ids, length)."""
    root = Path(unifuse.__file__).parent
    offenders = [f"{path.relative_to(root)}:{line}" for path in sorted(root.rglob("*.py"))
                 if path != root / "models" / "transformer.py" for line in cache_field_writes(path.read_text())]
    assert not offenders, offenders
    written = cache_field_writes("both.k[i][0], both.v[i][0] = a, b\nc.length = 2\nself.length = 1")
    assert written == [1, 1, 2]  # two fields on line 1, one on line 2, none written by the cache itself
    cache = backbone().new_cache(1, 4)
    with pytest.raises(AttributeError):
        cache.length = 3


def test_scratch_forgets_what_ran_inside_it_even_on_error_and_decoding_goes_on_as_without_it():
    m = backbone()
    x = torch.randint(0, 61, (2, 9))
    cache = m.new_cache(2, 12)
    m(x[:, :5], cache=cache)
    with cache.scratch():
        m(torch.randint(0, 61, (2, 3)), cache=cache)  # e.g. an image block being denoised
        assert cache.length == 8
    assert cache.length == 5
    with pytest.raises(RuntimeError, match="boom"), cache.scratch():
        m(torch.randint(0, 61, (2, 2)), cache=cache)
        raise RuntimeError("boom")
    assert cache.length == 5
    out = m(x[:, 5:], cache=cache)
    torch.testing.assert_close(out, m(x)[:, 5:], atol=1e-5, rtol=1e-5)


def test_stacked_rows_decode_as_each_row_alone():
    """A document's cache stacked with a shorter one (right-aligned: the unconditional row of
    guidance) decodes each row as that row's own sequence."""
    m = backbone()
    doc, un = torch.randint(0, 61, (1, 7)), torch.randint(0, 61, (1, 2))
    a, b = m.new_cache(1, 10), m.new_cache(1, 4)
    m.forward_rows(left_padded(doc.tolist(), 0, "cpu"), a, ids=True)
    m.forward_rows(left_padded(un.tolist(), 0, "cpu"), b, ids=True)
    both = a.stacked(b)
    assert both.rows == 2 and both.length == 7 and not both.plain
    assert both.doc_id[1, :7].tolist() == [-1] * 5 + [0, 0]
    step = torch.randint(0, 61, (2, 2))
    rows = left_padded(step.tolist(), 0, "cpu", start=torch.tensor([7, 2]))
    out = m.forward_rows(rows, both, ids=True)
    for r, (prefix, n) in enumerate(((doc, 7), (un, 2))):
        alone = m.forward_hidden(m.tok_emb(torch.cat([prefix[0], step[r]])[None]))[0, n:]
        torch.testing.assert_close(out[r], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot align a cache of 7 positions to one of 2"):
        b.stacked(a)


def test_advance_moves_forward_within_the_cache_only():
    cache = backbone().new_cache(1, 4)
    cache.reserve(2, None, None)
    cache.advance(2)
    for bad in (1, 5):
        with pytest.raises(ValueError, match=f"^cannot advance a cache of 2 positions to {bad}$"):
            cache.advance(bad)


# ----------------------------------------------------------------------------- documents
def test_a_sampled_boi_becomes_an_image_and_given_text_stays_text(monkeypatch):
    """The document decoder follows its typed segments: a sampled BOI queues an image (while images
    may still be made), sampled text forms one generated segment, and given text is fed as text
    whatever it says (no string of it steers the decoder)."""
    m = tiny_model()
    real = document.text_logits

    def boi_first(net, logits, allow_boi):  # BOI whenever allowed, never EOS
        out = real(net, logits, allow_boi)
        out[..., net.vocab.eos] = float("-inf")
        if allow_boi:
            out[..., net.vocab.boi] = 1e4
        return out

    monkeypatch.setattr(document, "text_logits", boi_first)
    segs = document.document(m, ["<sample>"], max_new_tokens=3, max_images=1, steps=2, seed=1)
    assert [sorted(s) for s in segs] == [["text"], ["image"], ["generated", "text"]]
    assert segs[0] == {"text": "<sample>"} and segs[1]["image"].shape == (4, 4, 4)
    assert len(m.text_tokenizer.encode(segs[2]["text"])) >= 1  # the two tokens after the image


@pytest.mark.parametrize("transport,default", [("flow", "euler"), ("ddpm", "ddim")])
def test_transfusion_decoding_without_a_sampler_uses_its_transports_default(transport, default):
    torch.manual_seed(0)
    net = tiny_model(transport).eval()
    unset = transfusion.generate(net, ["a cat"], steps=2, seed=0)
    assert torch.equal(unset, transfusion.generate(net, ["a cat"], sampler=default, steps=2, seed=0))
    doc = document.document(net, ["a cat", None], steps=2, seed=0)
    named = document.document(net, ["a cat", None], sampler=default, steps=2, seed=0)
    assert torch.equal(doc[-1]["image"], named[-1]["image"])
