"""Non-finite losses (unifuse.run.guard). The NaN enters the way it would in practice: through the pixels
of one batch in the middle of a real training run. `stop` (default) names the step, the loss term and
the batch's sample keys, saves the state before the step as bad-step<N>.ckpt and raises before the
optimizer applies anything; `skip` drops the batch (weights, buffers and optimizer state unchanged),
counts it and goes on, and stops after `guard.max_skips_in_row` in a row. Under DDP all ranks agree."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, kl_overrides, ldm_overrides, tiny_overrides
from tests.poison import PoisonBatch, fit_with
from unifuse.lit.base import check_finite


def _run_poisoned(overrides: list[str], tmp_path) -> tuple[str, PoisonBatch]:
    poison = PoisonBatch(at=(2,))
    with pytest.raises(FloatingPointError) as err:
        fit_with(overrides + ["trainer.max_epochs=1"], tmp_path, poison)
    return str(err.value), poison


@pytest.mark.parametrize("kind", ["ldm", "kl_autoencoder"])
def test_stop_names_step_term_and_keys_and_saves_the_state_before_the_step(kind, tiny_emoji, tiny_kl, tmp_path):
    from unifuse.run.checkpoint import read_checkpoint
    from unifuse.run.resume import complete_checkpoints

    over = ldm_overrides(tiny_emoji, tiny_kl) if kind == "ldm" else kl_overrides(tiny_emoji)
    msg, poison = _run_poisoned(over, tmp_path)
    assert poison.keys, "the poisoned step was never reached"
    assert "non-finite loss at step 2:" in msg
    assert ("diffusion=nan" in msg) if kind == "ldm" else ("recon=nan" in msg and "loss=nan" in msg)
    assert poison.keys[2][0] in msg
    bad = tmp_path / "checkpoints" / "bad-step0000002.ckpt"
    assert str(bad) in msg and bad.is_file()
    before = {k[len("module.net."):]: v for k, v in poison.before.items() if k.startswith("module.net.")}
    for weights in ("raw", "ema"):  # the EMA starts at step 1000: until then it is the trained weights
        saved = read_checkpoint(bad, weights=weights).state_dict
        assert saved.keys() == before.keys() and all(torch.equal(saved[k], before[k]) for k in saved), \
            f"the bad checkpoint's {weights} weights are not the state before the step"
    assert bad not in complete_checkpoints(tmp_path), "ckpt_path=last|auto could resume from the bad checkpoint"


def test_skip_drops_the_batch_counts_it_and_goes_on(tiny_emoji, tmp_path, caplog):
    """(The adversarial autoencoder, which optimises by hand, is in test_grad_clip.)"""
    over = kl_overrides(tiny_emoji)
    poison = PoisonBatch(at=(1, 3))
    with caplog.at_level(logging.WARNING, logger="unifuse"):
        trainer, _ = fit_with(over + ["guard.nonfinite=skip", "guard.max_skips_in_row=2", "trainer.max_epochs=1",
                                  "trainer.limit_train_batches=5"], tmp_path, poison)
    assert sorted(poison.keys) == [1, 3]
    assert poison.unchanged == {0: False, 1: True, 2: False, 3: True, 4: False}, \
        "a skipped batch changed the state, or a normal one did not"
    assert trainer.callback_metrics["train/skipped_batches"] == 2
    warned = [r.getMessage() for r in caplog.records if "non-finite loss" in r.getMessage()]
    assert len(warned) == 2 and "recon=nan" in warned[0] and poison.keys[1][0] in warned[0]
    assert "batch skipped (1 in a row, 1 in this run)" in warned[0]


def test_skip_stops_after_max_skips_in_row(tiny_emoji, tmp_path):
    poison = PoisonBatch(at=(1, 2, 3))
    with pytest.raises(FloatingPointError) as err:
        over = ["guard.nonfinite=skip", "guard.max_skips_in_row=2", "trainer.max_epochs=1"]
        fit_with(kl_overrides(tiny_emoji) + over, tmp_path, poison)
    msg = str(err.value)
    # batch 2 is step 2: a skipped batch still counts as a step (its optimizer step changes nothing)
    assert "non-finite loss at step 2:" in msg and "2 in a row: guard.max_skips_in_row=2" in msg
    assert poison.keys[2][0] in msg
    assert poison.unchanged == {0: False, 1: True}  # stopped in batch 2, before its step
    assert (tmp_path / "checkpoints" / "bad-step0000002.ckpt").is_file()


def test_ddp_ranks_agree_to_skip_a_batch_only_one_of_them_saw(tmp_path, tiny_emoji):
    """Rank 1 alone gets the NaN: both ranks must skip that step, or rank 0 applies the NaN gradients
    DDP averaged in (or the ranks deadlock)."""
    out = tmp_path / "poison"
    args = [*tiny_overrides(tiny_emoji), f"paths.root_dir={tmp_path}", "logger=none", "trainer=ddp",
            "trainer.devices=2", "trainer.max_epochs=1", "+trainer.limit_train_batches=4",
            "+trainer.limit_val_batches=1",
            "callbacks.fidelity.enabled=false", "callbacks.images=null", "guard.nonfinite=skip",
            "+callbacks.poison._target_=tests.poison.PoisonBatch", "+callbacks.poison.at=[2]",
            "+callbacks.poison.rank=1", f"+callbacks.poison.out={out}"]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), WANDB_MODE="offline")
    proc = subprocess.run([sys.executable, "-m", "unifuse.train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert list(ranks[1]["keys"]) == ["2"] and not ranks[0]["keys"]
    for r in ranks:
        assert r["unchanged"] == {"0": False, "1": False, "2": True, "3": False} and r["skipped"] == 1
    assert ranks[0]["weights"] == ranks[1]["weights"], "the ranks' weights diverged"
    assert all(math.isfinite(x) for w in ranks[0]["weights"].values() for x in torch.tensor(w).flatten().tolist())
    assert "rank 1: recon=nan" in proc.stderr + proc.stdout


def test_check_finite_names_only_the_bad_terms():
    check_finite({"a": torch.tensor(1.0), "b": 2.0}, 5)  # all finite: nothing
    with pytest.raises(FloatingPointError, match=r"step 7: image=inf; batch keys: k0, k1") as err:
        check_finite({"text": torch.tensor(0.5), "image": torch.tensor(math.inf)}, 7, {"key": ["k0", "k1"]})
    assert "text" not in str(err.value)
    many = {"key": [f"s{i}" for i in range(20)]}
    with pytest.raises(FloatingPointError, match=r"s7, \.\.\. \(20 samples\)"):
        check_finite({"loss": torch.tensor(math.nan)}, 0, many)


def test_guard_settings_are_checked():
    from unifuse.run.guard import NonFiniteGuard

    with pytest.raises(ValueError, match="guard.nonfinite must be one of stop, skip"):
        NonFiniteGuard("ignore")
    with pytest.raises(ValueError, match="guard.max_skips_in_row must be >= 1"):
        NonFiniteGuard("skip", 0)
