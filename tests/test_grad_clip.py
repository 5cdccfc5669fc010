"""Gradient-norm logging and clipping (unifuse.run.guard): `train/grad_norm` is the total norm before
clipping, every step; `trainer.gradient_clip_val` clips, also for the adversarial autoencoder, which
optimises by hand (Lightning refuses the setting there, so the module clips itself)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from tests.conftest import compose_cfg, kl_overrides, tiny_overrides
from tests.poison import fit_with

CLIP = 1e-3  # far below the tiny models' gradient norms: every step is clipped


def _norm(params) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))


class GradProbe(L.Callback):
    """Per step: the gradient norm before clipping (measured here), what the module logged, and each
    optimizer's gradient norm as it stepped (a post-step hook: the gradients it applied, clipped)."""

    def __init__(self):
        self.before, self.logged, self.applied = [], [], {}

    def on_train_start(self, trainer, pl_module):
        for i, opt in enumerate(trainer.optimizers):
            params = [p for g in opt.param_groups for p in g["params"]]
            record = self.applied.setdefault(i, [])
            opt.register_step_post_hook(lambda o, a, k, ps=params, rec=record: rec.append(_norm(ps)))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # Lightning clips after this hook
        self.before.append(_norm(p for g in optimizer.param_groups for p in g["params"]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items() if "grad_norm" in k})


def test_grad_norm_is_logged_every_step_before_clipping_and_clipping_applies(tiny_emoji, tmp_path):
    probe = GradProbe()
    fit_with(kl_overrides(tiny_emoji) + ["trainer.max_epochs=1", f"trainer.gradient_clip_val={CLIP}"], tmp_path,
             probe)
    assert len(probe.before) == 3 and len(probe.logged) == 3
    for before, logged in zip(probe.before, probe.logged, strict=True):
        assert before > 10 * CLIP
        assert logged["train/grad_norm"] == pytest.approx(before, rel=1e-4)
    assert len(probe.applied[0]) == 3 and all(n <= CLIP * (1 + 1e-3) for n in probe.applied[0])


def test_adversarial_autoencoder_skips_clips_and_averages(tiny_emoji, tmp_path):
    """The VQGAN steps two optimizers by hand. `trainer.gradient_clip_val` reaches the module, which
    clips both (Lightning would refuse the setting on the trainer) and logs both norms; a skipped
    batch (guard.nonfinite=skip) steps neither; the EMA averages both nets, once per batch."""
    from tests.poison import PoisonBatch
    from unifuse.run.ema import EMA

    probe, poison = GradProbe(), PoisonBatch(at=(1,))
    over = tiny_overrides(tiny_emoji) + ["model.adversarial.weight=0.5", "model.adversarial.start_step=0",
                                         "model.adversarial.channels=8", "model.adversarial.layers=2",
                                         "trainer.max_epochs=1", f"trainer.gradient_clip_val={CLIP}",
                                         "guard.nonfinite=skip", "callbacks.ema.decay=0.5",
                                         "callbacks.ema.update_starting_at_step=0"]
    trainer, model = fit_with(over, tmp_path, probe, poison)
    assert trainer.gradient_clip_val is None and model.manual_clipping[0] == CLIP
    assert poison.unchanged == {0: False, 1: True, 2: False} and trainer.global_step == 4  # 2 steps per batch
    assert all(m["train/grad_norm"] > 10 * CLIP and m["train/d_grad_norm"] > 0 for m in probe.logged)
    assert sorted(probe.applied) == [0, 1] and all(len(v) == 2 for v in probe.applied.values())
    assert all(n <= CLIP * (1 + 1e-3) for v in probe.applied.values() for n in v)
    avg = next(c for c in trainer.callbacks if isinstance(c, EMA))._average_model
    assert int(avg.n_averaged) == 2  # one update per batch that stepped
    trained = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["current_model_state"]
    d = [k for k in trained if k.startswith("discriminator.") and trained[k].is_floating_point()]
    assert d and any(not torch.equal(avg.module.state_dict()[k], trained[k]) for k in d)


def test_manual_optimisation_refuses_accumulation_naming_the_setting(tiny_emoji, tmp_path):
    from hydra.utils import instantiate

    from unifuse.run.guard import manual_optimisation_kwargs

    over = ["model.adversarial.weight=0.5", "trainer.accumulate_grad_batches=4"]
    cfg = compose_cfg(tiny_overrides(tiny_emoji) + over, tmp_path)
    with pytest.raises(ValueError, match=r"trainer.accumulate_grad_batches=4: VQVAEModule optimises by hand"):
        manual_optimisation_kwargs(instantiate(cfg.model), cfg.trainer)


def test_trainer_presets_set_clipping_and_accumulation(tmp_path):
    clip = {"default": None, "cpu": None, "debug_limit": None, "gpu": 1.0, "ddp": 1.0}
    for preset, value in clip.items():
        t = compose_cfg([f"trainer={preset}"], tmp_path).trainer
        assert t.gradient_clip_val == value and t.gradient_clip_algorithm == "norm"
        assert t.accumulate_grad_batches == 1
