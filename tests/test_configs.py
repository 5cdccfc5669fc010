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
def test_group_options_compose(group, option, tmp_path: Path):
    """The option is what got composed, its interpolations resolve and every ``_target_`` in it
    names something importable (a renamed class fails here, not at launch)."""
    from hydra.utils import get_object

    extra = []
    needs_tokenizer = {("model", "ar_gpt"), ("model", "maskgit"), ("model", "ldm"), ("model", "transfusion"),
                       ("data", "emoji_codes"), ("data", "emoji_latents"), ("data", "emoji_packed"),
                       ("data", "emoji_packed_pixels"), ("data", "emoji_packed_text")}
    if (group, option) in needs_tokenizer:
        (tmp_path / "tok.ckpt").write_bytes(b"x")  # generators and encoded shards name a tokenizer / autoencoder
        model = {"emoji_codes": ["model=ar_gpt"], "emoji_latents": ["model=ldm"],
                 "emoji_packed": ["model=transfusion"], "emoji_packed_pixels": ["model=transfusion"],
                 "emoji_packed_text": ["model=transfusion"]}.get(option, [])
        extra = [*model, f"model.tokenizer_ckpt={tmp_path / 'tok.ckpt'}"]
    cfg = _compose([f"{group}={option}", *extra])
    assert cfg.hydra.runtime.choices[group] == option
    node = cfg.hydra if group == "hydra" else cfg[group]
    if group != "hydra":
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(cfg)  # ${hydra:...} resolves as in a run
        OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
    targets = []

    def walk(n):
        if isinstance(n, dict):
            if isinstance(n.get("_target_"), str):
                targets.append(n["_target_"])
            for v in n.values():
                walk(v)
        elif isinstance(n, list):
            for v in n:
                walk(v)

    walk(OmegaConf.to_container(node, resolve=False))
    for t in targets:
        assert callable(get_object(t)), t


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


def test_run_dirs_do_not_collide(monkeypatch):
    import unifuse.config as c

    monkeypatch.delenv("UNIFUSE_RUN_ID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    ids = set()
    for _ in range(3):  # same second, different runs
        monkeypatch.setattr(c, "_RUN_ID", None)
        ids.add(c.run_id())
    assert len(ids) == 3


# An "elastic agent": starts two ranks as its children, the way torchrun does, and prints their ids.
_AGENT = """
import os, subprocess, sys
env = {k: v for k, v in os.environ.items() if k != "UNIFUSE_RUN_ID"}
env["TORCHELASTIC_RUN_ID"] = sys.argv[1]
code = "import unifuse.config as c; print(c.run_id())"
procs = [subprocess.Popen([sys.executable, "-c", code], env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                          text=True) for r in range(2)]
print(" ".join(p.communicate()[0].strip() for p in procs))
"""


def test_torchrun_ranks_agree_on_one_run_dir_and_launches_differ():
    """Two ranks (separate processes, one parent) get the same run id, with and without a rendezvous
    id; a second launch gets another."""
    import subprocess
    import sys

    def launch(rdzv: str) -> list[str]:
        out = subprocess.run([sys.executable, "-c", _AGENT, rdzv], capture_output=True, text=True, check=True)
        return out.stdout.split()

    a, b = launch("none"), launch("none")
    assert len(a) == 2 and a[0] == a[1] and "torchrun_" in a[0]
    assert b[0] == b[1] and b[0] != a[0]  # another agent process: another run
    c = launch("job42")
    assert c[0] == c[1] and c[0].endswith("torchrun_job42")


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


def test_callback_or_logger_entry_without_target_is_refused_before_anything_is_built():
    """The transfusion preset sets callbacks.ema fields that callbacks=fsdp (no EMA) does not define:
    what is left has no _target_ and reached Lightning as a plain dict (then 'Missing key
    on_exception'). Training refuses it first, naming the entry and the group option."""
    from hydra.core.hydra_config import HydraConfig

    from unifuse.config import ConfigError, require_targets
    from unifuse.train import train

    cfg = _compose(["experiment=transfusion_emoji", "trainer=fsdp", "callbacks=fsdp"])
    HydraConfig.instance().set_config(cfg)
    with pytest.raises(ConfigError, match=r"^callbacks\.ema has no _target_ \(it sets only decay, "
                                          r"update_starting_at_step\): .* callbacks=fsdp does not define; "
                                          r"pass callbacks\.ema=null"):
        train(cfg)  # before the data (whose autoencoder checkpoint does not exist here) is built
    require_targets(_compose(["experiment=transfusion_emoji", "trainer=fsdp", "callbacks=fsdp",
                              "callbacks.ema=null"]), "callbacks", "logger")  # the fix it names
    with pytest.raises(ConfigError, match=r"^logger\.csv has no _target_ \(it sets only save_dir\)"):
        require_targets(_compose(["logger=none", "+logger.csv.save_dir=x"]), "callbacks", "logger")
    with pytest.raises(ConfigError, match=r"^callbacks\.every has no _target_ \(it is 5, not a config\)"):
        require_targets(_compose(["+callbacks.every=5"]), "callbacks")
    for group in ("callbacks", "logger"):  # every shipped option has its targets
        for option in options(group):
            require_targets(_compose([f"{group}={option}"]), group)


# The Transfusion paper's Table 2 (layers, width, heads) for each preset of the ladder.
LADDER = {"transfusion_0.16b_h100": (16, 768, 12), "transfusion_0.37b_h100": (24, 1024, 16),
          "transfusion_0.76b_h100": (24, 1536, 24), "transfusion_1.4b_h100": (24, 2048, 16),
          "transfusion_7b_h100": (32, 4096, 32)}


def assert_papers_recipe(cfg) -> None:
    """The fields of a composed Transfusion config that the paper fixes (arXiv 2408.11039, sections 3
    and 4.1, footnote 6)."""
    net, model = cfg.model.net, cfg.model
    assert net.transformer.qk_norm is False
    img = net.image
    assert (img.time_embedding, img.time_conditioning, img.pos_emb_2d) == ("before", "input", False)
    assert (img.diffusion_weight, img.image_first_max_t) == (5.0, 0.5)
    d = img.diffusion
    assert (d.transport, d.schedule, d.prediction, d.steps) == ("ddpm", "cosine", "eps", 1000)
    assert (model.sampling.sampler, model.sampling.steps, model.sampling.cfg_scale) == ("ddpm", 250, 5.0)
    opt = model.optimizer
    assert opt._target_ == "torch.optim.AdamW" and (opt.lr, list(opt.betas), opt.eps) == (3e-4, [0.9, 0.95], 1e-8)
    assert model.weight_decay == 0.1 and opt.lr * model.scheduler.min_lr_ratio == pytest.approx(1.5e-5)


@pytest.mark.parametrize("preset", LADDER)
def test_the_size_ladder_is_the_papers_table_2_and_recipe(preset):
    cfg = _compose([f"experiment={preset}"])
    t = cfg.model.net.transformer
    assert (t.n_layers, t.dim, t.n_heads) == LADDER[preset]
    assert_papers_recipe(cfg)
    assert (cfg.model.net.image.patch_encoder, cfg.model.net.image.patch_size) == ("linear", 2)  # its section 4.2
    assert cfg.model.scheduler.warmup_steps == 4000 and cfg.trainer.max_steps == 250_000
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.trainer.precision == "bf16-mixed"


def test_model_transfusion_is_the_papers_recipe_and_the_emoji_preset_keeps_what_it_measured():
    assert_papers_recipe(_compose(["model=transfusion"]))
    e = _compose(["experiment=transfusion_emoji"])
    net, model = e.model.net, e.model
    assert net.transformer.qk_norm and net.image.pos_emb_2d and net.image.time_embedding == "after"
    assert (net.image.time_conditioning, net.image.patch_size, net.image.diffusion.transport) == ("adaln", 2, "flow")
    assert (model.sampling.sampler, model.sampling.steps, model.sampling.cfg_scale) == ("heun", 10, 3.0)
    assert (model.optimizer.lr, model.scheduler.warmup_steps, model.scheduler.min_lr_ratio) == (1e-3, 200, 0.1)


def test_cfg_job_of_the_0_76b_preset_prints_the_papers_heads_diffusion_and_warmup():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "unifuse.train", "experiment=transfusion_0.76b_h100", "--cfg", "job"],
                         capture_output=True, text=True, check=True, cwd=CONF_DIR.parent).stdout
    cfg = OmegaConf.create(out)
    assert cfg.model.net.transformer.n_heads == 24 and cfg.model.scheduler.warmup_steps == 4000
    d = cfg.model.net.image.diffusion
    assert (d.transport, d.prediction, d.schedule) == ("ddpm", "eps", "cosine")
