"""AR GPT and MaskGIT through the training app, pre-encoded shards, DDP and the sampling CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import compose_cfg, generator_overrides
from tests.test_distributed import run, run_dirs
from unifuse.train import train


def test_encoded_shards_hold_codes_and_captions(tiny_codes, tiny_tokenizer):
    from collections import Counter

    from unifuse.data.read import raw_samples
    from unifuse.data.samples import DecodeConfig, decode_sample
    from unifuse.data.shards import expand_shards

    stats = Counter()
    raws = [r for u in expand_shards(str(tiny_codes / "train")) for r in raw_samples(u, 0, None, stats)]
    s = decode_sample(raws[0], DecodeConfig(), stats)
    assert s.codes.shape == (8, 8) and s.codes.dtype == np.int16 and s.text and not s.images
    assert 0 <= s.codes.min() and s.codes.max() < 32
    assert (tiny_codes / "_encoded_with.json").is_file()


def test_code_shards_of_another_tokenizer_are_refused(tiny_codes, tiny_tokenizer, tmp_path):
    """Codes are only valid with the codebook that made them: pointing a run at code shards encoded
    by another tokenizer checkpoint is an error naming the setting, before any batch is read."""
    import shutil

    import hydra

    other = tmp_path / "other.ckpt"
    shutil.copy(tiny_tokenizer, other)
    for tok, ok in ((tiny_tokenizer, True), (other, False)):
        cfg = compose_cfg(generator_overrides("ar_gpt", tiny_codes, tok)
                          + ["data.build=encode", f"data.build_dir={tiny_codes}"], tmp_path / "run")
        dm = hydra.utils.instantiate(cfg.data)
        if ok:
            dm.prepare_data()
        else:
            with pytest.raises(ValueError, match="model.tokenizer_ckpt") as e:
                dm.prepare_data()
            assert str(other) in str(e.value) and str(tiny_tokenizer.resolve()) in str(e.value)


def test_fast_dev_run_ar_gpt_and_maskgit(tiny_codes, tiny_tokenizer, tmp_path, monkeypatch):
    """Both train on PackingCollator rows holding several documents (each <= 92 positions here)."""
    from unifuse.data.collate import PackingCollator

    docs_per_row = []
    real_pop = PackingCollator.pop

    def pop(self):
        batch = real_pop(self)
        docs_per_row.append(int(batch["doc_id"].max()) + 1)
        return batch

    monkeypatch.setattr(PackingCollator, "pop", pop)
    for model in ("ar_gpt", "maskgit"):
        docs_per_row.clear()
        cfg = compose_cfg(generator_overrides(model, tiny_codes, tiny_tokenizer)
                          + ["trainer=debug", "logger=none", "data.collator.seq_len=200"], tmp_path / model)
        result = train(cfg)
        assert result["metrics"]["train/loss"] > 0
        assert docs_per_row and max(docs_per_row) >= 2, model
        grids = [p for p in result["images"] if "samples" in p]
        assert grids, f"{model}: no sample grid written"
        im = np.asarray(Image.open(grids[0]))
        assert im.shape[0] > 16 and im.std() > 0


def test_generator_trains_from_images_on_the_fly(tiny_emoji, tiny_tokenizer, tmp_path):
    over = generator_overrides("ar_gpt", tiny_emoji, tiny_tokenizer) + ["trainer=debug", "logger=none"]
    over = [o for o in over if not o.startswith("data=")]  # plain image shards, encoded in the step
    result = train(compose_cfg(over, tmp_path))
    assert result["metrics"]["train/loss"] > 0


def test_sampling_cli_writes_a_grid(tiny_codes, tiny_tokenizer, tmp_path):
    from unifuse.sample import main

    for model in ("ar_gpt", "maskgit"):
        cfg = compose_cfg(generator_overrides(model, tiny_codes, tiny_tokenizer) +
                          ["trainer=debug_limit", "trainer.max_epochs=1", "logger=none"], tmp_path / model)
        ckpt = train(cfg)["checkpoint"]
        out = main([f"ckpt={ckpt}", "prompt=twemoji dog face|openmoji red heart", "n=3", "cfg_scale=2",
                    f"out={tmp_path / model}.png", "steps=4"])
        im = Image.open(out)
        assert im.size[0] == 3 * 96 + 4 * 4  # 3 per row, 16px images scaled x6 to 96, padding 4
        rows = np.asarray(im.convert("L"))[:, 4:4 + 3 * 100]
        caption_band = rows[4 + 96 + 2: 4 + 96 + 14]  # first line of text under the first row
        assert (caption_band < 128).any()  # the prompt is written there
        again = main([f"ckpt={ckpt}", "prompt=twemoji dog face|openmoji red heart", "n=3", "cfg_scale=2",
                      f"out={tmp_path / model}_2.png", "steps=4"])
        assert np.array_equal(np.asarray(Image.open(again)), np.asarray(im))  # seeded


def test_sampling_cli_defaults_to_the_checkpoint_sampling_settings():
    from unifuse.config import SamplingOverrides, compose_app, given
    from unifuse.models.image_gpt import ImageGPT
    from unifuse.models.maskgit import MaskGIT
    from unifuse.models.transformer import TransformerConfig
    from unifuse.pipelines import TokenImagePipeline
    from unifuse.text.vocab import VocabLayout

    stored = {"cfg_scale": 1.5, "temperature": 0.8, "top_k": None, "top_p": 0.95, "seed": 0, "steps": 12}
    tiny = dict(transformer=TransformerConfig(dim=16, n_layers=1, n_heads=2), vocab=VocabLayout(image_codes=8), grid=2)
    cli = given(compose_app("sample", ["ckpt=x", "temperature=1.0", "top_k=50"]), SamplingOverrides)
    assert cli == {"temperature": 1.0, "top_k": 50}  # only what the command line sets
    pipe = TokenImagePipeline(ImageGPT(**tiny), object(), sampling=stored)
    assert pipe.arguments(pipe.settings(**cli)) == {"cfg_scale": 1.5, "cfg_schedule": "constant", "temperature": 1.0,
                                                    "top_k": 50, "top_p": 0.95, "seed": 0}  # no steps
    cli = given(compose_app("sample", ["ckpt=x", "cfg_scale=null", "cfg_schedule=linear"]), SamplingOverrides)
    mg = TokenImagePipeline(MaskGIT(**tiny), object(), sampling=stored).settings(**cli)
    assert mg.cfg_scale is None and mg.steps == 12 and mg.cfg_schedule == "linear"


def test_ddp_two_processes_ar_gpt(tiny_codes, tiny_tokenizer, tmp_path):
    args = generator_overrides("ar_gpt", tiny_codes, tiny_tokenizer) + [
        f"paths.root_dir={tmp_path}", "logger=csv", "trainer=ddp", "trainer.devices=2", "trainer.max_epochs=1",
        "+trainer.limit_val_batches=1"]
    run(args, tmp_path)
    dirs = run_dirs(tmp_path / "outputs")
    assert len(dirs) == 1 and (dirs[0] / "checkpoints" / "last.ckpt").is_file()
    ck = torch.load(dirs[0] / "checkpoints" / "last.ckpt", weights_only=True)
    assert ck["unifuse"]["kind"] == "ar_gpt" and ck["unifuse"]["config"]["vocab"]["image_codes"] == 32


def test_captioned_grid_layout():
    from unifuse.run.viz import captioned_grid

    images = torch.zeros(6, 3, 8, 8)
    with pytest.raises(ValueError, match="captions"):
        captioned_grid(images, ["a"], nrow=3)
    g = np.asarray(captioned_grid(images, ["dog face", "", "", "", "", ""], nrow=3).convert("L"))
    tile = 96  # 8px scaled x12
    assert g.shape[1] == 3 * (tile + 4) + 4
    assert (g[4:4 + tile, 4:4 + tile] == 0).all()  # the image itself, nearest-upscaled
    assert (g[4 + tile:4 + tile + 14, 4:4 + tile] < 128).any()  # its caption
    second_row = g.shape[0] // 2
    assert not (g[second_row + 4 + tile:, :] < 128).any()  # no caption under uncaptioned tiles


def test_a_collator_with_another_vocabulary_is_refused_at_setup():
    """Token ids must mean the same to the data collator and the model (e.g. a different codebook
    size moves every special token)."""
    from types import SimpleNamespace

    from unifuse.data.collate import PackingCollator
    from unifuse.lit.generators import TokenGeneratorModule
    from unifuse.models.image_gpt import ImageGPT
    from unifuse.models.transformer import TransformerConfig
    from unifuse.text.vocab import VocabLayout

    module = TokenGeneratorModule(ImageGPT(TransformerConfig(dim=32, n_layers=1, n_heads=2),
                                           VocabLayout(image_codes=16), grid=2))
    same = PackingCollator(2, 16, vocab=VocabLayout(image_codes=16))
    other = PackingCollator(2, 16, vocab=VocabLayout(image_codes=32))
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(collator=same, val_collator=same))
    module.setup("fit")
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(collator=same, val_collator=other))
    with pytest.raises(ValueError, match="data.val_collator builds sequences"):
        module.setup("fit")
