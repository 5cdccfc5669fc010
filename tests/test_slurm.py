"""`hydra/launcher=slurm` renders the sbatch script a sweep submits: SIGUSR1 `signal_delay_s` before
the time limit, requeue allowed, one task per GPU, and one run id for every job and every requeue
of it. No cluster: Hydra's submitit launcher runs for real, with stand-ins for `srun` (so submitit
believes it is on SLURM) and `sbatch` (which keeps the script and answers with a job id)."""

from __future__ import annotations

import os
import re
import stat

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from unifuse import config as unifuse_config
from unifuse.config import CONF_DIR

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()
    HydraConfig().set_config(cfg)  # ${hydra:...} interpolations, as in a running app
    return cfg


def _fake_slurm(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {"srun": "exit 0\n",
               "sbatch": f'cp "$1" "{tmp_path}/submitted_$(date +%s%N).sh"\necho "Submitted batch job 4242"\n'}
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_slurm_sweep_submits_signal_requeue_and_one_run_directory(tmp_path, monkeypatch):
    import submitit
    from hydra.utils import instantiate

    _fake_slurm(tmp_path, monkeypatch)
    monkeypatch.setenv("UNIFUSE_ROOT", str(tmp_path))
    monkeypatch.delenv("UNIFUSE_RUN_ID", raising=False)
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    monkeypatch.setattr(unifuse_config, "_RUN_ID", None)
    # results() would wait for the jobs to finish
    monkeypatch.setattr(submitit.core.core.Job, "results", lambda self: [self.job_id])

    sweep = ["model.optimizer.lr=1e-4", "model.optimizer.lr=3e-4"]
    base = ["hydra/launcher=slurm", "experiment=vqvae_emoji_h100", "trainer.num_nodes=2", "ckpt_path=auto",
            "hydra.launcher.partition=h100", "hydra.launcher.signal_delay_s=600"]
    cfg = _compose(base)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda c: None, config=cfg)
    ids = launcher.launch([base + [s] for s in sweep], initial_job_idx=0)
    assert ids == ["4242_0", "4242_1"]

    scripts = sorted(tmp_path.glob("submitted_*.sh"))
    assert len(scripts) == 1, "a sweep is one job array"
    text = scripts[0].read_text()
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", text, re.M))
    assert flags["signal"] == "USR1@600"  # the process saves and requeues on SIGUSR1, 10 min before the limit
    assert "requeue" in flags
    assert flags["nodes"] == "2" and flags["ntasks-per-node"] == "8" and flags["gpus-per-node"] == "8"
    assert flags["time"] == "4320" and flags["partition"] == "h100"
    assert flags["array"] == "0-1%2"
    assert flags["open-mode"] == "append"  # a requeued job's log continues the first one's

    # every job, and every requeue of it, runs with the run id of the sweep directory it belongs to
    exported = re.search(r"^export UNIFUSE_RUN_ID='(.+)'$", text, re.M)
    assert exported, "the jobs do not share the sweep's run id"
    run_id = exported.group(1)
    sweep_dir = str(cfg.hydra.sweep.dir)
    assert sweep_dir.endswith(run_id) and sweep_dir.startswith(str(tmp_path))
    assert re.search(r"^export SUBMITIT_PREEMPT_SIGNAL=USR2$", text, re.M)  # submitit's handler off SIGUSR1
    assert "srun" in text and "submitit.core._submit" in text

    # what a job (or its requeue) composes on the node: the same sweep directory
    monkeypatch.setenv("UNIFUSE_RUN_ID", run_id)
    monkeypatch.setattr(unifuse_config, "_RUN_ID", None)
    assert str(_compose(base + [sweep[1]]).hydra.sweep.dir) == sweep_dir
