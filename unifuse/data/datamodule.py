"""LightningDataModule over webdataset shards (see stream.py for the per-rank plan)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from unifuse.data import builders
from unifuse.data.encode import STAMP, check_stamp, encode_shards
from unifuse.data.read import Source
from unifuse.data.samples import DecodeConfig
from unifuse.data.shards import build_complete, expand_shards
from unifuse.data.stream import ShardStream
from unifuse.run.preemption import shield_worker

log = logging.getLogger("unifuse.data")


def worker_init_threads(_: int) -> None:
    """DataLoader workers decode images; one intra-op thread each avoids oversubscribing cores. They
    leave preemption signals to the main process (``unifuse.run.preemption.shield_worker``)."""
    torch.set_num_threads(1)
    shield_worker()


class StreamLoader(DataLoader):
    """The training DataLoader. Each iteration starts where the fit loop stands when its first batch is
    asked for (``position``: the epoch and the batches of it already trained on), so a resumed run goes on
    with the batch the interrupted one would have trained next.

    The start is read then, not when Lightning hands a checkpoint's loader state to ``load_state_dict``:
    Lightning (2.6) restores the loops after ``configure_optimizers``, and a module whose schedule asks
    ``trainer.estimated_stepping_batches`` there (with ``max_epochs`` set) makes Lightning build and iterate
    this loader before the restore and never give it the saved state (Lightning issue #20550). Iterating
    is lazy, so no worker starts and no batch is built before the first one is asked for; by then the
    loops hold the checkpoint's counters.

    ``state_dict`` (stored by Lightning in every checkpoint) records the position; the loops' counters in
    the same checkpoint hold it too, and they are what a resumed run reads. Its own ``generator`` keeps
    iterator creation (which draws worker seeds) off the global torch RNG, whose state the checkpoint
    restores."""

    def __init__(self, dataset: ShardStream, position=None, **kwargs):
        super().__init__(dataset, **kwargs)
        self.position = position

    def __iter__(self):
        if self.position is not None:
            self.dataset.resume_at(*self.position())
        yield from super().__iter__()

    def state_dict(self) -> dict:
        epoch, batches = self.position() if self.position else (self.dataset.base_epoch, 0)
        return {"epoch": int(epoch), "batches": int(batches), "world_size": self.dataset.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to load: the next iteration starts at the restored loops' position (see the class)."""


class ShardDataModule(L.LightningDataModule):
    """Streams training sources mixed by weight, and the validation split.

    Args:
        train: ``{name: {"shards": spec, "weight": w}}``; a spec is a directory, glob, brace
            pattern or list of them.
        val: shard spec of the validation split (or None); or ``{name: spec}`` for a split of several
            sources (e.g. image documents and text documents), interleaved in proportion to their
            sizes so that every rank and every batch reads each of them.
        collator: builds batches (``ImageCollator`` / ``PackingCollator``); its batch size is the
            per-rank batch size.
        val_collator: defaults to a fresh copy of ``collator``.
        build: name of an embedded dataset (``emoji``/``fashion_mnist``) built by ``prepare_data``
            into ``build_dir`` when its shards are missing, with ``build_args``.
        mode: ``epoch`` (default; exact epochs, no repeats) or ``resampled``.
        name, image_root: the dataset's name and its image shards (``train/``, ``val/``) for evaluation.
    """

    def __init__(self, train: Mapping, collator, val: str | list | Mapping | None = None, val_collator=None,
                 decode: DecodeConfig | None = None, num_workers: int = 2, mode: str = "epoch",
                 batches_per_epoch: int | None = None, val_batches: int | None = None,
                 shuffle_buffer: int = 1000, seed: int = 0, pin_memory: bool = False,
                 build: str | None = None, build_dir: str | None = None, build_args: Mapping | None = None,
                 name: str = "data", image_root: str | None = None):
        super().__init__()
        self.train_spec = {k: v for k, v in dict(train).items() if v is not None}  # null removes a source
        self.val_spec = val
        self.collator, self.val_collator = collator, val_collator or collator.fresh()
        self.decode = decode or DecodeConfig()
        self.num_workers, self.mode, self.batches_per_epoch = num_workers, mode, batches_per_epoch
        self.val_batches, self.shuffle_buffer = val_batches, shuffle_buffer
        self.seed, self.pin_memory = seed, pin_memory
        self.build, self.build_dir, self.build_args = build, build_dir, dict(build_args or {})
        self.name, self.image_root = name, image_root  # image_root: image shards used by evaluation

    # ------------------------------------------------------------------ data preparation
    def _missing(self) -> list[str]:
        """The config keys whose shards are not found."""
        keys = []
        for name, spec in self.train_spec.items():
            try:
                expand_shards(spec["shards"])
            except FileNotFoundError:
                keys.append(f"data.train.{name}.shards")
        for key, spec in self._val_specs().items():
            try:
                expand_shards(spec)
            except FileNotFoundError:
                keys.append(key)
        return keys

    def _val_specs(self) -> dict:
        """{config key: shard spec} of the validation sources."""
        if isinstance(self.val_spec, Mapping):
            return {f"data.val.{k}": v for k, v in self.val_spec.items() if v is not None}
        return {"data.val": self.val_spec} if self.val_spec else {}

    def _missing_error(self, keys: list[str]) -> FileNotFoundError:
        msgs = []
        for key in keys:
            if key.startswith("data.val"):
                msgs.append(f"validation shards not found: data.val={self.val_spec!r}. Write a validation split "
                            "(`python -m unifuse.data write pairs ... --out DIR --val-fraction 0.05` writes DIR/train "
                            "and DIR/val), point data.val at one, or set data.val=null to train without validation")
            else:
                name = key.split(".")[2]
                msgs.append(f"training shards not found: {key}={self.train_spec[name]['shards']!r}. Write some with "
                            "`python -m unifuse.data write`, or set data.build to an embedded dataset")
        return FileNotFoundError("; ".join(msgs))

    def _build_done(self) -> bool:
        """``build_dir`` holds a finished build (an unfinished, interrupted one is never reused)."""
        d = Path(self.build_dir)
        if self.build == "encode":
            return (d / STAMP).is_file()
        return build_complete(d)

    def prepare_data(self) -> None:
        if self.build == "encode":
            check_stamp(self.build_dir, self.build_args["tokenizer"])
        missing = self._missing()
        if not self.build:
            if missing:
                raise self._missing_error(missing)
            return
        done, there = self._build_done(), Path(self.build_dir).exists()
        if not missing and (done or not there):  # built, or the shards are somewhere else
            return
        if done:  # built, but the config looks elsewhere
            raise self._missing_error(missing)
        if there:
            log.warning("%s holds an incomplete %s build (interrupted?): building it again", self.build_dir,
                        self.build)
        log.info("building %s data into %s", self.build, self.build_dir)
        self._build()
        missing = self._missing()
        if missing:
            raise self._missing_error(missing)

    def _build(self) -> None:
        if self.build == "encode":  # code shards from image shards, building those first if needed
            a = self.build_args
            src, src_build = a["src"], a.get("src_build")
            if src_build and not build_complete(src):
                getattr(builders, f"build_{src_build}")(out=src, **dict(a.get("src_args") or {}))
            encode_shards(a["tokenizer"], src, self.build_dir, batch_size=int(a.get("batch_size", 256)),
                          device=str(a.get("device", "cpu")))
            return
        builders.BUILDERS[self.build](out=self.build_dir, **self.build_args)

    # ------------------------------------------------------------------ loaders
    def _rank(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _loader(self, stream: ShardStream, cls=DataLoader, **kwargs) -> DataLoader:
        nw = self.num_workers
        return cls(stream, batch_size=None, num_workers=nw, persistent_workers=nw > 0,
                   pin_memory=self.pin_memory, worker_init_fn=worker_init_threads if nw else None,
                   prefetch_factor=4 if nw else None, generator=torch.Generator().manual_seed(self.seed), **kwargs)

    def _train_position(self) -> tuple[int, int]:
        """(epoch, batches of it trained on) as the fit loop counts them, read when a train iteration
        starts and when a checkpoint records the loader's state. Lightning (2.6) resumes a checkpoint
        written at the end of the epoch's last step (``on_train_batch_end``) straight in the next epoch,
        so that checkpoint records (next epoch, 0)."""
        t = self.trainer
        bp = t.fit_loop.epoch_loop.batch_progress.current
        if bp.processed >= t.num_training_batches and bp.completed < bp.processed:
            return t.current_epoch + 1, 0
        return t.current_epoch, bp.processed

    def state_dict(self) -> dict:
        return {"world_size": self._rank()[1]}  # how many ranks split the data (see load_state_dict)

    def load_state_dict(self, state: dict) -> None:
        saved, world = state.get("world_size"), self._rank()[1]
        if saved is not None and saved != world:
            log.warning("the checkpoint was written by %d ranks, this run has %d: the ranks split the data "
                        "differently, so the rest of the interrupted epoch comes from the new split (some of "
                        "its samples are trained on twice in that epoch, some not at all)", saved, world)

    @staticmethod
    def _source(key: str, name: str, shards, weight: float = 1.0) -> Source:
        try:
            return Source(name, shards, weight)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{key}: {e}") from None

    def train_stream(self) -> ShardStream:
        rank, world = self._rank()
        sources = [self._source(f"data.train.{name}.shards", name, spec["shards"], float(spec.get("weight", 1.0)))
                   for name, spec in self.train_spec.items()]
        return ShardStream(sources, self.collator, self.decode, mode=self.mode,
                           batches_per_epoch=self.batches_per_epoch, shuffle=True,
                           shuffle_buffer=self.shuffle_buffer, seed=self.seed, rank=rank, world_size=world)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_stream(), StreamLoader,
                            position=self._train_position if self.trainer is not None else None)

    def val_dataloader(self):
        specs = self._val_specs()
        if not specs:
            return []
        rank, world = self._rank()
        sources = [self._source(key, key.rpartition(".")[2], spec) for key, spec in specs.items()]
        for src in sources:  # weight by size: each sample once an epoch, the sources interleaved
            src.weight = float(src.total)
        try:
            stream = ShardStream(sources, self.val_collator, self.decode, mode="once",  # each sample once
                                 batches_per_epoch=self.val_batches, shuffle=False, seed=self.seed, rank=rank,
                                 world_size=world)
        except ValueError as e:  # e.g. a validation split smaller than one batch
            raise ValueError(f"validation shards data.val={self.val_spec!r}: {e} (or set data.val=null)") from None
        return self._loader(stream)

    # ------------------------------------------------------------------ device side
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        img = batch.get("image") if isinstance(batch, dict) else None
        if img is not None and img.dtype == torch.uint8:  # uint8 over IPC/PCIe, floats on the device
            batch["image"] = img.float().div_(127.5).sub_(1.0)
        return batch
