"""MaskGIT over VQ codes: bidirectional transformer, [MASK] token, parallel decoding.

Training masks a cosine-scheduled fraction of each image block's codes (ratio = cos(pi/2 * u),
u ~ U(0, 1) per image) in the packed rows of ``PackingCollator`` and predicts them all at once.
Decoding starts from an all-[MASK] image and runs K forward passes; after pass k it keeps the
N * (1 - cos(pi/2 * (k+1)/K)) most confident positions decoded, choosing among the still-masked
ones by confidence plus Gumbel noise annealed to zero, so every position is decoded exactly once.
Same prompt layout and backbone as the AR GPT (image_gpt.py).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F
from tqdm import tqdm

from unifuse.models.image_gpt import TokenImageModel
from unifuse.sampling.guidance import guidance_scale
from unifuse.sampling.tokens import row_generators, sample_logits


def cosine_schedule(r: torch.Tensor | float):
    """Fraction of tokens masked at progress r in [0, 1]."""
    return torch.cos(r * math.pi / 2) if isinstance(r, torch.Tensor) else math.cos(r * math.pi / 2)


class MaskGIT(TokenImageModel):
    def image_forward(self, image_tokens: torch.Tensor, conds: list) -> torch.Tensor:
        """Logits over the image codes for every image position: (B, N, codebook), running the
        whole row ``prompt + image`` (the uncached reference of :meth:`generate`). The caption is
        causal and the image one bidirectional block (the Transfusion mask), so the caption never
        depends on the image and its keys/values can be cached across decoding steps."""
        row = self.prompts(conds, image_tokens.device).with_image_block(image_tokens)
        h = self.net.forward_hidden(self.net.tok_emb(row["tokens"]), row["position"], doc_id=row["doc_id"],
                                    image_id=row["image_id"])
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

    @torch.inference_mode()  # no autograd bookkeeping: per-token overhead is what a cached step spends
    def generate(self, conds: list, steps: int = 8, cfg_scale: float | None = None, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, noise: float = 4.5,
                 seed: int | list[int] | None = None, use_cache: bool = True, progress: bool = False,
                 return_trace: bool = False, cfg_schedule: str = "constant"):
        """K = ``steps`` forward passes -> (B, h, w) codes. ``noise``: initial Gumbel temperature of
        the confidence ranking (annealed linearly to 0). ``return_trace``: also the step at which
        each position was decoded (B, N). ``use_cache``: run the caption once and only the image
        positions at each step (``False`` reruns the whole sequence, the reference)."""
        dev = self.net.tok_emb.weight.device
        b, n = len(conds), self.n_image_tokens
        rows = list(conds) + ([None] * b if cfg_scale is not None else [])
        gens = row_generators(seed, b, dev)
        codes = torch.zeros(b, n, dtype=torch.long, device=dev)
        known = torch.zeros(b, n, dtype=torch.bool, device=dev)
        decoded_at = torch.full((b, n), -1, dtype=torch.long, device=dev)
        if use_cache:  # the caption's keys/values once, for all K steps
            pr = self.prompts(rows, dev, pad_to=None)
            cache = self.net.new_cache(len(rows), pr.tokens.shape[1] + n)
            self.net.forward_hidden(self.net.tok_emb(pr.tokens), pr.positions,
                                    doc_id=pr.doc_id if pr.padded else None, cache=cache)
            img_pos = pr.image_positions(n)
        for k in tqdm(range(steps), desc="maskgit", unit="step", disable=not progress):
            inp = torch.where(known, self.vocab.code_to_id(codes), torch.full_like(codes, self.vocab.mask))
            inp = inp.repeat(len(rows) // b, 1)
            if use_cache:  # only the image runs; the cached caption is rewound to after every step
                h = self.net.forward_hidden(self.net.tok_emb(inp), img_pos, doc_id=torch.zeros_like(inp),
                                            image_id=torch.zeros_like(inp), cache=cache)
                cache.truncate(cache.length - n)
                logits = self.image_logits(self.net.lm_head(h))
            else:
                logits = self.image_forward(inp, rows)
            logits = self.guide(logits.float(), guidance_scale(cfg_scale, cfg_schedule, (k + 1) / steps))
            flat = logits.reshape(b * n, -1)
            sampled = sample_logits(flat, temperature, top_k, top_p, gens).view(b, n)  # gen r draws row r's n
            probs = flat.softmax(-1).gather(1, sampled.view(-1, 1)).view(b, n)
            n_keep_masked = math.floor(n * cosine_schedule((k + 1) / steps)) if k < steps - 1 else 0
            n_keep_masked = min(n_keep_masked, int((~known).sum(1).min()) - 1) if k < steps - 1 else 0
            t = noise * (1 - (k + 1) / steps)
            if gens is None:
                u = torch.rand(b, n, device=dev)
            else:
                u = torch.stack([torch.rand(n, generator=g, device=dev) for g in gens])
            gumbel = -torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-10)))
            conf = torch.log(probs.clamp_min(1e-20)) + t * gumbel
            conf = conf.masked_fill(known, float("-inf"))  # only masked positions compete
            n_new = (~known).sum(1) - n_keep_masked  # positions decoded in this step, per row
            order = conf.argsort(1, descending=True)
            rank = order.argsort(1)
            new = (rank < n_new[:, None]) & ~known
            codes = torch.where(new, sampled, codes)
            decoded_at[new] = k
            known |= new
        out = codes.view(b, self.grid, self.grid)
        return (out, decoded_at) if return_trace else out
