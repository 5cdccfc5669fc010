"""Growing a run past one GPU: FSDP2 sharding through Lightning, and regional ``torch.compile``.

``trainer=fsdp`` builds :class:`FSDP2Strategy`: Lightning's ``ModelParallelStrategy`` with every
process in one data-parallel group (no tensor parallelism), and ``torch.distributed.fsdp.fully_shard``
(FSDP2) applied to each transformer :class:`~unifuse.models.transformer.Block` (the wrap unit), then
to the LightningModule's trainable children (``net``: embeddings, heads, patch layers), bottom-up
as FSDP2 wants. Weights, gradients and optimizer state are split across all ranks; a Block's
weights are gathered just before it runs and freed after. FSDP2 also runs on CPU with gloo, which
is how the tests train it with 2 processes (Lightning's ``FSDPStrategy`` wraps the older FSDP1,
which needs GPUs).

Checkpoints are sharded: ``last.ckpt`` is a directory written by ``torch.distributed.checkpoint``
(one file per rank) plus Lightning's ``meta.pt``, written beside its name and renamed into place
(:meth:`FSDP2Strategy.save_checkpoint`). ``ckpt_path=`` resumes from it; ``python -m unifuse.sample``
/ ``evaluate`` / ``export`` read the weights from it in one process (:mod:`unifuse.run.sharded`).

Mixed precision: with ``trainer.precision=bf16-mixed`` the strategy also gives FSDP2 a
``MixedPrecisionPolicy`` (``bf16_params``): ranks all-gather bf16 copies of the float32 sharded
weights and compute with them, and gradients are reduce-scattered in float32 into the float32
shards that AdamW updates (the master weights).

Activation checkpointing is the backbone's own switch, ``model.net.transformer.grad_checkpointing``
(``torch.utils.checkpoint`` around each Block, under any strategy), not FSDP's wrapper, so one
setting means the same thing under DDP and FSDP and the memory plan reads it from the model.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import types
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from unifuse.run.callbacks import FidelityEval, ImageLogger

log = logging.getLogger("unifuse")

BLOCK = "unifuse.models.transformer.Block"


def import_class(path: str | type) -> type:
    """``"package.module.Class"`` -> the class (classes pass through)."""
    if isinstance(path, type):
        return path
    module, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"cannot import {path!r}: expected 'package.module.Class'") from e


def shard_module(module: nn.Module, mesh, wrap: tuple[type, ...], reshard_after_forward: bool = True,
                 param_dtype: torch.dtype | None = None) -> list[nn.Module]:
    """``fully_shard`` every ``wrap`` instance in ``module``, then each trainable child of ``module``
    that holds the remaining parameters (the FSDP roots, e.g. ``net``). Returns the sharded units,
    roots last. ``module`` itself is not sharded: a LightningModule's ``forward`` is not what runs,
    its children's are."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kw = {"mesh": mesh, "reshard_after_forward": reshard_after_forward, **({"mp_policy": mp} if mp else {})}
    units = [m for m in module.modules() if isinstance(m, wrap)]
    if not units:
        names = ", ".join(c.__name__ for c in wrap)
        raise ValueError(f"trainer.strategy.wrap: no {names} in {type(module).__name__}; name the module class "
                         f"that repeats in the model (its layers)")
    for m in reversed(units):  # bottom-up: an inner unit is sharded before any unit around it
        fully_shard(m, **kw)
    roots = [c for c in module.children() if any(p.requires_grad for p in c.parameters())]
    for r in roots:
        fully_shard(r, **kw)
    return units + roots


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as fully sharded data parallelism over every rank.

    Arguments (``trainer.strategy.*``):
        wrap: module classes sharded as one unit each (gathered together for their forward and backward).
        reshard_after_forward: free a unit's gathered weights after its forward and gather them again
            in the backward (less memory, one more all-gather per unit); false keeps them until the
            backward (ZeRO-2 like).
        bf16_params: with ``trainer.precision=bf16-mixed``, all-gather and compute in bf16 (FSDP2's
            mixed precision; the shards and the optimizer stay float32). False: float32 all-gathers and
            autocast alone.
        save_distributed_checkpoint: each rank writes its shards (true) or rank 0 writes one full file.

    Lightning asks the LightningModule's ``configure_model`` hook to apply the parallelism; this
    strategy supplies that hook on the module it is given (after the module's own one, if any), so
    every unifuse module trains under it unchanged.
    """

    def __init__(self, wrap: list[str | type] | tuple = (BLOCK,), reshard_after_forward: bool = True,
                 bf16_params: bool = True, save_distributed_checkpoint: bool = True,
                 process_group_backend: str | None = None, timeout: timedelta | None = default_pg_timeout):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.wrap = tuple(import_class(w) for w in wrap)
        if not self.wrap:
            raise ValueError(f"trainer.strategy.wrap is empty: name the module class to shard as a unit (e.g. {BLOCK})")
        self.reshard_after_forward, self.bf16_params = reshard_after_forward, bf16_params

    @property
    def param_dtype(self) -> torch.dtype | None:
        """The dtype units are gathered and run in: bf16 under bf16-mixed with ``bf16_params``, else their own."""
        precision = getattr(self.precision_plugin, "precision", "32-true")
        return torch.bfloat16 if self.bf16_params and precision in ("bf16-mixed", "bf16-true") else None

    def connect(self, model) -> None:
        super().connect(model)
        model.configure_model = partial(self._configure_model, model, model.configure_model)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every rank shards, none splits tensors
        trainer = getattr(self.lightning_module, "_trainer", None)
        if trainer is not None:
            check_callbacks(trainer.callbacks)
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """A sharded checkpoint is written into a hidden directory beside the target (every rank its
        shard, then rank 0 Lightning's ``meta.pt``) and renamed into place, so a kill during the save
        leaves the previous checkpoint whole. The old directory is first renamed aside: a kill between
        the two renames (microseconds) leaves it as ``.<name>.old``. A full-file checkpoint
        (``save_distributed_checkpoint=false``) goes through the trainer's checkpoint IO."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp, old = path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.old")
        if self.global_rank == 0:
            _remove(tmp)
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()
        if self.global_rank == 0:
            _remove(old)
            if path.exists():
                path.rename(old)
            tmp.rename(path)
            _remove(old)
        self.barrier()
        return None

    def _configure_model(self, module, own_hook) -> None:
        from torch.distributed.fsdp import FSDPModule

        own_hook()
        if any(isinstance(m, FSDPModule) for m in module.modules()):
            return  # configure_model runs once per fit/validate call; the model stays sharded
        units = shard_module(module, self.device_mesh["data_parallel"], self.wrap, self.reshard_after_forward,
                             self.param_dtype)
        if self.global_rank == 0:
            log.info("FSDP2: %d units over %d ranks (%s), compute dtype %s", len(units), self.world_size,
                     ", ".join(sorted({type(u).__name__ for u in units})), self.param_dtype or "float32")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def check_callbacks(callbacks) -> None:
    """Refuse callbacks that cannot work with a sharded model, where each rank holds a slice of every
    weight and every rank takes part in each forward; one error names them all."""
    found = []
    for cb in callbacks:
        if isinstance(cb, WeightAveraging):
            found.append("callbacks.ema (the weight average is an unsharded copy of the model)")
        elif isinstance(cb, ImageLogger):
            found.append("callbacks.images (samples on rank 0 alone)")
        elif isinstance(cb, FidelityEval) and cb.enabled:
            found.append("callbacks.fidelity (samples on rank 0 alone)")
    if found:
        raise ValueError("trainer=fsdp shards the model, which these callbacks cannot work with: " + "; ".join(found)
                         + ". Use callbacks=fsdp (the default callbacks without them) and sample or evaluate the "
                         "checkpoints: python -m unifuse.sample ckpt=<run>/checkpoints/last.ckpt")


# ----------------------------------------------------------------------------- torch.compile
def _forward_compiled_in_training(self, *args, **kwargs):
    if self.training and torch.is_grad_enabled():
        return self._compiled_forward(self, *args, **kwargs)
    return self._eager_forward(self, *args, **kwargs)


def compile_blocks(module: nn.Module, classes: tuple[type, ...] | None = None, **options) -> int:
    """Regional compilation (as torchtitan does): ``torch.compile`` the ``forward`` of each Block
    (``classes``) rather than the whole model, so one small graph is compiled once and reused by
    every layer. The compiled forward runs only for training steps (module in train mode with
    gradients on): validation and KV-cached sampling, whose cache grows by one position per step
    (a new shape each time, a recompilation each), stay eager. Parameter names and checkpoints do
    not change. Returns the number of modules compiled; ``options`` go to ``torch.compile``."""
    classes = classes or (import_class(BLOCK),)
    n = 0
    for m in module.modules():
        if isinstance(m, classes) and "_compiled_forward" not in vars(m):
            eager = type(m).forward
            m._eager_forward = eager  # plain functions taking the module: copies of the model (EMA) keep working
            m._compiled_forward = torch.compile(eager, **options)
            m.forward = types.MethodType(_forward_compiled_in_training, m)
            n += 1
    return n
