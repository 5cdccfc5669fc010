"""What every unifuse LightningModule shares: optimizer/scheduler wiring from Hydra partials,
checkpoint metadata (kind + architecture config, so nets rebuild without Lightning), and the
``log_images`` hook that ``ImageLogger`` calls on rank 0."""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
from torch import nn


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
    names = list(terms)
    if not names:
        return
    dev = next((v.device for v in terms.values() if isinstance(v, torch.Tensor)), None)
    vals = torch.stack([torch.as_tensor(terms[k], device=dev).detach().float().reshape(()) for k in names])
    if bool(torch.isfinite(vals).all()):
        return
    bad = {k: float(v) for k, v in zip(names, vals.tolist(), strict=True) if not math.isfinite(v)}
    keys = list((batch or {}).get("key") or [])
    shown = ", ".join(map(str, keys[:8])) + (f", ... ({len(keys)} samples)" if len(keys) > 8 else "")
    raise FloatingPointError(f"non-finite loss at step {step}: " + ", ".join(f"{k}={v}" for k, v in bad.items())
                             + (f"; batch keys: {shown}" if keys else ""))


class UnifuseModule(L.LightningModule):
    kind: str = "base"

    def __init__(self, optimizer: Callable | None = None, scheduler: Callable | None = None,
                 weight_decay: float = 0.0):
        super().__init__()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.weight_decay = weight_decay

    # subclasses return {"kind": ..., "config": {...}} describing their nets
    def checkpoint_meta(self) -> dict:
        return {"kind": self.kind, "config": {}}

    # extra top-level checkpoint entries (tensors allowed), e.g. the weights of a frozen tokenizer
    def checkpoint_extras(self) -> dict:
        return {}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["unifuse"] = self.checkpoint_meta()
        checkpoint.update(self.checkpoint_extras())

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
