"""The Hydra entry points for sampling and evaluation, run as a user runs them: typed settings that
fail on a misspelled key, sweeps with a summary table, prompts that must be given, and the online
generator FID reproduced offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, compose_cfg, generator_overrides
from unifuse.train import train


def cli(module: str, args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "UNIFUSE_ROOT": str(cwd), "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def online(tiny_codes, tiny_tokenizer, tiny_emoji, domain_weights, tmp_path_factory) -> dict:
    """A tiny AR GPT trained with the online FID callback on (n=8)."""
    out = tmp_path_factory.mktemp("online")
    over = generator_overrides("ar_gpt", tiny_codes, tiny_tokenizer) + [
        "trainer=debug_limit", "trainer.max_epochs=1", "logger=csv", "callbacks.fidelity.enabled=true",
        f"data.image_root={tiny_emoji}", "eval.n=8", "eval.batch_size=8", "eval.cache_dir=null"]
    return train(compose_cfg(over, out))


def test_online_generator_fid_is_reproduced_by_the_evaluate_cli(online):
    from unifuse.evaluate import main as evaluate_main

    logged = {k: v for k, v in online["metrics"].items() if k.startswith("eval/fid@domain-")}
    assert len(logged) == 1, online["metrics"]
    (name, value), = logged.items()
    assert name.endswith("-n8-ema-cfg1.5lin")  # callbacks.ema's average; the ar_gpt preset's cfg 1.5, linear ramp
    res = evaluate_main([f"ckpt={online['checkpoint']}"])
    assert res["metric_names"]["fid"] == name
    assert res["metrics"]["fid"] == pytest.approx(value, rel=1e-5, abs=1e-6)
    assert res["protocol"]["sampler"] == "ar_gpt" and res["protocol"]["temperature"] == 0.8


def test_misspelled_key_fails_naming_it(online, tmp_path):
    proc = cli("unifuse.evaluate", [f"ckpt={online['checkpoint']}", "extractr=inception"], tmp_path)
    assert proc.returncode != 0 and "extractr" in proc.stderr
    assert not list(Path(online["checkpoint"]).parent.glob("eval_*inception*"))  # nothing computed
    proc = cli("unifuse.sample", [f"ckpt={online['checkpoint']}", "prompt=a", "cfg_scale=high"], tmp_path)
    assert proc.returncode != 0 and "cfg_scale" in proc.stderr  # typed: not a float


def test_cfg_job_prints_the_config(tmp_path):
    proc = cli("unifuse.evaluate", ["--cfg", "job", "ckpt=x.ckpt", "cfg_scale=2"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "cfg_scale: 2.0" in proc.stdout and "extractor: ???" in proc.stdout


def test_evaluate_sweep_writes_one_json_per_job_and_a_table(online, tmp_path):
    ckpt = online["checkpoint"]
    out = f"out={tmp_path}/r/" + "${cfg_scale}.json"  # one JSON per job, named by its guidance scale
    proc = cli("unifuse.evaluate", ["-m", f"ckpt={ckpt}", "cfg_scale=1,1.5,3", out], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jsons = sorted((tmp_path / "r").glob("*.json"))
    assert [p.name for p in jsons] == ["1.0.json", "1.5.json", "3.0.json"]
    scales = [json.loads(p.read_text())["protocol"]["cfg_scale"] for p in jsons]
    assert scales == [1.0, 1.5, 3.0]
    table = list((tmp_path / "outputs" / "eval_sweeps").rglob("summary.md"))
    assert len(table) == 1
    lines = table[0].read_text().strip().splitlines()
    assert len(lines) == 2 + 3  # header, rule, one row per job
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:4] == ["job", "overrides", "protocol", "fid"]
    for line, result, scale in zip(lines[2:], jsons, ("cfg1.0lin", "cfg1.5lin", "cfg3.0lin"), strict=True):
        row = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        assert scale in row["protocol"] and "domain-" in row["protocol"]  # each row names its protocol
        assert float(row["fid"]) == pytest.approx(json.loads(result.read_text())["metrics"]["fid"], abs=1e-4)
    assert (table[0].parent / "summary.csv").is_file()


def test_prompts_are_required_unless_unconditional_is_asked_for(online, tmp_path):
    from unifuse.sample import main

    ckpt = online["checkpoint"]
    with pytest.raises(ValueError, match="prompt=... is required"):
        main([f"ckpt={ckpt}", f"out={tmp_path}/a.png"])
    with pytest.raises(ValueError, match="uncond=true"):
        main([f"ckpt={ckpt}", "prompt=", f"out={tmp_path}/b.png"])
    with pytest.raises(ValueError, match="uncond=true"):
        main([f"ckpt={ckpt}", "prompt=dog face||pizza", f"out={tmp_path}/c.png"])
    out = main([f"ckpt={ckpt}", "prompt=", "uncond=true", "n=2", f"out={tmp_path}/d.png"])
    assert out.is_file()


def test_sample_sweep_over_guidance(online, tmp_path):
    proc = cli("unifuse.sample", ["-m", f"ckpt={online['checkpoint']}", "prompt=twemoji dog face", "n=2",
                                  "cfg_scale=null,2", f"out={tmp_path}/g/" + "${cfg_scale}.png"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "g").glob("*.png")) == ["2.0.png", "None.png"]


@pytest.fixture(scope="module")
def transfusion_ckpt(tiny_emoji, tiny_kl, tmp_path_factory) -> str:
    """A tiny Transfusion checkpoint (reads images, writes captions)."""
    from tests.test_transfusion import transfusion_overrides

    out = tmp_path_factory.mktemp("transfusion")
    over = transfusion_overrides(tiny_emoji, tiny_kl) + [
        "trainer=debug_limit", "trainer.max_epochs=1", "logger=none", "callbacks.fidelity.enabled=false"]
    return train(compose_cfg(over, out))["checkpoint"]


def test_caption_of_a_file_that_is_not_an_image_names_it_in_one_line(transfusion_ckpt, tmp_path):
    from PIL import Image

    from unifuse.sample import main

    good, text = tmp_path / "good.png", tmp_path / "notes.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(good)
    text.write_text("not an image\n")
    proc = cli("unifuse.sample", [f"ckpt={transfusion_ckpt}", "mode=caption", f"image={good}|{text}"], tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: image={text}: not a readable image (cannot identify image file '{text}')")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:60])  # a PNG header, then nothing
    with pytest.raises(ValueError, match=f"^image={truncated}: not a readable image"):
        main([f"ckpt={transfusion_ckpt}", "mode=caption", f"image={truncated}"])
    with pytest.raises(FileNotFoundError, match=f"^image={tmp_path}/missing.png: no such file$"):
        main([f"ckpt={transfusion_ckpt}", "mode=caption", f"image={good}|{tmp_path}/missing.png"])
    out = main([f"ckpt={transfusion_ckpt}", "mode=caption", f"image={good}", "max_new_tokens=2",
                f"out={tmp_path}/cap.png"])
    assert out.is_file()  # a readable image is still captioned


def test_train_refuses_a_callback_without_target_in_one_line(tmp_path):
    """callbacks=fsdp has no EMA, the transfusion preset sets callbacks.ema fields: the run stops
    before anything is built with one line naming the entry (it crashed in Lightning's
    on_exception with the entry as a plain dict)."""
    proc = cli("unifuse.train", ["experiment=transfusion_emoji", "trainer=fsdp", "callbacks=fsdp"], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: callbacks.ema has no _target_") and "callbacks.ema=null" in last
