"""MaskGIT over VQ codes: bidirectional transformer, [MASK] token, parallel decoding.

Training masks a cosine-scheduled fraction of each image block's codes (ratio = cos(pi/2 * u),
u ~ U(0, 1) per image) in the packed rows of ``PackingCollator`` and predicts them all at once.
Decoding (:mod:`unifuse.decoding.maskgit`) starts from an all-[MASK] image and decodes every
position once over K passes. Same prompt layout and backbone as the AR GPT (image_gpt.py).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from unifuse.models.image_gpt import TokenImageModel


def cosine_schedule(r: torch.Tensor | float):
    """Fraction of tokens masked at progress r in [0, 1]."""
    return torch.cos(r * math.pi / 2) if isinstance(r, torch.Tensor) else math.cos(r * math.pi / 2)


class MaskGIT(TokenImageModel):
    def image_forward(self, image_tokens: torch.Tensor, conds: list) -> torch.Tensor:
        """Logits over the image codes for every image position: (B, N, codebook), running the
        whole rows ``prompt + image`` (the uncached reference of MaskGIT's decoding). The caption is
        causal and the image one bidirectional block (the Transfusion mask), so the caption never
        depends on the image and its keys/values can be cached across decoding steps."""
        h = self.net.forward_rows(self.prompts(conds, image_tokens.device).append(image_tokens, image=True))
        return self.image_logits(self.net.lm_head(h[:, -image_tokens.shape[1]:]))

    @staticmethod
    def mask_codes(image_id: torch.Tensor) -> torch.Tensor:
        """(B, L) True at the positions to mask: in every image block (``image_id`` >= 0) a
        fraction cos(pi/2 * u), u ~ U(0, 1) drawn per block, rounded up (at least one position),
        the positions chosen uniformly within the block."""
        b, length = image_id.shape
        is_img = image_id >= 0
        n_blocks = int(image_id.max()) + 1 if is_img.any() else 0
        key = torch.where(is_img, image_id, n_blocks)  # non-image positions form a last pseudo-block
        counts = F.one_hot(key, n_blocks + 1).sum(1)  # (B, blocks + 1) positions per block
        ratio = cosine_schedule(torch.rand(b, n_blocks, device=image_id.device))
        n_mask = torch.cat([(ratio * counts[:, :n_blocks]).ceil().clamp_min(1), torch.zeros_like(ratio[:, :1])], 1)
        # rank of each position within its block: sort by block, then by a random score
        rank = (key.double() + torch.rand(b, length, device=image_id.device, dtype=torch.float64)).argsort(1).argsort(1)
        first = counts.cumsum(1) - counts  # rank of each block's first position
        return is_img & (rank - first.gather(1, key) < n_mask.gather(1, key))

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """Masked-code loss on packed rows of :class:`unifuse.data.collate.PackingCollator`: each
        image block is masked by :meth:`mask_codes` and predicted from the causal prefix
        (its caption) and the block's unmasked codes; only masked codes are scored."""
        tokens, image_id = batch["tokens"], batch["image_id"]
        masked = self.mask_codes(image_id)
        inp = torch.where(masked, torch.full_like(tokens, self.vocab.mask), tokens)
        h = self.net.forward_hidden(self.net.tok_emb(inp), batch["position"], doc_id=batch["doc_id"],
                                    image_id=image_id)
        logits = self.image_logits(self.net.lm_head(h[masked]))
        ce = F.cross_entropy(logits.float(), self.vocab.id_to_code(tokens[masked]))
        return {"loss": ce, "image_loss": ce, "masked_fraction": masked.sum() / (image_id >= 0).sum().clamp_min(1),
                "tokens": torch.tensor(tokens.numel())}
