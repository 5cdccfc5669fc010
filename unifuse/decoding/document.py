"""Interleaved documents for Transfusion: given text, images generated where asked, and sampled text
in which a sampled BOI starts another image, all decoded with one KV cache of one row.

The decoder works through a queue of typed segments: :class:`GivenText` is fed whole (as training
feeds interleaved text), :class:`ImageHere` generates an image (a ``None`` part, or a sampled BOI),
and once the queue is empty :class:`SampleToken` draws the next token while new tokens remain.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from unifuse.decoding.transfusion import commit_image, denoise, device_of, prompt_ids, text_logits
from unifuse.models.rows import left_padded
from unifuse.models.transformer import KVCache
from unifuse.models.transfusion import Transfusion
from unifuse.sampling.settings import SamplingSettings
from unifuse.sampling.tokens import row_generators, sample_logits


@dataclass(frozen=True)
class GivenText:
    """Text the document contains here, fed whole (never cut)."""

    text: str
    ids: tuple[int, ...]


@dataclass(frozen=True)
class ImageHere:
    """An image generated here: BOI, a denoised image block, EOI."""


@dataclass(frozen=True)
class SampleToken:
    """The next token is sampled: text, EOS (the end) or BOI (an image follows)."""


Segment = GivenText | ImageHere | SampleToken


def feed(net: Transfusion, cache: KVCache, ids: list[int]) -> torch.Tensor:
    """Append tokens to every row of a one-document cache (positions continue); the last hidden
    state (rows, dim)."""
    rows = left_padded([list(ids)] * cache.rows, net.vocab.pad, device_of(net), start=cache.length)
    return net.net.forward_rows(rows, cache, ids=True)[:, -1]


def with_uncond(net: Transfusion, cache: KVCache) -> KVCache:
    """A two-row copy of a one-row cache whose second row is the unconditional prompt ``[BOS] [BOI]``,
    right-aligned (its padding has doc_id -1), for guidance at an image inside a document."""
    ids = prompt_ids(net, None)
    un = net.net.new_cache(1, len(ids))
    feed(net, un, ids)
    return cache.stacked(un)


def document_cache(net: Transfusion, texts: list[tuple[int, ...]], forced_images: int, max_images: int,
                   max_new_tokens: int) -> KVCache:
    """A one-row cache for a document of the given text parts (token ids, uncut) and images,
    plus what sampling may add; refused, naming the limit, when it exceeds the model's context."""
    n, limit = net.n_patches, net.net.cfg.max_seq_len
    images = max_images if max_new_tokens else min(max_images, forced_images)
    text = sum(len(ids) for ids in texts)
    size = 2 + text + images * (n + 2) + max_new_tokens
    if size > limit:
        raise ValueError(
            f"the document needs up to {size} positions (BOS and EOS, {text} tokens of given text, {images} x "
            f"{n + 2} for images, {max_new_tokens} new tokens), more than model.net.transformer.max_seq_len = "
            f"{limit}: shorten the text or lower max_new_tokens / max_images")
    return net.net.new_cache(1, size)


@dataclass
class _Document:
    """The state of one document being decoded: its cache, the hidden state of its last position,
    what it has produced and the settings it samples with."""

    net: Transfusion
    cache: KVCache
    settings: SamplingSettings
    max_images: int
    h: torch.Tensor | None = None
    segments: list[dict] = field(default_factory=list)
    generated: list[int] | None = None  # ids of the generated text segment being written
    images: int = 0

    def text(self, part: GivenText) -> None:
        if part.ids:
            self.h = feed(self.net, self.cache, list(part.ids))
        self.segments.append({"text": part.text})
        self.generated = None

    def image(self) -> None:
        """BOI, an image block denoised against the document so far (image k uses seed + 1 + k), EOI."""
        if self.images >= self.max_images:
            return
        net, cache, s, dev = self.net, self.cache, self.settings, device_of(self.net)
        feed(net, cache, [net.vocab.boi])
        guided = with_uncond(net, cache) if s.cfg_scale is not None else cache
        # each row's image block right after its own prefix: the document's, the unconditional prompt's
        lengths = torch.tensor([cache.length, len(prompt_ids(net, None))][: guided.rows], device=dev)
        img_pos = lengths[:, None] + torch.arange(net.n_patches, device=dev)
        gens = row_generators(None if s.seed is None else s.seed + 1 + self.images, 1, dev)
        z = denoise(net, guided, img_pos, self.images, 1, s, gens)
        commit_image(net, cache, z, img_pos[:1], self.images)
        self.h = feed(net, cache, [net.vocab.eoi])
        self.segments.append({"image": z[0]})
        self.images += 1
        self.generated = None

    def token(self, gen) -> SampleToken | ImageHere | None:
        """Sample one token: text extends the generated segment; BOI asks for an image (returned),
        EOS ends the document (None)."""
        v, s = self.net.vocab, self.settings
        logits = text_logits(self.net, self.net.net.lm_head(self.h), self.images < self.max_images)
        tok = int(sample_logits(logits, s.temperature, s.top_k, s.top_p, gen)[0])
        if tok == v.eos:
            return None
        if tok == v.boi:
            return ImageHere()
        if self.generated is None:
            self.generated = []
            self.segments.append({"text": "", "generated": True})
        self.generated.append(tok)
        self.segments[-1]["text"] = self.net.text_tokenizer.decode(self.generated)
        self.h = feed(self.net, self.cache, [tok])
        return SampleToken()


@torch.no_grad()
def document(net: Transfusion, parts: list[str | None], max_new_tokens: int = 0, max_images: int = 4,
             sampler: str | None = None, steps: int | None = None, cfg_scale: float | None = None,
             cfg_schedule: str = "constant", eta: float = 0.0, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = 0) -> list[dict]:
    """An interleaved document, decoded with one KV cache: ``parts`` are given text (str) and
    images to generate there (None: a forced BOI); then up to ``max_new_tokens`` sampled
    tokens, in which a sampled BOI starts another image (at most ``max_images`` in all).
    Returns segments ``{"text": str}`` / ``{"image": (C, H, W) latent}``; generated text is
    ``{"text": str, "generated": True}``. Image k uses seed ``seed + 1 + k``. A document that may
    not fit the model's context (``max_seq_len``) is refused before anything runs. ``sampler`` and
    ``steps`` left unset are the transport's defaults."""
    queue: list[Segment] = [ImageHere() if p is None else GivenText(p, tuple(net.text_tokenizer.encode(p)))
                            for p in parts]
    cache = document_cache(net, [p.ids for p in queue if isinstance(p, GivenText)], parts.count(None),
                           max_images, max_new_tokens)
    settings = SamplingSettings(cfg_scale=cfg_scale, cfg_schedule=cfg_schedule, temperature=temperature, top_k=top_k,
                                top_p=top_p, steps=steps, sampler=sampler, eta=eta, seed=seed)
    doc = _Document(net, cache, settings, max_images)
    doc.h = feed(net, cache, [net.vocab.bos])
    gen = row_generators(seed, 1, device_of(net))
    new = 0
    while queue or new < max_new_tokens:
        part = queue.pop(0) if queue else SampleToken()
        if isinstance(part, GivenText):
            doc.text(part)
        elif isinstance(part, ImageHere):
            doc.image()
        else:
            new += 1
            follow = doc.token(gen)
            if follow is None:
                break
            if isinstance(follow, ImageHere):
                queue.insert(0, follow)
    return doc.segments
