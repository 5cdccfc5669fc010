"""Typed configuration schemas and OmegaConf resolvers, registered before Hydra composes.

Architecture hyperparameters are dataclasses stored in Hydra's ConfigStore under ``schema/``;
the model yaml files put them in their defaults lists (``/schema/autoencoder@net.autoencoder``),
so a misspelled key fails at compose time with the key named, and ``_convert_: object`` hands the
modules real dataclass instances.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from unifuse.models.autoencoder import AutoencoderConfig
from unifuse.models.quantize import QuantizerConfig
from unifuse.models.transformer import TransformerConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

_RUN_ID: str | None = None


def run_id() -> str:
    """A run-directory name that never collides and that all ranks of one launch agree on.

    Under torchrun every rank runs Hydra itself, so the name comes from what the ranks share: the
    rendezvous id when one is given, else the elastic agent (the ranks' common parent) and its
    start time. Otherwise: date, time and a random suffix (two runs in the same second differ).
    ``UNIFUSE_RUN_ID`` overrides both (e.g. a SLURM job id)."""
    global _RUN_ID
    if _RUN_ID is None:
        if os.environ.get("UNIFUSE_RUN_ID"):
            _RUN_ID = os.environ["UNIFUSE_RUN_ID"]
        elif "TORCHELASTIC_RUN_ID" in os.environ:
            rid = os.environ["TORCHELASTIC_RUN_ID"]
            if rid in ("", "none"):
                ppid = os.getppid()
                try:
                    start = Path(f"/proc/{ppid}/stat").read_text().rsplit(")", 1)[1].split()[19]
                except (OSError, IndexError):
                    start = "0"
                rid = f"{ppid}-{start}"
            _RUN_ID = f"{time.strftime('%Y-%m-%d')}/torchrun_{rid}"
        else:
            _RUN_ID = f"{time.strftime('%Y-%m-%d')}/{time.strftime('%H-%M-%S')}_{secrets.token_hex(3)}"
    return _RUN_ID


def wandb_offline() -> bool:
    """Offline unless the user asked for online W&B (WANDB_MODE=online, or an API key without
    WANDB_MODE=offline). With no network, online mode retries ~105 s before failing."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return True
    if mode == "online":
        return False
    return not os.environ.get("WANDB_API_KEY")


def latest_checkpoint(log_dir: str, task_name: str) -> str:
    """Newest ``last.ckpt`` of a run whose task_name matches, e.g. the tokenizer trained by
    ``make train``. Fails naming the setting to use instead."""
    best, best_time = None, -1.0
    for cfg_file in Path(log_dir).glob("**/.hydra/config.yaml"):
        ckpt = cfg_file.parent.parent / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            continue
        try:
            name = OmegaConf.load(cfg_file).get("task_name")
        except Exception:
            continue
        if name == task_name and ckpt.stat().st_mtime > best_time:
            best, best_time = ckpt, ckpt.stat().st_mtime
    if best is None:
        raise FileNotFoundError(
            f"no checkpoint of a '{task_name}' run under {log_dir}: train one first (`make train` trains the "
            f"VQ-VAE tokenizer) or set model.tokenizer_ckpt=<path to last.ckpt>"
        )
    return str(best)


def ckpt_tag(path: str) -> str:
    """Short stable tag of a checkpoint (its resolved path and modification time), naming data
    derived from it: codes pre-encoded by one tokenizer land in their own directory, so training
    a new tokenizer re-encodes instead of mixing codes from two codebooks."""
    p = Path(path).expanduser()
    key = str(p.resolve())
    if p.is_file():
        key += f":{p.stat().st_mtime_ns}"
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def register() -> None:
    if not OmegaConf.has_resolver("unifuse.run_id"):
        OmegaConf.register_new_resolver("unifuse.run_id", run_id)
        OmegaConf.register_new_resolver("unifuse.wandb_offline", wandb_offline)
        OmegaConf.register_new_resolver("unifuse.latest_ckpt", latest_checkpoint, use_cache=True)
        OmegaConf.register_new_resolver("unifuse.ckpt_tag", ckpt_tag, use_cache=True)
    cs = ConfigStore.instance()
    cs.store(group="schema", name="autoencoder", node=AutoencoderConfig)
    cs.store(group="schema", name="quantizer", node=QuantizerConfig)
    cs.store(group="schema", name="transformer", node=TransformerConfig)


register()
