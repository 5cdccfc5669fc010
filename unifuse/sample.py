"""``python -m unifuse.sample ckpt=<path> prompt="dog face|red heart" n=16 [cfg_scale=3 steps=8 ...]``

A Hydra app (``conf/sample.yaml``, typed by ``unifuse.config.SampleApp``): loads any generator
checkpoint or export directory through ``unifuse.run.checkpoint`` (weights-only, no Lightning; a
paradigm defined outside unifuse needs ``plugins=[<module>]``), samples
``n`` images per prompt, decodes them with the image tokenizer the checkpoint carries (or
``tokenizer=<checkpoint>``), writes a PNG grid (one row per prompt when n <= 16, the prompt under
its first image) and prints its path.

``weights=ema|raw`` picks the EMA average or the trained weights of a checkpoint that has both
(default: the training run's ``eval.weights``).

Sampling settings (cfg_scale, cfg_schedule, temperature, top_k, top_p, steps, seed) default to the
ones the training run stored; ``cfg_scale=null`` samples without guidance. A prompt is required:
``prompt='' uncond=true`` asks for unconditional samples explicitly. ``--cfg job`` prints the
config; ``-m`` sweeps (e.g. ``-m cfg_scale=1,3``) write one grid per job.

Models that also read images (Transfusion) have two more modes:

* ``mode=caption image="a.png|b.png"``: image -> text; prints the captions and writes the images
  with their captions under them.
* ``mode=document "prompt='twemoji red heart<image>openmoji grinning face<image>'"``: an
  interleaved document (Hydra needs the inner quotes around ``<``), ``<image>`` marking where an
  image is generated after the text before it; then up to
  ``max_new_tokens`` more tokens are sampled (a sampled BOI starts another image). Writes the
  images with the text that precedes each.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from unifuse import config as _config
from unifuse.config import SamplingOverrides, given
from unifuse.run.checkpoint import load_pipeline
from unifuse.run.sharded import is_sharded
from unifuse.run.viz import save_captioned_grid


def parse_prompts(prompt: str | None, uncond: bool) -> list[str]:
    """``"a|b"`` -> ``["a", "b"]``; an empty prompt is an error unless ``uncond`` asks for it."""
    if prompt is None:
        raise ValueError("prompt=... is required (several: prompt='a|b'); for unconditional samples pass "
                         "prompt='' uncond=true")
    prompts = [p.strip() for p in str(prompt).split("|")]
    if any(not p for p in prompts) and not uncond:
        raise ValueError(f"empty prompt in prompt={prompt!r}: unconditional sampling needs uncond=true")
    return prompts


def default_out(ckpt_path: Path, kind: str, prompts: list[str], seed) -> Path:
    # an export directory is its own run; a .ckpt file or a sharded checkpoint sits in <run>/checkpoints/
    run = ckpt_path if ckpt_path.is_dir() and not is_sharded(ckpt_path) else ckpt_path.parent.parent
    slug = "_".join(p.replace(" ", "-") or "uncond" for p in prompts)[:80]
    return run / "samples" / f"{kind}_{slug}_s{seed}.png"


def _needs(pipe, method: str, mode: str, kind: str) -> None:
    if not hasattr(pipe, method):
        raise ValueError(f"mode={mode} needs a model that reads images and writes text (transfusion); "
                         f"this checkpoint is a {kind}")


def read_image(path: str, size: int):
    """The image file at ``path`` as a (3, size, size) RGB tensor in [-1, 1]. A missing file, or one
    that is not an image PIL can decode (another format, truncated), is an error naming it."""
    if not Path(path).exists():
        raise FileNotFoundError(f"image={path}: no such file")
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((size, size), Image.BICUBIC)
    except OSError as e:  # PIL's UnidentifiedImageError and truncated-file errors are OSErrors
        raise ValueError(f"image={path}: not a readable image ({e})") from e
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


def caption_images(cfg: DictConfig, pipe, ck) -> Path:
    _needs(pipe, "caption", "caption", ck.kind)
    if not cfg.image:
        raise ValueError('mode=caption needs image="a.png|b.png"')
    size = pipe.tokenizer.downsample_factor * pipe.net.latent_shape()[1]
    x = torch.stack([read_image(path.strip(), size) for path in str(cfg.image).split("|")])
    with torch.inference_mode():
        captions = pipe.caption(x, max_new_tokens=cfg.max_new_tokens)
    for path, c in zip(str(cfg.image).split("|"), captions, strict=True):
        print(f"{path.strip()}: {c}")
    out = Path(cfg.out) if cfg.out else default_out(ck.path, ck.kind, ["captions"], 0)
    save_captioned_grid((x + 1) / 2, captions, out, nrow=min(len(captions), 8))
    print(f"-> {out}")
    return out


def write_document(cfg: DictConfig, pipe, ck, overrides: dict) -> Path:
    _needs(pipe, "document", "document", ck.kind)
    if not cfg.prompt:
        raise ValueError('mode=document needs prompt="text<image>more text<image>"')
    parts: list[str | None] = []
    for i, chunk in enumerate(str(cfg.prompt).split("<image>")):
        if i:
            parts.append(None)
        if chunk.strip():
            parts.append(chunk.strip())
    with torch.inference_mode():
        segs = pipe.document(parts, max_new_tokens=cfg.max_new_tokens, **overrides)
    text, images, captions = "", [], []
    for s in segs:
        if "image" in s:
            images.append((s["image"].cpu() + 1) / 2)
            captions.append(text.strip()[-40:])
            text = ""
        else:
            text += " " + s["text"]
    print(" ".join(("[image]" if "image" in s else s["text"]) for s in segs))
    if not images:
        raise ValueError("the document has no image (add <image> to the prompt)")
    out = Path(cfg.out) if cfg.out else default_out(ck.path, ck.kind, ["document"], overrides.get("seed", 0))
    save_captioned_grid(torch.stack(images), captions, out, nrow=len(images))
    print(f"{len(images)} images -> {out}")
    return out


def sample(cfg: DictConfig) -> Path:
    if cfg.mode not in ("text2image", "caption", "document"):
        raise ValueError(f"mode must be text2image, caption or document, not {cfg.mode!r}")
    pipe, ck = load_pipeline(cfg.ckpt, cfg.tokenizer, cfg.device, cfg.weights)
    if cfg.mode == "caption":
        return caption_images(cfg, pipe, ck)
    if cfg.mode == "document":
        return write_document(cfg, pipe, ck, given(cfg, SamplingOverrides))
    prompts = parse_prompts(cfg.prompt, cfg.uncond)
    overrides = given(cfg, SamplingOverrides)
    settings = pipe.arguments(pipe.settings(**overrides))
    n = cfg.n
    conds = [p for p in prompts for _ in range(n)]
    t = time.perf_counter()
    with torch.inference_mode():
        images = (pipe.generate(conds, **overrides, progress=True) + 1) / 2
    dt = time.perf_counter() - t
    out = Path(cfg.out) if cfg.out else default_out(ck.path, ck.kind, prompts, settings.get("seed"))
    out.parent.mkdir(parents=True, exist_ok=True)
    # the prompt under the first image of each prompt's run of n samples
    save_captioned_grid(images.cpu(), [(c or "(unconditional)") if i % n == 0 else "" for i, c in enumerate(conds)],
                        out, nrow=min(n, 16))
    print(f"{len(conds)} samples in {dt:.1f}s ({ck.kind}, {ck.weights} weights, {settings}) -> {out}")
    return out


main = _config.tool_main("sample", sample)

if __name__ == "__main__":
    main()
