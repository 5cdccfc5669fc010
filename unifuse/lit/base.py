"""What every unifuse LightningModule shares: its paradigm (the spec of its net,
:mod:`unifuse.paradigms`), optimizer/scheduler wiring from Hydra partials, checkpoint metadata
(kind + architecture config, so nets rebuild without Lightning; which weights the checkpoint's
state_dict holds), the loss and gradient guards of :mod:`unifuse.run.guard`, and the
``log_images`` hook that ``ImageLogger`` calls on rank 0."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch import nn

from unifuse.paradigms import Paradigm, paradigm_of
from unifuse.run.guard import NonFiniteGuard, nonfinite_message, nonfinite_terms, total_norm_and_clip


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices/convs only; none on biases, norms and embeddings-as-vectors."""
    decay, no_decay = [], []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_finite(terms: dict[str, torch.Tensor], step: int, batch: dict | None = None) -> None:
    """Raise ``FloatingPointError`` naming the step, every non-finite loss term and the batch's
    sample keys (so the offending samples can be found in the shards). One check per step on the
    already-computed scalars: a single host sync for all terms."""
    if not terms:
        return
    flag, names, vals = nonfinite_terms(terms)
    if flag.item():
        raise FloatingPointError(f"non-finite loss at step {step}: {nonfinite_message(names, vals, batch)}")


class UnifuseModule(L.LightningModule):
    """Subclasses hold their net as ``self.net``; its class names the paradigm."""

    def __init__(self, optimizer: Callable | None = None, scheduler: Callable | None = None,
                 weight_decay: float = 0.0):
        super().__init__()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.weight_decay = weight_decay
        # (clip value, algorithm) for modules that optimise by hand (guard.manual_optimisation_kwargs)
        self.manual_clipping: tuple[float | None, str | None] = (None, None)

    @property
    def paradigm(self) -> Paradigm:
        """The spec of the net's paradigm (an error when this module is not the one it names)."""
        spec = paradigm_of(self.net)
        spec.check_module(self)
        return spec

    @property
    def kind(self) -> str:
        """The checkpoint kind: the paradigm's name."""
        return self.paradigm.name

    # subclasses add what else rebuilding or sampling needs
    def checkpoint_meta(self) -> dict:
        return {"kind": self.kind, "config": self.net.config()}

    # extra top-level checkpoint entries (tensors allowed), e.g. the weights of a frozen tokenizer
    def checkpoint_extras(self) -> dict:
        return {}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # callbacks' hooks run first: Lightning's weight averaging (callbacks.ema) has stored the
        # average as the state_dict and the trained weights beside it
        weights = "ema" if "averaging_state" in checkpoint else "raw"
        checkpoint["unifuse"] = {**self.checkpoint_meta(), "weights": weights}
        checkpoint.update(self.checkpoint_extras())

    # ------------------------------------------------------------------ guards (unifuse.run.guard)
    def finite_losses(self, terms: dict, batch: dict | None = None) -> bool:
        """Check a training step's loss terms before backward: True to go on, False to skip the
        batch (``guard.nonfinite=skip``, agreed by all ranks); stopping raises ``FloatingPointError``."""
        trainer = self._trainer
        guard = next((c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)), None) if trainer else None
        if guard is None:
            check_finite(terms, self.global_step, batch)
            return True
        return guard.check(trainer, self, terms, batch)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Automatic optimisation: log the gradient norm, then clip (trainer.gradient_clip_val)."""
        self.clip_and_log(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def clip_and_log(self, optimizer, clip_val=None, algorithm=None, name: str = "train/grad_norm") -> None:
        """Log the total gradient norm before clipping as ``name``, then clip. Modules that optimise by
        hand call it after each backward pass with their ``manual_clipping``."""
        norm = total_norm_and_clip(self, optimizer, clip_val, algorithm)
        if norm is not None:
            self.log(name, norm, on_step=True, on_epoch=False)

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("no optimizer configured (model.optimizer)")
        opt = self.optimizer_factory(param_groups(self, self.weight_decay))
        if self.scheduler_factory is None:
            return opt
        total = self.trainer.estimated_stepping_batches
        sched = self.scheduler_factory(opt, total_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @torch.no_grad()
    def log_images(self, batch: dict) -> dict[str, tuple[torch.Tensor, list[str] | None]]:
        """name -> (images in [-1, 1] (N, 3, H, W), captions or None). Override to show something."""
        return {}
