"""AR image GPT training (models/image_gpt.py): next-token prediction over the packed rows of
``PackingCollator`` (documents ``[BOS] caption [BOI] codes [EOI] [EOS]``, several per row) with a
causal, document-masked attention. The loss at every target is checked against a reference that
cannot leak: the backbone run on that document's prefix before the target, alone."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from tests.conftest import packed
from unifuse.data.collate import PackingCollator
from unifuse.data.samples import Sample
from unifuse.models.image_gpt import ImageGPT
from unifuse.models.transformer import TransformerConfig
from unifuse.text.vocab import VocabLayout


def sharp_gpt() -> ImageGPT:
    """A tiny model whose predictions depend strongly on the context (the default init is nearly
    uniform, which would hide a leak in the noise)."""
    torch.manual_seed(0)
    m = ImageGPT(TransformerConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2),
                 VocabLayout(image_codes=16), grid=2, max_text_len=16).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.25)
    return m


def row_tokens(m: ImageGPT, caption: str, codes: torch.Tensor) -> list[int]:
    v = m.vocab
    return [v.bos, *m.text_tokenizer.encode(caption), v.boi, *v.code_to_id(codes).tolist(), v.eoi, v.eos]


def reference_losses(m: ImageGPT, caption: str, codes: torch.Tensor) -> dict[int, float]:
    """target index t (in the document) -> CE of token t given tokens [0, t) and nothing else."""
    toks = torch.tensor(row_tokens(m, caption, codes))
    out = {}
    with torch.no_grad():
        for t in range(1, len(toks)):
            logits = m.net(toks[None, :t])[0, -1]
            out[t] = F.cross_entropy(logits[None].float(), toks[t:t + 1]).item()
    return out


def captured_losses(m: ImageGPT, batch: dict, monkeypatch) -> tuple[dict, torch.Tensor]:
    """The loss dict and the per-position cross entropies (B, L-1) that ``loss`` averages."""
    seen = []
    real = F.cross_entropy

    def spy(inp, target, *a, **kw):
        out = real(inp, target, *a, **kw)
        seen.append(out.detach())
        return out

    monkeypatch.setattr(F, "cross_entropy", spy)
    with torch.no_grad():
        out = m.loss(batch)
    monkeypatch.setattr(F, "cross_entropy", real)
    (ce,) = seen
    return out, ce.view(batch["tokens"].shape[0], -1)


def test_every_target_loss_sees_only_its_documents_prefix(monkeypatch):
    """Catches a mask that leaks the future or across packed documents, positions that do not
    restart per document, targets shifted by one and targets scored across a document boundary:
    each per-position loss equals the loss of the model run on that document's prefix alone, and
    the three averages are the means of exactly the right reference losses."""
    m = sharp_gpt()
    codes = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0], [9, 9, 9, 9]])
    conds = ["ab", "a longer caption", ""]
    batch = packed(m, codes, conds, seq_len=36, rows=2)  # row 0: documents 0 and 1; row 1: document 2
    assert batch["doc_id"][0].max() == 1 and (batch["doc_id"][1] == 0).sum() == 8
    out, ce = captured_losses(m, batch, monkeypatch)
    every, text, image = [], [], []
    for r, d, c in ((0, 0, 0), (0, 1, 1), (1, 0, 2)):
        start = int((batch["doc_id"][r] == d).nonzero()[0])
        ref = reference_losses(m, conds[c], codes[c])
        n_caption = len(m.text_tokenizer.encode(conds[c]))
        for t, value in ref.items():
            assert abs(ce[r, start + t - 1].item() - value) < 1e-4, f"document {c} target {t}"
            every.append(value)
            if 1 <= t <= n_caption:
                text.append(value)
            elif n_caption + 2 <= t <= n_caption + 6:  # the four codes and EOI
                image.append(value)
    assert abs(out["loss"].item() - sum(every) / len(every)) < 1e-4  # no boundary or padding target
    assert abs(out["text_loss"].item() - sum(text) / len(text)) < 1e-4
    assert len(image) == 15 and abs(out["image_loss"].item() - sum(image) / len(image)) < 1e-4
    # spread of the per-target losses: a leak or a shift would move them by far more than 1e-4
    assert max(every) - min(every) > 0.5


def test_changing_later_tokens_leaves_earlier_losses_alone(monkeypatch):
    """The same property, seen from the inputs: changing code j changes the losses of targets >= j
    only (its own target and what comes after it), and does change those."""
    m = sharp_gpt()
    a = torch.tensor([[1, 2, 3, 4]])
    b = torch.tensor([[1, 2, 11, 4]])  # the third code differs
    _, ca = captured_losses(m, packed(m, a, ["dog"], seq_len=11), monkeypatch)
    _, cb = captured_losses(m, packed(m, b, ["dog"], seq_len=11), monkeypatch)
    first = 1 + 3 + 1 + 2  # target index of the third code: BOS "dog" BOI c0 c1 [c2]
    torch.testing.assert_close(ca[0, :first - 1], cb[0, :first - 1])
    assert (ca[0, first - 1:] != cb[0, first - 1:]).all()


def test_class_conditioned_documents_put_the_class_token_after_bos():
    m = ImageGPT(TransformerConfig(dim=32, n_layers=1, n_heads=2), VocabLayout(image_codes=16, num_classes=4),
                 grid=2, max_text_len=8)
    col = PackingCollator(2, 10, vocab=m.vocab, cond="class")
    assert col.add(Sample("a", "", text="ignored", cls=3, codes=np.arange(4))) is None
    assert col.add(Sample("b", "", text="no class", codes=np.arange(4))) == "no_class"
    assert col.add(Sample("c", "", cls=7, codes=np.arange(4))) == "no_class"  # outside the vocabulary
    row = col.pop()["tokens"][0, :9].tolist()
    v = m.vocab
    assert row == [v.bos, v.class_token(3), v.boi, *v.code_to_id(np.arange(4)).tolist(), v.eoi, v.eos]
    assert row[:3] == m.prompts([3], "cpu").tokens[0].tolist()  # the sampling prompt is the document's start
