"""A paradigm defined outside unifuse works through every CLI.

This file is the plugin: a tiny text-to-image net (a caption's mean byte embedding, through one
linear layer, to pixels), its LightningModule, its pipeline and one spec registered when the module
is imported. The test trains it with ``python -m unifuse.train plugins=[test_toy_paradigm] ...``
(the model config composed from overrides: the spec's schema from Hydra's ConfigStore and the
module by ``_target_``), then samples, evaluates and exports it with the other CLIs, each run as a
user runs it, in its own process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from unifuse.lit.generators import GeneratorModule
from unifuse.paradigms import TEXT_TO_IMAGE, Paradigm, register
from unifuse.pipelines.base import Pipeline

HERE = Path(__file__).resolve().parent
PLUGIN = Path(__file__).stem  # the module name the CLIs import (tests/ on PYTHONPATH)


@dataclass
class ToyConfig:
    _target_: str = f"{__name__}.ToyNet"  # the net's config is the spec's schema, instantiated as the net
    dim: int = 8
    image_size: int = 16


class ToyNet(nn.Module):
    """Caption -> image: the mean of its byte embeddings, one linear layer to pixels, tanh."""

    def __init__(self, dim: int = 8, image_size: int = 16):
        super().__init__()
        self.dim, self.image_size = dim, image_size
        self.embed = nn.Embedding(257, dim)  # bytes, and 256 for the empty (unconditional) caption
        self.out = nn.Linear(dim, 3 * image_size * image_size)

    def config(self) -> dict:
        return {"dim": self.dim, "image_size": self.image_size}

    @classmethod
    def from_config(cls, config: dict) -> ToyNet:
        return cls(**config)

    def forward(self, captions: list[str | None]) -> torch.Tensor:
        dev = self.embed.weight.device
        ids = [torch.tensor(list((c or "").encode())[:32] or [256], device=dev) for c in captions]
        h = torch.stack([self.embed(i).mean(0) for i in ids])
        return torch.tanh(self.out(h)).view(len(captions), 3, self.image_size, self.image_size)


class ToyModule(GeneratorModule):
    """Pixels regressed from captions (caption dropout from the generator base)."""

    def training_step(self, batch: dict, batch_idx: int):
        x = self.tokenizer.encode_latents(batch["image"])
        loss = F.mse_loss(self.net(self._conds(batch, self.p_uncond)), x)
        self.log("train/loss", loss, batch_size=len(x))
        return loss

    def validation_step(self, batch: dict, batch_idx: int):
        x = self.tokenizer.encode_latents(batch["image"])
        self.log("val/loss", F.mse_loss(self.net(self._conds(batch, 0.0)), x), batch_size=len(x))


class ToyPipeline(Pipeline):
    """Prompts -> pixels; the net draws nothing, so no sampling setting changes its images."""

    setting_names = ("seed",)

    @torch.no_grad()
    def generate(self, prompts: list, progress: bool = False, **overrides) -> torch.Tensor:
        self.settings(**overrides)  # an unknown setting is refused, as every pipeline refuses it
        return self.tokenizer.decode_latents(self.net(self.conditions(prompts))).clamp(-1, 1)


SPEC = register(Paradigm("toy", ToyNet, TEXT_TO_IMAGE, "unifuse.eval.fidelity:evaluate_generator", module=ToyModule,
                         pipeline=ToyPipeline, tokenizers=("identity",), schemas={"toy": ToyConfig}))


def cli(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)]), "UNIFUSE_ROOT": str(cwd),
           "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{module} {' '.join(args)}:\n{proc.stderr[-3000:]}"
    return proc


def toy_overrides(data_dir: Path, domain_weights: Path, out: Path) -> list[str]:
    return [
        f"plugins=[{PLUGIN}]", "~model", "+schema@model.net=toy", "model.net.dim=6",
        f"+model._target_={PLUGIN}.ToyModule", "+model.tokenizer_ckpt=identity",
        "+model.sample_prompts=[twemoji dog face]", "+model.sampling={seed: 0}",
        "+model.optimizer._target_=torch.optim.Adam", "+model.optimizer._partial_=true", "+model.optimizer.lr=0.01",
        f"data.train.emoji.shards={data_dir}/train", f"data.val={data_dir}/val", "data.build=null",
        f"data.image_root={data_dir}", "data.decode.image_size=16", "data.collator.batch_size=8",
        "data.num_workers=0", f"eval.domain_weights={domain_weights}", "eval.n=8", "eval.batch_size=8",
        "eval.cache_dir=null", "trainer=debug_limit", "trainer.max_epochs=1", "logger=csv",
        "callbacks.progress=null", "callbacks.memory_plan=null", f"hydra.run.dir={out}",
    ]


def test_a_paradigm_from_outside_trains_samples_evaluates_and_exports_through_the_clis(tiny_emoji, domain_weights,
                                                                                        tmp_path):
    run = tmp_path / "run"
    cli("unifuse.train", toy_overrides(tiny_emoji, domain_weights, run), tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    stored = torch.load(ckpt, weights_only=True)
    assert stored["unifuse"]["kind"] == "toy" and stored["unifuse"]["config"] == {"dim": 6, "image_size": 16}
    assert stored["unifuse"]["tokenizer"]["kind"] == "identity"
    # the CSV logger's metrics: the online FID of the toy's pipeline, from the FID callback
    header, *rows = next(run.rglob("metrics.csv")).read_text().splitlines()
    fid_col = [i for i, h in enumerate(header.split(",")) if h.startswith("eval/fid@domain-")]
    assert len(fid_col) == 1, header
    online = [float(r.split(",")[fid_col[0]]) for r in rows if r.split(",")[fid_col[0]]]

    grid = tmp_path / "grid.png"
    proc = cli("unifuse.sample", [f"plugins=[{PLUGIN}]", f"ckpt={ckpt}", "prompt=twemoji dog face|openmoji pizza",
                                  "n=2", f"out={grid}"], tmp_path)
    assert grid.is_file() and "4 samples" in proc.stdout and "(toy," in proc.stdout

    export = tmp_path / "export"
    cli("unifuse.export", [f"plugins=[{PLUGIN}]", f"ckpt={ckpt}", f"out={export}"], tmp_path)
    assert json.loads((export / "config.json").read_text())["kind"] == "toy"

    result = tmp_path / "eval.json"  # the export holds the weights the online evaluation used (the EMA's)
    cli("unifuse.evaluate", [f"plugins=[{PLUGIN}]", f"ckpt={export}", f"out={result}"], tmp_path)
    offline = json.loads(result.read_text())
    assert offline["kind"] == "toy" and offline["protocol"]["sampler"] == "toy" and offline["protocol"]["n"] == 8
    assert offline["metrics"]["fid"] == pytest.approx(online[-1], rel=1e-4)  # one evaluation, online and offline


def test_without_the_plugin_a_toy_checkpoint_fails_naming_the_setting(tmp_path):
    ckpt = tmp_path / "toy.ckpt"
    net = ToyNet(dim=4)
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "unifuse": {"kind": "hidden_toy", "config": net.config()}}, ckpt)
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run([sys.executable, "-m", "unifuse.export", f"ckpt={ckpt}", f"out={tmp_path / 'x'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "unknown checkpoint kind 'hidden_toy'" in last and "plugins=[" in last
    assert not (tmp_path / "x").exists()
