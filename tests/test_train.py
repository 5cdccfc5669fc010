"""The training app end to end on tiny real data (in-process, Hydra-composed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.conftest import compose_cfg, tiny_overrides
from unifuse.train import train


def test_fast_dev_run_vqvae(tiny_emoji, tmp_path):
    cfg = compose_cfg(tiny_overrides(tiny_emoji) + ["trainer=debug", "logger=none"], tmp_path)
    result = train(cfg)
    assert result["metrics"]["train/loss"] > 0
    assert any(Path(p).is_file() for p in result["images"])


def test_short_run_with_wandb_offline_logs_images_usage_and_checkpoint(tiny_emoji, tmp_path):
    cfg = compose_cfg(tiny_overrides(tiny_emoji) + ["trainer=debug_limit", "logger=wandb", "trainer.max_epochs=2"],
                      tmp_path)
    result = train(cfg)
    import wandb

    wandb.finish()
    m = result["metrics"]
    assert 0 < m["train/codebook_usage"] <= 1 and m["val/codebook_perplexity"] >= 1
    assert "val/psnr" in m and "val/ssim" in m
    images = sorted((tmp_path / "images").glob("reconstructions_*.png"))
    assert len(images) == 2
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = list(runs[0].rglob("*.png"))
    assert media, "reconstruction grid not logged to W&B"
    summary = list(runs[0].rglob("*.wandb"))
    assert summary
    ckpt = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["unifuse"]["kind"] == "vqvae"


def test_throughput_mfu_and_memory_are_logged(tiny_emoji, tmp_path):
    over = tiny_overrides(tiny_emoji) + ["trainer=debug_limit", "trainer.max_epochs=1", "logger=csv",
                                         "callbacks.throughput.log_every_n_steps=1", "callbacks.fidelity=null"]
    m = train(compose_cfg(over, tmp_path))["metrics"]
    assert m["perf/samples_per_s"] > 0 and m["perf/peak_memory_gb"] > 0.05
    assert 0 < m["perf/mfu"] < 1.0  # FLOPs counted by torch against a GEMM measured on this CPU


def test_csv_logger_and_resume(tiny_emoji, tmp_path):
    over = tiny_overrides(tiny_emoji) + ["trainer=debug_limit", "logger=csv", "trainer.max_epochs=1"]
    first = train(compose_cfg(over, tmp_path / "a"))
    metrics = list((tmp_path / "a" / "csv").rglob("metrics.csv"))
    assert metrics and "train/codebook_usage" in metrics[0].read_text()
    second = train(compose_cfg(over + ["trainer.max_epochs=2", f"ckpt_path={first['checkpoint']}"], tmp_path / "b"))
    ck = torch.load(second["checkpoint"], map_location="cpu", weights_only=True)
    assert ck["epoch"] == 1 and ck["global_step"] == 6  # continued from epoch 1, not restarted


def test_tokenizer_loads_without_lightning(tiny_emoji, tmp_path):
    from unifuse.models.vqvae import load_vqvae

    cfg = compose_cfg(tiny_overrides(tiny_emoji) + ["trainer=debug_limit", "logger=none", "trainer.max_epochs=1"],
                      tmp_path)
    result = train(cfg)
    net = load_vqvae(result["checkpoint"])
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    idx = net.encode(x)
    assert idx.shape == (2, 8, 8) and idx.dtype == torch.long and int(idx.max()) < net.codebook_size
    img = net.decode(idx)
    assert img.shape == (2, 3, 16, 16)
    # same weights as in the Lightning checkpoint
    sd = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    torch.testing.assert_close(net.quantizer.embedding, sd["net.quantizer.embedding"])
    json.dumps(torch.load(result["checkpoint"], weights_only=True)["unifuse"])  # plain data only


def test_resume_continues_the_same_wandb_run(tiny_emoji, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    over = tiny_overrides(tiny_emoji) + ["trainer=debug_limit", "logger=wandb", "trainer.max_epochs=1",
                                         "task_name=wbtest"]
    first = train(compose_cfg(over, tmp_path / "a"))
    wandb.finish()  # as the app does at the end of every run
    rec = json.loads((tmp_path / "a" / "wandb_run.json").read_text())
    assert rec["name"].startswith("wbtest/") and len(rec["id"]) == 8
    second = train(compose_cfg(over + ["trainer.max_epochs=2", f"ckpt_path={first['checkpoint']}"], tmp_path / "b"))
    wandb.finish()
    assert json.loads((tmp_path / "b" / "wandb_run.json").read_text()) == rec
    runs = [p.name for d in ("a", "b") for p in (tmp_path / d / "wandb").glob("offline-run-*")]
    assert len(runs) == 2 and all(r.endswith(f"-{rec['id']}") for r in runs)  # one W&B run, resumed
    fresh = train(compose_cfg(over, tmp_path / "c"))  # a new run gets a new W&B run
    wandb.finish()
    assert json.loads((tmp_path / "c" / "wandb_run.json").read_text())["id"] != rec["id"]
    assert second["checkpoint"] and fresh["checkpoint"]


def test_wandb_login_credentials_switch_to_online(tmp_path, monkeypatch):
    from unifuse.config import wandb_offline

    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.org login me password x\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_offline()  # no W&B credentials: offline
    netrc.write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    assert not wandb_offline()  # what `wandb login` writes
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_offline()  # an explicit offline wins
