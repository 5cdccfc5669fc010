"""A non-finite loss stops training with a message naming the step, the loss term and the batch's
sample keys, before the optimizer step applies it. The NaN enters the way it would in practice:
through the pixels of one batch in the middle of a real training run."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from tests.conftest import compose_cfg, kl_overrides, ldm_overrides
from unifuse.lit.base import check_finite


class PoisonBatch(L.Callback):
    """Puts a NaN into the first image of the batch of step ``at``; remembers that batch's keys and
    the weights before the step, to show the step was not taken."""

    def __init__(self, at: int = 2):
        self.at, self.keys, self.before = at, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            batch["image"][0, 0, 0, 0] = math.nan
            self.keys = list(batch["key"])
            self.before = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def _run_poisoned(overrides: list[str], tmp_path) -> tuple[str, PoisonBatch, L.LightningModule]:
    from hydra.utils import instantiate

    cfg = compose_cfg(overrides + ["trainer=debug_limit", "logger=none", "trainer.max_epochs=1",
                                   "callbacks.fidelity.enabled=false", "callbacks.images=null"], tmp_path)
    poison = PoisonBatch()
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None] + [poison]
    dm, model = instantiate(cfg.data), instantiate(cfg.model)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    with pytest.raises(FloatingPointError) as err:
        trainer.fit(model, datamodule=dm)
    return str(err.value), poison, model


@pytest.mark.parametrize("kind", ["ldm", "kl_autoencoder"])
def test_nan_in_a_batch_stops_naming_step_term_and_keys(kind, tiny_emoji, tiny_kl, tmp_path):
    over = ldm_overrides(tiny_emoji, tiny_kl) if kind == "ldm" else kl_overrides(tiny_emoji)
    msg, poison, model = _run_poisoned(over, tmp_path)
    assert poison.keys, "the poisoned step was never reached"
    assert "step 2" in msg
    assert ("diffusion=nan" in msg) if kind == "ldm" else ("recon=nan" in msg and "loss=nan" in msg)
    assert str(poison.keys[0]) in msg
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in poison.before.items()), "the NaN step was applied"


def test_check_finite_names_only_the_bad_terms():
    check_finite({"a": torch.tensor(1.0), "b": 2.0}, 5)  # all finite: nothing
    with pytest.raises(FloatingPointError, match=r"step 7: image=inf; batch keys: k0, k1") as err:
        check_finite({"text": torch.tensor(0.5), "image": torch.tensor(math.inf)}, 7, {"key": ["k0", "k1"]})
    assert "text" not in str(err.value)
    many = {"key": [f"s{i}" for i in range(20)]}
    with pytest.raises(FloatingPointError, match=r"s7, \.\.\. \(20 samples\)"):
        check_finite({"loss": torch.tensor(math.nan)}, 0, many)
