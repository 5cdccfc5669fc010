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

from dataclasses import asdict

import torch
from torch import nn
from torch.nn import functional as F

from unifuse.models.rows import Rows, left_padded
from unifuse.models.transformer import Transformer, TransformerConfig
from unifuse.text.tokenizer import ByteTokenizer, TextTokenizer, load_tokenizer
from unifuse.text.vocab import VocabLayout


class TokenImageModel(nn.Module):
    """What the AR GPT and MaskGIT share: vocabulary, conditioning, prompt building. Their decoding
    programs are :mod:`unifuse.decoding.ar` and :mod:`unifuse.decoding.maskgit`."""

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

    def condition_ids(self, cond: str | int | None) -> list[int]:
        """Token ids of one condition: a caption (str), a class (int) or None (unconditional)."""
        if cond is None or cond == "":
            return []
        if isinstance(cond, str):
            return self.text_tokenizer.encode(cond)[: self.max_text_len]
        return [self.vocab.class_token(int(cond))]

    def prompts(self, conds: list, device, pad_to: int | None = None) -> Rows:
        """The rows ``[BOS] condition [BOI]`` of ``conds``, left-padded: what decoding starts from."""
        v = self.vocab
        return left_padded([[v.bos, *self.condition_ids(c), v.boi] for c in conds], v.pad, device, pad_to)

    def image_logits(self, logits: torch.Tensor) -> torch.Tensor:
        lo, hi = self.vocab.image_range()
        return logits[..., lo:hi]


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
