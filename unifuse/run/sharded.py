"""Reading the weights of a sharded checkpoint (``trainer=fsdp``) in one process, without GPUs or
a process group.

A sharded checkpoint is a directory: ``torch.distributed.checkpoint`` files (``.metadata`` and one
``__<rank>_0.distcp`` per rank, holding the model under ``state_dict`` and each optimizer under
``optimizer_<i>``) and Lightning's ``meta.pt`` (everything else: step, loops, callbacks, and the
``unifuse`` entry with the kind and config). Only the model's tensors are read, assembled into full
tensors; the optimizer state (twice the model in float32) is skipped.

Safety: ``meta.pt`` and the tensor files load with ``torch.load(weights_only=True)``. The
``.metadata`` index is a pickle written by ``torch.distributed.checkpoint`` (its reader uses plain
``pickle.load``); it is read here with an unpickler that only builds the index's own classes,
so a crafted file cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

DCP_METADATA = ".metadata"
LIGHTNING_META = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME
MODEL_KEYS = ("state_dict", "model")  # ModelParallelStrategy (FSDP2), FSDPStrategy (FSDP1)

_INDEX_MODULES = ("torch.distributed.checkpoint.metadata",)
_INDEX_CLASSES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                  ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
                  ("collections", "OrderedDict")}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in _INDEX_MODULES or (module, name) in _INDEX_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a torch.distributed.checkpoint index")


def is_sharded(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / DCP_METADATA).is_file()


def is_complete(path: str | Path) -> bool:
    """A sharded checkpoint with its index (written after every shard) and Lightning's ``meta.pt``
    (written last). ``FSDP2Strategy`` writes beside the target and renames, so a directory under the
    checkpoint's own name is whole."""
    return is_sharded(path) and (Path(path) / LIGHTNING_META).is_file()


def _reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(Path(self.path) / DCP_METADATA, "rb") as f:
                metadata = _IndexUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is not None:
                metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def read_sharded(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint as one dict, like a ``.ckpt`` file without optimizer states: ``meta.pt``'s
    entries plus ``state_dict`` (full tensors, the LightningModule's parameter names)."""
    # the loader torch's own dcp_to_torch_save uses (and Lightning's consolidation): it builds the
    # state from the index instead of filling a given one
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    meta_file = path / LIGHTNING_META
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} holds torch.distributed.checkpoint shards but no {LIGHTNING_META}: "
                                "not a checkpoint written by a Lightning trainer")
    reader = _reader(path)
    stored = {k.split(".", 1)[0] for k in reader.read_metadata().state_dict_metadata}
    key = next((k for k in MODEL_KEYS if k in stored), None)
    if key is None:
        raise ValueError(f"{path}: no model weights among the sharded entries {sorted(stored)} "
                         f"(expected one of {', '.join(MODEL_KEYS)})")
    state: dict = {}
    _load_state_dict(state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(keys={key}), no_dist=True)
    ck = torch.load(meta_file, map_location=map_location, weights_only=True)
    ck["state_dict"] = {k: v.to(map_location) for k, v in state[key].items()}
    return ck
