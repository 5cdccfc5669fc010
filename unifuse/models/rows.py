"""Token rows at inference: the one builder of every row a model is run on outside training.

A :class:`Rows` is a batch of R rows of equal width: token ids, rotary positions, document ids
(-1 on padding, which is never attended to) and image-block ids (-1 outside an image block). It is
built from token-id lists, left-padded (prompts: every row ends at the same column, so a batch
shares one KV-cache write index; decoding appends the same number of positions to every row) or
right-padded (captions scored or encoded as a whole), and then extended by blocks of positions:
an image block, decoded tokens, or ragged text (or, for a KV-cached step, built as the positions
that follow alone). Positions start at ``start`` on each row's first
real token and continue from each row's own length, so a row means the same whatever it is
batched with and whatever padding it gets.

The AR GPT's and MaskGIT's prompts, their uncached references, Transfusion's prompts, caption
prefixes, scored captions and document text, and the DiT's caption rows are all built here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from unifuse.text.vocab import IMAGE, TEXT


@dataclass(frozen=True)
class Rows:
    """R token rows of one width L (see the module docstring)."""

    tokens: torch.Tensor  # (R, L)
    doc_id: torch.Tensor  # (R, L) -1 on padding, 0 elsewhere
    positions: torch.Tensor  # (R, L) rotary positions
    lengths: torch.Tensor  # (R,) real positions of each row, plus ``start``: where the next position goes
    image_id: torch.Tensor  # (R, L) k on the positions of the row's k-th image block, -1 elsewhere
    # the columns [a, b) outside which no row has padding (known when built, so no device sync)
    pad_span: tuple[int, int] = (0, 0)
    blocks: tuple[tuple[int, int], ...] = field(default=())  # (first column, positions) of each image block

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    @property
    def padded(self) -> bool:
        """Some row has padding (a doc_id of -1)."""
        return self.pad_span[0] < self.pad_span[1]

    @property
    def modality(self) -> torch.Tensor:
        """(R, L) IMAGE on image-block positions, TEXT elsewhere (special tokens and padding included)."""
        return torch.where(self.image_id >= 0, IMAGE, TEXT)

    @property
    def image_pos(self) -> torch.Tensor:
        """(R * blocks, 3) rows ``(row, first column, positions)`` of every image block, row-major."""
        dev, r = self.tokens.device, self.tokens.shape[0]
        per_block = [torch.stack([torch.arange(r, device=dev), torch.full((r,), start, device=dev),
                                  torch.full((r,), n, device=dev)], 1) for start, n in self.blocks]
        return torch.cat(per_block) if per_block else torch.zeros(0, 3, dtype=torch.long, device=dev)

    def next_positions(self, n: int) -> torch.Tensor:
        """(R, n) rotary positions of n positions appended to every row."""
        return self.lengths[:, None] + torch.arange(n, device=self.tokens.device)

    def following(self, block: torch.Tensor, image: bool = False) -> Rows:
        """Only the positions ``block`` (R, n) adds after these rows: what a KV-cached step runs when
        the cache holds these rows. Decoded tokens, or with ``image`` an image block (its ids are
        placeholders or codes; its image id counts the image blocks of these rows)."""
        n = block.shape[1]
        return Rows(block, torch.zeros_like(block), self.next_positions(n), self.lengths + n,
                    torch.full_like(block, len(self.blocks) if image else -1), (0, 0), ((0, n),) if image else ())

    def append(self, block: torch.Tensor, image: bool = False) -> Rows:
        """These rows followed by ``block`` (R, n) token ids on every row (see :meth:`following`)."""
        new = self.following(block, image)
        blocks = (*self.blocks, (self.width, block.shape[1])) if image else self.blocks
        return Rows(torch.cat([self.tokens, new.tokens], 1), torch.cat([self.doc_id, new.doc_id], 1),
                    torch.cat([self.positions, new.positions], 1), new.lengths,
                    torch.cat([self.image_id, new.image_id], 1), self.pad_span, blocks)

    def append_text(self, ids: list[list[int]], pad: int) -> Rows:
        """These rows followed by row i's text ``ids[i]``, right-padded to the longest (the padding
        takes the positions after the row's text and doc_id -1)."""
        tail = right_padded(ids, pad, self.tokens.device, start=self.lengths)
        a, b = (tail.pad_span[0] + self.width, tail.pad_span[1] + self.width) if tail.padded else (0, 0)
        span = (min(self.pad_span[0], a), max(self.pad_span[1], b)) if self.padded else (a, b)
        return Rows(torch.cat([self.tokens, tail.tokens], 1), torch.cat([self.doc_id, tail.doc_id], 1),
                    torch.cat([self.positions, tail.positions], 1), tail.lengths,
                    torch.cat([self.image_id, tail.image_id], 1), span, self.blocks)

    def batch(self) -> dict[str, torch.Tensor]:
        """The rows as a packed batch of the collator's keys (``tokens``, ``modality``,
        ``position``, ``doc_id``, ``image_id`` and, with an image block, ``image_pos``)."""
        out = {"tokens": self.tokens, "modality": self.modality, "position": self.positions,
               "doc_id": self.doc_id, "image_id": self.image_id}
        return {**out, "image_pos": self.image_pos} if self.blocks else out


def _padded(rows: list[list[int]], pad: int, device, left: bool, start, pad_to: int = 0) -> Rows:
    if not rows:
        raise ValueError("no rows to build: pass at least one (possibly empty) row of token ids")
    r, width = len(rows), max(pad_to, max(len(ids) for ids in rows))
    tokens = torch.full((r, width), pad, dtype=torch.long)
    doc = torch.full((r, width), -1, dtype=torch.long)
    for i, ids in enumerate(rows):
        real = slice(width - len(ids), width) if left else slice(0, len(ids))
        tokens[i, real] = torch.tensor(ids, dtype=torch.long)
        doc[i, real] = 0
    lengths = torch.tensor([len(ids) for ids in rows])
    # a real token's position counts the row's real tokens before it; left padding sits at 0, right
    # padding continues the count (padding is never attended, its position only has to be valid)
    cols = torch.arange(width)
    pos = (cols - (width - lengths[:, None])).clamp_min(0) if left else cols.expand(r, width)
    start = torch.as_tensor(start, device=device)
    start_col = start.view(-1, 1) if start.dim() else start
    shortest = min(len(ids) for ids in rows)
    span = ((0, width - shortest) if left else (shortest, width)) if shortest < width else (0, 0)
    return Rows(tokens.to(device), doc.to(device), pos.to(device) + start_col, lengths.to(device) + start,
                torch.full((r, width), -1, dtype=torch.long, device=device), span)


def left_padded(rows: list[list[int]], pad: int, device, pad_to: int | None = None, start=0) -> Rows:
    """Token-id rows, left-padded to the longest (at least ``pad_to``): prompts that share a KV-cache
    write index. ``start``: the position of each row's first real token (after a cached prefix; an
    int or one per row)."""
    return _padded(rows, pad, device, True, start, pad_to or 0)


def right_padded(rows: list[list[int]], pad: int, device, start=0) -> Rows:
    """Token-id rows, right-padded to the longest: text run or scored as a whole (captions)."""
    return _padded(rows, pad, device, False, start)
