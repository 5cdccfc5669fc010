"""Typed configuration schemas and OmegaConf resolvers, registered before Hydra composes.

Architecture hyperparameters are dataclasses stored in Hydra's ConfigStore under ``schema/``
(each paradigm's spec names its own, :mod:`unifuse.paradigms`); the model yaml files put them in
their defaults lists (``/schema/autoencoder@net.autoencoder``), so a misspelled key fails at compose
time with the key named, and ``_convert_: object`` hands the modules real dataclass instances.

``plugins=[<module>, ...]`` (every CLI) imports modules that register paradigms defined outside
unifuse; the command line's value is read before Hydra composes, so the schemas and config options
they store are there to compose.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import get_type_hints

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep
from omegaconf import MISSING, DictConfig, OmegaConf

from unifuse import paradigms
from unifuse.eval.protocol import OnlineEvalConfig
from unifuse.sampling.settings import SamplingSettings

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

_RUN_ID: str | None = None


def run_id() -> str:
    """A run-directory name that never collides and that all ranks of one launch agree on.

    Under torchrun every rank runs Hydra itself, so the name comes from what the ranks share: the
    rendezvous id when one is given, else the elastic agent (the ranks' common parent) and its
    start time. Otherwise: date, time and a random suffix (two runs in the same second differ).
    ``UNIFUSE_RUN_ID`` overrides both (e.g. a SLURM job id)."""
    global _RUN_ID
    if _RUN_ID is None:
        if os.environ.get("UNIFUSE_RUN_ID"):
            _RUN_ID = os.environ["UNIFUSE_RUN_ID"]
        elif "TORCHELASTIC_RUN_ID" in os.environ:
            rid = os.environ["TORCHELASTIC_RUN_ID"]
            if rid in ("", "none"):
                ppid = os.getppid()
                try:
                    start = Path(f"/proc/{ppid}/stat").read_text().rsplit(")", 1)[1].split()[19]
                except (OSError, IndexError):
                    start = "0"
                rid = f"{ppid}-{start}"
            _RUN_ID = f"{time.strftime('%Y-%m-%d')}/torchrun_{rid}"
        else:
            _RUN_ID = f"{time.strftime('%Y-%m-%d')}/{time.strftime('%H-%M-%S')}_{secrets.token_hex(3)}"
    return _RUN_ID


def wandb_logged_in() -> bool:
    """``wandb login`` stored credentials for the W&B host in the netrc file (``NETRC`` or ~/.netrc)."""
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_offline() -> bool:
    """Offline unless the user asked for online W&B: WANDB_MODE=online, an API key (WANDB_API_KEY)
    or `wandb login` credentials, without WANDB_MODE=offline. With no network, online mode
    retries ~105 s before failing, so offline is the default for everyone else."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return True
    if mode == "online":
        return False
    return not (os.environ.get("WANDB_API_KEY") or wandb_logged_in())


WANDB_RUN_FILE = "wandb_run.json"
_WANDB_RUNS: dict[tuple, dict] = {}


def wandb_run(field_name: str, ckpt_path: str | None = None, task_name: str = "train",
              output_dir: str = "") -> str:
    """The W&B run id / name of the training run writing to ``output_dir``. Resuming (``ckpt_path``
    inside a run directory that recorded its W&B run) continues that W&B run; otherwise a new id,
    and a name carrying the task name and the run id so runs of one preset are told apart. Each
    job of an in-process sweep has its own output_dir, hence its own W&B run."""
    key = (str(output_dir), str(ckpt_path))
    if key not in _WANDB_RUNS:
        stored = None
        if ckpt_path and str(ckpt_path) not in ("None", "null"):
            rec = Path(ckpt_path).expanduser().resolve().parent.parent / WANDB_RUN_FILE
            if str(ckpt_path) in ("last", "auto"):  # resuming in this run directory (unifuse.run.resume)
                rec = Path(str(output_dir)) / WANDB_RUN_FILE
            if rec.is_file():
                stored = json.loads(rec.read_text())
        parts = Path(str(output_dir)).parts
        cut = max((i for i, p in enumerate(parts) if p in ("runs", "multiruns")), default=None)
        rid = "/".join(parts[cut + 1:]) if cut is not None and cut + 1 < len(parts) else run_id()
        _WANDB_RUNS[key] = stored or {"id": secrets.token_hex(4), "name": f"{task_name}/{rid}"}
    return _WANDB_RUNS[key][field_name]


def latest_checkpoint(log_dir: str, task_name: str) -> str:
    """Newest ``last.ckpt`` of a run whose task_name matches, e.g. the tokenizer trained by
    ``make train-vqvae``. Fails naming the setting to use instead."""
    best, best_time = None, -1.0
    for cfg_file in Path(log_dir).glob("**/.hydra/config.yaml"):
        ckpt = cfg_file.parent.parent / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            continue
        try:
            name = OmegaConf.load(cfg_file).get("task_name")
        except Exception:
            continue
        if name == task_name and ckpt.stat().st_mtime > best_time:
            best, best_time = ckpt, ckpt.stat().st_mtime
    if best is None:
        raise FileNotFoundError(
            f"no checkpoint of a '{task_name}' run under {log_dir}: train one first "
            f"(`python -m unifuse.train experiment={task_name}`) or set model.tokenizer_ckpt=<path to last.ckpt>"
        )
    return str(best)


def native_bf16_precision() -> str:
    """Lightning precision for presets that want bf16 where it is fast: ``bf16-mixed`` on a CUDA
    GPU with bf16 support or a CPU with AMX or AVX512-BF16 matrix units (there a bf16 GEMM runs
    several times faster than fp32), else ``32-true`` (elsewhere autocast to bf16 on the CPU is
    emulated and slower than fp32)."""
    import torch

    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    cpu = torch.cpu
    probes = [getattr(cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return "bf16-mixed" if any(p is not None and p() for p in probes) else "32-true"


def ckpt_tag(path: str) -> str:
    """Short stable tag of a checkpoint (its resolved path and modification time), naming data
    derived from it: codes pre-encoded by one tokenizer land in their own directory, so training
    a new tokenizer re-encodes instead of mixing codes from two codebooks."""
    p = Path(path).expanduser()
    key = str(p.resolve())
    if p.is_file():
        key += f":{p.stat().st_mtime_ns}"
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def under(root: str | None, name: str, fallback: str | None = None) -> str | None:
    """``root/name``, or ``fallback`` when ``root`` is null: where the evaluation finds its
    reference images and domain extractor when the data config names an image root (``data=shards``
    has none unless ``data.image_root`` is given; its reference split is then ``data.val``)."""
    return fallback if root in (None, "") else f"{root}/{name}"


# ----------------------------------------------------------------------------- the CLI apps' schemas
# Sampling and evaluation fields left at ??? (MISSING) take the value stored in the checkpoint; a
# value given on the command line overrides it (``cfg_scale=null``: no guidance). The fields are
# SamplingSettings' own, each defaulting to ???.
SamplingOverrides = make_dataclass(
    "SamplingOverrides",
    [(f.name, get_type_hints(SamplingSettings)[f.name], field(default=MISSING)) for f in fields(SamplingSettings)])


@dataclass
class SampleApp(SamplingOverrides):
    """``python -m unifuse.sample``."""

    ckpt: str = MISSING  # checkpoint (.ckpt) or export directory
    mode: str = "text2image"  # text2image | caption (image -> text) | document (interleaved; Transfusion)
    prompt: str | None = None  # several prompts: "a|b"; required unless uncond=true. document: "<image>" marks images
    image: str | None = None  # mode=caption: image files to caption, "a.png|b.png"
    max_new_tokens: int = 48  # mode=caption / document: generated text tokens at most
    uncond: bool = False  # with prompt='': unconditional samples
    n: int = 16  # samples per prompt
    out: str | None = None  # PNG path; default <run>/samples/...
    tokenizer: str | None = None  # image tokenizer to decode with; default: the one the checkpoint carries
    weights: str | None = None  # ema | raw; default: the training run's eval.weights (raw without an EMA)
    device: str = "cpu"
    plugins: list[str] = field(default_factory=list)  # modules registering paradigms defined outside unifuse


@dataclass
class EvaluateApp(SamplingOverrides):
    """``python -m unifuse.evaluate``: evaluation fields default to the protocol stored by training."""

    ckpt: str = MISSING
    extractor: str = MISSING  # domain | inception
    domain_weights: str | None = MISSING
    inception_weights: str | None = MISSING
    reference: str | None = MISSING
    reference_name: str = MISSING
    n: int = MISSING
    metrics: list[str] = MISSING
    batch_size: int = MISSING
    cache_dir: str | None = MISSING
    weights: str = MISSING  # ema | raw
    tokenizer: str | None = None
    out: str | None = None  # JSON path; default next to the checkpoint
    device: str = "cpu"
    plugins: list[str] = field(default_factory=list)  # modules registering paradigms defined outside unifuse


@dataclass
class GuardConfig:
    """``guard`` in the training config: what a non-finite loss does (``unifuse.run.guard``)."""

    nonfinite: str = "stop"  # stop | skip
    max_skips_in_row: int = 3  # skip: this many non-finite batches in a row stop the run


@dataclass
class ExportApp:
    """``python -m unifuse.export``."""

    ckpt: str = MISSING
    out: str = MISSING
    plugins: list[str] = field(default_factory=list)  # modules registering paradigms defined outside unifuse


def given(cfg: DictConfig, schema: type) -> dict:
    """The fields of ``schema`` that ``cfg`` sets (not left at ???), as plain values."""
    values = OmegaConf.to_container(cfg, resolve=True)
    return {f.name: values[f.name] for f in fields(schema) if not OmegaConf.is_missing(cfg, f.name)}


class ConfigError(ValueError):
    """A composed config that cannot run; the training CLI prints its message as one line."""


def require_targets(cfg: DictConfig, *groups: str) -> None:
    """Every non-null entry of the ``groups`` (name -> config, e.g. ``callbacks``, ``logger``) names
    a ``_target_``. An entry without one would be instantiated as a plain dict and reach Lightning
    as a callback or logger that fails later, often in its exception handling, hiding the cause.
    The usual case: a preset sets fields of an entry (``callbacks.ema.decay``) that the chosen
    group option (``callbacks=fsdp``, which has no EMA) does not define, so the fields alone remain."""
    for group in groups:
        for name, node in (cfg.get(group) or {}).items():
            if node is None or (isinstance(node, DictConfig) and "_target_" in node):
                continue
            where = f"{group}={_choice(group)}" if _choice(group) else f"the {group} config"
            what = (f"sets only {', '.join(map(str, node))}" if isinstance(node, DictConfig)
                    else f"is {node!r}, not a config")
            raise ConfigError(
                f"{group}.{name} has no _target_ (it {what}): a preset or override gives fields to an entry "
                f"that {where} does not define; pass {group}.{name}=null to go without it, or choose "
                f"a {group} option that defines it")


def _choice(group: str) -> str | None:
    """The option chosen for a config group in the running Hydra app, if there is one."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(group)


def compose_app(name: str, overrides: list[str]) -> DictConfig:
    """Compose ``conf/<name>.yaml`` with ``overrides`` in-process, as the CLI would (tests, notebooks)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(name, overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


def plugin_overrides(args: list[str]) -> list[str]:
    """The modules a ``plugins=[...]`` override among the command-line ``args`` names (also
    ``+plugins=...``; a sweep over plugins names all its values). Others are left to Hydra."""
    found: list[str] = []
    for arg in args:
        if not re.match(r"\+{0,2}plugins=", arg):
            continue
        value = OverridesParser.create().parse_override(arg).value()
        value = value.list if isinstance(value, ChoiceSweep) else value
        found += [] if value is None else [value] if isinstance(value, str) else [str(v) for v in value]
    return found


def use_plugins(modules) -> None:
    """Import the plugin modules (they register their paradigms) and store every paradigm's schemas."""
    paradigms.load_plugins(modules)
    store_schemas()


def store_schemas() -> None:
    """Each registered paradigm's schemas, as ``schema/<name>`` in Hydra's ConfigStore."""
    cs = ConfigStore.instance()
    for spec in paradigms.paradigms():
        for name, node in spec.schema_nodes().items():
            cs.store(group="schema", name=name, node=node)


def tool_main(config_name: str, task):
    """The entry point of a Hydra tool app (``sample``, ``evaluate``, ``export``): ``main()`` runs the
    CLI on ``conf/<config_name>.yaml`` (bad input ends with its message, not a traceback);
    ``main(overrides)`` composes the same config in-process and returns ``task``'s result. Both
    import the ``plugins`` first."""

    def with_plugins(cfg: DictConfig):
        use_plugins(cfg.plugins)
        return task(cfg)

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    def app(cfg: DictConfig) -> None:
        try:
            with_plugins(cfg)
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")

    def main(argv: list[str] | None = None):
        if argv is None:
            try:
                use_plugins(plugin_overrides(sys.argv[1:]))
            except ValueError as e:
                sys.exit(f"error: {e}")
            app()
            return None
        use_plugins(plugin_overrides(argv))
        return with_plugins(compose_app(config_name, argv))

    return main


def register() -> None:
    if not OmegaConf.has_resolver("unifuse.run_id"):
        OmegaConf.register_new_resolver("unifuse.run_id", run_id)
        OmegaConf.register_new_resolver("unifuse.wandb_offline", wandb_offline)
        OmegaConf.register_new_resolver("unifuse.latest_ckpt", latest_checkpoint, use_cache=True)
        OmegaConf.register_new_resolver("unifuse.ckpt_tag", ckpt_tag, use_cache=True)
        OmegaConf.register_new_resolver("unifuse.wandb_run", wandb_run)
    if not OmegaConf.has_resolver("unifuse.under"):
        OmegaConf.register_new_resolver("unifuse.under", under)
    if not OmegaConf.has_resolver("unifuse.native_bf16"):
        OmegaConf.register_new_resolver("unifuse.native_bf16", native_bf16_precision, use_cache=True)
    cs = ConfigStore.instance()
    store_schemas()
    cs.store(group="schema", name="sampling", node=SamplingSettings)
    cs.store(group="schema", name="eval", node=OnlineEvalConfig)
    cs.store(group="schema", name="guard", node=GuardConfig)
    cs.store(name="sample_schema", node=SampleApp)
    cs.store(name="evaluate_schema", node=EvaluateApp)
    cs.store(name="export_schema", node=ExportApp)


register()
