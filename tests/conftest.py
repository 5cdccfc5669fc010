"""Shared fixtures: a tiny real emoji dataset (built once per session) and Hydra-composed configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from unifuse.config import CONF_DIR

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def tiny_emoji(tmp_path_factory) -> Path:
    """~160 real emoji at 16x16 (both styles), 20% held out as val."""
    from unifuse.data.builders import build_emoji

    out = tmp_path_factory.mktemp("emoji16")
    build_emoji(out, size=16, limit=80, val_percent=20.0, shard_size=40)
    return out


def write_uneven_shards(out: Path, sizes=(40, 47, 54), n_val: int = 16, size: int = 16) -> Path:
    """A user's own shards as they often are: training shards of unequal lengths (``sizes``) in
    ``out/train``, ``n_val`` samples in ``out/val``; captioned ``size``-pixel images of a coloured box on
    a coloured ground, every one different. Written with the project's shard writer."""
    import io

    import numpy as np
    from PIL import Image

    from unifuse.data.writer import ShardWriter

    rng = np.random.default_rng(0)

    def sample(i: int) -> dict:
        img = np.empty((size, size, 3), np.uint8)
        img[:] = rng.integers(0, 256, 3)
        y, x = rng.integers(0, size // 2, 2)
        img[y:y + size // 2, x:x + size // 2] = rng.integers(0, 256, 3)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        return {"png": buf.getvalue(), "txt": f"a box, picture {i}"}

    start = 0
    for part, n in enumerate(sizes):  # one writer per shard: each closes its shard at its own length
        with ShardWriter(out / "train", prefix=f"part{part}") as w:
            for i in range(start, start + n):
                w.write(f"img{i:04d}", sample(i))
        start += n
    with ShardWriter(out / "val", prefix="val") as w:
        for i in range(start, start + n_val):
            w.write(f"img{i:04d}", sample(i))
    return out


@pytest.fixture(scope="session")
def uneven_shards(tmp_path_factory) -> Path:
    """Shards of 40, 47 and 54 training images and 16 validation ones (``write_uneven_shards``)."""
    return write_uneven_shards(tmp_path_factory.mktemp("uneven"))


def compose_cfg(overrides: list[str], out_dir: Path, data_dir: Path | None = None) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
        cfg.paths.log_dir = str(out_dir)
        if data_dir is not None:
            cfg.paths.data_dir = str(data_dir)
    GlobalHydra.instance().clear()
    return cfg


def tiny_data_overrides(data_dir: Path) -> list[str]:
    """The tiny emoji set at 16x16, batch 8, in-process loading, no progress bar."""
    return [
        f"paths.data_dir={data_dir.parent}",
        f"data.train.emoji.shards={data_dir}/train",
        f"data.val={data_dir}/val",
        "data.build=null",
        f"data.image_root={data_dir}",
        "eval.n=32",
        "data.decode.image_size=16",
        "data.collator.batch_size=8",
        "data.num_workers=0",
        "callbacks.progress=null",
    ]


def tiny_overrides(data_dir: Path) -> list[str]:
    """Shrink the default VQ-VAE + emoji config to something that trains in seconds."""
    return tiny_data_overrides(data_dir) + [
        "model.net.autoencoder.channels=8",
        "model.net.autoencoder.ch_mult=[1,2]",
        "model.net.autoencoder.z_channels=8",
        "model.net.quantizer.codebook_size=32",
    ]


def python_cmd() -> list[str]:
    return [sys.executable, "-m", "unifuse.train"]


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_emoji, tmp_path_factory) -> Path:
    """A VQ-VAE checkpoint trained for a few steps on the tiny emoji set (32 codes, 8x8 grid)."""
    from unifuse.train import train

    out = tmp_path_factory.mktemp("tok_run")
    cfg = compose_cfg(tiny_overrides(tiny_emoji) + ["trainer=debug_limit", "logger=none", "trainer.max_epochs=1"],
                      out)
    return Path(train(cfg)["checkpoint"])


def kl_overrides(data_dir: Path) -> list[str]:
    """The tiny overrides for model=kl_autoencoder (4 latent channels at 8x8 for 16x16 images)."""
    over = [o for o in tiny_overrides(data_dir) if "quantizer" not in o]
    return ["model=kl_autoencoder", *over, "model.net.latent_channels=4", "model.latent_stats_images=32"]


@pytest.fixture(scope="session")
def tiny_kl(tiny_emoji, tmp_path_factory) -> Path:
    """A KL autoencoder checkpoint trained for a few steps on the tiny emoji set (with latent stats)."""
    from unifuse.train import train

    out = tmp_path_factory.mktemp("kl_run")
    cfg = compose_cfg(kl_overrides(tiny_emoji) + ["trainer=debug_limit", "logger=none", "trainer.max_epochs=2",
                                                  "callbacks.fidelity.enabled=false"], out)
    return Path(train(cfg)["checkpoint"])


def ldm_overrides(data_dir: Path, kl: Path) -> list[str]:
    """A tiny DDPM-transport DiT (the samplers most tests exercise; the flow test switches it)."""
    return ["model=ldm", *tiny_data_overrides(data_dir), f"model.tokenizer_ckpt={kl}", "model.net.dit.dim=32",
            "model.net.dit.n_layers=2", "model.net.dit.n_heads=2", "model.net.dit.text_dim=32",
            "model.net.dit.text_layers=1", "model.net.dit.max_text_len=24", "model.net.dit.patch_size=2",
            "model.net.dit.diffusion.transport=ddpm", "model.sampling.sampler=ddim", "model.sampling.steps=4",
            "model.sample_prompts=[twemoji dog face,openmoji pizza]"]


@pytest.fixture(scope="session")
def tiny_codes(tiny_emoji, tiny_tokenizer, tmp_path_factory) -> Path:
    from unifuse.data.encode import encode_shards

    out = tmp_path_factory.mktemp("codes")
    encode_shards(tiny_tokenizer, tiny_emoji, out, batch_size=32)
    return out


def generator_overrides(model: str, codes: Path, tokenizer: Path) -> list[str]:
    return [
        f"model={model}",
        "data=emoji_codes",
        f"data.train.emoji.shards={codes}/train",
        f"data.val={codes}/val",
        "data.build=null",
        "callbacks.fidelity.enabled=false",
        "data.decode.image_size=16",
        "data.collator.batch_size=8",
        "data.num_workers=0",
        f"model.tokenizer_ckpt={tokenizer}",
        "model.net.vocab.image_codes=32",
        "model.net.grid=8",
        "model.net.max_text_len=24",
        "model.net.transformer.dim=32",
        "model.net.transformer.n_layers=2",
        "model.net.transformer.n_heads=2",
        "model.sample_prompts=[twemoji dog face,openmoji pizza]",
        "callbacks.progress=null",
    ]


@pytest.fixture(scope="session")
def domain_weights(tiny_emoji) -> Path:
    """The domain feature extractor of the tiny emoji set, where the training config looks for it
    (``<data.image_root>/domain_extractor.pt``)."""
    from unifuse.eval.extractors import train_domain_extractor

    out = tiny_emoji / "domain_extractor.pt"
    if not out.is_file():
        info = train_domain_extractor(str(tiny_emoji / "train"), out, epochs=6)
        assert info["classes"] >= 2 and info["train_accuracy"] > 0.3
    return out


def packed(m, codes, conds: list, seq_len: int, rows: int | None = None, **kw) -> dict:
    """The collator's batch for these (codes, caption) documents, packed in order."""
    from unifuse.data.collate import PackingCollator
    from unifuse.data.samples import Sample

    col = PackingCollator(rows or len(conds), seq_len, vocab=m.vocab, tokenizer=m.text_tokenizer,
                          max_text_len=m.max_text_len, **kw)
    for i, (c, cap) in enumerate(zip(codes, conds)):
        assert col.add(Sample(str(i), "", text=cap, codes=c.numpy() if hasattr(c, "numpy") else c)) is None
    return col.pop()
