"""A user's own data: image folders (HF image-folder metadata, captions files, no captions at all)
written into train/val shards, shards read from URLs and pipe: commands, writes and builds that are
never published half-done (a killed build is rebuilt), and errors that name the config key or the
unknown argument."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT
from unifuse.data import shards as shards_mod
from unifuse.data import writer as writer_mod
from unifuse.data.__main__ import main as data_main
from unifuse.data.__main__ import parse_args
from unifuse.data.collate import ImageCollator
from unifuse.data.datamodule import ShardDataModule
from unifuse.data.read import Source, iter_decoded
from unifuse.data.samples import DecodeConfig
from unifuse.data.shards import (
    INDEX_NAME,
    build_complete,
    count_tar_samples,
    expand_shards,
    index_location,
    shard_counts,
)
from unifuse.data.staging import partial_dirs
from unifuse.data.stream import ShardStream
from unifuse.data.write import write_pairs
from unifuse.data.writer import ShardWriter


def make_images(folder: Path, n: int, sub: str = "", size: int = 8) -> list[str]:
    """``n`` distinct tiny PNGs; returns their names relative to ``folder``."""
    names = []
    for i in range(n):
        rel = f"{sub}/img{i:03d}.png" if sub else f"img{i:03d}.png"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        arr = np.full((size, size, 3), (i * 37 % 256, i * 11 % 256, i % 256), np.uint8)
        Image.fromarray(arr).save(folder / rel)
        names.append(rel)
    return names


def env_with_root(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def keys_and_captions(spec) -> dict[str, str]:
    return {s.key: s.text for s in iter_decoded(spec, DecodeConfig(), Counter())}


def no_leftovers(root: Path) -> None:
    left = [p for p in root.rglob("*") if ".partial-" in p.name or p.name.endswith((".tmp", ".tar.tmp"))]
    assert not left, f"temporary files left behind: {left}"


# ----------------------------------------------------------------------------- writing
def test_hf_image_folder_val_fraction_writes_train_and_val_reproducibly(tmp_path: Path):
    imgs = tmp_path / "imgs"
    names = make_images(imgs, 60)
    with (imgs / "metadata.jsonl").open("w") as f:
        for i, name in enumerate(names):
            f.write(json.dumps({"file_name": name, "text": f"a picture number {i}", "source": "test"}) + "\n")
    out = tmp_path / "shards"
    res = write_pairs(imgs, out=out, shard_size=16, val_fraction=0.2)
    assert set(res) == {"train", "val"}
    train, val = keys_and_captions(str(out / "train")), keys_and_captions(str(out / "val"))
    assert 0 < len(val) < 30 and len(train) + len(val) == 60 and not set(train) & set(val)
    assert res["train"].samples == len(train) and res["val"].samples == len(val)
    assert sum(shard_counts(expand_shards(str(out / "train")))) == len(train)
    assert all(c == f"a picture number {int(k.split('_')[0])}" for k, c in {**train, **val}.items())
    meta = next(iter(iter_decoded(str(out / "val"), DecodeConfig(), Counter()))).meta
    assert meta["source"] == "test"

    # the CLI in another process (another str-hash seed) splits the same way, and replaces the output
    proc = subprocess.run([sys.executable, "-m", "unifuse.data", "write", "pairs", "--images", str(imgs),
                           "--out", str(out), "--val-fraction", "0.2", "--shard-size", "16"],
                          env=env_with_root(PYTHONHASHSEED="12345"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"train ({out}/train): wrote {len(train)} samples" in proc.stdout
    assert f"val ({out}/val): wrote {len(val)} samples" in proc.stdout
    assert keys_and_captions(str(out / "val")) == val and keys_and_captions(str(out / "train")) == train
    no_leftovers(tmp_path)


def test_image_only_folder_trains_without_captions(tmp_path: Path):
    imgs = tmp_path / "imgs"
    names = make_images(imgs, 5, sub="a") + make_images(imgs, 4, sub="b/c")
    (imgs / "notes.txt").write_text("not an image")
    (imgs / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(imgs / ".hidden" / "skip.png")
    summary = write_pairs(imgs, out=tmp_path / "shards", shard_size=4)
    assert summary.samples == 9 and summary.shards == 3 and not summary.skipped

    stats = Counter()
    samples = list(iter_decoded(str(tmp_path / "shards"), DecodeConfig(require_caption=False), stats))
    assert [s.meta["file_name"] for s in samples] == sorted(names)
    assert all(s.kind == "image" and s.text is None for s in samples)
    assert list(iter_decoded(str(tmp_path / "shards"), DecodeConfig(require_caption=True), stats)) == []
    assert stats["missing_caption"] == 9

    stream = ShardStream([Source("main", str(tmp_path / "shards"))], ImageCollator(3),
                         DecodeConfig(require_caption=False), shuffle=False)
    batches = list(stream)
    assert len(batches) == len(stream) == 3
    assert all(b["caption"] == ["", "", ""] and b["image"].shape == (3, 3, 8, 8) for b in batches)


def test_captions_csv_and_jsonl_with_caption_column(tmp_path: Path, capsys):
    imgs = tmp_path / "imgs"
    names = make_images(imgs, 6)
    with (tmp_path / "caps.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "description", "cls"])
        for i, n in enumerate(names):
            w.writerow([n, f"csv caption {i}" if i != 2 else "", i % 2])
    (tmp_path / "caps.jsonl").write_text("\n".join(
        json.dumps({"image": n, "desc": f"jsonl caption {i}"}) for i, n in enumerate(names)))

    assert data_main(["write", "pairs", "--images", str(imgs), "--captions", str(tmp_path / "caps.csv"),
                      "--caption-column", "description", "--out", str(tmp_path / "csv")]) == 0
    assert "wrote 5 samples" in capsys.readouterr().out  # the empty caption is skipped
    samples = list(iter_decoded(str(tmp_path / "csv"), DecodeConfig(), Counter()))
    assert sorted(s.text for s in samples) == [f"csv caption {i}" for i in (0, 1, 3, 4, 5)]
    assert sorted(s.cls for s in samples) == [0, 0, 1, 1, 1]

    res = write_pairs(imgs, tmp_path / "caps.jsonl", tmp_path / "jsonl", caption_column="desc", val_fraction=0.5)
    got = {**keys_and_captions(str(tmp_path / "jsonl/train")), **keys_and_captions(str(tmp_path / "jsonl/val"))}
    assert sorted(got.values()) == [f"jsonl caption {i}" for i in range(6)]
    assert res["train"].samples + res["val"].samples == 6

    with pytest.raises(ValueError, match="caption column 'nope' is not in .*columns: file, description, cls"):
        write_pairs(imgs, tmp_path / "caps.csv", tmp_path / "bad", caption_column="nope")
    with pytest.raises(ValueError, match="no caption column"):
        write_pairs(imgs, tmp_path / "caps.csv", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_explicit_val_list_takes_captions_from_the_metadata(tmp_path: Path):
    imgs = tmp_path / "imgs"
    names = make_images(imgs, 10)
    (imgs / "metadata.jsonl").write_text("\n".join(
        json.dumps({"file_name": n, "caption": f"cap {i}"}) for i, n in enumerate(names)))
    (tmp_path / "val.txt").write_text("img003.png\nimg007.png\n")
    res = write_pairs(imgs, out=tmp_path / "out", val_captions=tmp_path / "val.txt")
    assert res["train"].samples == 8
    assert sorted(keys_and_captions(str(tmp_path / "out/val")).values()) == ["cap 3", "cap 7"]


# ----------------------------------------------------------------------------- remote shards
def test_file_and_pipe_urls_use_the_index_or_count_once_and_cache(tmp_path: Path, monkeypatch):
    d = tmp_path / "shards"
    make_images(tmp_path / "imgs", 11)
    write_pairs(tmp_path / "imgs", out=d, shard_size=4)  # image-only: 4 + 4 + 3
    monkeypatch.setenv("UNIFUSE_CACHE", str(tmp_path / "cache"))
    specs = {"file": f"file://{d}/pairs-{{000000..000002}}.tar",
             "pipe": f"pipe:cat {d}/pairs-{{000000..000002}}.tar"}

    def no_counting(url):
        raise AssertionError(f"counted {url} although a count was available")

    with monkeypatch.context() as m:  # counts from the _index.json beside the shards
        m.setattr(shards_mod, "count_stream_samples", no_counting)
        for spec in specs.values():
            src = Source("main", spec)
            assert len(src.shards) == 3 and src.counts == [4, 4, 3]
            stream = ShardStream([src], ImageCollator(2), DecodeConfig(require_caption=False), shuffle=False)
            keys = [k for b in stream for k in b["key"]]
            assert len(keys) == 10 and len(set(keys)) == 10  # 11 samples, batches of 2
            assert len(list(iter_decoded(spec, DecodeConfig(), Counter()))) == 11

    (d / INDEX_NAME).unlink()
    counted = []
    real = shards_mod.count_stream_samples
    monkeypatch.setattr(shards_mod, "count_stream_samples", lambda url: counted.append(url) or real(url))
    for spec in specs.values():
        assert Source("main", spec).counts == [4, 4, 3]
    assert len(counted) == 6 and len(list((tmp_path / "cache" / "shard_counts").glob("*.json"))) == 6
    monkeypatch.setattr(shards_mod, "count_stream_samples", no_counting)  # now from the cache
    for spec in specs.values():
        assert Source("main", spec).counts == [4, 4, 3]
    # a mix of local and remote shards
    assert shard_counts([str(d / "pairs-000000.tar"), f"file://{d}/pairs-000002.tar"]) == [4, 3]


def test_streamed_count_matches_the_local_count_of_a_truncated_tar(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("UNIFUSE_CACHE", str(tmp_path / "cache"))
    with ShardWriter(tmp_path, prefix="t") as w:
        for i in range(6):
            w.write(f"k{i}", {"txt": f"text {i}" * 50, "json": {"i": i}})
    t = tmp_path / "t-000000.tar"
    t.write_bytes(t.read_bytes()[: t.stat().st_size // 2])
    (tmp_path / INDEX_NAME).unlink()
    local = count_tar_samples(t)
    assert local[1] and 0 < local[0] < 6
    assert shards_mod.count_stream_samples(f"file://{t}") == local
    assert shards_mod.count_stream_samples(f"pipe:cat {t}") == local


@pytest.mark.parametrize("url,where", [
    ("https://host/data/shard-000001.tar", ("https://host/data/_index.json", "shard-000001.tar")),
    ("pipe:aws s3 cp s3://bucket/a/shard-000001.tar -", ("pipe:aws s3 cp s3://bucket/a/_index.json -",
                                                          "shard-000001.tar")),
    ("pipe:gsutil cat gs://b/x-1.tar", ("pipe:gsutil cat gs://b/_index.json", "x-1.tar")),
    ("pipe:curl -s https://host/get?id=4", None),
])
def test_index_location_of_remote_shards(url, where):
    assert index_location(url) == where


def test_url_specs_expand_braces():
    assert expand_shards("https://h/s-{0..2}.tar") == ["https://h/s-0.tar", "https://h/s-1.tar", "https://h/s-2.tar"]
    assert expand_shards(["pipe:cat /x/a-{00..01}.tar"]) == ["pipe:cat /x/a-00.tar", "pipe:cat /x/a-01.tar"]
    assert expand_shards("s3://bucket/a.tar") == ["s3://bucket/a.tar"]


# ----------------------------------------------------------------------------- nothing half-written
def test_shard_writer_publishes_only_finished_shards_and_the_index_last(tmp_path: Path, monkeypatch):
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(writer_mod.os, "replace", lambda a, b: renamed.append(Path(b).name) or real_replace(a, b))
    w = ShardWriter(tmp_path / "d", prefix="s", max_samples=3)
    for i in range(4):
        w.write(f"k{i}", {"txt": f"t{i}"})
        tars = sorted(p.name for p in (tmp_path / "d").glob("*.tar"))
        assert tars == ([] if i < 3 else ["s-000000.tar"]), "a shard was visible before it was finished"
        assert not (tmp_path / "d" / INDEX_NAME).exists()
    assert count_tar_samples(tmp_path / "d" / "s-000000.tar") == (3, False)
    w.close()
    assert renamed == ["s-000000.tar", "s-000001.tar", INDEX_NAME]
    assert shard_counts(expand_shards(str(tmp_path / "d"))) == [3, 1]
    no_leftovers(tmp_path)

    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "e", prefix="s", max_samples=3) as w:
        for i in range(5):
            w.write(f"k{i}", {"txt": f"t{i}"})
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == [INDEX_NAME, "s-000000.tar"]


def test_failed_write_publishes_nothing(tmp_path: Path, monkeypatch):
    import unifuse.data.write as write_mod

    make_images(tmp_path / "imgs", 6)
    real, calls = write_mod._image_member, []

    def fail_later(path, resize):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(path, resize)

    monkeypatch.setattr(write_mod, "_image_member", fail_later)
    with pytest.raises(KeyboardInterrupt):
        write_pairs(tmp_path / "imgs", out=tmp_path / "out", shard_size=2)
    assert not (tmp_path / "out").exists()
    no_leftovers(tmp_path)


SLOW_BUILD = """
import sys, time
from unifuse.data import writer
finish = writer.ShardWriter._close_shard
def slow(self):
    finish(self)
    time.sleep(0.25)
writer.ShardWriter._close_shard = slow
from unifuse.data.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_build_is_rebuilt_in_full(tmp_path: Path, capsys):
    from unifuse.data.builders import build_emoji

    args = ["--size", "16", "--styles", "twemoji", "--limit", "24", "--shard-size", "2", "--val-percent", "20"]
    ref = build_emoji(tmp_path / "ref", size=16, styles=("twemoji",), limit=24, shard_size=2, val_percent=20)
    out = tmp_path / "emoji16"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_BUILD, "build", "emoji", "--out", str(out), *args],
                            env=env_with_root(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list(tmp_path.glob("emoji16.partial-*/*/*.tar")):
            assert proc.poll() is None, "the build ended before it could be interrupted"
            assert time.time() < deadline, "no shard appeared"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert partial_dirs(out), "the killed build left no partial directory"
    assert not list(out.glob("*/*.tar")), "the killed build published shards"
    assert not build_complete(out)

    assert data_main(["build", "emoji", "--out", str(out), *args]) == 0
    assert "exists" not in capsys.readouterr().out
    assert build_complete(out) and not partial_dirs(out)
    for split in ("train", "val"):
        assert sum(shard_counts(expand_shards(str(out / split)))) == ref[split] > 0
        assert keys_and_captions(str(out / split)) == keys_and_captions(str(tmp_path / "ref" / split))
    assert data_main(["build", "emoji", "--out", str(out), *args]) == 0
    assert "exists; use --force" in capsys.readouterr().out


def test_interrupted_build_without_marker_is_not_reused(tmp_path: Path, capsys):
    """A build dir with shards but no completion marker (a build killed while writing its final
    names) is rebuilt by ``build`` and by ``prepare_data``, never used as it is."""
    args = dict(size=16, styles=["twemoji"], limit=10, shard_size=4, val_percent=20)
    for out in (tmp_path / "cli", tmp_path / "dm"):
        (out / "train").mkdir(parents=True)
        with tarfile.open(out / "train" / "emoji16-000000.tar", "w") as tar:  # one torn shard, no index
            tar.addfile(tarfile.TarInfo("x.txt"))
    cli = tmp_path / "cli"
    assert data_main(["build", "emoji", "--out", str(cli), "--size", "16", "--styles", "twemoji", "--limit", "10",
                      "--shard-size", "4", "--val-percent", "20"]) == 0
    assert "incomplete build" in capsys.readouterr().out
    assert build_complete(cli) and "x" not in keys_and_captions(str(cli / "train"))

    dm_dir = tmp_path / "dm"
    dm = ShardDataModule({"emoji": {"shards": str(dm_dir / "train")}}, ImageCollator(2), val=str(dm_dir / "val"),
                         build="emoji", build_dir=str(dm_dir), build_args=args)
    dm.prepare_data()
    assert build_complete(dm_dir)
    assert sum(shard_counts(expand_shards(str(dm_dir / "train")))) == sum(
        shard_counts(expand_shards(str(cli / "train"))))


# ----------------------------------------------------------------------------- errors
def test_missing_splits_name_their_config_key(tmp_path: Path):
    make_images(tmp_path / "imgs", 4)
    write_pairs(tmp_path / "imgs", out=tmp_path / "train")
    dm = ShardDataModule({"main": {"shards": str(tmp_path / "train")}}, ImageCollator(2), val=str(tmp_path / "val"))
    with pytest.raises(FileNotFoundError, match="data.val") as e:
        dm.prepare_data()
    assert "training shards" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="data.val"):
        dm.val_dataloader()

    dm = ShardDataModule({"main": {"shards": str(tmp_path / "nope")}}, ImageCollator(2), val=str(tmp_path / "train"))
    with pytest.raises(FileNotFoundError, match=r"data\.train\.main\.shards") as e:
        dm.prepare_data()
    assert "data.val" not in str(e.value)


@pytest.mark.parametrize("argv,bad", [
    (["write", "pairs", "--images", "x", "--out", "y", "--bogus"], "--bogus"),
    (["write", "pairs", "--images", "x", "--out", "y", "--shard", "5"], "--shard 5"),  # no abbreviations
    (["encode", "tokenizer=a", "src=b", "out=c", "bogus=1"], "bogus=1"),
    (["encode", "tokenizer=a", "src=b", "out=c", "tok=1"], "tok=1"),
    (["build", "emoji", "extra"], "extra"),
])
def test_unknown_arguments_are_errors(argv, bad, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert f"unrecognized arguments: {bad}" in capsys.readouterr().err


def test_key_value_arguments():
    a = parse_args(["encode", "tokenizer=t.ckpt", "src=s", "out=o", "batch_size=8"])
    assert (a.tokenizer, a.src, a.out, a.batch_size) == ("t.ckpt", "s", "o", 8)
    a = parse_args(["write", "pairs", "--images", "a=b", "--out", "run=1", "--val-fraction", "0.1"])
    assert (a.images, a.out, a.val_fraction) == ("a=b", "run=1", 0.1)
    a = parse_args(["build", "emoji", "--force", "size=16"])
    assert a.force and a.size == 16
