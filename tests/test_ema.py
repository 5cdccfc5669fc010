"""EMA of the weights for every model (callbacks.ema, unifuse.run.ema): `eval.weights=ema` runs
validation (module hooks included), sample grids and online evaluation on the average, `raw` on the
trained weights; checkpoints hold both, the sampling and evaluation CLIs pick one (default: the
run's choice); a resume restores the average (the adversarial autoencoder, which optimises by
hand, is in test_grad_clip). A short decay from step 0 makes the average differ from the weights."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from tests.conftest import compose_cfg, ldm_overrides, tiny_overrides
from tests.poison import fit_with

FAST_EMA = ["callbacks.ema.decay=0.5", "callbacks.ema.update_starting_at_step=0"]


def net_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.net.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def ema_callback(trainer):
    from unifuse.run.ema import EMA

    return next(c for c in trainer.callbacks if isinstance(c, EMA))


class WeightsProbe(L.Callback):
    """The trained and averaged weights after the last training step, and the weights the module
    holds while validation runs, while the sample grid is drawn and in its own validation-epoch end."""

    def __init__(self):
        self.raw = self.avg = None
        self.seen: dict[str, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.raw, self.avg = net_state(pl_module), net_state(ema_callback(trainer)._average_model.module)

    def on_fit_start(self, trainer, pl_module):
        from unifuse.run.ema import weights_in_use

        draw, end = pl_module.log_images, pl_module.on_validation_epoch_end

        def log_images(batch):
            self.seen["samples"] = net_state(pl_module)
            return draw(batch)

        def epoch_end():
            if not trainer.sanity_checking:
                self.seen["module_epoch_end"] = net_state(pl_module)
                self.seen["online_eval_label"] = weights_in_use(trainer)
            return end()

        pl_module.log_images, pl_module.on_validation_epoch_end = log_images, epoch_end

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking and batch_idx == 0:
            self.seen["validation"] = net_state(pl_module)


@pytest.fixture(scope="module")
def ema_run(tiny_emoji, tmp_path_factory):
    """A tiny VQ-VAE run with eval.weights=ema (the default): (probe, run directory)."""
    out = tmp_path_factory.mktemp("ema_run")
    probe = WeightsProbe()
    trainer, _ = fit_with(tiny_overrides(tiny_emoji) + FAST_EMA + ["trainer.max_epochs=1"], out, probe, images=True)
    assert not ema_callback(trainer).swapped
    return probe, out


def _check_weights_used(probe: WeightsProbe, run_dir, weights: str) -> None:
    from unifuse.run.checkpoint import read_checkpoint

    assert not same(probe.raw, probe.avg), "the test cannot tell the weights apart"
    want = probe.avg if weights == "ema" else probe.raw
    for where in ("validation", "samples", "module_epoch_end"):
        assert same(probe.seen[where], want), f"{where} did not use the {weights} weights"
    assert probe.seen["online_eval_label"] == weights
    # the checkpoint keeps both; by default the CLIs take what this run used
    last = run_dir / "checkpoints" / "last.ckpt"
    assert same(read_checkpoint(last, weights="ema").state_dict, probe.avg)
    assert same(read_checkpoint(last, weights="raw").state_dict, probe.raw)
    default = read_checkpoint(last)
    assert default.weights == weights and same(default.state_dict, want)


def test_validation_samples_and_online_eval_use_the_ema_by_default(ema_run):
    _check_weights_used(*ema_run, "ema")


def test_eval_weights_raw_uses_the_trained_weights(tiny_emoji, tmp_path):
    probe = WeightsProbe()
    fit_with(tiny_overrides(tiny_emoji) + FAST_EMA + ["eval.weights=raw", "trainer.max_epochs=1"], tmp_path, probe,
             images=True)
    _check_weights_used(probe, tmp_path, "raw")


def test_evaluate_cli_evaluates_the_chosen_weights(ema_run, tiny_emoji, tmp_path, monkeypatch):
    """`python -m unifuse.evaluate weights=ema|raw` hands the evaluator those weights and names them."""
    from unifuse.eval import fidelity
    from unifuse.evaluate import evaluate_checkpoint

    probe, run_dir = ema_run
    got = {}

    def fake_evaluator(net, cfg, weights="raw"):
        got.update(state={k: v.clone() for k, v in net.state_dict().items()}, weights=weights,
                   cfg_weights=cfg.weights)
        return {"metrics": {"rfid": 1.0}, "protocol": {"feature_extractor": "x", "n": 1, "weights": weights}}

    monkeypatch.setattr(fidelity, "evaluate_tokenizer", fake_evaluator)  # the vqvae paradigm's evaluator
    last = run_dir / "checkpoints" / "last.ckpt"
    for weights, want in (("ema", probe.avg), ("raw", probe.raw), (None, probe.avg)):
        extra = {"weights": weights} if weights else {}
        res = evaluate_checkpoint(last, reference=str(tiny_emoji / "val"), out=str(tmp_path / "e.json"), **extra)
        assert same(got["state"], want) and got["weights"] == got["cfg_weights"] == (weights or "ema")
        assert ("-ema" in res["metric_names"]["rfid"]) == (weights != "raw")


def test_sample_cli_draws_with_the_chosen_weights(tiny_emoji, tiny_kl, tmp_path, capsys, monkeypatch):
    from unifuse import sample
    from unifuse.run import checkpoint
    from unifuse.sample import main as sample_main

    over = ldm_overrides(tiny_emoji, tiny_kl) + FAST_EMA + ["trainer.max_epochs=1"]
    fit_with(over, tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    states = {w: checkpoint.read_checkpoint(last, weights=w).state_dict for w in ("ema", "raw")}
    assert not same(states["ema"], states["raw"])
    load, drew = checkpoint.load_pipeline, {}

    def load_and_record(*args, **kwargs):  # the net the CLI draws with
        pipe, ck = load(*args, **kwargs)
        drew["state"] = net_state(pipe)
        return pipe, ck

    monkeypatch.setattr(sample, "load_pipeline", load_and_record)  # the name the sampling CLI calls
    for w in ("ema", "raw", None):
        sample_main([f"ckpt={last}", "prompt=twemoji dog face", "n=2", "steps=2", f"out={tmp_path / f'{w}.png'}"]
                    + ([f"weights={w}"] if w else []))
        assert f"(ldm, {w or 'ema'} weights," in capsys.readouterr().out
        assert same(drew["state"], states[w or "ema"]), f"weights={w} drew with other weights"
    pipes = {w: load(last, weights=w)[0] for w in ("ema", "raw")}
    with torch.no_grad():  # and the weights make a difference to the images
        a = pipes["ema"].generate(["twemoji dog face"], seed=0, steps=2)
        b = pipes["raw"].generate(["twemoji dog face"], seed=0, steps=2)
    assert not torch.equal(a, b)


class ResumeProbe(L.Callback):
    def on_train_start(self, trainer, pl_module):
        ema = ema_callback(trainer)
        self.avg = {k: v.clone() for k, v in ema._average_model.state_dict().items()}
        self.raw = net_state(pl_module)
        self.latest = ema._latest_update_step


def test_resume_restores_the_average(ema_run, tiny_emoji, tmp_path):
    from unifuse.run.checkpoint import read_checkpoint

    last = ema_run[1] / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    probe = ResumeProbe()
    fit_with(tiny_overrides(tiny_emoji) + FAST_EMA + ["trainer.max_epochs=2"], tmp_path, probe, ckpt_path=str(last))
    avg_net = {k[len("module.net."):]: v for k, v in probe.avg.items() if k.startswith("module.net.")}
    assert same(avg_net, read_checkpoint(last, weights="ema").state_dict)
    assert int(probe.avg["n_averaged"]) == int(saved["averaging_state"]["n_averaged"]) == 3
    assert same(probe.raw, read_checkpoint(last, weights="raw").state_dict), "the trained weights were not restored"
    assert probe.latest == 3


def test_ema_is_a_default_callback_presets_override_it_settings_are_checked(tmp_path):
    from hydra.utils import instantiate

    from unifuse.run.ema import EMA

    cfg = compose_cfg([], tmp_path)  # callbacks=default, whatever the model
    ema = instantiate(cfg.callbacks.ema)
    assert isinstance(ema, EMA) and ema.decay == 0.999 and ema.update_starting_at_step == 1000
    assert ema.weights == cfg.eval.weights == "ema"
    for name, decay in {"ldm_emoji": 0.998, "transfusion_emoji": 0.995}.items():
        ema = instantiate(compose_cfg([f"experiment={name}"], tmp_path).callbacks.ema)
        assert isinstance(ema, EMA) and ema.decay == decay
    with pytest.raises(ValueError, match="eval.weights must be 'ema' or 'raw'"):
        EMA(weights="best")
    with pytest.raises(ValueError, match=r"callbacks.ema.decay must be in \[0, 1\)"):
        EMA(decay=1.0)
