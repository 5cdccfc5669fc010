"""``python -m unifuse.evaluate ckpt=<path> [n=256 extractor=domain cfg_scale=3 steps=8 seed=0 ...]``

A Hydra app (``conf/evaluate.yaml``, typed by ``unifuse.config.EvaluateApp``; a misspelled key fails
naming it). Loads any checkpoint kind through ``unifuse.run.checkpoint`` and evaluates it as its
paradigm says (``unifuse.paradigms``): autoencoders get reconstruction FID + PSNR/SSIM, generators
text-to-image FID/KID from the reference split's captions. A paradigm defined outside unifuse
needs its module: ``plugins=[<module>]``. The protocol and sampling settings stored by the training
run are the defaults, so the logged online number is reproduced; any field can be overridden. The
result is a JSON next to the checkpoint (or ``out=``), named by its protocol.

Sweeps: ``python -m unifuse.evaluate -m ckpt=... cfg_scale=1,1.5,3`` runs one job per value, each
writing its JSON, and ends with a summary table (``summary.md``, ``summary.csv`` in the sweep dir).

``python -m unifuse.evaluate build-extractor shards=<train shards> out=<file.pt> [epochs=6]`` trains
the domain feature extractor.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from unifuse import config as _config
from unifuse import paradigms
from unifuse.config import SamplingOverrides, given
from unifuse.eval.extractors import train_domain_extractor
from unifuse.eval.fidelity import metric_name, protocol_parts
from unifuse.eval.protocol import EvalConfig
from unifuse.run.checkpoint import load_net, load_pipeline, read_checkpoint
from unifuse.run.sharded import is_sharded


def evaluate_checkpoint(ckpt_path: str | Path, tokenizer: str | None = None, device: str = "cpu",
                        out: str | None = None, **overrides) -> dict:
    """Evaluate one checkpoint: ``overrides`` are EvalConfig fields and sampling settings."""
    unknown = set(overrides) - {f.name for f in fields(EvalConfig)} - {f.name for f in fields(SamplingOverrides)}
    if unknown:
        raise ValueError(f"unknown evaluation settings: {sorted(unknown)}")
    ck = read_checkpoint(ckpt_path, device, overrides.get("weights"))  # ema | raw; default: the run's choice
    names = {f.name for f in fields(EvalConfig)}
    cfg = EvalConfig(**{**{k: v for k, v in ck.eval.items() if k in names},
                        **{k: v for k, v in overrides.items() if k in names}, "weights": ck.weights})
    if cfg.reference is None:
        raise ValueError("no reference set: pass reference=<image shards of the val split>")
    sampling = {k: v for k, v in overrides.items() if k in {f.name for f in fields(SamplingOverrides)}}
    result = paradigms.get(ck.kind).evaluate(lambda: load_net(ck, device),
                                             lambda: load_pipeline(ck.path, tokenizer, device, ck.weights)[0],
                                             cfg, ck.weights, **sampling)
    result = {"checkpoint": str(ck.path), "kind": ck.kind, "epoch": ck.epoch, "step": ck.step,
              "eval_config": asdict(cfg), **result,
              "metric_names": {k: metric_name(k, result["protocol"]) for k in result["metrics"]}}
    slug = "_".join(protocol_parts(result["protocol"]))
    base = ck.path if ck.path.is_dir() and not is_sharded(ck.path) else ck.path.parent  # beside a .ckpt or shards
    path = Path(out) if out else base / f"eval_{ck.path.stem}_{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    result["json"] = str(path)
    return result


def run(cfg: DictConfig) -> dict:
    opts = {**given(cfg, _config.EvaluateApp)}
    ckpt = opts.pop("ckpt", None)
    if ckpt is None:
        raise ValueError("ckpt=<checkpoint or export directory> is required")
    for key in ("tokenizer", "device", "out", "plugins"):
        opts.pop(key, None)
    result = evaluate_checkpoint(ckpt, tokenizer=cfg.tokenizer, device=cfg.device, out=cfg.out, **opts)
    print(json.dumps({k: result[k] for k in ("metrics", "protocol", "json")}, indent=2))
    _record_sweep_job(result)
    return result


def _record_sweep_job(result: dict) -> None:
    """In a sweep, each job also leaves its result in its own directory for the summary table."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "result.json").write_text(json.dumps({**result, "overrides": list(hc.overrides.task)}, indent=2))


def summary_table(sweep_dir: str | Path) -> list[dict]:
    """One row per sweep job: its overrides, the protocol its metrics were measured under (what
    follows ``@`` in their names: extractor, n, weights, sampler, guidance ...) and the metrics.
    A row's numbers compare with another's only where the protocols match."""
    rows = []
    jobs = sorted(Path(sweep_dir).glob("*/result.json"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit()
                  else 1 << 30)
    for path in jobs:
        r = json.loads(path.read_text())
        names = [r["metric_names"].get(k, k) for k in r["metrics"]]
        protocols = dict.fromkeys(n.split("@", 1)[1] for n in names if "@" in n)
        row = {"job": path.parent.name, "overrides": " ".join(r.get("overrides", [])),
               "protocol": " ".join(protocols)}
        row.update({k: round(v, 4) for k, v in r["metrics"].items()})
        row["json"] = r["json"]
        rows.append(row)
    return rows


def write_summary(sweep_dir: str | Path) -> Path | None:
    rows = summary_table(sweep_dir)
    if not rows:
        return None
    cols = list(dict.fromkeys(k for r in rows for k in r if k != "json")) + ["json"]
    sweep_dir = Path(sweep_dir)
    with (sweep_dir / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    shown = [c for c in cols if c != "json"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in shown) + " |" for r in rows]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"summary: {sweep_dir / 'summary.md'} and summary.csv")
    return sweep_dir / "summary.md"


class SweepSummary(Callback):
    """Hydra callback: after a ``-m`` sweep, the table of every job's metrics."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        write_summary(config.hydra.sweep.dir)


def build_extractor(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m unifuse.evaluate build-extractor")
    p.add_argument("--shards", required=True, help="labelled training image shards")
    p.add_argument("--out", required=True, help="weights file to write (.pt)")
    p.add_argument("--epochs", type=int, default=6)
    args = [x for a in argv for x in (("--" + a.split("=", 1)[0], a.split("=", 1)[1]) if "=" in a
                                      and not a.startswith("-") else (a,))]
    a = p.parse_args(args)
    info = train_domain_extractor(a.shards, a.out, epochs=a.epochs)
    print(json.dumps(info))
    return info


_main = _config.tool_main("evaluate", run)


def main(argv: list[str] | None = None) -> dict | None:
    """The CLI (``build-extractor`` is its own argparse command); with ``argv`` (a list of overrides)
    evaluates in-process and returns the result (tests, notebooks)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] == "build-extractor":
        return build_extractor(args[1:])
    return _main(argv)


if __name__ == "__main__":
    main()
