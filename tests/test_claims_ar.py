"""AR image GPT training (models/image_gpt.py): next-token prediction over
``[BOS] caption [BOI] codes [EOI]`` with a causal mask. The loss at every target is checked against
a reference that cannot leak: the backbone run on the prefix before that target alone."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

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
    return [v.bos, *m.text_tokenizer.encode(caption), v.boi, *v.code_to_id(codes).tolist(), v.eoi]


def reference_losses(m: ImageGPT, caption: str, codes: torch.Tensor) -> dict[int, float]:
    """target index t (in the unpadded row) -> CE of token t given tokens [0, t) and nothing else."""
    toks = torch.tensor(row_tokens(m, caption, codes))
    out = {}
    with torch.no_grad():
        for t in range(1, len(toks)):
            logits = m.net(toks[None, :t])[0, -1]
            out[t] = F.cross_entropy(logits[None].float(), toks[t:t + 1]).item()
    return out


def captured_losses(m: ImageGPT, codes: torch.Tensor, conds: list, monkeypatch) -> tuple[dict, torch.Tensor]:
    """The loss dict and the per-position cross entropies (B, L-1) that ``loss`` averages."""
    seen = []
    real = F.cross_entropy

    def spy(inp, target, *a, **kw):
        out = real(inp, target, *a, **kw)
        seen.append(out.detach())
        return out

    monkeypatch.setattr(F, "cross_entropy", spy)
    with torch.no_grad():
        out = m.loss(codes, conds)
    monkeypatch.setattr(F, "cross_entropy", real)
    (ce,) = seen
    return out, ce.view(len(conds), -1)


def test_every_target_loss_sees_only_its_prefix(monkeypatch):
    """Catches a mask that leaks the future and targets shifted by one: each per-position loss must
    equal the loss of the model run on the prefix before that target."""
    m = sharp_gpt()
    codes = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0], [9, 9, 9, 9]])
    conds = ["ab", "a longer caption", ""]  # different lengths: left padding
    out, ce = captured_losses(m, codes, conds, monkeypatch)
    width = ce.shape[1] + 1
    img_ref, all_ref = [], []
    for r, c in enumerate(conds):
        ref = reference_losses(m, c, codes[r])
        pad = width - (len(ref) + 1)
        for t, value in ref.items():
            assert abs(ce[r, pad + t - 1].item() - value) < 1e-4, f"row {r} target {t}"
            all_ref.append(value)
            n_caption = len(m.text_tokenizer.encode(c))
            if t >= n_caption + 2:
                img_ref.append(value)  # the codes and EOI
    assert abs(out["image_loss"].item() - sum(img_ref) / len(img_ref)) < 1e-4
    # (text_loss of padded rows: see test_padding_adds_no_target)
    # spread of the per-target losses: a leak or a shift would move them by far more than 1e-4
    assert max(all_ref) - min(all_ref) > 0.5


def test_loss_of_an_unpadded_batch_is_the_mean_over_every_target(monkeypatch):
    m = sharp_gpt()
    codes = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]])
    conds = ["cd", "ab"]  # same length: no padding
    out, _ = captured_losses(m, codes, conds, monkeypatch)
    refs = [reference_losses(m, c, codes[r]) for r, c in enumerate(conds)]
    every = [v for ref in refs for v in ref.values()]
    assert abs(out["loss"].item() - sum(every) / len(every)) < 1e-4
    text = [v for ref in refs for t, v in ref.items() if t <= 2]  # the two caption tokens, not BOI
    assert abs(out["text_loss"].item() - sum(text) / len(text)) < 1e-4
    image = [v for ref in refs for t, v in ref.items() if t >= 4]  # four codes and EOI
    assert len(image) == 10 and abs(out["image_loss"].item() - sum(image) / len(image)) < 1e-4


def test_changing_later_tokens_leaves_earlier_losses_alone(monkeypatch):
    """The same property, seen from the inputs: changing code j changes the losses of targets >= j
    only (its own target and what comes after it), and does change those."""
    m = sharp_gpt()
    conds = ["dog"]
    a = torch.tensor([[1, 2, 3, 4]])
    b = torch.tensor([[1, 2, 11, 4]])  # the third code differs
    _, ca = captured_losses(m, a, conds, monkeypatch)
    _, cb = captured_losses(m, b, conds, monkeypatch)
    first = 1 + 3 + 1 + 2  # target index of the third code: BOS "dog" BOI c0 c1 [c2]
    torch.testing.assert_close(ca[0, :first - 1], cb[0, :first - 1])
    assert (ca[0, first - 1:] != cb[0, first - 1:]).all()


def test_padding_adds_no_target(monkeypatch):
    """A left-padded row scores no target predicted from padding (BOS included): its losses do not
    depend on the other captions of the batch."""
    m = sharp_gpt()
    codes = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    alone, _ = captured_losses(m, codes[:1], ["ab"], monkeypatch)
    both, _ = captured_losses(m, codes, ["ab", "a longer one"], monkeypatch)
    ref = reference_losses(m, "a longer one", codes[1])
    text_long = [v for t, v in ref.items() if t <= len("a longer one")]
    text_short = [v for t, v in reference_losses(m, "ab", codes[0]).items() if t <= 2]
    expected = (sum(text_short) + sum(text_long)) / (len(text_short) + len(text_long))
    assert abs(both["text_loss"].item() - expected) < 1e-4
    assert alone["text_loss"].item() == pytest.approx(sum(text_short) / len(text_short), abs=1e-4)
