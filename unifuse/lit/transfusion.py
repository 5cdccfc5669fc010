"""LightningModule for Transfusion: the packed text/image rows of ``PackingCollator`` in, the
model's LM + diffusion loss out. Image blocks are the normalised latents of a frozen KL autoencoder
(from latent shards or encoded on the fly; posterior samples in training, the posterior mean in
validation), exactly as latent diffusion gets them (both are
:class:`~unifuse.lit.latent.LatentGeneratorModule`). Caption dropout for guidance happens in the collator
(``data.collator.p_uncond``), where the sequences are built.

Validation logs ``val/loss``, ``val/text_loss``, ``val/image_loss`` (fixed times and noise on the
posterior mean: the same number every epoch for the same weights) and, over the epoch:

* ``val/caption_bpb``: bits per UTF-8 byte of the text of documents that hold an image (the
  held-out captions), the nats of their text-token targets over the bytes those tokens spell;
  ``val/text_bpb``: the same over text-only documents (a text source mixed into validation).
* For the first ``retrieval_images`` validation images: ``val/caption_top1``, the true caption ranked
  first among ``retrieval_candidates`` (the others drawn from the validation captions) by
  log p(caption | image), chance 1 / candidates; and ``val/caption_top1_pmi``, ranked by
  log p(caption | image) - log p(caption | no image), which takes away the caption's own
  likelihood (short, common captions win the first ranking whatever the image).
* For the first ``caption_images`` validation images: greedy captions (KV-cached decoding, batched)
  against the true caption as the model saw it (cut to ``max_text_len`` tokens): ``val/caption_exact``
  (the share that match exactly) and ``val/caption_f1`` (mean token F1), both on
  :func:`caption_words`."""

from __future__ import annotations

import math
import random
from collections import Counter

import torch

from unifuse.decoding import transfusion as decoding
from unifuse.lit.latent import LatentGeneratorModule
from unifuse.models.transfusion import Transfusion
from unifuse.run.flops import forward_flops
from unifuse.text.vocab import IMAGE


def caption_words(text: str) -> list[str]:
    """The tokens captions are scored on: the whitespace-separated words of the caption lowercased
    (runs of spaces, leading and trailing space do not count)."""
    return text.lower().split()


def caption_match(pred: str, ref: str) -> tuple[float, float]:
    """(exact match, token F1) of a generated caption against the true one, on :func:`caption_words`.
    F1 is the harmonic mean of the shares of predicted and of true words that the other holds
    (a repeated word counts as often as both hold it); an empty side scores 1 only against an empty one."""
    p, r = caption_words(pred), caption_words(ref)
    exact = float(p == r)
    if not p or not r:
        return exact, exact
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return exact, 0.0
    precision, recall = common / len(p), common / len(r)
    return exact, 2 * precision * recall / (precision + recall)


def text_only_positions(batch: dict) -> torch.Tensor:
    """(B, L) True at the positions of documents that hold no image position (text-only documents)."""
    doc, mod = batch["doc_id"], batch["modality"]
    b, length = doc.shape
    key = torch.arange(b, device=doc.device)[:, None] * length + doc.clamp(min=0)  # one id per (row, document)
    with_image = torch.zeros(b * length, dtype=torch.bool, device=doc.device)
    with_image[key[(mod == IMAGE) & (doc >= 0)]] = True
    return ~with_image[key] & (doc >= 0)


class TransfusionModule(LatentGeneratorModule):
    RETRIEVAL_ROWS = 256  # caption scoring and decoding run this many rows at once
    BITS = ("caption_bpb", "text_bpb")  # val/<name>: documents with an image, text-only documents

    def __init__(self, net: Transfusion, *args, weight_decay: float = 0.1, retrieval_images: int = 64,
                 retrieval_candidates: int = 16, caption_images: int = 64, **kwargs):
        super().__init__(net, *args, weight_decay=weight_decay, **kwargs)
        self.retrieval_images, self.retrieval_candidates = retrieval_images, retrieval_candidates
        self.caption_images = caption_images
        self._pool: list[tuple[torch.Tensor, str]] = []
        self._bits: dict[str, torch.Tensor] = {}  # name -> [nats, bytes] summed over the epoch

    def _batch_size(self, batch: dict) -> int:
        return int(batch["tokens"].shape[0])

    def _clean_latents(self, batch: dict, sample: bool = True) -> torch.Tensor | None:
        """The batch's image latents (posterior samples, or the mean: ``sample=False``); None for a
        batch of text-only documents (LM loss only)."""
        if "latents" not in batch and "image" not in batch:
            return None
        return self.latents(batch, sample=sample)

    def training_step(self, batch: dict, batch_idx: int):
        out = self.net.loss(batch, self._clean_latents(batch))
        self.last_batch_tokens = int(out.pop("tokens"))
        if self.finite_losses(out, batch):  # skipped: the guard drops the gradients before the step
            self.log_dict({f"train/{k}": v for k, v in out.items()}, prog_bar=True, batch_size=self._batch_size(batch))
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int):
        g = torch.Generator().manual_seed(1000 + batch_idx)
        z = self._clean_latents(batch, sample=False)
        t = eps = None
        if z is not None:
            t = self.net.sample_times(batch["image_first"], g)
            eps = torch.randn(z.shape, generator=g).to(z.device)
        out = self.net.loss(batch, z, t, eps, per_token=True)
        out.pop("tokens")
        y, nats = out.pop("text_ids"), out.pop("text_nats")
        self.log_dict({f"val/{k}": v for k, v in out.items()}, sync_dist=True, batch_size=self._batch_size(batch))
        self._count_bits(batch, y, nats)
        pool_size = max(self.retrieval_images, self.caption_images)
        if z is not None and len(self._pool) < pool_size:
            for zi, cap in zip(z, batch["image_caption"], strict=True):  # normalised posterior means
                if cap and len(self._pool) < pool_size:
                    self._pool.append((zi.detach(), cap))

    def _count_bits(self, batch: dict, y: torch.Tensor, nats: torch.Tensor) -> None:
        """Add the batch's text-token targets (ids ``y``, their nats) and the UTF-8 bytes they spell to
        the epoch's sums, apart for documents with an image and text-only ones (special tokens spell
        no bytes and are left out)."""
        target = self.net.text_targets(batch)
        b, length = batch["tokens"].shape
        doc = (torch.arange(b, device=y.device)[:, None] * length + batch["doc_id"][:, 1:])[target]  # (row, document)
        in_text_doc = text_only_positions(batch)[:, 1:][target]
        is_text = y < self.net.vocab.text_size
        for name, keep in zip(self.BITS, (is_text & ~in_text_doc, is_text & in_text_doc), strict=True):
            add = torch.stack([nats[keep].sum().float(), nats.new_tensor(self._utf8_bytes(y[keep], doc[keep]))])
            self._bits[name] = self._bits.get(name, 0) + add

    def _utf8_bytes(self, ids: torch.Tensor, doc: torch.Tensor) -> int:
        """UTF-8 bytes spelled by text ids, each document's ids decoded as one string (a character whose
        bytes span several tokens counts once; one cut short counts as a replacement character)."""
        per_doc: dict[int, list[int]] = {}
        for i, d in zip(ids.tolist(), doc.tolist(), strict=True):
            per_doc.setdefault(d, []).append(i)
        return sum(len(self.net.text_tokenizer.decode(r).encode("utf-8")) for r in per_doc.values())

    def on_validation_epoch_start(self) -> None:
        self._pool, self._bits = [], {}

    @torch.no_grad()
    def on_validation_epoch_end(self) -> None:
        zero = torch.zeros(2)
        sums = {name: self._bits.get(name, zero).cpu() / torch.tensor([math.log(2), 1.0]) for name in self.BITS}
        sums |= self._retrieval_sums(self._pool[: self.retrieval_images])
        sums |= self._caption_sums(self._pool[: self.caption_images])
        self._log_pooled(sums)
        self._pool, self._bits = [], {}

    def _log_pooled(self, sums: dict[str, torch.Tensor]) -> None:
        """Log ``val/<name>`` = numerator / denominator of each entry of ``sums``, both summed over all
        ranks. Every rank reduces every entry (one with nothing to count adds zeros: a rank whose
        validation share holds no image or no text-only document still takes part), and an entry
        whose denominator is 0 on all ranks is not logged."""
        for name, nd in sums.items():
            total = self.trainer.strategy.reduce(nd.float().to(self.device), reduce_op="sum")
            if total[1] > 0:  # sync_dist: the value is the same on every rank; it keeps Lightning's check quiet
                self.log(f"val/{name}", total[0] / total[1], sync_dist=True)

    def _retrieval_sums(self, pool: list[tuple[torch.Tensor, str]]) -> dict[str, torch.Tensor]:
        """[hits, images] of val/caption_top1 and val/caption_top1_pmi over ``pool`` (see the module
        doc); no images when the pool holds fewer distinct captions than the candidates."""
        k = self.retrieval_candidates
        captions = sorted({c for _, c in pool})
        hits, n = [0, 0], len(pool) if len(captions) >= k else 0
        rows = self.RETRIEVAL_ROWS
        if n:
            rng = random.Random(0)
            ranked = [(z, [cap] + rng.sample([c for c in captions if c != cap], k - 1)) for z, cap in pool]
            prior = dict(zip(captions, torch.cat([decoding.caption_logprob(self.net, None, captions[i : i + rows])
                                                  for i in range(0, len(captions), rows)]).tolist(), strict=True))
            group = max(1, rows // k)  # images scored together, k rows each
            for i in range(0, n, group):
                chunk = ranked[i : i + group]
                cands = [c for _, cs in chunk for c in cs]
                latents = torch.cat([z[None].expand(k, *z.shape) for z, _ in chunk])
                scores = decoding.caption_logprob(self.net, latents, cands).view(len(chunk), k).cpu()
                pmi = scores - torch.tensor([prior[c] for c in cands]).view(len(chunk), k)
                for j, s in enumerate((scores, pmi)):
                    hits[j] += int((s.argmax(1) == 0).sum())
        return {"caption_top1": torch.tensor([hits[0], n]), "caption_top1_pmi": torch.tensor([hits[1], n])}

    def _caption_sums(self, pool: list[tuple[torch.Tensor, str]]) -> dict[str, torch.Tensor]:
        """[exact matches, images] and [summed token F1, images] of the greedy captions of ``pool``'s
        images against their captions, cut to ``max_text_len`` tokens as training cuts them."""
        net, preds, rows = self.net, [], self.RETRIEVAL_ROWS
        for i in range(0, len(pool), rows):
            images = torch.stack([z for z, _ in pool[i : i + rows]])
            preds += decoding.caption(net, images, max_new_tokens=net.icfg.max_text_len)
        refs = [net.text_tokenizer.decode(net.text_ids(c)) for _, c in pool]
        scores = [caption_match(p, r) for p, r in zip(preds, refs, strict=True)]
        return {"caption_exact": torch.tensor([sum(e for e, _ in scores), len(pool)]),
                "caption_f1": torch.tensor([sum(f for _, f in scores), len(pool)])}

    def flops_per_batch(self, batch: dict) -> float:
        """Training FLOPs of the batch: 3x the forward (the backward costs two) of the backbone over
        every position of the packed rows (padding included; attention over all (query, key) pairs;
        the LM head everywhere), plus each image's own layers (:meth:`image_flops`). The frozen
        autoencoder is not counted."""
        b, length = batch["tokens"].shape
        images = len(batch["image_pos"]) if "image_pos" in batch else 0
        fwd = b * length * self.net.net.flops_per_token(length, training=False)
        return 3.0 * (fwd + images * self.image_flops()) if images else 3.0 * fwd

    def image_flops(self) -> float:
        """Forward FLOPs of one image's own layers: time embedding, patch encoder and decoder (counted
        by FlopCounterMode on one latent through a copy of the net on the meta device: shapes only, no
        memory, and the training net, perhaps sharded or compiled, is left alone) and the blocks'
        adaLN projections."""
        with torch.device("meta"):
            net = type(self.net).from_config(self.net.config())
            z, t = torch.zeros(1, *net.latent_shape()), torch.zeros(1)

        def one_image():
            h, ctx = net.embed_image(z, t)
            return net.image_output(h, ctx)

        return forward_flops(one_image) + net.net.flops_per_cond()
