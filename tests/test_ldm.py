"""model=ldm from training to FID: DiT over a frozen KL autoencoder's normalised latents, EMA
weights through Lightning's callback, the checkpoint registry (sample, evaluate, travelling
checkpoints), per-row seeds, errors naming the setting, and a 2-process DDP run."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.conftest import compose_cfg, ldm_overrides
from tests.test_distributed import run, run_dirs
from unifuse.models.dit import DiT, DiTConfig

EMA = ["callbacks.ema.decay=0.9", "callbacks.ema.update_starting_at_step=0"]  # the default callback, averaging at once


@pytest.fixture(scope="module")
def trained_ldm(tiny_emoji, tiny_kl, domain_weights, tmp_path_factory):
    from unifuse.train import train

    out = tmp_path_factory.mktemp("ldm_run")
    cfg = compose_cfg(ldm_overrides(tiny_emoji, tiny_kl) + EMA + [
        "trainer=debug_limit", "trainer.max_epochs=2", "logger=csv", f"eval.domain_weights={domain_weights}"], out)
    return train(cfg)


def tiny_dit(**kw) -> DiT:
    torch.manual_seed(0)
    kw = {"latent_channels": 4, "latent_size": 8, "patch_size": 2, "dim": 32, "n_layers": 2, "n_heads": 2,
          "text_dim": 32, "text_layers": 1, "text_heads": 2, "max_text_len": 16, **kw}
    net = DiT(DiTConfig(**kw)).eval()
    with torch.no_grad():  # adaLN-Zero starts as the identity: give the blocks something to do
        for p in net.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return net


def test_dit_text_reaches_the_output_and_padding_does_not():
    net = tiny_dit()
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 10])
    a = net(z, t, net.encode_conditions(["a dog", "a cat"], "cpu"))
    assert not torch.allclose(a[0], a[1])  # the caption matters
    # the same caption alone or next to a longer one (more padding in the batch): the same output
    alone = net(z[:1], t[:1], net.encode_conditions(["a dog"], "cpu"))
    torch.testing.assert_close(a[:1], alone, atol=1e-5, rtol=1e-4)
    # unconditional = BOS only; class-conditional nets take ids, None = the null class
    u = net(z, t, net.encode_conditions([None, ""], "cpu"))
    torch.testing.assert_close(u[0], net(z[:1], t[:1], net.encode_conditions([""], "cpu"))[0], atol=1e-5, rtol=1e-4)
    cls = tiny_dit(num_classes=3, text_layers=0)
    c = cls.encode_conditions([0, None], "cpu")
    assert c["class_id"].tolist() == [0, 3]


def test_dit_patchify_round_trip_and_zero_init_output():
    net = DiT(DiTConfig(latent_channels=4, latent_size=8, patch_size=2, dim=32, n_layers=2, n_heads=2,
                        text_dim=32, text_layers=1, text_heads=2))
    z = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(net.unpatchify(net.patchify(z)), z)
    assert net.patchify(z).shape == (3, 16, 16)
    out = net(z, torch.tensor([1, 2, 3]), net.encode_conditions(["x", "y", ""], "cpu"))
    assert out.shape == z.shape and out.abs().max() == 0  # adaLN-Zero + zero final layer


def test_same_image_alone_or_in_a_batch(trained_ldm):
    from unifuse.run.checkpoint import load_pipeline

    pipe, _ = load_pipeline(trained_ldm["checkpoint"])
    for sampler in ("ddim", "ddpm", "dpmpp_2m"):
        both = pipe.generate(["twemoji dog face", "openmoji pizza"], sampler=sampler, steps=4, seed=5)
        second = pipe.generate(["openmoji pizza"], sampler=sampler, steps=4, seed=6)
        torch.testing.assert_close(both[1:], second, atol=1e-4, rtol=1e-4)


def test_checkpoint_is_ema_carries_its_autoencoder_and_online_fid_is_reproduced(trained_ldm, tmp_path):
    from unifuse.evaluate import main as evaluate_main
    from unifuse.run.checkpoint import read_checkpoint
    from unifuse.sample import main as sample_main

    ck = read_checkpoint(trained_ldm["checkpoint"])
    assert ck.kind == "ldm" and ck.meta["weights"] == "ema" and ck.tokenizer_state is not None
    assert ck.tokenizer["kind"] == "kl_autoencoder" and ck.sampling["sampler"] == "ddim"
    raw = torch.load(trained_ldm["checkpoint"], weights_only=True)["current_model_state"]
    assert any(not torch.equal(raw[k], v) for k, v in torch.load(trained_ldm["checkpoint"], weights_only=True)[
        "state_dict"].items() if k.startswith("net.") and v.is_floating_point())  # EMA differs from raw
    online = {k: v for k, v in trained_ldm["metrics"].items() if k.startswith("eval/fid@")}
    assert len(online) == 1, trained_ldm["metrics"]
    (name, value), = online.items()
    assert "-ema-" in name and "-ddim-" in name and "cfg3.0" in name and "steps4" in name
    res = evaluate_main([f"ckpt={trained_ldm['checkpoint']}"])
    assert res["metric_names"]["fid"] == name
    assert res["metrics"]["fid"] == pytest.approx(value, rel=1e-4)
    other = evaluate_main([f"ckpt={trained_ldm['checkpoint']}", "sampler=dpmpp_2m", "steps=3", "n=16"])
    assert "-dpmpp_2m-" in other["metric_names"]["fid"] and "steps3" in other["metric_names"]["fid"]
    # the checkpoint alone, copied elsewhere, samples from the autoencoder it carries
    alone = tmp_path / "alone.ckpt"
    shutil.copy(trained_ldm["checkpoint"], alone)
    out = sample_main([f"ckpt={alone}", "prompt=twemoji dog face|openmoji pizza", "n=2", "steps=3",
                       f"out={tmp_path / 'grid.png'}"])
    assert out.is_file()


def test_wrong_autoencoder_or_latent_size_fail_before_training_naming_the_setting(tiny_emoji, tiny_kl, tiny_tokenizer,
                                                                                  tmp_path):
    from unifuse.train import train

    base = ldm_overrides(tiny_emoji, tiny_kl) + ["trainer=debug_limit", "logger=none",
                                                 "callbacks.fidelity.enabled=false"]
    with pytest.raises(ValueError, match="kl_autoencoder"):
        train(compose_cfg(base + [f"model.tokenizer_ckpt={tiny_tokenizer}"], tmp_path / "a"))
    with pytest.raises(ValueError, match="model.net.dit.latent_channels"):
        train(compose_cfg(base + ["model.net.dit.latent_channels=8"], tmp_path / "b"))
    with pytest.raises(ValueError, match="model.net.dit.latent_size"):
        train(compose_cfg(base + ["model.net.dit.latent_size=4"], tmp_path / "c"))


def test_flow_matching_transport_trains_and_samples(tiny_emoji, tiny_kl, tmp_path):
    from unifuse.run.checkpoint import load_pipeline
    from unifuse.train import train

    r = train(compose_cfg(ldm_overrides(tiny_emoji, tiny_kl) + [
        "trainer=debug_limit", "trainer.max_epochs=1", "logger=none", "callbacks.fidelity.enabled=false",
        "model.net.dit.diffusion.transport=flow", "model.sampling.sampler=euler"], tmp_path))
    pipe, ck = load_pipeline(r["checkpoint"])
    assert ck.config["dit"]["diffusion"]["transport"] == "flow"
    for sampler in ("euler", "heun"):
        x = pipe.generate(["twemoji dog face"], sampler=sampler, steps=3)
        assert x.shape == (1, 3, 16, 16) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="FlowMatching|GaussianDiffusion"):
        pipe.generate(["x"], sampler="ddim", steps=3)


def test_ddp_two_processes_ldm(tiny_emoji, tiny_kl, tmp_path):
    args = ldm_overrides(tiny_emoji, tiny_kl) + EMA + [
        f"paths.root_dir={tmp_path}", "logger=csv", "trainer=ddp", "trainer.devices=2", "trainer.max_epochs=1",
        "+trainer.limit_val_batches=1", "callbacks.fidelity.enabled=false"]
    run(args, tmp_path)
    dirs = run_dirs(tmp_path / "outputs")
    assert len(dirs) == 1 and (dirs[0] / "checkpoints" / "last.ckpt").is_file()
    ck = torch.load(dirs[0] / "checkpoints" / "last.ckpt", weights_only=True)
    assert ck["unifuse"]["kind"] == "ldm" and ck["unifuse"]["weights"] == "ema"


def test_latent_shards_train_the_same_model_and_a_mismatch_names_the_setting(tiny_emoji, tiny_kl, tmp_path):
    """`unifuse.data encode` with a KL checkpoint writes float16 posterior mean + std; an ldm run
    trains from them (sampling the posterior), and shards of another latent shape are refused."""
    from collections import Counter

    import numpy as np

    from unifuse.data.encode import encode_shards
    from unifuse.data.read import raw_samples
    from unifuse.data.samples import DecodeConfig, decode_sample
    from unifuse.data.shards import expand_shards
    from unifuse.models.kl_autoencoder import load_kl_autoencoder
    from unifuse.train import train

    out = tmp_path / "latents"
    encode_shards(tiny_kl, tiny_emoji, out, batch_size=16)
    raw = next(raw_samples(expand_shards(str(out / "val"))[0], 0, None, Counter()))
    s = decode_sample(raw, DecodeConfig(), Counter())
    assert s.codes.dtype == np.float16 and s.codes.shape == (8, 8, 8) and s.text
    ae = load_kl_autoencoder(tiny_kl)
    img = next(x for x in raw_samples(expand_shards(str(tiny_emoji / "val"))[0], 0, None, Counter())
               if x["__key__"] == raw["__key__"])
    x = torch.from_numpy(decode_sample(img, DecodeConfig(), Counter()).images[0]).permute(2, 0, 1)[None]
    q = ae.posterior(x.float() / 127.5 - 1)
    torch.testing.assert_close(torch.from_numpy(s.codes[:4]).float(), q.mean[0], atol=2e-2, rtol=1e-2)
    over = [o for o in ldm_overrides(tiny_emoji, tiny_kl) if not o.startswith(("data.train", "data.val"))]
    over += [f"data.train.emoji.shards={out}/train", f"data.val={out}/val", "trainer=debug_limit", "logger=none",
             "trainer.max_epochs=1", "callbacks.fidelity.enabled=false"]
    r = train(compose_cfg(over, tmp_path / "run"))
    assert torch.isfinite(torch.tensor(r["metrics"]["train/loss"]))
    with pytest.raises(ValueError, match="latent_size"):
        train(compose_cfg(over + ["model.net.dit.latent_size=4"], tmp_path / "bad"))


def test_pixel_space_latent_diffusion_with_the_identity_autoencoder(tiny_emoji, tmp_path):
    """model.tokenizer_ckpt=identity: a DiT on raw 16x16 pixels (3 channels, 2x2 patches), no
    autoencoder; a VQ model refuses it, naming the setting."""
    from unifuse.run.checkpoint import load_pipeline
    from unifuse.train import train

    over = [o for o in ldm_overrides(tiny_emoji, "unused") if not o.startswith("model.tokenizer_ckpt")]
    r = train(compose_cfg(over + ["model.tokenizer_ckpt=identity", "model.net.dit.latent_channels=3",
                                  "model.net.dit.latent_size=16", "model.net.dit.patch_size=4", "trainer=debug_limit",
                                  "trainer.max_epochs=1", "logger=none", "callbacks.fidelity.enabled=false"],
                          tmp_path / "ldm"))
    pipe, ck = load_pipeline(r["checkpoint"])
    assert ck.tokenizer["kind"] == "identity"
    x = pipe.generate(["twemoji dog face"])
    assert x.shape == (1, 3, 16, 16) and torch.isfinite(x).all()
    from unifuse.lit.generators import TokenGeneratorModule
    from unifuse.models.image_gpt import ImageGPT
    from unifuse.models.transformer import TransformerConfig
    from unifuse.text.vocab import VocabLayout

    ar = TokenGeneratorModule(ImageGPT(TransformerConfig(dim=32, n_layers=1, n_heads=2), VocabLayout(image_codes=8),
                                       grid=2), tokenizer_ckpt="identity")
    with pytest.raises(ValueError, match="tokenizer_ckpt=identity"):
        ar.setup("fit")


def test_two_validation_passes_of_the_same_weights_log_the_same_loss(tiny_emoji, tiny_kl, tmp_path):
    """Validation encodes the posterior mean: val/loss moves only with the weights (a posterior
    sample from the global generator moved it between epochs)."""
    from tests.test_transfusion import validate_twice

    first, second = validate_twice(ldm_overrides(tiny_emoji, tiny_kl), tmp_path)
    assert "val/loss" in first and first == second


def test_caption_dropout_resumes_where_it_stopped_and_validation_draws_none():
    """The caption-dropout stream of a generator module is part of the run: a module restored from a
    checkpoint drops the captions the uninterrupted one would have dropped, and validation (drop 0)
    does not move it (else training's drops would depend on how much validation ran)."""
    import io

    from unifuse.lit.ldm import LatentDiffusionModule

    batch = {"caption": [f"caption {i}" for i in range(64)]}
    run = LatentDiffusionModule(tiny_dit(), p_uncond=0.5, seed=7)
    for _ in range(3):
        run._conds(batch, 0.5)
    assert run._conds(batch, 0.0) == batch["caption"]  # validation: every caption ...
    without_val = LatentDiffusionModule(tiny_dit(), p_uncond=0.5, seed=7)
    for _ in range(3):
        without_val._conds(batch, 0.5)
    assert run._rng.getstate() == without_val._rng.getstate()  # ... and nothing drawn
    ckpt = {}
    run.on_save_checkpoint(ckpt)
    buf = io.BytesIO()
    torch.save({"caption_dropout_rng": ckpt["caption_dropout_rng"]}, buf)  # checkpoints load weights_only
    buf.seek(0)
    resumed = LatentDiffusionModule(tiny_dit(), p_uncond=0.5, seed=7)
    resumed.on_load_checkpoint(torch.load(buf, weights_only=True))
    expected = [run._conds(batch, 0.5) for _ in range(2)]
    assert [resumed._conds(batch, 0.5) for _ in range(2)] == expected
    fresh = LatentDiffusionModule(tiny_dit(), p_uncond=0.5, seed=7)
    assert fresh._conds(batch, 0.5) != expected[0]  # the stream had moved: a restart from the seed differs
