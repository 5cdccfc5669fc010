"""Transfusion's decoding (:class:`unifuse.models.transfusion.Transfusion`): text -> image, image ->
text, and the pieces the interleaved document decoder (:mod:`.document`) shares with them.

One KV cache holds the rows: text is decoded token by token; on BOI, ``n`` noise patches are
appended and denoised by any sampler of the diffusion module, each step running only the image
block against the cached prefix (:meth:`~unifuse.models.transformer.KVCache.scratch` forgets it
again; classifier-free guidance: unconditional rows ``[BOS] [BOI]`` batched after the conditional
ones); the clean latent (t = 0) then enters the cache, EOI follows, and text decoding continues.
Every row is built by :mod:`unifuse.models.rows`.
"""

from __future__ import annotations

import torch

from unifuse.diffusion.samplers import guided_sample
from unifuse.models.rows import Rows, left_padded
from unifuse.models.transformer import KVCache
from unifuse.models.transfusion import Transfusion
from unifuse.sampling.guidance import Guidance
from unifuse.sampling.settings import SamplingSettings
from unifuse.sampling.tokens import row_generators, sample_logits


def device_of(net: Transfusion) -> torch.device:
    return net.net.tok_emb.weight.device


def prompt_ids(net: Transfusion, cond: str | None) -> list[int]:
    """``[BOS] caption [BOI]``: the start of a caption-first document, the prompt of text -> image
    (``cond`` None: ``[BOS] [BOI]``, the unconditional prompt of classifier-free guidance)."""
    return [net.vocab.bos, *net.text_ids(cond), net.vocab.boi]


def image_prefix(net: Transfusion, b: int, device) -> Rows:
    """``b`` rows ``[BOS] [BOI] image [EOI]``: the start of an image-first document (its image block
    holds placeholder ids; the latents enter through :meth:`Transfusion.forward_rows`)."""
    v, n = net.vocab, net.n_patches
    rows = left_padded([[v.bos, v.boi]] * b, v.pad, device)
    return rows.append(torch.full((b, n), v.pad, device=device), image=True).append(
        torch.full((b, 1), v.eoi, device=device))


def text_logits(net: Transfusion, logits: torch.Tensor, allow_boi: bool) -> torch.Tensor:
    """Only text tokens, EOS (and BOI when images may be generated) can be sampled."""
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[: net.vocab.text_size] = True
    keep[net.vocab.eos] = True
    keep[net.vocab.boi] = allow_boi
    return logits.float().masked_fill(~keep, float("-inf"))


def denoise(net: Transfusion, cache: KVCache, img_pos: torch.Tensor, block: int, b: int,
            settings: SamplingSettings, gens) -> torch.Tensor:
    """Denoise one image block at rotary positions ``img_pos`` (rows of ``cache``, n) after what
    ``cache`` holds (rows: b conditional, then b unconditional when guided) with the sampler and
    guidance of ``settings`` -> (b, C, H, W) latents; the cache is left as it was."""
    rows = cache.rows

    def model(x, t, cond):
        r = x.shape[0]
        if r < rows:  # guidance switched off for this step: the unconditional rows ride along
            x, t = torch.cat([x, x])[:rows], torch.cat([t, t])[:rows]
        with cache.scratch():
            h, ctx = net.cached_image(cache, x, t, img_pos, block)
        return net.image_output(h, ctx)[:r]

    return sample(net, model, b, settings, gens, img_pos.device)


def sample(net: Transfusion, model, b: int, settings: SamplingSettings, gens, device) -> torch.Tensor:
    """Noise -> latents (b, C, H, W); ``model(x, t, cond)`` runs the image block (guided rows batched)."""
    return guided_sample(net.diffusion, model, (b, *net.latent_shape()), settings, gens, device, cond={}, uncond={})


def commit_image(net: Transfusion, cache: KVCache, z: torch.Tensor, img_pos: torch.Tensor, block: int) -> None:
    """The clean latents z (t = 0) enter the cache as image block ``block``."""
    net.cached_image(cache, z, net.diffusion.clean_time(len(z), z.device), img_pos, block)


@torch.no_grad()
def generate(net: Transfusion, conds: list, sampler: str | None = None, steps: int | None = None,
             cfg_scale: float | None = None, cfg_schedule: str = "constant", eta: float = 0.0,
             seed: int | list[int] | None = None, use_cache: bool = True, progress: bool = False) -> torch.Tensor:
    """Text -> image: ``[BOS] caption [BOI]`` then an image block -> (B, C, H, W) latents.
    ``use_cache=False`` reruns the whole rows at every step (the reference). ``sampler`` and
    ``steps`` left unset are the transport's default sampler and that sampler's default steps."""
    dev, b, n, v = device_of(net), len(conds), net.n_patches, net.vocab
    settings = SamplingSettings(cfg_scale=cfg_scale, cfg_schedule=cfg_schedule, steps=steps, sampler=sampler, eta=eta)
    rows = left_padded([prompt_ids(net, c) for c in Guidance.of(settings).rows(conds)], v.pad, dev)
    r = rows.tokens.shape[0]
    gens = row_generators(seed, b, dev)
    if use_cache:
        cache = net.net.new_cache(r, rows.width + n + 1)
        net.net.forward_rows(rows, cache, ids=True)
        return denoise(net, cache, rows.next_positions(n), 0, b, settings, gens)
    batch = rows.append(torch.full((r, n), v.pad, device=dev), image=True).batch()

    def model(x, t, cond):
        k = x.shape[0]
        x, t = torch.cat([x, x])[:r], torch.cat([t, t])[:r]
        return net(batch, x, t)[1][:k]

    return sample(net, model, b, settings, gens, dev)


@torch.no_grad()
def caption_logprob(net: Transfusion, z: torch.Tensor | None, captions: list[str]) -> torch.Tensor:
    """(B,) log-likelihood of caption i and its end, summed over tokens: after row i's clean
    latent, ``[BOS] [BOI] image [EOI] caption [EOS]`` (an image-first document); with ``z`` None,
    with no image, ``[BOS] caption [BOI]`` (a caption-first document, whose caption ends where its
    image begins). The first minus the second is the pointwise mutual information of caption and image."""
    v, b, dev = net.vocab, len(captions), device_of(net) if z is None else z.device
    prefix = image_prefix(net, b, dev) if z is not None else left_padded([[v.bos]] * b, v.pad, dev)
    t0 = net.diffusion.clean_time(b, dev) if z is not None else None
    end = v.eos if z is not None else v.boi
    rows = prefix.append_text([net.text_ids(c) + [end] for c in captions], v.pad)
    k = prefix.width
    logits, _ = net(rows.batch(), z, t0)
    cap, valid = rows.tokens[:, k:], rows.doc_id[:, k:] >= 0
    logp = logits[:, k - 1:-1].float().log_softmax(-1).gather(-1, cap[..., None])[..., 0]
    return (logp * valid).sum(1)


@torch.no_grad()
def caption(net: Transfusion, z: torch.Tensor, max_new_tokens: int = 48, temperature: float = 0.0,
            top_k: int | None = None, top_p: float | None = None, seed: int | list[int] | None = None) -> list[str]:
    """Image -> text: ``[BOS] [BOI] image [EOI]`` then text decoded with the KV cache until EOS."""
    ids = caption_ids(net, z, max_new_tokens, temperature, top_k, top_p, seed)
    return [net.text_tokenizer.decode(r) for r in ids]


@torch.no_grad()
def caption_ids(net: Transfusion, z: torch.Tensor, max_new_tokens: int = 48, temperature: float = 0.0,
                top_k: int | None = None, top_p: float | None = None, seed: int | list[int] | None = None,
                ) -> list[list[int]]:
    """:func:`caption` as token ids (without the EOS)."""
    b, dev = len(z), z.device
    rows = image_prefix(net, b, dev)
    cache = net.net.new_cache(b, rows.width + max_new_tokens)
    h = net.forward_rows(rows, z, net.diffusion.clean_time(b, dev), cache)[:, -1]
    gens = row_generators(seed, b, dev)
    out = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    for i in range(max_new_tokens):
        tok = sample_logits(text_logits(net, net.net.lm_head(h), False), temperature, top_k, top_p, gens)
        for r in range(b):
            if not done[r] and int(tok[r]) != net.vocab.eos:
                out[r].append(int(tok[r]))
        done |= tok == net.vocab.eos
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        rows = rows.following(tok[:, None])  # the cache holds the rows so far
        h = net.net.forward_rows(rows, cache)[:, -1]
    return out
