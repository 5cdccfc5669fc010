"""Discrete-token text-to-image generators over VQ codes: the autoregressive image GPT
(Chameleon/LlamaGen) and MaskGIT share the prompt layout and the backbone.

Sequence (one row)::

    [PAD ... PAD] [BOS] condition [BOI] h*w image codes [EOI]

``condition`` is the caption's text tokens (text-conditional) or one class token; an empty
condition is the unconditional branch used for classifier-free guidance. Prompts are left-padded
to a common length; padding has ``doc_id = -1`` (never attended) and rotary positions start at 0
on BOS, so a row means the same whatever the padding. Training rows come from
:class:`unifuse.data.collate.PackingCollator` (documents ``[BOS] condition [BOI] codes [EOI] [EOS]``
packed whole into rows, positions restarting at 0 on each BOS), so a sampling prompt is exactly
the start of a training document.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from unifuse.models.transformer import Transformer, TransformerConfig
from unifuse.sampling.guidance import guidance_scale
from unifuse.sampling.rows import Prompts, left_padded
from unifuse.sampling.tokens import row_generators, sample_logits
from unifuse.text.tokenizer import ByteTokenizer, TextTokenizer, load_tokenizer
from unifuse.text.vocab import VocabLayout


class TokenImageModel(nn.Module):
    """What the AR GPT and MaskGIT share: vocabulary, conditioning, prompt building."""

    def __init__(self, transformer: TransformerConfig, vocab: VocabLayout, grid: int, max_text_len: int = 48,
                 text_tokenizer: TextTokenizer | None = None):
        super().__init__()
        if transformer.vocab_size != vocab.size:
            transformer = TransformerConfig(**{**asdict(transformer), "vocab_size": vocab.size})
        self.vocab, self.grid, self.max_text_len = vocab, grid, max_text_len
        self.text_tokenizer = text_tokenizer or ByteTokenizer()
        if self.text_tokenizer.vocab_size > vocab.text_size:
            raise ValueError(f"text tokenizer has {self.text_tokenizer.vocab_size} ids; vocab.text_size is "
                             f"{vocab.text_size}")
        self.net = Transformer(transformer)

    @property
    def n_image_tokens(self) -> int:
        return self.grid * self.grid

    def config(self) -> dict:
        """Everything :meth:`from_config` needs, the text tokenizer's vocabulary included."""
        return {"transformer": self.net.config(), "vocab": self.vocab.to_dict(), "grid": self.grid,
                "max_text_len": self.max_text_len, "text_tokenizer": self.text_tokenizer.to_config()}

    @classmethod
    def from_config(cls, config: dict) -> TokenImageModel:
        return cls(TransformerConfig(**config["transformer"]), VocabLayout.from_dict(config["vocab"]),
                   grid=config["grid"], max_text_len=config["max_text_len"],
                   text_tokenizer=load_tokenizer(config.get("text_tokenizer")))

    def sampling_kwargs(self, settings: dict) -> dict:
        """The entries of ``settings`` that this model's ``generate`` takes (the AR GPT has no
        ``steps``); one settings schema serves every generator."""
        params = inspect.signature(self.generate).parameters
        return {k: v for k, v in settings.items() if k in params}

    def condition_ids(self, cond: str | int | None) -> list[int]:
        """Token ids of one condition: a caption (str), a class (int) or None (unconditional)."""
        if cond is None or cond == "":
            return []
        if isinstance(cond, str):
            return self.text_tokenizer.encode(cond)[: self.max_text_len]
        return [self.vocab.class_token(int(cond))]

    def prompts(self, conds: list, device, pad_to: int | None = None) -> Prompts:
        v = self.vocab
        return left_padded([[v.bos, *self.condition_ids(c), v.boi] for c in conds], v.pad, device, pad_to)

    def image_logits(self, logits: torch.Tensor) -> torch.Tensor:
        lo, hi = self.vocab.image_range()
        return logits[..., lo:hi]

    @staticmethod
    def guide(logits: torch.Tensor, scale: float | None) -> torch.Tensor:
        """Rows [cond; uncond] -> uncond + scale * (cond - uncond); passthrough without guidance."""
        if scale is None:
            return logits
        c, u = logits.chunk(2)
        return u + scale * (c - u)


class ImageGPT(TokenImageModel):
    """Next-token prediction over [BOS] condition [BOI] codes [EOI]."""

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """Next-token loss on packed rows of :class:`unifuse.data.collate.PackingCollator`
        (``tokens``, ``position``, ``doc_id``): every target predicted from the same document.
        ``image_loss`` averages the code and EOI targets, ``text_loss`` the caption's text tokens;
        ``loss`` averages every target (BOI, class tokens and EOS included)."""
        tokens, doc = batch["tokens"], batch["doc_id"]
        x, y = tokens[:, :-1], tokens[:, 1:]
        logits = self.net(x, batch["position"][:, :-1], doc_id=doc[:, :-1])
        valid = (doc[:, 1:] == doc[:, :-1]) & (doc[:, 1:] >= 0)  # no target across documents or padding
        ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none").view_as(y)
        v = self.vocab
        img_mask = valid & (v.is_image(y) | (y == v.eoi))
        text_mask = valid & v.is_text(y)
        return {"loss": (ce * valid).sum() / valid.sum().clamp_min(1),
                "image_loss": (ce * img_mask).sum() / img_mask.sum().clamp_min(1),
                "text_loss": (ce * text_mask).sum() / text_mask.sum().clamp_min(1),
                "tokens": torch.tensor(x.numel())}

    @torch.inference_mode()  # no autograd bookkeeping: per-token overhead is what a cached step spends
    def generate(self, conds: list, cfg_scale: float | None = None, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | list[int] | None = None,
                 use_cache: bool = True, progress: bool = False, return_logits: bool = False,
                 cfg_schedule: str = "constant"):
        """Sample h*w codes per condition -> (B, h, w) code indices (and per-step logits).

        ``cfg_scale`` None: plain conditional sampling; a number: cond and uncond rows run as one
        batch and logits = uncond + s * (cond - uncond), with s constant or ramped over the tokens
        (``cfg_schedule``, see :func:`guidance_scale`). Logits are restricted to the image codes."""
        dev = self.net.tok_emb.weight.device
        b = len(conds)
        rows = list(conds) + ([None] * b if cfg_scale is not None else [])
        pr = self.prompts(rows, dev)
        gen = row_generators(seed, b, dev)
        n = self.n_image_tokens
        out = torch.zeros(b, n, dtype=torch.long, device=dev)
        kept = []
        doc = pr.doc_id if pr.padded else None
        if use_cache:
            cache = self.net.new_cache(len(rows), pr.tokens.shape[1] + n)
            h = self.net.forward_hidden(self.net.tok_emb(pr.tokens), pr.positions, doc_id=doc, cache=cache)
        seq, pos, docs = pr.tokens, pr.positions, pr.doc_id
        for i in tqdm(range(n), desc="sampling", unit="tok", disable=not progress):
            if not use_cache:  # the naive loop: rerun the whole prefix for every token
                h = self.net.forward_hidden(self.net.tok_emb(seq), pos, doc_id=docs if doc is not None else None)
            scale = guidance_scale(cfg_scale, cfg_schedule, (i + 1) / n)
            logits = self.guide(self.image_logits(self.net.lm_head(h[:, -1])).float(), scale)
            if return_logits:
                kept.append(logits)
            tok = sample_logits(logits, temperature, top_k, top_p, gen)
            out[:, i] = tok
            if i == n - 1:
                break
            nxt = self.vocab.code_to_id(tok.repeat(len(rows) // b))[:, None]
            npos = pr.lengths[:, None] + i
            if use_cache:
                h = self.net.forward_hidden(self.net.tok_emb(nxt), npos,
                                            doc_id=None if doc is None else torch.zeros_like(nxt), cache=cache)
            else:
                seq, pos = torch.cat([seq, nxt], 1), torch.cat([pos, npos], 1)
                docs = torch.cat([docs, torch.zeros_like(nxt)], 1)
        codes = out.view(b, self.grid, self.grid)
        return (codes, torch.stack(kept, 1)) if return_logits else codes
