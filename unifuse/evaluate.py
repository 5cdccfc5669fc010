"""``python -m unifuse.evaluate ckpt=<path> [n=256 extractor=domain cfg_scale=3 steps=8 seed=0 ...]``

Loads any paradigm's checkpoint (vqvae: reconstruction FID + PSNR/SSIM; ar_gpt / maskgit:
text-to-image FID/KID from the reference split's captions), computes the metrics with the
protocol stored in the checkpoint by the training run (overridable here), and writes a JSON result
next to the checkpoint. ``python -m unifuse.evaluate build-extractor shards=<train shards> out=<file>``
trains the domain feature extractor.

Options (key=value): ckpt, n, extractor (domain|inception), domain_weights, inception_weights,
reference (image shards), reference_name, seed, batch_size, cfg_scale ('none': no guidance), cfg_schedule, steps,
temperature, top_k, top_p, tokenizer, out, device.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch

from unifuse.cli import parse_kv
from unifuse.eval.fidelity import EvalConfig, evaluate_generator, evaluate_tokenizer, metric_name, protocol_parts


def _parse(argv: list[str]) -> dict:
    return parse_kv(argv, __doc__)


def _value(v: str):
    if v.lower() in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def evaluate_checkpoint(ckpt_path: str | Path, **opts) -> dict:
    ckpt_path = Path(ckpt_path)
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    meta = ck.get("unifuse") or {}
    kind = meta.get("kind")
    stored = dict(ck.get("unifuse_eval") or {})
    names = {f.name for f in fields(EvalConfig)}
    cfg = EvalConfig(**{**stored, **{k: v for k, v in opts.items() if k in names}})
    if cfg.reference is None:
        raise SystemExit("no reference set: pass reference=<image shards of the val split>")
    device = opts.get("device", "cpu")
    if kind == "vqvae":
        from unifuse.models.vqvae import load_vqvae

        result = evaluate_tokenizer(load_vqvae(ckpt_path, device).to(device), cfg)
    elif kind in ("ar_gpt", "maskgit"):
        from unifuse.models.vqvae import load_vqvae
        from unifuse.sample import load_generator, merge_sampling

        net, meta = load_generator(ckpt_path, device)
        tok = load_vqvae(opts.get("tokenizer") or meta["config"]["tokenizer_ckpt"], device).to(device)
        # cast like the sampling CLI: cfg_scale=3 names its metric cfg3.0, as training does
        sampling = merge_sampling(dict(meta["config"].get("sampling") or {}), opts, kind)
        result = evaluate_generator(net.to(device), tok, cfg, sampling)
    else:
        raise SystemExit(f"{ckpt_path}: unknown checkpoint kind {kind!r}")
    result = {"checkpoint": str(ckpt_path), "kind": kind, "epoch": ck.get("epoch"), "step": ck.get("global_step"),
              "eval_config": asdict(cfg), **result,
              "metric_names": {k: metric_name(k, result["protocol"]) for k in result["metrics"]}}
    slug = "_".join(protocol_parts(result["protocol"]))
    out = Path(opts.get("out") or ckpt_path.parent / f"eval_{ckpt_path.stem}_{slug}.json")
    out.write_text(json.dumps(result, indent=2))
    result["json"] = str(out)
    return result


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "build-extractor":
        from unifuse.eval.extractors import train_domain_extractor

        o = _parse(argv[1:])
        if "shards" not in o or "out" not in o:
            raise SystemExit("build-extractor needs shards=<train image shards> out=<file.pt>")
        info = train_domain_extractor(o["shards"], o["out"], epochs=int(o.get("epochs", 6)))
        print(json.dumps(info))
        return info
    o = {k: _value(v) if k not in ("ckpt", "out", "tokenizer", "reference", "domain_weights",
                                   "inception_weights", "reference_name", "device", "extractor") else v
         for k, v in _parse(argv).items()}
    if "ckpt" not in o:
        raise SystemExit(f"ckpt=<path> is required\n\n{__doc__}")
    result = evaluate_checkpoint(o.pop("ckpt"), **o)
    print(json.dumps({k: result[k] for k in ("metrics", "protocol", "json")}, indent=2))
    return result


if __name__ == "__main__":
    main()
