"""DDP, multirun and torchrun launched as a user would: subprocesses with timeouts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, tiny_overrides
from unifuse.data.writer import ShardWriter

TIMEOUT = 240


def unequal_image_shards(d: Path, sizes=(13, 5, 9, 1, 7)) -> Path:
    import io

    n = 0
    for si, size in enumerate(sizes):
        with ShardWriter(d, prefix=f"u{si}") as w:
            for _ in range(size):
                arr = np.random.default_rng(n).integers(0, 255, (16, 16, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="PNG")
                w.write(f"k{n:04d}", {"png": buf.getvalue(), "txt": f"sample {n}"})
                n += 1
    return d


def run(args: list[str], cwd: Path, launcher: list[str] | None = None,
        timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=str(ROOT))
    cmd = (launcher or [sys.executable, "-m"]) + ["unifuse.train", *args]
    # its own process group: a timeout (or an interrupted test) kills every rank, not only rank 0
    popen = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        out, err = popen.communicate(timeout=timeout)
    except BaseException as e:
        os.killpg(popen.pid, signal.SIGKILL)
        out, err = popen.communicate()
        if isinstance(e, subprocess.TimeoutExpired):
            pytest.fail(f"{' '.join(cmd)} timed out after {timeout} s (every rank killed):\n{out[-3000:]}\n"
                        f"{err[-5000:]}")
        raise
    proc = subprocess.CompletedProcess(cmd, popen.returncode, out, err)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def common(tmp_path: Path, data: Path) -> list[str]:
    over = [o for o in tiny_overrides(data) if not o.startswith(("paths.data_dir", "data.train", "data.val"))]
    return over + [f"paths.root_dir={tmp_path}", f"data.train.emoji.shards={data}/train",
                   f"data.val={data}/val", "logger=csv"]


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob(".hydra"))


def test_ddp_two_processes_equal_batches_no_repeats_one_run_dir(tmp_path, tiny_emoji):
    data = tmp_path / "unequal"
    unequal_image_shards(data / "train")
    unequal_image_shards(data / "val", sizes=(5, 4))
    args = common(tmp_path, data) + [
        "trainer=ddp", "trainer.devices=2", "trainer.max_epochs=2", "data.num_workers=2",
        "data.collator.batch_size=4", "+callbacks.audit._target_=unifuse.run.callbacks.SampleAudit",
        "+callbacks.audit.out_dir=${paths.output_dir}/audit",
    ]
    run(args, tmp_path)
    dirs = run_dirs(tmp_path / "outputs")
    assert len(dirs) == 1, f"expected one run directory, got {dirs}"
    audits = [json.loads(p.read_text()) for p in sorted((dirs[0] / "audit").glob("rank*.json"))]
    assert [a["rank"] for a in audits] == [0, 1] and all(a["world_size"] == 2 for a in audits)
    for epoch in ("0", "1"):
        batches = [a["epochs"][epoch]["batches"] for a in audits]
        assert batches == [4, 4]  # 35 samples of unequal shards: 17 per rank -> 4 batches of 4 each
        keys = [k for a in audits for k in a["epochs"][epoch]["keys"]]
        assert len(keys) == 32 and len(set(keys)) == 32, "a sample was seen twice in one epoch"
    assert audits[0]["epochs"]["0"]["keys"] != audits[0]["epochs"]["1"]["keys"]
    assert (dirs[0] / "checkpoints" / "last.ckpt").is_file()
    assert list((dirs[0] / "images").glob("*.png"))


def test_multirun_with_ddp_runs_each_job_with_two_ranks(tmp_path, tiny_emoji):
    base = [o for o in common(tmp_path, tiny_emoji) if not o.startswith("model.net.quantizer.codebook_size")]
    args = ["-m", "model.net.quantizer.codebook_size=16,32", *base, "trainer=ddp", "trainer.devices=2",
            "trainer.max_epochs=1", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=2"]
    proc = run(args, tmp_path)
    jobs = sorted((tmp_path / "outputs" / "multiruns").glob("*/*/[0-9]*"))
    assert [j.name for j in jobs] == ["0", "1"], jobs
    for j, size in zip(jobs, (16, 32)):
        assert (j / "train_ddp_process_1.log").is_file(), "job did not start a second rank"
        assert (j / "checkpoints" / "last.ckpt").is_file()
        cfg = (j / ".hydra" / "config.yaml").read_text()
        assert f"codebook_size: {size}" in cfg
    assert proc.stdout.count("run directory") == 2


def test_plain_multirun_two_jobs(tmp_path, tiny_emoji):
    run(["-m", "model.recon_loss=l1,mse", *common(tmp_path, tiny_emoji), "trainer=debug", "logger=none"], tmp_path)
    jobs = sorted((tmp_path / "outputs" / "multiruns").glob("*/*/[0-9]*"))
    assert len(jobs) == 2 and len({j.parent for j in jobs}) == 1


def test_torchrun_launch_writes_one_run_dir(tmp_path, tiny_emoji):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m"]
    run([*common(tmp_path, tiny_emoji), "trainer=ddp", "trainer.devices=2", "+trainer.max_steps=2",
         "trainer.max_epochs=1"], tmp_path, launcher=torchrun)
    assert len(run_dirs(tmp_path / "outputs")) == 1
