"""``python -m unifuse.sample ckpt=<path> prompt="dog face" n=16 [cfg_scale=3 steps=8 ...]``

Loads an ar_gpt or maskgit checkpoint (weights-only, no Lightning), samples ``n`` images per
prompt (several prompts: ``prompt="dog face|red heart"``), decodes them with the tokenizer stored
in the checkpoint (or ``tokenizer=<vqvae ckpt>``), writes a PNG grid (one row per prompt when n <= 16,
the prompt written under its first image) and prints its path.

Options (key=value): ckpt, prompt, n (16), out (next to the checkpoint), tokenizer, device, and the
sampling settings cfg_scale ('none' for no guidance), cfg_schedule (constant|linear), temperature,
top_k, top_p, steps (MaskGIT), seed. Sampling settings default to the ones the training run used
(``model.sampling``, stored in the checkpoint), else cfg_scale 3.0, temperature 1.0, steps 8, seed 0.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from unifuse.cli import parse_kv
from unifuse.models.image_gpt import ImageGPT
from unifuse.models.maskgit import MaskGIT
from unifuse.models.transformer import TransformerConfig
from unifuse.models.vqvae import load_vqvae
from unifuse.text.tokenizer import load_tokenizer
from unifuse.text.vocab import VocabLayout
from unifuse.viz import save_captioned_grid

KINDS = {"ar_gpt": ImageGPT, "maskgit": MaskGIT}


def load_generator(path: str | Path, map_location="cpu"):
    """(generator net, checkpoint meta) from a unifuse ar_gpt/maskgit checkpoint."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    meta = ckpt.get("unifuse") or {}
    if meta.get("kind") not in KINDS:
        raise ValueError(f"{path} is not an ar_gpt or maskgit checkpoint (kind={meta.get('kind')!r})")
    c = meta["config"]
    net = KINDS[meta["kind"]](TransformerConfig(**c["transformer"]), VocabLayout.from_dict(c["vocab"]),
                              grid=c["grid"], max_text_len=c["max_text_len"],
                              text_tokenizer=load_tokenizer(c.get("text_tokenizer")))
    net.load_state_dict({k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")})
    return net.eval(), meta


def _parse(argv: list[str]) -> dict:
    return parse_kv(argv, __doc__)


def _num(v, cast=float):
    if v is None or (isinstance(v, str) and v.lower() in ("none", "null", "")):
        return None
    return cast(v)


SAMPLING_CASTS = {"cfg_scale": _num, "cfg_schedule": str, "temperature": float, "top_k": lambda v: _num(v, int),
                  "top_p": _num, "seed": int, "steps": int}


def merge_sampling(stored: dict, opts: dict, kind: str) -> dict:
    """Sampling settings: ``stored`` (the checkpoint's ``model.sampling``) overridden by the sampling
    keys of ``opts`` (command-line strings or values), cast to their types; the AR GPT has no steps."""
    kw = dict(stored)
    for k, cast in SAMPLING_CASTS.items():
        if k in opts:
            kw[k] = cast(opts[k])
    if kind != "maskgit":
        kw.pop("steps", None)
    return kw


def sampling_options(o: dict, meta: dict) -> dict:
    """generate() keywords for the CLI: the checkpoint's stored sampling settings (else cfg 3.0,
    temperature 1.0, seed 0, MaskGIT steps 8), overridden by the command line."""
    stored = {"cfg_scale": 3.0, "temperature": 1.0, "seed": 0, **(meta["config"].get("sampling") or {})}
    kw = merge_sampling(stored, o, meta["kind"])
    if meta["kind"] == "maskgit":
        kw.setdefault("steps", 8)
    return {**kw, "progress": True}


def main(argv: list[str] | None = None) -> Path:
    o = _parse(sys.argv[1:] if argv is None else argv)
    if "ckpt" not in o:
        raise SystemExit(f"ckpt=<path> is required\n\n{__doc__}")
    device = o.get("device", "cpu")
    net, meta = load_generator(o["ckpt"], device)
    net.to(device)
    tok_path = o.get("tokenizer") or meta["config"].get("tokenizer_ckpt")
    if not tok_path:
        raise SystemExit("the checkpoint names no tokenizer: pass tokenizer=<vqvae checkpoint>")
    tokenizer = load_vqvae(tok_path, device).to(device)
    cond = meta["config"].get("cond", "text")
    prompts = [p.strip() for p in o.get("prompt", "").split("|")]
    if cond == "class":
        prompts = [int(p) for p in prompts]
    n = int(o.get("n", 16))
    conds = [p for p in prompts for _ in range(n)]
    kw = sampling_options(o, meta)
    t = time.perf_counter()
    codes = net.generate(conds, **kw)
    images = (tokenizer.decode(codes).clamp(-1, 1) + 1) / 2
    dt = time.perf_counter() - t
    out = Path(o.get("out") or Path(o["ckpt"]).parent.parent / "samples" /
               f"{meta['kind']}_{'_'.join(str(p).replace(' ', '-') for p in prompts)[:80]}_s{kw['seed']}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    nrow = min(n, 16)
    # the prompt under the first image of each prompt's run of n samples
    save_captioned_grid(images, [str(c) if i % n == 0 else "" for i, c in enumerate(conds)], out, nrow=nrow)
    print(f"{len(conds)} samples in {dt:.1f}s -> {out}")
    return out


if __name__ == "__main__":
    main()
