"""``python -m unifuse.sample ckpt=<path> prompt="dog face|red heart" n=16 [cfg_scale=3 steps=8 ...]``

A Hydra app (``conf/sample.yaml``, typed by ``unifuse.config.SampleApp``): loads any generator
checkpoint or export directory through the checkpoint registry (weights-only, no Lightning), samples
``n`` images per prompt, decodes them with the image tokenizer the checkpoint carries (or
``tokenizer=<checkpoint>``), writes a PNG grid (one row per prompt when n <= 16, the prompt under
its first image) and prints its path.

Sampling settings (cfg_scale, cfg_schedule, temperature, top_k, top_p, steps, seed) default to the
ones the training run stored; ``cfg_scale=null`` samples without guidance. A prompt is required:
``prompt='' uncond=true`` asks for unconditional samples explicitly. ``--cfg job`` prints the
config; ``-m`` sweeps (e.g. ``-m cfg_scale=1,3``) write one grid per job.
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig

from unifuse import config as _config
from unifuse.config import SamplingOverrides, given


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
    run = ckpt_path if ckpt_path.is_dir() else ckpt_path.parent.parent
    slug = "_".join(p.replace(" ", "-") or "uncond" for p in prompts)[:80]
    return run / "samples" / f"{kind}_{slug}_s{seed}.png"


def sample(cfg: DictConfig) -> Path:
    import torch

    from unifuse.checkpoint import load_pipeline
    from unifuse.viz import save_captioned_grid

    prompts = parse_prompts(cfg.prompt, cfg.uncond)
    pipe, ck = load_pipeline(cfg.ckpt, cfg.tokenizer, cfg.device)
    overrides = given(cfg, SamplingOverrides)
    settings = pipe.settings(**overrides)
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
    print(f"{len(conds)} samples in {dt:.1f}s ({ck.kind}, {settings}) -> {out}")
    return out


main = _config.tool_main("sample", sample)

if __name__ == "__main__":
    main()
