"""The checkpoint registry: checkpoints that travel (tokenizer and BPE vocabulary inside), exports
that load with safetensors alone, clear errors for what cannot be loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import compose_cfg, generator_overrides
from unifuse.train import train


def _train_generator(model: str, codes: Path, tokenizer: Path, out: Path, *extra: str) -> Path:
    over = generator_overrides(model, codes, tokenizer) + ["trainer=debug_limit", "trainer.max_epochs=1",
                                                           "logger=none", *extra]
    return Path(train(compose_cfg(over, out))["checkpoint"])


@pytest.fixture(scope="module")
def travelling(tiny_codes, tiny_tokenizer, tmp_path_factory) -> dict:
    """An AR checkpoint trained against a tokenizer copy that is then deleted, copied alone elsewhere;
    and one that stores only the tokenizer's hash and path (embed_tokenizer=false)."""
    root = tmp_path_factory.mktemp("travel")
    tok = root / "tok" / "last.ckpt"
    tok.parent.mkdir()
    shutil.copy(tiny_tokenizer, tok)
    embedded = _train_generator("ar_gpt", tiny_codes, tok, root / "run_a")
    named = _train_generator("ar_gpt", tiny_codes, tok, root / "run_b", "model.embed_tokenizer=false")
    moved = root / "elsewhere"
    moved.mkdir()
    shutil.copy(embedded, moved / "embedded.ckpt")
    shutil.copy(named, moved / "named.ckpt")
    tok_moved = root / "tok_moved.ckpt"
    shutil.move(tok, tok_moved)  # the path stored at training time no longer exists
    shutil.rmtree(root / "run_a")
    return {"embedded": moved / "embedded.ckpt", "named": moved / "named.ckpt", "tokenizer": tok_moved,
            "root": root}


def _sample(ckpt: Path, out: Path, *extra: str) -> np.ndarray:
    from unifuse.sample import main

    path = main([f"ckpt={ckpt}", "prompt=twemoji dog face|openmoji red heart", "n=2", f"out={out}", *extra])
    return np.asarray(Image.open(path))


def test_generator_checkpoint_samples_alone_or_with_tokenizer_override(travelling, tmp_path):
    alone = _sample(travelling["embedded"], tmp_path / "a.png")  # the tokenizer it carries
    with_override = _sample(travelling["embedded"], tmp_path / "b.png", f"tokenizer={travelling['tokenizer']}")
    assert np.array_equal(alone, with_override)  # carried weights == the tokenizer file's weights
    # a checkpoint that only names its tokenizer: a clear error naming the setting, then tokenizer= works
    with pytest.raises(FileNotFoundError, match="tokenizer="):
        _sample(travelling["named"], tmp_path / "c.png")
    named = _sample(travelling["named"], tmp_path / "d.png", f"tokenizer={travelling['tokenizer']}")
    assert named.shape == alone.shape


def test_carried_tokenizer_is_the_training_tokenizer(travelling):
    from unifuse.run.checkpoint import load_net, load_tokenizer, read_checkpoint, state_hash

    ck = read_checkpoint(travelling["embedded"])
    assert ck.tokenizer_state is not None and ck.tokenizer["kind"] == "vqvae"
    tok = load_tokenizer(ck)
    ref = load_net(travelling["tokenizer"], expect="vqvae")
    assert state_hash(tok.state_dict()) == state_hash(ref.state_dict()) == ck.tokenizer["sha256"]
    named = read_checkpoint(travelling["named"])
    assert named.tokenizer_state is None and named.tokenizer["sha256"] == ck.tokenizer["sha256"]
    json.dumps(torch.load(travelling["embedded"], weights_only=True)["unifuse"])  # metadata stays plain data


def test_changed_tokenizer_file_is_refused(travelling, tmp_path):
    """A checkpoint that names its tokenizer by path refuses a file whose weights changed since."""
    from unifuse.run.checkpoint import load_tokenizer, read_checkpoint

    ck = read_checkpoint(travelling["named"])
    other = tmp_path / "tok.ckpt"
    raw = torch.load(travelling["tokenizer"], weights_only=True)
    raw["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in raw["state_dict"].items()}
    torch.save(raw, other)
    ck.meta["tokenizer"] = {**ck.tokenizer, "path": str(other)}
    with pytest.raises(ValueError, match="has changed"):
        load_tokenizer(ck)
    ck.meta["tokenizer"]["path"] = str(travelling["tokenizer"])
    assert load_tokenizer(ck) is not None


def test_export_loads_into_a_fresh_net_with_safetensors_alone(travelling, tmp_path):
    from safetensors.torch import load_file

    from unifuse.export import main as export_main
    from unifuse.run.checkpoint import build_net, load_net

    out = export_main([f"ckpt={travelling['embedded']}", f"out={tmp_path / 'export'}"])
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.safetensors"}
    c = json.loads((out / "config.json").read_text())
    fresh = build_net(c["kind"], c["config"])
    fresh.load_state_dict(load_file(str(out / "model.safetensors")))
    ref = load_net(travelling["embedded"])
    x = torch.randint(0, ref.vocab.size, (2, 12))
    pos = torch.arange(12).expand(2, 12)
    torch.testing.assert_close(fresh.eval().net(x, pos), ref.net(x, pos), rtol=0, atol=0)
    tok = build_net(c["tokenizer"]["kind"], c["tokenizer"]["config"], load_file(str(out / "tokenizer.safetensors")))
    assert tok.codebook_size == c["config"]["vocab"]["image_codes"]
    # the export directory is a checkpoint for the sampler too, and samples the same images
    a = _sample(travelling["embedded"], tmp_path / "ckpt.png")
    b = _sample(out, tmp_path / "export.png")
    assert np.array_equal(a, b)


def test_export_of_a_name_only_checkpoint_carries_the_tokenizer(travelling, tmp_path):
    """Exporting where the named tokenizer file exists puts its weights into the export."""
    from unifuse.run.checkpoint import export, read_checkpoint

    ck = torch.load(travelling["named"], weights_only=True)
    ck["unifuse"]["tokenizer"]["path"] = str(travelling["tokenizer"])
    fixed = tmp_path / "named.ckpt"
    torch.save(ck, fixed)
    out = export(fixed, tmp_path / "exp")
    assert (out / "tokenizer.safetensors").is_file()
    assert read_checkpoint(out).tokenizer_state is not None


def test_bpe_vocabulary_travels_inside_the_config(tmp_path):
    from unifuse.models.image_gpt import ImageGPT
    from unifuse.models.transformer import TransformerConfig
    from unifuse.run.checkpoint import build_net
    from unifuse.text.tokenizer import BPETokenizer
    from unifuse.text.vocab import VocabLayout

    texts = ["twemoji dog face", "openmoji red heart", "twemoji red apple", "openmoji dog"] * 50
    bpe = BPETokenizer.train(iter(texts), tmp_path / "bpe.json", vocab_size=300)
    net = ImageGPT(TransformerConfig(dim=16, n_layers=1, n_heads=2), VocabLayout(text_size=bpe.vocab_size,
                   image_codes=8), grid=2, text_tokenizer=bpe)
    config = json.loads(json.dumps(net.config()))  # what a checkpoint stores, as plain data
    (tmp_path / "bpe.json").unlink()  # the file is gone: the vocabulary itself is in the config
    rebuilt = build_net("ar_gpt", config)
    assert rebuilt.text_tokenizer.encode("twemoji dog face") == bpe.encode("twemoji dog face")
    assert len(bpe.encode("twemoji dog face")) < len("twemoji dog face")  # real merges, not bytes


def test_registry_errors_name_what_is_wrong(tmp_path, travelling):
    from unifuse.paradigms import paradigms
    from unifuse.run.checkpoint import load_net, read_checkpoint

    assert {"vqvae", "ar_gpt", "maskgit"} <= {p.name for p in paradigms()}
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(ValueError, match="not a unifuse checkpoint"):
        read_checkpoint(plain)
    odd = tmp_path / "odd.ckpt"
    torch.save({"state_dict": {}, "unifuse": {"kind": "hologram", "config": {}}}, odd)
    with pytest.raises(ValueError, match=r"unknown checkpoint kind 'hologram'.*pass plugins=\["):
        read_checkpoint(odd)
    with pytest.raises(ValueError, match="is a ar_gpt checkpoint, expected vqvae"):
        load_net(travelling["embedded"], expect="vqvae")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_checkpoint(tmp_path / "missing.ckpt")


def test_resume_with_another_vocabulary_layout_fails(tiny_codes, tiny_tokenizer, tmp_path):
    """The vocabulary layout stored in a checkpoint is checked when a run resumes from it."""
    first = _train_generator("ar_gpt", tiny_codes, tiny_tokenizer, tmp_path / "a")
    over = generator_overrides("ar_gpt", tiny_codes, tiny_tokenizer) + [
        "trainer=debug_limit", "trainer.max_epochs=2", "logger=none", f"ckpt_path={first}",
        "model.net.vocab.num_classes=4", "model.net.vocab.image_codes=32"]
    with pytest.raises(ValueError, match="vocabulary layout"):
        train(compose_cfg(over, tmp_path / "b"))
