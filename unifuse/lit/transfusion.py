"""LightningModule for Transfusion: the packed text/image rows of ``PackingCollator`` in, the
model's LM + diffusion loss out. Image blocks are the normalised latents of a frozen KL autoencoder
(from latent shards, posterior sampled, or encoded on the fly), exactly as latent diffusion gets
them, so this module is latent diffusion with a different net and batch. Caption dropout for
guidance happens in the collator (``data.collator.p_uncond``), where the sequences are built.

Validation logs ``val/loss``, ``val/text_loss``, ``val/image_loss`` (fixed times and noise),
``val/caption_bpb`` (bits per UTF-8 byte of the held-out captions' tokens) and
``val/caption_top1``: for the first ``retrieval_images`` validation images, the model ranks the true
caption among ``retrieval_candidates`` (the others drawn from the validation captions) by
log p(caption | image); chance is 1 / candidates."""

from __future__ import annotations

import math
import random

import torch

from unifuse.flops import forward_flops
from unifuse.lit.ldm import LatentDiffusionModule
from unifuse.models.transfusion import Transfusion
from unifuse.pipeline import TransfusionPipeline


class TransfusionModule(LatentDiffusionModule):
    kind = "transfusion"
    pipeline_class = TransfusionPipeline
    RETRIEVAL_ROWS = 256  # caption-retrieval forward passes score this many (image, caption) rows at once

    def __init__(self, net: Transfusion, *args, weight_decay: float = 0.1, retrieval_images: int = 64,
                 retrieval_candidates: int = 16, **kwargs):
        super().__init__(net, *args, weight_decay=weight_decay, **kwargs)
        self.retrieval_images, self.retrieval_candidates = retrieval_images, retrieval_candidates
        self._pool: list[tuple[torch.Tensor, str]] = []
        self._byte_len: torch.Tensor | None = None

    def _batch_size(self, batch: dict) -> int:
        return int(batch["tokens"].shape[0])

    def _clean_latents(self, batch: dict) -> torch.Tensor | None:
        """The batch's image latents; None for a batch of text-only documents (LM loss only)."""
        if "latents" not in batch and "image" not in batch:
            return None
        return self.latents(batch)

    def training_step(self, batch: dict, batch_idx: int):
        out = self.net.loss(batch, self._clean_latents(batch))
        self.last_batch_tokens = int(out.pop("tokens"))
        if self.finite_losses(out, batch):  # skipped: the guard drops the gradients before the step
            self.log_dict({f"train/{k}": v for k, v in out.items()}, prog_bar=True, batch_size=self._batch_size(batch))
        return out["loss"]

    def _caption_bytes(self) -> torch.Tensor:
        """UTF-8 bytes of every vocabulary id (0 for special tokens), for bits per byte."""
        if self._byte_len is None:
            v, tok = self.net.vocab, self.net.text_tokenizer
            lens = [len(tok.decode([i]).encode("utf-8")) for i in range(v.text_size)]
            self._byte_len = torch.tensor(lens + [0] * (v.size - v.text_size), dtype=torch.float32)
        return self._byte_len.to(self.device)

    def validation_step(self, batch: dict, batch_idx: int):
        g = torch.Generator().manual_seed(1000 + batch_idx)
        z = self._clean_latents(batch)
        t = eps = None
        if z is not None:
            t = self.net.sample_times(batch["image_first"], g)
            eps = torch.randn(z.shape, generator=g).to(z.device)
        out = self.net.loss(batch, z, t, eps, per_token=True)
        out.pop("tokens")
        y, nats = out.pop("text_ids"), out.pop("text_nats")
        bs = self._batch_size(batch)
        self.log_dict({f"val/{k}": v for k, v in out.items()}, sync_dist=True, batch_size=bs)
        # bits per byte of caption text: the nats of text-token targets over the bytes they spell
        is_text = y < self.net.vocab.text_size
        n_bytes = self._caption_bytes()[y[is_text]].sum()
        if n_bytes > 0:
            self.log("val/caption_bpb", nats[is_text].sum() / n_bytes / math.log(2), sync_dist=True, batch_size=bs)
        if z is not None and len(self._pool) < self.retrieval_images:
            for zi, cap in zip(z, batch["image_caption"], strict=True):  # normalised posterior samples
                if cap and len(self._pool) < self.retrieval_images:
                    self._pool.append((zi.detach(), cap))

    def on_validation_epoch_start(self) -> None:
        self._pool = []

    @torch.no_grad()
    def on_validation_epoch_end(self) -> None:
        pool, k = self._pool, self.retrieval_candidates
        captions = sorted({c for _, c in pool})
        if len(captions) < k:
            return
        rng = random.Random(0)
        rows = [(z, [cap] + rng.sample([c for c in captions if c != cap], k - 1)) for z, cap in pool]
        hits, group = 0, max(1, self.RETRIEVAL_ROWS // k)  # images scored together, k rows each
        for i in range(0, len(rows), group):
            chunk = rows[i : i + group]
            latents = torch.cat([z[None].expand(k, *z.shape) for z, _ in chunk])
            scores = self.net.caption_logprob(latents, [c for _, cands in chunk for c in cands]).view(len(chunk), k)
            hits += int((scores.argmax(1) == 0).sum())
        self.log("val/caption_top1", hits / len(pool), sync_dist=True)
        self._pool = []

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
