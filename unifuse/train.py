"""``python -m unifuse.train [overrides]``: compose conf/train.yaml, build everything with
``hydra.utils.instantiate``, fit, and always close the W&B run.

Multirun with several processes per job (``-m ... trainer=ddp``): Lightning's DDP launcher
re-runs ``sys.argv`` for the extra ranks, which in a sweep is the whole ``-m`` sweep, and it
leaves rank variables (LOCAL_RANK, WORLD_SIZE, ...) in the environment after the first job. So in a sweep
each job that needs more than one process is run as a fresh single run of this module in a child
process, with that job's overrides only and that job's output directory, and a clean environment.
The child exits, taking its process group and variables with it; the next job starts clean.

``plugins=[<module>]`` imports modules that register paradigms defined outside unifuse (read from
the command line before Hydra composes, so the schemas they store compose); the model config then
names the plugin's LightningModule and net by ``_target_``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from unifuse import config as _config  # noqa: F401  (registers schemas and resolvers)
from unifuse.config import WANDB_RUN_FILE, ConfigError, plugin_overrides, require_targets, use_plugins
from unifuse.run.guard import manual_optimisation_kwargs
from unifuse.run.parallel import compile_blocks
from unifuse.run.resume import complete_checkpoints, resolve_ckpt_path

log = logging.getLogger("unifuse")
# 1x1 conv weight grads come back with arbitrary strides on their size-1 dims; DDP warns though
# the layouts are equivalent (no copy, no slowdown).
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

_RANK_VARS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
              "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


def _processes_per_job(cfg: DictConfig) -> int:
    t = cfg.trainer
    devices = t.get("devices", 1)
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        n = len(devices)
    elif isinstance(devices, str):
        n = 1 if devices in ("auto", "1") else (int(devices) if devices.isdigit() else 2)
    else:
        n = int(devices)
    return n * int(t.get("num_nodes", 1))


def _launched_externally() -> bool:
    """torchrun/SLURM (or a previous relaunch) already started one process per rank."""
    if "LOCAL_RANK" in os.environ or os.environ.get("UNIFUSE_RELAUNCHED") == "1":
        return True
    return "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def _relaunch_job(cfg: DictConfig) -> int:
    hc = HydraConfig.get()
    out_dir = hc.runtime.output_dir
    cmd = [sys.executable, "-m", "unifuse.train", *hc.overrides.task, f"hydra.run.dir={out_dir}"]
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARS}
    env["UNIFUSE_SWEEP_JOB"] = "1"
    log.info("multirun job %s: launching %d processes in %s", hc.job.num, _processes_per_job(cfg), out_dir)
    proc = subprocess.run(cmd, env=env, cwd=hydra.utils.get_original_cwd())
    if proc.returncode != 0:
        raise RuntimeError(f"sweep job {hc.job.num} ({' '.join(hc.overrides.task)}) failed "
                           f"with exit code {proc.returncode}; see {out_dir}")
    return proc.returncode


def _needs_relaunch(cfg: DictConfig) -> bool:
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    return _processes_per_job(cfg) > 1 and not _launched_externally()


def train(cfg: DictConfig) -> dict:
    """Build data, model, callbacks, loggers and trainer from ``cfg`` and fit. Returns metrics and paths."""
    use_plugins(cfg.get("plugins") or [])  # before the model's _target_ is built: its paradigm must be registered
    require_targets(cfg, "callbacks", "logger")  # before anything is built
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir)  # last | auto | <file>
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    if cfg.get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg.matmul_precision)

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    if (cfg.get("compile") or {}).get("enabled"):
        compile_blocks(model, backend=cfg.compile.backend)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    # modules that optimise by hand clip their gradients themselves (Lightning refuses the trainer's)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                          **manual_optimisation_kwargs(model, cfg.trainer))

    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if wandb_cfg is not None and trainer.is_global_zero:  # what a resume needs to continue this W&B run
        Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
        Path(cfg.paths.output_dir, WANDB_RUN_FILE).write_text(
            json.dumps({"id": wandb_cfg.get("id"), "name": wandb_cfg.get("name")}))

    if loggers:
        hparams = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                   for k in cfg if k != "hydra"}
        for lg in loggers:
            lg.log_hyperparams(hparams)

    # weights_only: resuming unpickles no code; a unifuse checkpoint holds tensors and plain values only
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    result = {"metrics": metrics, "output_dir": cfg.paths.output_dir}
    ckpt_cb = trainer.checkpoint_callback
    if ckpt_cb is not None:  # the run's last.ckpt (callbacks.last_checkpoint), else the best one
        last = complete_checkpoints(cfg.paths.output_dir)
        result["checkpoint"] = str(last[0]) if last else ckpt_cb.last_model_path or ckpt_cb.best_model_path
    images = [str(p) for cb in callbacks for p in getattr(cb, "written", [])]
    result["images"] = images
    for lg in loggers:
        if lg.__class__.__name__ == "WandbLogger" and trainer.is_global_zero:
            result["wandb_dir"] = str(getattr(lg.experiment, "dir", "") or "")
    if trainer.is_global_zero:
        _report(result)
    return result


def _report(result: dict) -> None:
    lines = ["", "=" * 72, f"run directory : {result['output_dir']}"]
    if result.get("checkpoint"):
        lines.append(f"checkpoint    : {result['checkpoint']}")
    if result.get("images"):
        lines.append(f"images        : {result['images'][-1]} ({len(result['images'])} written)")
    if result.get("wandb_dir"):
        lines.append(f"W&B run       : {Path(result['wandb_dir']).parent}  (upload: wandb sync <dir>)")
    shown = {k: round(v, 4) for k, v in sorted(result["metrics"].items()) if k.startswith(("val/", "train/"))}
    lines.append(f"metrics       : {shown}")
    evals = {k: round(v, 3) for k, v in sorted(result["metrics"].items()) if k.startswith("eval/") and "std" not in k}
    if evals:  # the last online evaluation (FID/KID, rFID, PSNR, SSIM)
        lines.append(f"evaluation    : {evals}")
    lines.append("=" * 72)
    print("\n".join(lines), flush=True)


def _finish_wandb(failed: bool) -> None:
    try:
        import wandb  # deferred: optional, and a second of imports for runs that log without it
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def _app(cfg: DictConfig) -> float | None:
    if _needs_relaunch(cfg):
        _relaunch_job(cfg)
        return None
    failed = True
    try:
        result = train(cfg)
        failed = False
        metric = cfg.get("optimized_metric")
        return result["metrics"].get(metric) if metric else None
    except ConfigError as e:
        sys.exit(f"error: {e}")
    finally:
        _finish_wandb(failed)  # always, or multirun jobs merge into one W&B run


def main() -> float | None:
    """The CLI: the command line's ``plugins`` are imported before Hydra composes."""
    try:
        use_plugins(plugin_overrides(sys.argv[1:]))
    except ValueError as e:
        sys.exit(f"error: {e}")
    return _app()


if __name__ == "__main__":
    main()
