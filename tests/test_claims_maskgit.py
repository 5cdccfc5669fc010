"""MaskGIT claims (models/maskgit.py docstring): the cosine schedule of decoded positions, the most
confident masked positions are the ones decoded, a prompt gives the same image alone or in a batch,
and training masks a cosine-scheduled fraction of the codes and scores only those."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from tests.conftest import packed
from unifuse.decoding.maskgit import generate
from unifuse.models.maskgit import MaskGIT, cosine_schedule
from unifuse.models.transformer import TransformerConfig
from unifuse.text.vocab import VocabLayout

TINY = TransformerConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm=True)


def maskgit(grid: int = 4, codes: int = 32) -> MaskGIT:
    torch.manual_seed(0)
    return MaskGIT(TINY, VocabLayout(image_codes=codes), grid=grid, max_text_len=16).eval()


def reference_masked_after(n: int, steps: int) -> list[int]:
    """Positions still masked after each of the K passes: N * cos(pi/2 * (k+1)/K) rounded down, at
    least one position decoded per pass, none left after the last."""
    left, out = n, []
    for k in range(steps):
        keep = 0 if k == steps - 1 else max(0, min(math.floor(n * math.cos(math.pi / 2 * (k + 1) / steps)), left - 1))
        out.append(keep)
        left = keep
    return out


def test_cosine_schedule_values():
    assert cosine_schedule(0.0) == 1.0 and abs(cosine_schedule(1.0)) < 1e-12
    assert abs(cosine_schedule(0.5) - math.sqrt(0.5)) < 1e-12
    t = cosine_schedule(torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(t, torch.tensor([1.0, math.sqrt(0.5), 0.0]))


@pytest.mark.parametrize("steps", [1, 3, 8, 30])
def test_decoded_counts_follow_the_cosine_schedule(steps):
    m = maskgit(grid=4)
    _, trace = generate(m, ["dog", "a red heart"], steps=steps, seed=1, return_trace=True)
    masked_after = reference_masked_after(16, steps)
    for k in range(steps):
        assert ((trace > k).sum(1) == masked_after[k]).all(), f"pass {k}"
    if steps > 16:  # more passes than positions: one position per pass, the last passes find none left
        assert sorted(trace[0].tolist()) == list(range(16))


def test_the_most_confident_masked_positions_are_decoded():
    """Without Gumbel noise, the positions decoded at a pass are those whose sampled token is
    likeliest under that pass's (guided) logits, among the positions still masked."""
    import unifuse.decoding.maskgit as mg
    from unifuse.sampling.guidance import Guidance

    m = maskgit(grid=4)
    logits, sampled = [], []
    real_combine, real_sample = Guidance.combine, mg.sample_logits
    combine = lambda self, out, progress: logits.append(real_combine(self, out, progress)) or logits[-1]  # noqa: E731
    mg_sample = lambda *a, **kw: sampled.append(real_sample(*a, **kw)) or sampled[-1]  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mg, "sample_logits", mg_sample)
        mp.setattr(Guidance, "combine", combine)
        _, trace = generate(m, ["dog", "cat", ""], steps=5, cfg_scale=2.0, noise=0.0, seed=4, top_k=8,
                              temperature=1.3, return_trace=True)
    assert len(logits) == len(sampled) == 5
    for k in range(5):
        p = logits[k].reshape(48, -1).softmax(-1).gather(1, sampled[k].view(-1, 1)).view(3, 16)
        new, later = trace == k, trace > k
        for r in range(3):
            if later[r].any():
                assert p[r][new[r]].min() >= p[r][later[r]].max(), f"pass {k} row {r}"
    # with noise the choice is randomised: another order, the same counts
    _, noisy = generate(m, ["dog", "cat", ""], steps=5, cfg_scale=2.0, noise=50.0, seed=4, top_k=8,
                          temperature=1.3, return_trace=True)
    assert not torch.equal(noisy, trace)
    for k in range(5):
        assert torch.equal((noisy == k).sum(1), (trace == k).sum(1))


@pytest.mark.parametrize("use_cache", [True, False])
def test_maskgit_same_image_alone_or_in_a_batch(use_cache):
    m = maskgit(grid=4)
    conds = ["x", "red heart with a long tail", "", "cat"]  # prompts of different lengths: left padding
    kw = dict(steps=6, cfg_scale=2.0, top_p=0.9, use_cache=use_cache, return_trace=True)
    batch, btrace = generate(m, conds, seed=3, **kw)
    for i, c in enumerate(conds):
        one, trace = generate(m, [c], seed=3 + i, **kw)
        assert torch.equal(one[0], batch[i]) and torch.equal(trace[0], btrace[i]), (i, c)
    assert len({tuple(b.flatten().tolist()) for b in batch}) > 1  # rows are not all the same image
    # a list of seeds gives each row its own seed
    again = generate(m, conds, seed=[3, 4, 5, 6], **kw)[0]
    assert torch.equal(again, batch)


def test_training_masks_a_cosine_fraction_per_image_and_scores_only_masked_codes():
    """Packed rows (several documents each): every image block gets its own masking ratio, the
    rest of the row is fed as it is, and the loss is the cross entropy of the masked codes given
    their own document only (the reference runs each document alone)."""
    m = maskgit(grid=4, codes=16)
    with torch.no_grad():  # sharper logits than the tiny init, so the loss depends on what is masked
        for p in m.parameters():
            p.mul_(8.0) if p.dim() > 1 else None
    fed = []
    m.net.tok_emb.register_forward_hook(lambda mod, inp, out: fed.append(inp[0].clone()))
    codes = torch.randint(0, 16, (64, 16), generator=torch.Generator().manual_seed(0))
    conds = ["dog"] * 32 + ["a cat with a hat"] * 32
    batch = packed(m, codes, conds, seq_len=80, rows=32)  # 2-3 documents per row
    assert int(batch["image_id"].max()) >= 2
    torch.manual_seed(5)
    out = m.loss(batch)
    (inp,) = fed
    img = batch["image_id"] >= 0
    masked = inp == m.vocab.mask
    assert not (masked & ~img).any() and torch.equal(inp[~masked], batch["tokens"][~masked])
    assert abs(float(out["masked_fraction"]) - masked[img].float().mean().item()) < 1e-6
    ref, masked_per_doc, rows_differ = [], [], []
    for r in range(batch["tokens"].shape[0]):
        row_counts = []
        for d in batch["doc_id"][r].unique().tolist():
            if d < 0:
                continue
            block = (batch["doc_id"][r] == d) & img[r]
            k = int(batch["position"][r][block][0]) - 2  # caption length: the block starts after BOS caption BOI
            doc_codes = m.vocab.id_to_code(batch["tokens"][r][block])
            cap = next(c for c in ("dog", "a cat with a hat") if len(m.text_tokenizer.encode(c)) == k)
            with torch.no_grad():
                logits = m.image_forward(inp[r][block][None], [cap])[0]
            mk = masked[r][block]
            masked_per_doc.append(int(mk.sum()))
            row_counts.append(int(mk.sum()))
            ref.append(F.cross_entropy(logits[mk].float(), doc_codes[mk], reduction="none"))
        rows_differ.append(len(set(row_counts)) > 1)
    assert len(masked_per_doc) == 64 and min(masked_per_doc) >= 1  # every image has a masked code
    torch.testing.assert_close(out["loss"].detach(), torch.cat(ref).mean(), atol=1e-4, rtol=1e-4)
    # the images of one row draw their own ratios
    assert sum(rows_differ) > 0.6 * len(rows_differ)
    # masked fraction ~ cos(pi/2 u), u ~ U(0, 1): mean 2/pi, and images spread over the whole range
    fracs = []
    for s in range(20):
        fed.clear()
        torch.manual_seed(100 + s)
        fracs.append(m.loss(batch)["masked_fraction"].item())
    mean = sum(fracs) / len(fracs)
    assert abs(mean - (2 / math.pi + 0.5 / 16)) < 0.03  # ceil adds half a position on average
