"""The one checkpoint loader every entry point uses.

A unifuse checkpoint (a Lightning ``.ckpt`` or a directory written by ``python -m unifuse.export``)
says what it holds: ``kind`` plus the net's ``config``. The kind is the name of a paradigm
(:mod:`unifuse.paradigms`): its spec names the net class whose ``from_config(config)`` rebuilds the
architecture, the pipeline of a generator and the image tokenizers it decodes with.

``python -m unifuse.sample``, ``python -m unifuse.evaluate``, ``python -m unifuse.export``, the online
FID callback and the generator modules all go through :func:`read_checkpoint` / :func:`load_net` /
:func:`load_pipeline`. A kind no spec is registered for is an error naming the ``plugins`` setting:
the checkpoint never names code to import.

Loading never unpickles: Lightning checkpoints are read with ``torch.load(weights_only=True)``,
exports with ``safetensors``.

A training checkpoint holds two sets of weights when ``callbacks.ema`` was on: the EMA average and
the trained ("raw") weights. ``weights=ema|raw`` picks one; the default is the run's ``eval.weights``.

Checkpoints travel: a generator checkpoint carries its image tokenizer (config + weights under
``unifuse_tokenizer``, and a content hash) and its text tokenizer's vocabulary, so it samples on a
machine that has nothing else. ``tokenizer=<checkpoint>`` overrides what it carries.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from unifuse import paradigms
from unifuse.run.sharded import is_sharded, read_sharded

log = logging.getLogger("unifuse")

EXPORT_FORMAT = "unifuse-export/1"
EXPORT_CONFIG, EXPORT_WEIGHTS, EXPORT_TOKENIZER = "config.json", "model.safetensors", "tokenizer.safetensors"


def state_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict (names, dtypes, shapes and bytes): the same weights give the
    same hash wherever the file lives."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@dataclass
class Checkpoint:
    """What a checkpoint holds, read without building anything."""

    path: Path
    kind: str
    config: dict  # the net's architecture (its from_config input)
    state_dict: dict  # the net's weights, without Lightning's "net." prefix
    meta: dict = field(default_factory=dict)  # cond, sampling settings, tokenizer description
    eval: dict = field(default_factory=dict)  # the evaluation protocol of the training run
    tokenizer_state: dict | None = None  # carried image-tokenizer weights
    epoch: int | None = None
    step: int | None = None
    weights: str = "raw"  # which weights state_dict holds: ema (the average of callbacks.ema) | raw

    @property
    def sampling(self) -> dict:
        return dict(self.meta.get("sampling") or {})

    @property
    def tokenizer(self) -> dict | None:
        return self.meta.get("tokenizer")


def _upgrade(meta: dict) -> dict:
    """Checkpoints written before the registry kept cond/sampling/tokenizer path inside ``config``
    (their tokenizer is the first kind their paradigm decodes with)."""
    meta = dict(meta)
    config = dict(meta.get("config") or {})
    for key in ("cond", "sampling"):
        if key in config:
            meta.setdefault(key, config.pop(key))
    if "tokenizer_ckpt" in config:
        path = config.pop("tokenizer_ckpt")
        if path and "tokenizer" not in meta:
            meta["tokenizer"] = {"kind": paradigms.get(meta.get("kind")).tokenizers[0], "path": path}
    meta["config"] = config
    return meta


def _choose_weights(requested: str | None, available: tuple[str, ...], protocol: dict, where: Path) -> str:
    """``requested`` (ema | raw) if the checkpoint holds it; None: the training run's ``eval.weights``
    (stored with its protocol), or what the checkpoint holds when that is not there."""
    if requested is None:
        preferred = protocol.get("weights") or "ema"
        return preferred if preferred in available else available[0]
    if requested not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', not {requested!r}")
    if requested not in available:
        why = "it was trained without callbacks.ema" if requested == "ema" else "an export keeps one set"
        raise ValueError(f"{where} holds only {available[0]} weights ({why}): pass weights={available[0]}")
    return requested


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    weights: str | None = None) -> Checkpoint:
    """A Lightning checkpoint (weights-only load), a sharded one (a directory of ``trainer=fsdp``
    shards, see :mod:`unifuse.run.sharded`) or an export directory (safetensors). ``weights``: ``ema``
    (the average of ``callbacks.ema``) or ``raw`` (the trained weights); None: the run's
    ``eval.weights``, raw for a checkpoint without an average."""
    path = Path(path).expanduser()
    if path.is_dir() and not is_sharded(path):
        return _read_export(path, map_location, weights)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found")
    ck = read_sharded(path, map_location) if path.is_dir() else torch.load(path, map_location=map_location,
                                                                          weights_only=True)
    if not isinstance(ck, dict) or not isinstance(ck.get("unifuse"), dict):
        raise ValueError(f"{path} is not a unifuse checkpoint (no 'unifuse' entry with its kind and config)")
    paradigms.get(ck["unifuse"].get("kind"), str(path))
    meta = _upgrade(ck["unifuse"])
    protocol = dict(ck.get("unifuse_eval") or {})
    # Lightning's weight averaging (callbacks.ema) saves the average as the state_dict and the trained
    # weights as current_model_state
    has_ema = "averaging_state" in ck and "current_model_state" in ck
    meta["weights"] = _choose_weights(weights, ("ema", "raw") if has_ema else ("raw",), protocol, path)
    full = ck["current_model_state"] if has_ema and meta["weights"] == "raw" else ck["state_dict"]
    state = {k[len("net."):]: v for k, v in full.items() if k.startswith("net.")}
    return Checkpoint(path, meta["kind"], meta["config"], state, meta, protocol, ck.get("unifuse_tokenizer"),
                      ck.get("epoch"), ck.get("global_step"), meta["weights"])


def _read_export(path: Path, map_location, weights: str | None = None) -> Checkpoint:
    cfg_file = path / EXPORT_CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is a directory without {EXPORT_CONFIG}: not a unifuse export")
    c = json.loads(cfg_file.read_text())
    if c.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{cfg_file}: unknown export format {c.get('format')!r} (expected {EXPORT_FORMAT})")
    paradigms.get(c.get("kind"), str(path))
    device = str(map_location)
    state = load_file(str(path / EXPORT_WEIGHTS), device=device)
    tok = path / EXPORT_TOKENIZER
    meta = {k: c[k] for k in ("kind", "config", "cond", "sampling", "tokenizer") if k in c}
    protocol = dict(c.get("eval") or {})
    meta["weights"] = _choose_weights(weights, (c.get("weights", "raw"),), protocol, path)
    return Checkpoint(path, c["kind"], c["config"], state, meta, protocol,
                      load_file(str(tok), device=device) if tok.is_file() else None, c.get("epoch"), c.get("step"),
                      meta["weights"])


def build_net(kind: str, config: dict, state_dict: dict | None = None) -> nn.Module:
    """A fresh net of a registered kind from its stored config (and weights, if given), in eval mode."""
    net = paradigms.get(kind).net_class().from_config(config)
    if state_dict is not None:
        net.load_state_dict(state_dict)
    return net.eval()


def load_net(path: str | Path | Checkpoint, map_location: str | torch.device = "cpu",
             expect: str | type | tuple[str | type, ...] | None = None) -> nn.Module:
    """The net of a checkpoint, rebuilt without Lightning, on ``map_location``. ``expect``: the kinds
    (names) or net classes the checkpoint must hold."""
    ck = path if isinstance(path, Checkpoint) else read_checkpoint(path, map_location)
    allowed = expect if isinstance(expect, tuple) else (expect,) if expect is not None else ()
    net_class = paradigms.get(ck.kind).net_class()
    if allowed and not any(a == ck.kind if isinstance(a, str) else issubclass(net_class, a) for a in allowed):
        names = [a if isinstance(a, str) else paradigms.paradigm_of(a).name for a in allowed]
        raise ValueError(f"{ck.path} is a {ck.kind} checkpoint, expected {' or '.join(names)}")
    return build_net(ck.kind, ck.config, ck.state_dict).to(map_location)


def load_tokenizer(ck: Checkpoint, override: str | Path | None = None,
                   map_location: str | torch.device = "cpu") -> nn.Module:
    """The image tokenizer a generator decodes with: ``override`` (``tokenizer=``) if given, else the
    one the checkpoint carries, else the file it names if that file is here and unchanged."""
    info = ck.tokenizer or {}
    kind = info.get("kind") or paradigms.get(ck.kind).tokenizers[0]
    if override:
        tok = load_net(override, map_location, expect=kind)
        if info.get("sha256") and state_hash(tok.state_dict()) != info["sha256"]:
            log.warning("tokenizer=%s differs from the tokenizer %s was trained with (content hash %s)",
                        override, ck.path, info["sha256"])
        return tok
    if ck.tokenizer_state is not None:
        return build_net(kind, info["config"], ck.tokenizer_state).to(map_location)
    if "config" in info and not build_net(kind, info["config"]).state_dict():  # no weights to find (pixel space)
        return build_net(kind, info["config"]).to(map_location)
    path = info.get("path")
    if path and Path(path).is_file():
        tok_ck = read_checkpoint(path, map_location)
        if info.get("sha256") and state_hash(tok_ck.state_dict) != info["sha256"]:
            raise ValueError(f"{path} has changed since {ck.path} was trained with it (content hash "
                             f"{info['sha256']}): pass tokenizer=<the tokenizer checkpoint it was trained with>")
        return load_net(tok_ck, map_location, expect=kind)
    raise FileNotFoundError(
        f"{ck.path} does not carry its image tokenizer and the file it names ({path}) is not here: "
        "pass tokenizer=<tokenizer checkpoint or export directory>")


def tokenizer_entry(tokenizer: nn.Module, path: str | None, embed: bool) -> tuple[dict, dict | None]:
    """(description stored in a generator's metadata, weights to carry or None)."""
    state = {k: v.detach().cpu() for k, v in tokenizer.state_dict().items()}
    info = {"kind": paradigms.paradigm_of(tokenizer).name, "config": tokenizer.config(), "sha256": state_hash(state),
            "path": path}
    return info, (state if embed else None)


def load_pipeline(path: str | Path, tokenizer: str | Path | None = None, device: str | torch.device = "cpu",
                  weights: str | None = None):
    """Prompts -> images for a generator checkpoint: (pipeline, checkpoint). ``weights``: ema | raw
    (default: see :func:`read_checkpoint`)."""
    ck = read_checkpoint(path, device, weights)
    pipeline_cls = paradigms.get(ck.kind).pipeline_class()
    net = load_net(ck, device)
    return pipeline_cls(net, load_tokenizer(ck, tokenizer, device), cond=ck.meta.get("cond", "text"),
                        sampling=ck.sampling), ck


def export(path: str | Path, out: str | Path) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ ``tokenizer.safetensors``) that load without
    Lightning: ``build_net(config["kind"], config["config"], safetensors.torch.load_file(...))``."""
    ck = read_checkpoint(path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def plain(sd: dict) -> dict:  # safetensors wants contiguous tensors that share no memory
        return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}

    save_file(plain(ck.state_dict), str(out / EXPORT_WEIGHTS))
    meta = {k: v for k, v in ck.meta.items() if k not in ("kind", "config")}
    tok = ck.meta.get("tokenizer")
    if ck.tokenizer_state is not None:
        save_file(plain(ck.tokenizer_state), str(out / EXPORT_TOKENIZER))
    elif tok and tok.get("path") and Path(tok["path"]).is_file():  # carry it now, so the export travels
        tok_ck = read_checkpoint(tok["path"])
        save_file(plain(tok_ck.state_dict), str(out / EXPORT_TOKENIZER))
        meta["tokenizer"] = {**tok, "config": tok_ck.config, "sha256": state_hash(tok_ck.state_dict)}
    config = {"format": EXPORT_FORMAT, "kind": ck.kind, "config": ck.config, **meta, "eval": ck.eval,
              "epoch": ck.epoch, "step": ck.step, "source": str(ck.path)}
    (out / EXPORT_CONFIG).write_text(json.dumps(config, indent=2))
    return out
