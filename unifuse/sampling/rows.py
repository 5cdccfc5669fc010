"""Prompt rows at inference: token prompts left-padded to one length, so every row of a batch shares
a KV-cache write index and means the same whatever it is batched with."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Prompts:
    """Token prompts of a batch, left-padded to one length so all rows share a KV-cache write index.
    Padding has ``doc_id = -1`` (never attended) and rotary positions start at 0 on each row's first
    real token, so a row means the same whatever it is batched with."""

    tokens: torch.Tensor  # (R, P)
    doc_id: torch.Tensor  # (R, P) -1 on padding, 0 elsewhere
    positions: torch.Tensor  # (R, P) 0 at the first real token
    lengths: torch.Tensor  # (R,) real prompt lengths

    @property
    def padded(self) -> bool:
        return bool((self.doc_id < 0).any())

    def image_positions(self, n: int) -> torch.Tensor:
        """(R, n) rotary positions of an n-position image block right after each prompt."""
        return self.lengths[:, None] + torch.arange(n, device=self.tokens.device)

    def with_image_block(self, block: torch.Tensor) -> dict[str, torch.Tensor]:
        """The prompts followed by one image block of ``block`` (R, n) token ids: ``tokens``,
        ``position``, ``doc_id`` and ``image_id`` (0 on the block, -1 elsewhere) of the whole rows."""
        return {"tokens": torch.cat([self.tokens, block], 1),
                "position": torch.cat([self.positions, self.image_positions(block.shape[1])], 1),
                "doc_id": torch.cat([self.doc_id, torch.zeros_like(block)], 1),
                "image_id": torch.cat([torch.full_like(self.tokens, -1), torch.zeros_like(block)], 1)}


def left_padded(rows: list[list[int]], pad: int, device, pad_to: int | None = None) -> Prompts:
    """Token-id rows -> :class:`Prompts` (at least ``pad_to`` long)."""
    p = max(pad_to or 0, max(len(r) for r in rows))
    tokens = torch.full((len(rows), p), pad, dtype=torch.long)
    doc = torch.full((len(rows), p), -1, dtype=torch.long)
    pos = torch.zeros((len(rows), p), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, p - len(r):] = torch.tensor(r, dtype=torch.long)
        doc[i, p - len(r):] = 0
        pos[i, p - len(r):] = torch.arange(len(r))
    lengths = torch.tensor([len(r) for r in rows])
    return Prompts(tokens.to(device), doc.to(device), pos.to(device), lengths.to(device))
