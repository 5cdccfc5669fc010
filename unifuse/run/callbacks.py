"""Callbacks shared by every paradigm."""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf
from torchvision.utils import make_grid, save_image

from unifuse.eval.extractors import inception_weights, train_domain_extractor
from unifuse.eval.fidelity import metric_name
from unifuse.eval.protocol import EvalConfig
from unifuse.run.ema import weights_in_use
from unifuse.run.perf import compute_dtype, peak_flops
from unifuse.run.viz import save_captioned_grid
from unifuse.sampling import eval_mode

log = logging.getLogger("unifuse")


class ImageLogger(L.Callback):
    """Calls ``pl_module.log_images(batch)`` on the first validation batch (rank 0 only), writes each
    grid as PNG under ``<run dir>/images`` (captioned grids carry the prompt under each image) and
    logs it to W&B with its captions."""

    def __init__(self, out_dir: str, every_n_epochs: int = 1, nrow: int = 8):
        self.out_dir, self.every_n_epochs, self.nrow = Path(out_dir), every_n_epochs, nrow
        self.written: list[Path] = []

    @rank_zero_only
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx != 0 or trainer.sanity_checking or not hasattr(pl_module, "log_images"):
            return
        if trainer.current_epoch % self.every_n_epochs:
            return
        with eval_mode(pl_module):
            grids = pl_module.log_images(batch)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, (images, captions) in grids.items():
            images = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2
            nrow = min(self.nrow, len(images)) if name != "reconstructions" else max(1, len(images) // 2)
            nrow = min(nrow, 16)
            path = self.out_dir / f"{name}_epoch{trainer.current_epoch:03d}_step{trainer.global_step:07d}.png"
            if captions and name != "reconstructions":  # prompt under each sample
                save_captioned_grid(images, captions, path, nrow=nrow)
            else:
                save_image(images, path, nrow=nrow, padding=2, pad_value=1.0)
            self.written.append(path)
            for lg in trainer.loggers:
                if isinstance(lg, WandbLogger):
                    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
                    caption = "; ".join(captions[:nrow]) if captions else name
                    lg.log_image(key=f"images/{name}", images=[grid], caption=[caption], step=trainer.global_step)
                    if captions and name != "reconstructions":  # prompt -> image table for fixed prompts
                        import wandb

                        rows = [[c, wandb.Image(img)] for c, img in zip(captions, images)]
                        lg.log_table(key=f"tables/{name}", columns=["prompt", "image"], data=rows,
                                     step=trainer.global_step)


class DataStatsCallback(L.Callback):
    """Sums the ``data_stats`` counters that batches carry (skipped samples by reason, conversions,
    refills), over workers and ranks, for each split apart, and logs them at the end of its epoch:
    ``data (train, epoch N)`` / ``data/<reason>`` for the training stream, ``data (val, epoch N)`` /
    ``data/val/<reason>`` for validation (which runs inside the training epoch, before its end)."""

    def __init__(self):
        self.counts = {"train": Counter(), "val": Counter()}
        self.total = {"train": Counter(), "val": Counter()}

    def _add(self, split: str, batch) -> None:
        if isinstance(batch, dict) and batch.get("data_stats"):
            self.counts[split].update(batch["data_stats"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._add("train", batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._add("val", batch)

    def _flush(self, trainer, pl_module, split: str) -> None:
        counts = self.counts[split]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, dict(counts))
            counts = Counter()
            for g in gathered:
                counts.update(g)
        self.counts[split] = Counter()
        if not counts:
            return
        self.total[split].update(counts)
        if trainer.is_global_zero:
            log.info("data (%s, epoch %d): %s", split, trainer.current_epoch,
                     ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
            prefix = "data/" if split == "train" else f"data/{split}/"
            for lg in trainer.loggers:
                lg.log_metrics({f"{prefix}{k}": float(v) for k, v in self.total[split].items()},
                               step=trainer.global_step)

    def on_train_epoch_end(self, trainer, pl_module):
        self._flush(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._flush(trainer, pl_module, "val")
        else:
            self.counts["val"] = Counter()


class StepThroughput(L.Callback):
    """Samples/s, tokens/s, step time, MFU and peak memory (logged from rank 0, for all ranks);
    the ``callbacks.throughput`` entry.

    MFU = model FLOPs per sample (``pl_module.flops_per_batch(batch)`` on the first batch) x
    samples/s / the peak FLOP/s of one device in the dtype the step computes in (from
    ``trainer.precision``: bf16-mixed -> bfloat16, 16-mixed -> float16, 32-true -> float32, TF32 on
    GPUs when the float32 matmul precision allows it): Lightning's table for GPUs, a GEMM measured
    in that dtype on CPUs (:func:`unifuse.run.perf.peak_flops`)."""

    def __init__(self, log_every_n_steps: int = 50):
        self.every = log_every_n_steps
        self._t0, self._n, self._tokens = None, 0, 0
        self.flops_per_sample: float | None = None
        self.peak, self.peak_source = None, None

    def on_train_start(self, trainer, pl_module):
        self.peak, self.peak_source = peak_flops(pl_module.device, compute_dtype(trainer.precision))
        if trainer.is_global_zero:
            log.info("perf/mfu against %.1f TFLOP/s per device (%s)", self.peak / 1e12, self.peak_source)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import time

        if self.flops_per_sample is None and hasattr(pl_module, "flops_per_batch"):
            n = _batch_size(batch)
            # on the first batch of each process, so also on the first one a resumed run trains: a
            # forward that samples (a KL posterior, noise levels) must not move the run's random stream
            with torch.random.fork_rng(devices=[pl_module.device] if pl_module.device.type == "cuda" else []):
                self.flops_per_sample = pl_module.flops_per_batch(batch) / max(1, n)
        if self._t0 is None:
            self._t0, self._n, self._tokens = time.perf_counter(), 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import time

        self._n += _batch_size(batch)
        self._tokens += int(getattr(pl_module, "last_batch_tokens", 0) or 0)
        if (batch_idx + 1) % self.every:
            return
        dt = time.perf_counter() - self._t0
        w = trainer.world_size
        m = {"perf/samples_per_s": self._n * w / dt, "perf/step_time_s": dt / self.every}
        if self._tokens:
            m["perf/tokens_per_s"] = self._tokens * w / dt
        if self.flops_per_sample and self.peak and math.isfinite(self.peak):
            m["perf/mfu"] = self.flops_per_sample * self._n / dt / self.peak
        if pl_module.device.type == "cuda":
            m["perf/peak_memory_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        else:
            import resource

            m["perf/peak_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        pl_module.log_dict(m, rank_zero_only=True)
        self._t0, self._n, self._tokens = time.perf_counter(), 0, 0


def _batch_size(batch) -> int:
    if isinstance(batch, dict):
        for k in ("image", "codes", "tokens"):
            if isinstance(batch.get(k), torch.Tensor):
                return len(batch[k])
        if "caption" in batch:
            return len(batch["caption"])
    return 0


class SampleAudit(L.Callback):
    """Records, per rank, how many training batches ran in each epoch and which sample keys they
    held, into ``<out_dir>/rank<r>.json``. For checking data plans (equal batches on every rank,
    no sample twice in an epoch): ``+callbacks.audit={_target_: unifuse.run.callbacks.SampleAudit, ...}``."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.epochs: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        e = self.epochs.setdefault(trainer.current_epoch, {"batches": 0, "keys": []})
        e["batches"] += 1
        e["keys"].extend(batch.get("key", []) if isinstance(batch, dict) else [])

    def on_train_end(self, trainer, pl_module):
        import json

        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"rank": trainer.global_rank, "world_size": trainer.world_size,
                                    "epochs": self.epochs}))


class FidelityEval(L.Callback):
    """Online FID/KID (rFID + PSNR/SSIM for autoencoders) every ``every_n_epochs`` validations,
    through the same code as ``python -m unifuse.evaluate``. Runs on rank 0; metric names carry
    the protocol (extractor, n, guidance, steps). Builds the domain extractor on first use when
    ``build_extractor_from`` names training shards."""

    def __init__(self, protocol, build_extractor_from: str | None = None, enabled: bool = True):
        p = OmegaConf.to_container(protocol, resolve=True) if OmegaConf.is_config(protocol) else dict(protocol)
        self.every_n_epochs = int(p.pop("every_n_epochs", 1))
        self.build_from, self.enabled = build_extractor_from, enabled
        self.cfg = EvalConfig(**p)
        self.last: dict | None = None

    def setup(self, trainer, pl_module, stage):
        if not self.enabled:
            return
        if self.cfg.reference is None or not Path(self.cfg.reference).exists():
            log.warning("online evaluation off: reference shards %s not found (eval.reference)", self.cfg.reference)
            self.enabled = False
            return
        weights = self.cfg.domain_weights
        if self.cfg.extractor == "domain" and weights and not Path(weights).is_file() and self.build_from:
            if trainer.is_global_zero:
                log.info("training the domain feature extractor on %s -> %s", self.build_from, weights)
                try:
                    train_domain_extractor(self.build_from, weights)
                except (ValueError, FileNotFoundError) as e:  # e.g. unlabelled data: no domain classes
                    log.warning("online evaluation off: cannot build the domain extractor (%s)", e)
            trainer.strategy.barrier()
        if self.cfg.extractor == "domain" and not (weights and Path(weights).is_file()):
            log.warning("online evaluation off: no domain extractor (eval.domain_weights=%s; set data.image_root to "
                        "labelled image shards to build one, or use eval.extractor=inception)", weights)
            self.enabled = False
            return
        if self.cfg.extractor == "inception":  # fail at start-up, not after an epoch of training
            inception_weights(self.cfg.inception_weights)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["unifuse_eval"] = asdict(self.cfg)  # so `unifuse.evaluate` repeats the same protocol

    def on_validation_epoch_end(self, trainer, pl_module):
        if not self.enabled or trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if not trainer.is_global_zero:
            return
        weights = weights_in_use(trainer)  # callbacks.ema keeps the average in until validation ends
        # the paradigm's evaluation, as `unifuse.evaluate` runs it: the net itself (autoencoders) or
        # samples through the same pipeline the sampling CLI uses (generators; None without a tokenizer)
        result = pl_module.paradigm.evaluate(lambda: pl_module.net, lambda: pl_module.pipeline(), self.cfg, weights)
        if result is None:
            return
        self.last = result
        metrics = {metric_name(k, result["protocol"]) if k not in ("psnr", "ssim", "kid_std") else f"eval/{k}": v
                   for k, v in result["metrics"].items()}
        pl_module.log_dict(metrics, rank_zero_only=True)
        log.info("evaluation (epoch %d): %s | protocol %s", trainer.current_epoch, metrics, result["protocol"])
