"""Collators turn decoded samples into batches inside the data workers.

A collator has ``batch_size``, ``add(sample) -> skip reason | None``, ``ready()``, ``pop()`` and
``fresh()`` (a new empty copy for each worker/epoch).

* :class:`ImageCollator` - image batches for tokenizers/autoencoders: ``image`` (uint8, B x 3 x H x W;
  the DataModule turns it into floats in [-1, 1] on the device), ``caption``, ``cls``, ``key``,
  and ``codes`` when the shards are pre-encoded.
* :class:`PackingCollator` - token/image sequences for the AR GPT and Transfusion: documents are
  packed whole into ``rows`` fixed-length rows (no per-example padding to full length), with
  per-position ``modality`` (0 text/special, 1 image), ``doc_id`` (-1 on padding), ``image_id``
  (block id of the image a position belongs to, -1 elsewhere) and ``position`` (restarting at 0
  in each document). Attention masks are built from these ids by the model.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import torch

from unifuse.data.samples import Sample
from unifuse.text.tokenizer import ByteTokenizer, TextTokenizer
from unifuse.text.vocab import VocabLayout

TEXT, IMAGE = 0, 1


class ImageCollator:
    def __init__(self, batch_size: int, need_image: bool = True):
        self.batch_size, self.need_image = batch_size, need_image
        self._items: list[Sample] = []

    def fresh(self) -> ImageCollator:
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
            batch["image"] = torch.from_numpy(np.stack([s.images[0] for s in items])).permute(0, 3, 1, 2)
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
    vocabulary) when the sample carries pre-encoded ``codes``, else ``image_tokens`` placeholder
    positions whose pixels travel in ``images`` (for continuous-image models such as Transfusion).
    Image-caption pairs put the caption first with probability ``caption_first`` (else the image
    first, i.e. captioning). Documents longer than a row are cut at ``seq_len`` if the cut falls in
    text; a document whose image would be cut is skipped (``doc_too_long``).
    """

    def __init__(self, batch_size: int, seq_len: int, vocab: VocabLayout,
                 tokenizer: TextTokenizer | None = None, image_tokens: int = 0,
                 caption_first: float = 1.0, seed: int = 0):
        self.batch_size, self.seq_len, self.vocab = batch_size, seq_len, vocab
        self.tokenizer = tokenizer or ByteTokenizer()
        self.image_tokens, self.caption_first = image_tokens, caption_first
        self.rng = random.Random(seed)
        self._rows: list[list[tuple]] = []  # per row: list of documents
        self._fill: list[int] = []
        self._pending: list[tuple] = []

    def fresh(self) -> PackingCollator:
        c = copy.copy(self)
        c._rows, c._fill, c._pending = [], [], []
        c.rng = random.Random(self.rng.random())
        return c

    # ------------------------------------------------------------------ documents
    def document(self, s: Sample) -> tuple[list[int], list[int], list[np.ndarray]] | None:
        """(token ids, modality per position, images) for one sample."""
        v = self.vocab
        toks, mods, images = [v.bos], [TEXT], []

        def text(t: str) -> None:
            ids = self.tokenizer.encode(t)
            toks.extend(ids)
            mods.extend([TEXT] * len(ids))

        def image(i: int) -> None:
            if s.codes is not None and i == 0:
                ids = list(v.code_to_id(np.asarray(s.codes).reshape(-1).astype(np.int64)))
            elif self.image_tokens > 0 and i < len(s.images):
                ids = [v.pad] * self.image_tokens
                images.append(s.images[i])
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
                    image(n_img)
                    n_img += 1
        elif s.images or s.codes is not None:
            cap = s.text or ""
            if self.rng.random() < self.caption_first:
                text(cap)
                image(0)
            else:
                image(0)
                text(cap)
        else:
            text(s.text or "")
        toks.append(v.eos)
        mods.append(TEXT)
        return toks, mods, images

    # ------------------------------------------------------------------ packing
    def add(self, s: Sample) -> str | None:
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

    def pop(self) -> dict:
        b, L, v = self.batch_size, self.seq_len, self.vocab
        tokens = torch.full((b, L), v.pad, dtype=torch.long)
        modality = torch.zeros((b, L), dtype=torch.long)
        doc_id = torch.full((b, L), -1, dtype=torch.long)
        image_id = torch.full((b, L), -1, dtype=torch.long)
        position = torch.zeros((b, L), dtype=torch.long)
        images, image_pos = [], []
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
                        images.append(torch.from_numpy(imgs[k]).permute(2, 0, 1))
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
            out["image"] = torch.stack(images)
            out["image_pos"] = torch.tensor(image_pos, dtype=torch.long)
        return out
