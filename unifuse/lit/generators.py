"""LightningModule for the discrete-token generators (AR image GPT and MaskGIT): thin wrapper
around ``ImageGPT`` / ``MaskGIT`` (steps, logging, sample grids). Batches are the packed rows of
``PackingCollator``: codes pre-encoded in the shards, or placeholder positions filled on the fly
with the codes of the frozen VQ-VAE tokenizer.

Checkpoints carry the tokenizer (its config, weights and content hash; ``embed_tokenizer=false``
stores only the config, hash and path) and the text tokenizer's vocabulary, so they sample and
evaluate on any machine (see ``unifuse.run.checkpoint``)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from unifuse.lit.base import UnifuseModule
from unifuse.models.maskgit import MaskGIT
from unifuse.models.pixels import IDENTITY, PixelSpace
from unifuse.models.transformer import linear_flops
from unifuse.models.vqvae import VQVAE
from unifuse.paradigms import paradigm_of, paradigms
from unifuse.run.checkpoint import load_net, tokenizer_entry
from unifuse.run.resume import as_tuples
from unifuse.sampling.settings import SamplingSettings
from unifuse.text.tokenizer import ByteTokenizer


class GeneratorModule(UnifuseModule):
    """What every text-to-image generator module shares: a frozen image tokenizer / autoencoder
    (loaded from ``tokenizer_ckpt`` and carried in the checkpoint), caption dropout for guidance
    (``p_uncond``; models over packed sequences have the data collator drop captions instead),
    stored sampling settings, the pipeline and the sample grid. The paradigm's spec names the
    image tokenizer kinds and the pipeline class; subclasses check the tokenizer against their net."""

    def __init__(self, net, tokenizer_ckpt: str | None = None, optimizer=None, scheduler=None,
                 weight_decay: float = 0.1, cond: str = "text", p_uncond: float = 0.1,
                 sample_prompts: list | None = None, sampling: dict | None = None, seed: int = 0,
                 embed_tokenizer: bool = True):
        super().__init__(optimizer, scheduler, weight_decay)
        if cond not in ("text", "class"):
            raise ValueError(f"cond must be 'text' or 'class', not {cond!r}")
        self.net, self.cond, self.p_uncond = net, cond, p_uncond
        self.tokenizer_ckpt = str(tokenizer_ckpt) if tokenizer_ckpt else None
        self.sample_prompts = list(sample_prompts or [])
        self.sampling = SamplingSettings.from_dict(sampling).to_dict()  # checked now, not at the first sample
        self.embed_tokenizer = embed_tokenizer
        self._rng = random.Random(seed)
        self.tokenizer = None
        self._tokenizer_info: dict | None = None
        self._tokenizer_state: dict | None = None

    def check_tokenizer(self, tok) -> None:
        """Raise if the frozen tokenizer does not fit the net (e.g. codebook size, latent channels)."""

    def setup(self, stage: str) -> None:
        self._check_collators()
        if self.tokenizer_ckpt and self.tokenizer is None:
            tok, path = self._load_tokenizer()
            tok.requires_grad_(False)
            self.check_tokenizer(tok)
            object.__setattr__(self, "tokenizer", tok)  # frozen helper: not a submodule, not trained
            self._tokenizer_info, self._tokenizer_state = tokenizer_entry(tok, path, self.embed_tokenizer)

    def _check_collators(self) -> None:
        """Models over token sequences: the data collators must build them with the model's vocabulary."""
        vocab = getattr(self.net, "vocab", None)
        dm = getattr(getattr(self, "_trainer", None), "datamodule", None)
        for name in ("collator", "val_collator"):
            theirs = getattr(getattr(dm, name, None), "vocab", None)
            if vocab is not None and theirs is not None and theirs != vocab:
                raise ValueError(f"data.{name} builds sequences with the vocabulary {theirs}, but the model's is "
                                 f"{vocab}: give data.{name} the model's vocab and text tokenizer")

    def _load_tokenizer(self) -> tuple[torch.nn.Module, str]:
        """(frozen tokenizer / autoencoder of a kind the paradigm decodes with, the path recorded in
        checkpoints)."""
        kinds = self.paradigm.tokenizers
        if self.tokenizer_ckpt != IDENTITY:
            tok = load_net(self.tokenizer_ckpt, expect=kinds).to(self.device)
            return tok, str(Path(self.tokenizer_ckpt).resolve())
        pixels = paradigm_of(PixelSpace).name
        if pixels not in kinds:  # pixel space is for the continuous-image models
            takers = ", ".join(p.name for p in paradigms() if pixels in p.tokenizers)
            raise ValueError(f"model.tokenizer_ckpt=identity (pixels) works for {takers}; "
                             f"{self.kind} needs a {kinds[0]} checkpoint")
        return PixelSpace(), IDENTITY

    def checkpoint_meta(self) -> dict:
        return {**super().checkpoint_meta(), "cond": self.cond, "sampling": self.sampling,
                "tokenizer": self._tokenizer_info}

    def checkpoint_extras(self) -> dict:
        return {"unifuse_tokenizer": self._tokenizer_state} if self._tokenizer_state is not None else {}

    def pipeline(self):
        """Prompts -> images with the current weights (None without a tokenizer)."""
        if self.tokenizer is None:
            return None
        self.tokenizer.to(self.device)
        return self.paradigm.pipeline_class()(self.net, self.tokenizer, cond=self.cond, sampling=self.sampling)

    def _conds(self, batch: dict, drop: float) -> list:
        """The batch's conditions, each dropped (None) with probability ``drop``. With ``drop`` 0
        (validation) nothing is drawn, so how much validation ran does not move training's draws."""
        raw = batch["caption"] if self.cond == "text" else batch["cls"].tolist()
        if drop <= 0:
            return list(raw)
        return [None if self._rng.random() < drop else c for c in raw]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["caption_dropout_rng"] = self._rng.getstate()  # a resumed run drops the same captions

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("caption_dropout_rng")
        if state is not None:
            self._rng.setstate(as_tuples(state))

    @torch.no_grad()
    def log_images(self, batch: dict) -> dict:
        pipe = self.pipeline()
        if not self.sample_prompts or pipe is None:
            return {}
        images = pipe.generate([str(p) for p in self.sample_prompts])
        return {"samples": (images, [str(p) for p in self.sample_prompts])}


def expected_masked(n: int) -> float:
    """The expected number of positions :meth:`MaskGIT.mask_codes` masks in a block of ``n``:
    ceil(n cos(pi u / 2)) with u ~ U(0, 1), i.e. the sum over k < n of P(n cos(pi u / 2) > k)
    = (2 / pi) arccos(k / n)."""
    return sum(2 / math.pi * math.acos(k / n) for k in range(n))


class TokenGeneratorModule(GeneratorModule):
    """The AR image GPT and MaskGIT (``unifuse.models.image_gpt.TokenImageModel``) over VQ codes."""

    def check_tokenizer(self, tok: VQVAE) -> None:
        if tok.codebook_size != self.net.vocab.image_codes:
            raise ValueError(f"tokenizer {self.tokenizer_ckpt} has {tok.codebook_size} codes but "
                             f"model.net.vocab.image_codes is {self.net.vocab.image_codes}")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resuming: the stored vocabulary layout must be the configured one (ids mean the same)."""
        super().on_load_checkpoint(checkpoint)
        stored = (checkpoint.get("unifuse") or {}).get("config", {}).get("vocab")
        if stored:
            self.net.vocab.check_compatible(stored, "checkpoint being resumed")

    # ------------------------------------------------------------------ batches
    def _rows(self, batch: dict) -> dict:
        """The collator's packed rows with VQ code ids in every image block. Pre-encoded shards
        carry the codes in ``tokens`` already; pixel shards leave placeholder positions (listed in
        ``image_pos``) that the frozen tokenizer's codes fill here."""
        if "image" not in batch:
            return batch
        if self.tokenizer is None:
            raise ValueError("batch has no pre-encoded codes and no tokenizer_ckpt is set to encode images")
        self.tokenizer.to(self.device)
        with torch.no_grad():
            codes = self.tokenizer.encode(batch["image"]).flatten(1)
        tokens = batch["tokens"].clone()
        for (r, start, n), c in zip(batch["image_pos"].tolist(), codes):
            if n != len(c):
                raise ValueError(f"the tokenizer makes {len(c)} codes per image but the collator left {n} "
                                 f"positions: set data.collator.image_tokens to {len(c)}")
            tokens[r, start:start + n] = self.net.vocab.code_to_id(c)
        return {**batch, "tokens": tokens}

    def flops_per_batch(self, batch: dict) -> float:
        """Training FLOPs of the batch: 3x the transformer's forward (the backward costs two) over
        every position of the packed rows, padding included, attention over all (query, key) pairs.
        The AR GPT runs the L - 1 input positions of a row; MaskGIT runs all L and its LM head only
        at the masked codes, counted at their expected number. The frozen tokenizer is not counted."""
        net = self.net.net
        b, seq = batch["tokens"].shape
        if not isinstance(self.net, MaskGIT):
            return 3.0 * b * (seq - 1) * net.flops_per_token(seq - 1, training=False)
        head = linear_flops(net.lm_head)
        blocks = batch["image_pos"][:, 2].tolist() if "image_pos" in batch else []
        masked = sum(expected_masked(n) for n in blocks)
        return 3.0 * (b * seq * (net.flops_per_token(seq, training=False) - head) + masked * head)

    def training_step(self, batch: dict, batch_idx: int):
        out = self.net.loss(self._rows(batch))
        self.last_batch_tokens = int(out.pop("tokens"))
        if self.finite_losses(out, batch):  # skipped: the guard drops the gradients before the step
            self.log_dict({f"train/{k}": v for k, v in out.items()}, prog_bar=True, batch_size=len(batch["tokens"]))
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int):
        out = self.net.loss(self._rows(batch))
        out.pop("tokens")
        if "text_loss" in out and isinstance(self.net.text_tokenizer, ByteTokenizer):
            out["caption_bpb"] = out["text_loss"] / math.log(2)  # bits per byte of held-out captions
        self.log_dict({f"val/{k}": v for k, v in out.items()}, sync_dist=True, batch_size=len(batch["tokens"]))
