"""EMA of the weights for every model: Lightning's ``EMAWeightAveraging`` (``callbacks.ema``), with
what unifuse needs on top of it.

* ``weights`` (``eval.weights``): ``ema`` runs validation, the sample grids and the online
  evaluation on the average; ``raw`` runs them on the trained weights. Either way the average is
  kept and saved: Lightning stores it as the checkpoint's ``state_dict`` and the trained weights as
  ``current_model_state``; :func:`unifuse.run.checkpoint.read_checkpoint` picks one (``weights=``).
* The average stays swapped in until the end of validation, module hooks included. (Lightning
  swaps back in the callbacks' ``on_validation_epoch_end``, which runs before the module's own:
  Transfusion's caption ranking and the VQ codebook usage would see the trained weights.)
* Until ``update_starting_at_step`` the average is the trained weights. (Lightning keeps the
  initial weights until the first update: validation and checkpoints would show an untrained net.)
* Integer buffers (counters, e.g. the VQ codebook's) are copied, not averaged.
* Sharded strategies (FSDP, model parallel, DeepSpeed) are refused: Lightning's averaging keeps an
  unsharded copy of the model (``callbacks.ema=null`` trains without it).
"""

from __future__ import annotations

import itertools

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging
from torch.optim.swa_utils import get_ema_avg_fn

WEIGHTS = ("ema", "raw")


class _EMAUpdate:
    """``decay * average + (1 - decay) * current`` for float tensors; integer tensors are copied.
    A class, not a closure, so the callback pickles."""

    def __init__(self, decay: float):
        self.ema = get_ema_avg_fn(decay)

    def __call__(self, average: torch.Tensor, current: torch.Tensor, num_averaged) -> torch.Tensor:
        return self.ema(average, current, num_averaged) if average.is_floating_point() else current


class EMA(EMAWeightAveraging):
    """Exponential moving average of the weights (and float buffers) of any unifuse module.

    ``decay``: weight of the old average per update (horizon about ``1 / (1 - decay)`` updates).
    ``update_starting_at_step``: first optimizer step that updates the average (None: the first).
    ``weights``: ``ema`` or ``raw``, what validation, sample grids and online evaluation use."""

    def __init__(self, decay: float = 0.999, update_starting_at_step: int | None = None,
                 update_every_n_steps: int = 1, weights: str = "ema", device: str | None = None):
        if weights not in WEIGHTS:
            raise ValueError(f"eval.weights must be 'ema' or 'raw', not {weights!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"callbacks.ema.decay must be in [0, 1), not {decay}")
        super().__init__(device=device, use_buffers=True, decay=decay, update_every_n_steps=update_every_n_steps,
                         update_starting_at_step=update_starting_at_step)
        self._kwargs["avg_fn"] = _EMAUpdate(decay)
        self.decay, self.weights = decay, weights
        self.swapped = False  # the average is in the module (validation)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy)):
            raise ValueError(f"callbacks.ema: Lightning's weight averaging keeps an unsharded copy of the model "
                             f"and cannot average a sharded one ({type(trainer.strategy).__name__}); "
                             "set callbacks.ema=null")
        super().setup(trainer, pl_module, stage)

    # ------------------------------------------------------------------ the average before its first update
    def _follow_until_started(self, pl_module: L.LightningModule) -> None:
        """Before its first update the average is the trained weights."""
        avg = self._average_model
        if avg is None or int(avg.n_averaged) > 0:
            return
        with torch.no_grad():
            for a, c in zip(itertools.chain(avg.module.parameters(), avg.module.buffers()),
                            itertools.chain(pl_module.parameters(), pl_module.buffers()), strict=True):
                a.copy_(c.detach())

    def on_train_end(self, trainer, pl_module) -> None:
        self._follow_until_started(pl_module)
        super().on_train_end(trainer, pl_module)

    # ------------------------------------------------------------------ validation (and what runs inside it)
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self._average_model is None or self.weights == "raw":
            return
        self._follow_until_started(pl_module)
        self._swap_models(pl_module)
        self.swapped = True

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        """Kept swapped in: the module's own epoch-end hook runs after this one."""

    def on_validation_end(self, trainer, pl_module) -> None:
        self._swap_back(pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._swap_back(pl_module)

    def _swap_back(self, pl_module: L.LightningModule) -> None:
        if self.swapped:
            self._swap_models(pl_module)
            self.swapped = False

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._average_model is None:
            return
        self._follow_until_started(pl_module)
        if self.swapped:
            # saved mid-validation: the module holds the average and the average model the trained
            # weights; clone both, since the tensors change again when validation swaps back
            checkpoint["current_model_state"] = {k: v.detach().clone() for k, v in
                                                 self._average_model.module.state_dict().items()}
            checkpoint["state_dict"] = {k: v.detach().clone() for k, v in checkpoint["state_dict"].items()}
            checkpoint["averaging_state"] = {k: v.clone() for k, v in self._average_model.state_dict().items()
                                             if not k.startswith("module.")}
            return
        super().on_save_checkpoint(trainer, pl_module, checkpoint)


def weights_in_use(trainer: L.Trainer) -> str:
    """``ema`` while an EMA callback has the average in the module (validation), else ``raw``."""
    for cb in trainer.callbacks:
        if isinstance(cb, EMA):
            return "ema" if cb.swapped else "raw"
    # Lightning's own weight averaging swaps the average in for validation
    return "ema" if any(isinstance(c, WeightAveraging) for c in trainer.callbacks) else "raw"
