"""Collators turn decoded samples into batches inside the data workers.

A collator has ``batch_size``, ``add(sample) -> skip reason | None``, ``ready()``, ``pop()``,
``held()`` (samples added and not yet in a popped batch), ``flush()`` (a last, smaller batch of what is
held, or None) and ``fresh(key)`` (a new empty copy for each worker/epoch; ``key`` seeds its random
choices, so a stream restarted at the same epoch, rank and worker makes the same ones).

* :class:`ImageCollator` - image batches for tokenizers/autoencoders: ``image`` (uint8, B x 3 x H x W;
  the DataModule turns it into floats in [-1, 1] on the device), ``caption``, ``cls``, ``key``,
  and ``codes`` when the shards are pre-encoded.
* :class:`PackingCollator` - token/image sequences for the AR GPT, MaskGIT and Transfusion: documents are
  packed whole into ``rows`` fixed-length rows (no per-example padding to full length), with
  per-position ``modality`` (0 text/special, 1 image), ``doc_id`` (-1 on padding), ``image_id``
  (block id of the image a position belongs to, -1 elsewhere) and ``position`` (restarting at 0
  in each document). Attention masks are built from these ids by the model.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable

import numpy as np
import torch

from unifuse.data.samples import Sample, image_batch
from unifuse.text.tokenizer import ByteTokenizer, TextTokenizer
from unifuse.text.vocab import IMAGE, TEXT, VocabLayout


class ImageCollator:
    def __init__(self, batch_size: int, need_image: bool = True):
        self.batch_size, self.need_image = batch_size, need_image
        self._items: list[Sample] = []

    def fresh(self, key: tuple = ()) -> ImageCollator:
        c = copy.copy(self)
        c._items = []
        return c

    def add(self, s: Sample) -> str | None:
        if self.need_image and not s.images and s.codes is None:
            return "no_image"
        self._items.append(s)
        return None

    def ready(self) -> bool:
        return len(self._items) >= self.batch_size

    def held(self) -> int:
        return len(self._items)

    def flush(self) -> dict | None:
        return self.pop() if self._items else None

    def pop(self) -> dict:
        items, self._items = self._items[: self.batch_size], self._items[self.batch_size :]
        batch: dict = {
            "caption": [s.text or "" for s in items],
            "cls": torch.tensor([-1 if s.cls is None else s.cls for s in items], dtype=torch.long),
            "key": [s.key for s in items],
        }
        if all(s.images for s in items):
            shapes = {s.images[0].shape for s in items}
            if len(shapes) > 1:
                raise ValueError(f"images of different sizes {shapes}: set data.image_size")
            batch["image"] = image_batch([s.images[0] for s in items])
        if all(s.codes is not None for s in items):
            arr = np.stack([s.codes for s in items])
            if np.issubdtype(arr.dtype, np.floating):  # KL latents (mean and std on channels)
                batch["latents"] = torch.from_numpy(arr.astype(np.float32))
            else:
                batch["codes"] = torch.from_numpy(arr.astype(np.int64))
        return batch


class PackingCollator:
    """Packs whole documents into ``rows`` rows of ``seq_len`` positions.

    A document is ``[BOS] segments... [EOS]`` where a text segment is its token ids and an image
    segment is ``[BOI] n image positions [EOI]``: the codes (offset into the image range of the
    vocabulary) when the sample carries pre-encoded integer ``codes``, else ``image_tokens``
    placeholder positions whose image travels beside the tokens (for continuous-image models such as
    Transfusion): pixels in ``image`` (uint8, N x 3 x H x W) or pre-encoded KL latents in ``latents``
    (float32, N x 2C x h x w: posterior mean and std), one entry per image block in row order, with
    ``image_pos`` (N x 3: row, first position, length), ``image_first`` (N: the image precedes
    its document's text, i.e. a captioning example) and ``image_caption`` (N: the sample's caption,
    even when dropped from the sequence; for caption-retrieval metrics).

    Image-caption pairs put the caption first with probability ``caption_first`` (else the image
    first, i.e. captioning); a caption-first pair loses its caption with probability ``p_uncond``
    (the unconditional branch of classifier-free guidance). The caption of a pair is cut to
    ``max_text_len`` tokens (as the models cut prompts at sampling time); ``cond="class"`` puts the
    sample's class token in its place (samples without a class are skipped, ``no_class``).
    Documents longer than a row are cut at
    ``seq_len`` if the cut falls in text; a document whose image would be cut is skipped
    (``doc_too_long``).
    """

    def __init__(self, batch_size: int, seq_len: int, vocab: VocabLayout | None = None,
                 tokenizer: TextTokenizer | None = None, image_tokens: int = 0,
                 caption_first: float = 1.0, p_uncond: float = 0.0, max_text_len: int | None = None,
                 cond: str = "text", seed: int = 0):
        """``vocab`` defaults to the text tokenizer's ids plus the special tokens (no image codes)."""
        if cond not in ("text", "class"):
            raise ValueError(f"cond must be 'text' or 'class', not {cond!r}")
        self.batch_size, self.seq_len, self.max_text_len, self.cond = batch_size, seq_len, max_text_len, cond
        self.tokenizer = tokenizer or ByteTokenizer()
        self.vocab = vocab or VocabLayout(text_size=self.tokenizer.vocab_size)
        self.image_tokens, self.caption_first, self.p_uncond = image_tokens, caption_first, p_uncond
        self.seed, self.rng = seed, random.Random(seed)
        self._rows: list[list[tuple]] = []  # per row: list of documents
        self._fill: list[int] = []
        self._pending: list[tuple] = []

    def fresh(self, key: tuple = ()) -> PackingCollator:
        c = copy.copy(self)
        c._rows, c._fill, c._pending = [], [], []
        # str seeds hash the same in every process; without a key: the next draw of this one's generator
        c.rng = random.Random("/".join(map(str, (self.seed, *key)))) if key else random.Random(self.rng.random())
        return c

    # ------------------------------------------------------------------ documents
    def document(self, s: Sample) -> tuple[list[int], list[int], list[tuple[np.ndarray, bool, str]]]:
        """(token ids, modality per position, [(image CHW, image_first, caption)]) for one sample."""
        v = self.vocab
        toks, mods, images = [v.bos], [TEXT], []
        seen_text = False

        def text(t: str, limit: int | None = None, ids: list[int] | None = None) -> None:
            nonlocal seen_text
            ids = self.tokenizer.encode(t)[:limit] if ids is None else ids
            toks.extend(ids)
            mods.extend([TEXT] * len(ids))
            seen_text = seen_text or bool(ids)

        def image(i: int, first: bool) -> None:
            latent = s.codes is not None and np.issubdtype(np.asarray(s.codes).dtype, np.floating)
            if s.codes is not None and i == 0 and not latent:
                ids = list(v.code_to_id(np.asarray(s.codes).reshape(-1).astype(np.int64)))
            elif self.image_tokens > 0 and latent and i == 0:
                ids = [v.pad] * self.image_tokens
                images.append((np.asarray(s.codes), first, s.text or ""))
            elif self.image_tokens > 0 and i < len(s.images):
                ids = [v.pad] * self.image_tokens
                images.append((s.images[i].transpose(2, 0, 1), first, s.text or ""))
            else:
                raise ValueError("image segment without codes or image_tokens")
            toks.extend([v.boi, *ids, v.eoi])
            mods.extend([TEXT, *([IMAGE] * len(ids)), TEXT])

        if s.segments is not None:
            n_img = 0
            for seg in s.segments:
                if "text" in seg:
                    text(seg["text"])
                else:
                    image(n_img, not seen_text)
                    n_img += 1
        elif s.images or s.codes is not None:
            cap = s.text or ""
            cond = [v.class_token(s.cls)] if self.cond == "class" else None
            if self.rng.random() < self.caption_first:
                drop = self.p_uncond > 0 and self.rng.random() < self.p_uncond
                text("" if drop else cap, self.max_text_len, [] if drop and cond else cond)
                image(0, False)
            else:
                image(0, True)
                text(cap, self.max_text_len, cond)
        else:
            text(s.text or "")
        toks.append(v.eos)
        mods.append(TEXT)
        return toks, mods, images

    # ------------------------------------------------------------------ packing
    def samples_per_batch(self, samples: Iterable[Sample]) -> float:
        """How many samples a batch holds on average when ``samples`` are packed (``ShardStream``
        plans its epochs in samples from this); from the rows begun when they fill no batch."""
        c = self.fresh(key=("plan",))
        full = []
        for s in samples:
            c.add(s)
            while c.ready():
                full.append(sum(len(r) for r in c._rows))
                c.pop()
        if full:
            return sum(full) / len(full)
        placed = sum(len(r) for r in c._rows)
        return self.batch_size * placed / len(c._rows) if placed else float(self.batch_size)

    def add(self, s: Sample) -> str | None:
        cls = -1 if s.cls is None else s.cls
        if self.cond == "class" and s.segments is None and not 0 <= cls < self.vocab.num_classes:
            return "no_class"  # no class, or one outside the vocabulary's class tokens
        try:
            doc = self.document(s)
        except ValueError:
            return "no_codes"
        toks, mods, images = doc
        reason = None
        if len(toks) > self.seq_len:
            if IMAGE in mods[self.seq_len:] or (self.seq_len < len(mods) and mods[self.seq_len - 1] == IMAGE):
                return "doc_too_long"
            toks, mods, reason = toks[: self.seq_len], mods[: self.seq_len], "doc_truncated"
        doc = (toks, mods, images)
        if self._pending or not self._place(doc):
            self._pending.append(doc)  # waits for the next batch
        return reason

    def _place(self, doc) -> bool:
        n = len(doc[0])
        for r, used in enumerate(self._fill):
            if used + n <= self.seq_len:
                self._rows[r].append(doc)
                self._fill[r] += n
                return True
        if len(self._rows) < self.batch_size:
            self._rows.append([doc])
            self._fill.append(n)
            return True
        return False

    def ready(self) -> bool:
        return bool(self._pending)

    def held(self) -> int:
        return sum(len(docs) for docs in self._rows) + len(self._pending)

    def flush(self) -> dict | None:
        """The rows begun (fewer than ``batch_size``) as a last batch; call it once ``ready()`` is False."""
        n = len(self._rows)
        if n == 0:
            return None
        rows = ("tokens", "modality", "doc_id", "image_id", "position")
        return {k: v[:n] if k in rows else v for k, v in self.pop().items()}

    def pop(self) -> dict:
        b, L, v = self.batch_size, self.seq_len, self.vocab
        tokens = torch.full((b, L), v.pad, dtype=torch.long)
        modality = torch.zeros((b, L), dtype=torch.long)
        doc_id = torch.full((b, L), -1, dtype=torch.long)
        image_id = torch.full((b, L), -1, dtype=torch.long)
        position = torch.zeros((b, L), dtype=torch.long)
        images, image_pos, image_first, image_caption = [], [], [], []
        for r, docs in enumerate(self._rows):
            at, img_block = 0, 0
            for d, (toks, mods, imgs) in enumerate(docs):
                n = len(toks)
                tokens[r, at : at + n] = torch.tensor(toks)
                m = torch.tensor(mods)
                modality[r, at : at + n] = m
                doc_id[r, at : at + n] = d
                position[r, at : at + n] = torch.arange(n)
                # consecutive IMAGE positions form one block
                is_img = m == IMAGE
                starts = (is_img & ~torch.cat([torch.tensor([False]), is_img[:-1]])).nonzero().flatten()
                for k, st in enumerate(starts.tolist()):
                    end = st
                    while end < n and mods[end] == IMAGE:
                        end += 1
                    image_id[r, at + st : at + end] = img_block
                    if k < len(imgs):
                        images.append(torch.from_numpy(np.ascontiguousarray(imgs[k][0])))
                        image_first.append(imgs[k][1])
                        image_caption.append(imgs[k][2])
                        image_pos.append((r, at + st, end - st))
                    img_block += 1
                at += n
        self._rows, self._fill = [], []
        pending, self._pending = self._pending, []
        for i, doc in enumerate(pending):
            if not self._place(doc):
                self._pending = pending[i:]
                break
        out = {"tokens": tokens, "modality": modality, "doc_id": doc_id, "image_id": image_id,
               "position": position}
        if images:
            if len({im.dtype for im in images}) > 1:
                raise ValueError("a batch mixes pixel images and pre-encoded latents: use one kind of shard")
            if images[0].is_floating_point():
                out["latents"] = torch.stack(images).float()
            else:
                out["image"] = torch.stack(images)
            out["image_pos"] = torch.tensor(image_pos, dtype=torch.long)
            out["image_first"] = torch.tensor(image_first, dtype=torch.bool)
            out["image_caption"] = image_caption
        return out
