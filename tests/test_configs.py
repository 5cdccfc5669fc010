"""Every preset and every group option composes; typos fail at compose time with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from unifuse.config import CONF_DIR

GROUPS = ["data", "model", "trainer", "logger", "callbacks", "paths", "hydra", "eval"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _compose(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_presets_compose(experiment):
    cfg = _compose([f"experiment={experiment}"])
    assert cfg.task_name == experiment
    assert cfg.model._target_ and cfg.data._target_ and cfg.trainer._target_


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_group_options_compose(group, option):
    cfg = _compose([f"{group}={option}"])
    OmegaConf.to_container(cfg.model)  # model nodes are fully typed and valid


def test_h100_preset_is_sized_for_gpus():
    cfg = _compose(["experiment=vqvae_emoji_h100"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 8
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.strategy == "ddp"


def test_misspelled_architecture_key_fails_at_compose(tmp_path: Path):
    with pytest.raises(ConfigCompositionException, match="chanels"):
        _compose(["model.net.autoencoder.chanels=3"])
    # a typo inside a preset file is caught by the typed schema, naming the key
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo.yaml").write_text(
        "# @package _global_\nmodel:\n  net:\n    quantizer:\n      codebook_sise: 64\n")
    with pytest.raises(ConfigCompositionException) as e:
        _compose([f"hydra.searchpath=[file://{tmp_path}]", "experiment=typo"])
    assert "codebook_sise" in str(e.value) + str(e.value.__cause__)


def test_wrong_type_fails_at_compose():
    with pytest.raises(ConfigCompositionException, match="codebook_size"):
        _compose(["model.net.quantizer.codebook_size=lots"])


def test_run_dirs_do_not_collide_and_torchrun_ranks_agree(monkeypatch):
    import unifuse.config as c

    monkeypatch.setattr(c, "_RUN_ID", None)
    a = c.run_id()
    monkeypatch.setattr(c, "_RUN_ID", None)
    b = c.run_id()
    assert a != b  # same second, different runs
    for rank in range(2):  # two torchrun ranks: same parent, same rendezvous id -> same dir
        monkeypatch.setattr(c, "_RUN_ID", None)
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
        monkeypatch.setenv("RANK", str(rank))
        ids = c.run_id()
        if rank == 0:
            first = ids
    assert ids == first and "torchrun_" in ids


def test_slurm_launcher_composes_from_the_trainer():
    cfg = _compose(["hydra/launcher=slurm", "experiment=vqvae_emoji_h100"])
    launcher = cfg.hydra.launcher
    assert "submitit" in launcher._target_.lower()
    assert launcher.tasks_per_node == 8 and launcher.gpus_per_node == 8 and launcher.nodes == 1


def test_code_shards_are_kept_per_tokenizer(tmp_path: Path):
    """Codes live in a directory tagged by their tokenizer checkpoint: another checkpoint, or the same
    file rewritten (a resumed run), gets a fresh directory instead of clashing with old codes."""
    import os

    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    a.write_bytes(b"a")
    b.write_bytes(b"b")

    def build_dir(ckpt: Path) -> str:
        cfg = _compose(["experiment=ar_emoji", f"model.tokenizer_ckpt={ckpt}", f"paths.data_dir={tmp_path}"])
        d = cfg.data.build_dir
        assert cfg.data.train.emoji.shards == f"{d}/train" and cfg.data.val == f"{d}/val"
        return d

    first = build_dir(a)
    assert first.startswith(f"{tmp_path}/emoji32_codes/") and build_dir(a) == first
    assert build_dir(b) != first
    os.utime(a, ns=(1, 1))
    assert build_dir(a) != first
