"""Acceptance test of a user's own path, with only the README's commands ("Your own data"), run as
subprocesses the way a user types them:

    python -m unifuse.data write pairs --images photos/ --out shards --val-fraction 0.05
    python -m unifuse.train data=shards data.train.main.shards=shards/train data.val=shards/val ...
    python -m unifuse.evaluate ckpt=<run>/checkpoints/last.ckpt extractor=inception inception_weights=<file>

on a folder of coloured shapes with a Hugging Face ``metadata.jsonl``; then the same training from
``file://`` and ``pipe:cat`` shard specs, which must plan the same samples (counts from the
``_index.json`` beside the shards, or counted once and cached in ``$UNIFUSE_CACHE``).
Only the sizes are shrunk (16x16 images, a tiny VQ-VAE, one epoch); nothing is downloaded: the
Inception weights are made here."""

from __future__ import annotations

import ast
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tests.conftest import ROOT

N_IMAGES, SIZE, BATCH, SHARD_SIZE = 120, 16, 4, 64
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (230, 200, 40)}
# the README's training command, plus what shrinks it to seconds on a CPU
TINY = [f"data.decode.image_size={SIZE}", f"data.collator.batch_size={BATCH}", "data.num_workers=0",
        "model.net.autoencoder.channels=8", "model.net.autoencoder.ch_mult=[1,2]",
        "model.net.autoencoder.z_channels=8", "model.net.quantizer.codebook_size=32",
        "trainer=cpu", "trainer.max_epochs=1", "logger=none", "callbacks.progress=null"]


def make_folder(folder: Path) -> None:
    """Distinct 16x16 PNGs of coloured shapes at random places, captioned in ``metadata.jsonl``."""
    folder.mkdir(parents=True)
    rng = random.Random(0)
    with (folder / "metadata.jsonl").open("w") as f:
        for i in range(N_IMAGES):
            shape, colour = SHAPES[i % 3], list(COLOURS)[(i // 3) % 4]
            im = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
            draw = ImageDraw.Draw(im)
            x, y, s = rng.randint(0, 6), rng.randint(0, 6), rng.randint(6, 9)
            if shape == "circle":
                draw.ellipse([x, y, x + s, y + s], fill=COLOURS[colour])
            elif shape == "square":
                draw.rectangle([x, y, x + s, y + s], fill=COLOURS[colour])
            else:
                draw.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=COLOURS[colour])
            name = f"{shape}_{i:03d}.png"
            im.save(folder / name)
            f.write(json.dumps({"file_name": name, "text": f"a {colour} {shape}"}) + "\n")


def make_inception_weights(path: Path, calibration: torch.Tensor) -> None:
    """A randomly initialised inception-v3-compat state dict, made here (nothing downloaded). Its batch
    norms take their statistics from ``calibration`` images, so features stay O(1) through the 90-odd
    layers (with default statistics they shrink to ~1e-8 and every FID is 0)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    with pytest.MonkeyPatch.context() as m:
        m.setattr(inc, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(inc.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.manual_seed(0)
        net = inc.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for mod in net.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None  # cumulative: the statistics of the calibration batch
    net.train()
    with torch.no_grad():
        net(calibration)
    torch.save(net.state_dict(), path)


def user_env(cache: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    for var in ("UNIFUSE_ROOT", "UNIFUSE_RUN_ID"):  # runs go to <cwd>/outputs/runs/<date>/<time>_<random>
        env.pop(var, None)
    if cache is not None:
        env["UNIFUSE_CACHE"] = str(cache)
    return env


def run(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=user_env(cwd / "cache"),
                          capture_output=True, text=True, timeout=600)


def report(proc: subprocess.CompletedProcess) -> dict:
    """What ``python -m unifuse.train`` prints at the end: the checkpoint and the metrics."""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ckpt = re.search(r"^checkpoint\s+: (.+)$", proc.stdout, re.M)
    metrics = re.search(r"^metrics\s+: (\{.*\})$", proc.stdout, re.M)
    assert ckpt and metrics, proc.stdout[-3000:]
    return {"checkpoint": Path(ckpt.group(1)), "metrics": ast.literal_eval(metrics.group(1))}


def index_counts(d: Path) -> dict[str, int]:
    return {name: e["samples"] for name, e in json.loads((d / "_index.json").read_text()).items()}


def keys(d: Path) -> set[str]:
    out = set()
    for t in sorted(d.glob("*.tar")):
        with tarfile.open(t) as tar:
            out |= {m.name.split(".", 1)[0] for m in tar}
    return out


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> dict:
    """The folder written into shards, the three training runs (local path, ``file://``, ``pipe:cat``;
    run side by side) and the Inception weights (made while they train)."""
    from unifuse.data.read import iter_decoded
    from unifuse.data.samples import DecodeConfig

    home = tmp_path_factory.mktemp("user_path")
    make_folder(home / "photos")
    write = run("unifuse.data", ["write", "pairs", "--images", "photos/", "--out", "shards", "--val-fraction", "0.05",
                                 "--shard-size", str(SHARD_SIZE)], home)
    assert write.returncode == 0, write.stderr[-3000:]
    train_dir, val_dir = home / "shards" / "train", home / "shards" / "val"
    n_train, n_val = sum(index_counts(train_dir).values()), sum(index_counts(val_dir).values())
    shards = sorted(p.name for p in train_dir.glob("*.tar"))
    assert shards == ["pairs-000000.tar", "pairs-000001.tar"], shards
    braces = "pairs-{000000..000001}.tar"

    # a copy served without its _index.json: its counts must be counted (once) through the pipe
    remote = home / "remote" / "train"
    remote.mkdir(parents=True)
    for name in shards:
        shutil.copy(train_dir / name, remote / name)

    common = ["data=shards", *TINY]
    specs = {
        "local": ["data.train.main.shards=shards/train", "data.val=shards/val"],
        "file": [f"data.train.main.shards='file://{train_dir}/{braces}'", f"data.val=file://{val_dir}"],
        "pipe": [f"data.train.main.shards='pipe:cat remote/train/{braces}'", "data.val=shards/val"],
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "unifuse.train", *common, *args], cwd=home,
                                    env=user_env(home / f"cache_{name}"),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in specs.items()}
    try:
        calib = [s.images[0] for s, _ in zip(iter_decoded(str(train_dir), DecodeConfig(), Counter()), range(16))]
        weights = home / "inception.pth"
        make_inception_weights(weights, torch.from_numpy(np.stack(calib)).permute(0, 3, 1, 2))
        runs = {}
        for name, p in procs.items():
            out, err = p.communicate(timeout=600)
            runs[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return {"home": home, "write": write, "n_train": n_train, "n_val": n_val, "runs": runs, "weights": weights,
            "train_dir": train_dir, "val_dir": val_dir}


def test_write_pairs_val_fraction_splits_the_folder(user):
    out, n_train, n_val = user["write"].stdout, user["n_train"], user["n_val"]
    assert "reading 120 samples from photos" in out and "metadata.jsonl, captions: text" in out
    assert f"train (shards/train): wrote {n_train} samples in 2 shards" in out, out
    assert f"val (shards/val): wrote {n_val} samples in 1 shards" in out, out
    assert n_train + n_val == N_IMAGES and BATCH <= n_val <= 15  # ~5%, and at least one validation batch
    assert not keys(user["train_dir"]) & keys(user["val_dir"])
    assert not list(user["home"].glob("shards*.partial-*")), "the staging directory was left behind"


def test_vqvae_trains_on_the_shards_and_evaluate_gives_rfid(user):
    local = report(user["runs"]["local"])
    from unifuse.run.checkpoint import read_checkpoint

    ck = read_checkpoint(local["checkpoint"])
    assert ck.kind == "vqvae" and ck.epoch == 0
    assert ck.step == user["n_train"] // BATCH  # one epoch over every training sample the writer counted
    assert ck.eval["reference"] == "shards/val"  # data=shards: the reference split is data.val
    assert math.isfinite(local["metrics"]["val/loss"])

    proc = run("unifuse.evaluate", [f"ckpt={local['checkpoint']}", "extractor=inception",
                                    f"inception_weights={user['weights']}"], user["home"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    printed = re.search(r'^  "json": "(.+)"$', proc.stdout, re.M)  # the evaluate CLI prints where it wrote
    assert printed, proc.stdout[-2000:]
    path = user["home"] / printed.group(1)
    assert path.is_file() and path.parent == local["checkpoint"].parent
    res = json.loads(path.read_text())
    name = f"eval/rfid@inception-v3-compat-n{user['n_val']}-ema"  # every model keeps an EMA; evaluation uses it
    assert res["metric_names"]["rfid"] == name
    rfid = res["metrics"]["rfid"]
    assert math.isfinite(rfid) and rfid > 0, res["metrics"]  # one epoch of a 27k-parameter VQ-VAE: not perfect
    assert res["protocol"]["n"] == user["n_val"] and res["protocol"]["reference"] == "shards-val"
    assert res["protocol"]["task"] == "reconstruction" and res["step"] == ck.step


def test_file_and_pipe_shard_urls_train_on_the_same_samples(user):
    from unifuse.run.checkpoint import read_checkpoint

    got = {name: report(p) for name, p in user["runs"].items()}
    steps = {name: read_checkpoint(r["checkpoint"]).step for name, r in got.items()}
    assert steps == dict.fromkeys(got, user["n_train"] // BATCH), steps
    for name in ("file", "pipe"):  # same counts, same seed: the same samples in the same order
        for key in ("train/loss", "val/loss"):
            assert got[name]["metrics"][key] == pytest.approx(got["local"]["metrics"][key], rel=1e-3), (name, key)

    home = user["home"]
    # file://: the counts came from the _index.json beside the shards; nothing was counted or cached
    assert not list((home / "cache_file").rglob("*.json"))
    # pipe: (no index beside the copies): each shard streamed once, counted and cached
    cached = [json.loads(p.read_text()) for p in (home / "cache_pipe" / "shard_counts").glob("*.json")]
    assert sorted(c["url"] for c in cached) == [f"pipe:cat remote/train/pairs-00000{i}.tar" for i in range(2)]
    assert sum(c["samples"] for c in cached) == user["n_train"] and not any(c["damaged"] for c in cached)
    log = (got["pipe"]["checkpoint"].parent.parent / "train.log").read_text()
    assert "2 remote shards have no _index.json beside them: counting their samples" in log
    assert [c["samples"] for c in sorted(cached, key=lambda c: c["url"])] == list(
        index_counts(user["train_dir"]).values())


def test_val_list_with_a_named_caption_column(tmp_path):
    """The README's second form: a captions csv with its own caption column and a ``.txt`` list of
    validation images (which has no caption column: its captions come from the csv)."""
    from unifuse.data.__main__ import main as data_main
    from unifuse.data.read import iter_decoded
    from unifuse.data.samples import DecodeConfig

    photos = tmp_path / "photos"
    make_folder(photos)
    (photos / "metadata.jsonl").unlink()
    names = sorted(p.name for p in photos.glob("*.png"))
    (tmp_path / "captions.csv").write_text("file_name,description\n" + "".join(
        f"{n},the {n.split('_')[0]} number {i}\n" for i, n in enumerate(names)))
    (tmp_path / "val.txt").write_text(f"{names[0]}\n{names[5]}\n")
    assert data_main(["write", "pairs", "--images", str(photos), "--captions", str(tmp_path / "captions.csv"),
                      "--caption-column", "description", "--out", str(tmp_path / "shards"),
                      "--val-captions", str(tmp_path / "val.txt"), "--shard-size", "50"]) == 0
    val = sorted(s.text for s in iter_decoded(str(tmp_path / "shards" / "val"), DecodeConfig(), Counter()))
    assert val == sorted([f"the {names[0].split('_')[0]} number 0", f"the {names[5].split('_')[0]} number 5"])
    assert sum(index_counts(tmp_path / "shards" / "train").values()) == N_IMAGES - 2
