"""For the tests of unifuse.run.guard: a callback that makes a loss non-finite the way it happens in
practice, through the pixels of a batch, and records what each training batch did to the module's
state (importable by training subprocesses: ``+callbacks.poison._target_=tests.poison.PoisonBatch``);
and :func:`fit_with`, a short in-process training run with extra callbacks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import torch

QUIET = ["trainer=debug_limit", "logger=none", "callbacks.fidelity.enabled=false"]


def fit_with(overrides: list[str], tmp_path, *extra: L.Callback, images: bool = False,
             ckpt_path: str | None = None) -> tuple[L.Trainer, L.LightningModule]:
    """Compose the training config (quiet, in ``tmp_path``; sample grids only with ``images``), fit
    with the configured callbacks plus ``extra``, as ``unifuse.train`` builds the trainer; (trainer,
    module) afterwards."""
    from hydra.utils import instantiate

    from tests.conftest import compose_cfg
    from unifuse.run.guard import manual_optimisation_kwargs

    cfg = compose_cfg(overrides + QUIET + ([] if images else ["callbacks.images=null"]), tmp_path)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None] + list(extra)
    dm, model = instantiate(cfg.data), instantiate(cfg.model)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False,
                          **manual_optimisation_kwargs(model, cfg.trainer))
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)  # as unifuse.train resumes
    return trainer, model


def module_state(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
    """Weights, buffers and every optimizer's state tensors (AdamW moments, step counts)."""
    state = {f"module.{k}": v.detach().clone() for k, v in pl_module.state_dict().items()}
    for i, opt in enumerate(pl_module.trainer.optimizers):
        for j, s in enumerate(opt.state.values()):
            state.update({f"opt{i}.{j}.{k}": v.detach().clone() for k, v in s.items() if isinstance(v, torch.Tensor)})
    return state


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class PoisonBatch(L.Callback):
    """A NaN in the first image of the training batches counted in ``at`` (0-based, this run's
    batches), on rank ``rank`` only when given. For every batch, whether it left the module's state
    unchanged (``unchanged[n]``); the poisoned batches' sample keys (``keys[n]``). With ``out``, each
    rank writes that and its final weights to ``<out>/rank<r>.json`` at the end of training."""

    def __init__(self, at: list[int] | tuple[int, ...] = (2,), rank: int | None = None, out: str | None = None):
        self.at, self.rank, self.out = set(at), rank, out
        self.n = -1
        self.keys: dict[int, list[str]] = {}
        self.unchanged: dict[int, bool] = {}
        self.before: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.n += 1
        self.before = module_state(pl_module)
        if self.n in self.at and (self.rank is None or trainer.global_rank == self.rank):
            batch["image"][0, 0, 0, 0] = math.nan
            self.keys[self.n] = [str(k) for k in batch["key"]]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.unchanged[self.n] = same_state(self.before, module_state(pl_module))

    def on_train_end(self, trainer, pl_module):
        if self.out is None:
            return
        weights = {k: v.tolist() for k, v in pl_module.state_dict().items() if v.is_floating_point()}
        guard = next(c for c in trainer.callbacks if type(c).__name__ == "NonFiniteGuard")
        Path(self.out).mkdir(parents=True, exist_ok=True)
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(
            {"unchanged": self.unchanged, "keys": self.keys, "skipped": guard.skipped, "weights": weights}))
