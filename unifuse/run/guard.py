"""Guards of the training step: non-finite losses (``guard.nonfinite``), gradient-norm logging and
gradient clipping, the same for every module.

Non-finite losses. Each module's ``training_step`` hands its loss terms to
:meth:`unifuse.lit.base.UnifuseModule.finite_losses`, which asks the :class:`NonFiniteGuard`
callback (``callbacks.guard``) before any backward pass or optimizer step. All ranks add up their
verdicts (one all-reduce of one number per step), so they all stop or all skip together; a rank
that skipped alone would deadlock or desync the others. The message names the step, each rank's
non-finite terms and its batch's sample keys.

* ``stop`` (default): the state before the step is saved as ``bad-step<N>.ckpt`` in the checkpoint
  directory (never ``last.ckpt``, so ``ckpt_path=last|auto`` never resumes from it) and the run ends
  with ``FloatingPointError`` (non-zero exit).
* ``skip``: the batch is dropped. Automatic optimisation: the backward pass still runs on every
  rank (DDP reduces gradients in it) and the gradients are discarded before the optimizer step, so
  weights and optimizer state do not change; the step still counts (global step, LR schedule).
  Buffers a forward pass changed (the VQ codebook's EMA and usage counts, batch-norm statistics)
  are put back from a copy taken at the start of each batch.
  With ``accumulate_grad_batches > 1`` the whole accumulated step is dropped. Modules that optimise
  by hand (the adversarial autoencoders) skip their backward passes and steps. Skipped batches are
  logged (``train/skipped_batches``); ``max_skips_in_row`` non-finite batches in a row stop as above.

Without the callback (``callbacks=none``) a non-finite loss raises ``FloatingPointError``.

Gradients. ``train/grad_norm`` is the total 2-norm of the gradients before clipping, every step
(logged every ``trainer.log_every_n_steps``); clipping follows ``trainer.gradient_clip_val`` /
``gradient_clip_algorithm``. Lightning refuses both settings for modules that optimise by hand;
:func:`manual_optimisation_kwargs` hands the clip value to such a module, which clips itself.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist

log = logging.getLogger("unifuse")

POLICIES = ("stop", "skip")


def nonfinite_terms(terms: dict[str, torch.Tensor | float]) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """(1.0 if any term is non-finite else 0.0, the names, their values): on the terms' device, no host sync."""
    names = list(terms)
    dev = next((v.device for v in terms.values() if isinstance(v, torch.Tensor)), None)
    vals = torch.stack([torch.as_tensor(terms[k], device=dev).detach().float().reshape(()) for k in names])
    return (~torch.isfinite(vals)).any().float(), names, vals


def nonfinite_message(names: list[str], vals: torch.Tensor, batch: dict | None) -> str:
    """``recon=nan, loss=nan; batch keys: a, b, ...``: the non-finite terms only."""
    bad = {k: float(v) for k, v in zip(names, vals.tolist(), strict=True) if not math.isfinite(v)}
    keys = list((batch or {}).get("key") or [])
    shown = ", ".join(map(str, keys[:8])) + (f", ... ({len(keys)} samples)" if len(keys) > 8 else "")
    return ", ".join(f"{k}={v}" for k, v in bad.items()) + (f"; batch keys: {shown}" if keys else "")


class NonFiniteGuard(L.Callback):
    """What a non-finite loss does (see the module docstring). ``dirpath``: where ``bad-step<N>.ckpt``
    goes (default: ``<trainer.default_root_dir>/checkpoints``)."""

    def __init__(self, nonfinite: str = "stop", max_skips_in_row: int = 3, dirpath: str | None = None):
        if nonfinite not in POLICIES:
            raise ValueError(f"guard.nonfinite must be one of {', '.join(POLICIES)}, not {nonfinite!r}")
        if int(max_skips_in_row) < 1:
            raise ValueError(f"guard.max_skips_in_row must be >= 1, not {max_skips_in_row}")
        self.policy, self.max_skips_in_row = nonfinite, int(max_skips_in_row)
        self.dirpath = dirpath
        self.in_row = 0  # non-finite batches in a row
        self.skipped = 0  # batches skipped in this run (kept across resumes)
        self._drop_grads = False
        self._buffers: list[torch.Tensor] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.policy == "skip" and getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError("guard.nonfinite=skip does not work with trainer.precision=16-mixed: its gradient "
                             "scaler needs the gradients a skipped batch drops; use bf16-mixed or guard.nonfinite=stop")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_row": self.in_row}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped, self.in_row = int(state_dict["skipped"]), int(state_dict["in_row"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """skip: keep the buffers, which some modules change in their forward pass (the VQ codebook's
        EMA and usage counts, batch-norm statistics), to put them back if the batch is skipped."""
        if self.policy == "skip":
            self._buffers = [b.detach().clone() for b in pl_module.buffers()]

    # ------------------------------------------------------------------ the check (from finite_losses)
    def check(self, trainer: L.Trainer, pl_module: L.LightningModule, terms: dict, batch: dict | None) -> bool:
        """True: go on with this batch. False: skip it. Raises ``FloatingPointError`` to stop."""
        if not terms:
            return True
        flag, names, vals = nonfinite_terms(terms)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="sum")  # every rank learns of any rank's bad batch
        if not flag.item():
            self.in_row = 0
            if self.policy == "skip":
                pl_module.log("train/skipped_batches", float(self.skipped), on_step=True, on_epoch=False)
            return True
        step = trainer.global_step
        message = f"non-finite loss at step {step}: " + _gather_messages(trainer, names, vals, batch)
        self.in_row += 1
        if self.policy == "stop" or self.in_row >= self.max_skips_in_row:
            if self.policy == "skip":
                message += f" ({self.in_row} in a row: guard.max_skips_in_row={self.max_skips_in_row})"
            path = self._save_bad(trainer, step)
            if trainer.is_global_zero:
                log.error("%s; the state before this step is in %s", message, path)
            raise FloatingPointError(f"{message}; the state before this step is in {path}")
        self.skipped += 1
        self._drop_grads = pl_module.automatic_optimization
        if self._buffers is not None:
            with torch.no_grad():
                for b, kept in zip(pl_module.buffers(), self._buffers, strict=True):
                    b.copy_(kept)
        if trainer.is_global_zero:
            log.warning("%s; batch skipped (%d in a row, %d in this run)", message, self.in_row, self.skipped)
        pl_module.log("train/skipped_batches", float(self.skipped), on_step=True, on_epoch=False)
        return False

    def _save_bad(self, trainer: L.Trainer, step: int) -> Path:
        dirpath = Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "checkpoints"
        path = dirpath / f"bad-step{step:07d}.ckpt"
        trainer.save_checkpoint(path)  # every rank calls it (Lightning writes on rank 0)
        return path

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        """A skipped batch's gradients (the whole accumulated step) are dropped: the optimizer step
        then leaves every parameter and its optimizer state as they were."""
        if not self._drop_grads:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self._drop_grads = False


def _gather_messages(trainer: L.Trainer, names: list[str], vals: torch.Tensor, batch: dict | None) -> str:
    """This rank's non-finite terms and keys; under DDP every rank's, prefixed by its rank."""
    mine = nonfinite_message(names, vals, batch) if not torch.isfinite(vals).all() else None
    if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return mine or ""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return " | ".join(f"rank {r}: {m}" for r, m in enumerate(everyone) if m)


# ---------------------------------------------------------------------- gradients
def total_norm_and_clip(module: L.LightningModule, optimizer, clip_val: float | None,
                        algorithm: str | None) -> torch.Tensor | None:
    """Total 2-norm of ``optimizer``'s gradients before clipping (None without gradients), then
    clip them: ``norm`` scales them to at most ``clip_val``; ``value`` clamps each entry."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not params:
        return None
    clip = float(clip_val or 0.0) > 0
    by_norm = clip and algorithm != "value"
    root = module.trainer.strategy.model
    if hasattr(root, "clip_grad_norm_"):  # FSDP: only the root module knows the norm over all shards
        norm = root.clip_grad_norm_(float(clip_val) if by_norm else math.inf)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0, foreach=True)
        if hasattr(norm, "full_tensor"):  # DTensor gradients (model parallel, FSDP2): the global norm
            norm = norm.full_tensor()
        if by_norm:
            torch.nn.utils.clip_grads_with_norm_(params, float(clip_val), norm, foreach=True)
    if clip and not by_norm:
        torch.nn.utils.clip_grad_value_(params, float(clip_val))
    return norm


def manual_optimisation_kwargs(model: L.LightningModule, trainer_cfg) -> dict:
    """Trainer keyword overrides for a module that optimises by hand (``automatic_optimization`` off):
    Lightning refuses ``gradient_clip_val`` for it, so the value moves to the module, which clips in
    its own steps; ``accumulate_grad_batches > 1`` is refused here, naming the setting."""
    if model.automatic_optimization:
        return {}
    accumulate = int(trainer_cfg.get("accumulate_grad_batches") or 1)
    if accumulate > 1:
        raise ValueError(f"trainer.accumulate_grad_batches={accumulate}: {type(model).__name__} optimises by hand "
                         "(e.g. model.adversarial.weight > 0) and does not accumulate; set it to 1")
    model.manual_clipping = (trainer_cfg.get("gradient_clip_val"), trainer_cfg.get("gradient_clip_algorithm"))
    return {"gradient_clip_val": None}
