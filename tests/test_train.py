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
