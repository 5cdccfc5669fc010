"""The memory plan: what one GPU holds while training, estimated from the model, the strategy and
the batch, printed and logged before the first step (:class:`MemoryPlanCallback`, or
:func:`plan_from_config` for a config without building anything).

Per GPU, in bytes. P: trainable parameters, F: frozen ones in the module, W: ranks. Under FSDP
(``trainer=fsdp``) the weights, gradients and optimizer state are divided by W; DDP replicates them.

* weights: 4 (P + F), float32 (the master weights under mixed precision); 2 under ``bf16-true``.
* gradients: 4 P, the weights' dtype.
* optimizer state: s x 4 P with s = 2 for Adam/AdamW (two moments), 1 for SGD (momentum).
* DDP gradient buckets: 4 P (DDP copies gradients into its buckets: torch's default
  ``gradient_as_bucket_view=False``).
* autocast weight copies: 2 P under ``bf16-mixed`` with float32 weights (each matmul keeps the bf16
  copy of its weight for the backward).
* FSDP gathered units: (2 U + R) g + (U + R) 4: the largest unit (U parameters) running and the next
  one prefetched, gathered in g bytes (2 with bf16 params, else 4), the root unit (R parameters:
  embeddings, heads, patch layers) gathered from forward to backward, and their float32 gradients
  before the reduce-scatter.
* EMA: 4 (P + F), a float32 copy of the module on every rank (DDP; FSDP refuses it).
* frozen tokenizer: 4 x the parameters of the image autoencoder (held beside the module).
* activations (what autograd keeps for the backward), for T tokens per GPU (rows x seq_len of
  one micro-batch; accumulation does not add): T x n_layers x a, where a (bytes per token and
  layer) was measured from the tensors autograd saves for one Block (d: width, k: kv heads x head
  dim, h: MLP hidden width, H: heads):

  - float32: 40 d + 20 k + 16 h + 4 H + 16
  - bf16-mixed (autocast over float32 weights): 36 d + 14 k + 8 h + 4 H + 16
  - bf16 weights (FSDP with bf16 params, autocast on top): 34 d + 14 k + 8 h + 4 H + 16

  With activation checkpointing (``model.net.transformer.grad_checkpointing``) a Block keeps only its
  input: 4 d per token (2 d with bf16 weights). LM head: T x (4 V + 12 d) for the float32
  log-softmax over the vocabulary (V) and the final norm's input and output (an upper bound: every
  position counted as a text target).
* backward peak: T x (a + 4 V): one Block's activations live again while it is recomputed
  (checkpointing) or its activation gradients, and the logits' float32 gradient.

  Not counted: the image patch and time layers and the embeddings (small next to the blocks), and
  the (rows, seq, seq) mask of the dense attention used on CPU (FlexAttention on GPUs keeps no
  scores).
* reserve: a fraction of the device memory for the CUDA context, NCCL buffers and allocator
  fragmentation (``reserve_fraction``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import nn

from unifuse.models.transformer import Block, Transformer, TransformerConfig
from unifuse.run.parallel import import_class

log = logging.getLogger("unifuse")

GB = 1e9
# bytes per token and layer: (per d, per k, per h), see the module doc
ACTIVATION_COEF = {"float32": (40, 20, 16), "bf16-mixed": (36, 14, 8), "bf16 weights": (34, 14, 8)}
LM_HEAD_BYTES_PER_VOCAB = 4  # the float32 log-softmax (and, in the backward, the logits' gradient)
LM_HEAD_BYTES_PER_DIM = 12  # the final norm's input and output, the head's input
OPTIMIZER_STATES = {"Adam": 2, "AdamW": 2, "SGD": 1}


def optimizer_states(name: str) -> int:
    """Float32 tensors of state per parameter for an optimizer class name."""
    if name not in OPTIMIZER_STATES:
        raise ValueError(f"memory plan: unknown optimizer {name!r} (known: {', '.join(OPTIMIZER_STATES)})")
    return OPTIMIZER_STATES[name]


def activation_mode(precision: str, bf16_weights: bool) -> str:
    """The dtype regime activations are kept in: a key of ``ACTIVATION_COEF``."""
    precision = str(precision)
    if precision in ("32-true", "32", "64-true"):
        return "float32"
    if precision in ("bf16-mixed", "16-mixed"):
        return "bf16 weights" if bf16_weights else "bf16-mixed"
    if precision in ("bf16-true", "16-true"):
        return "bf16 weights"
    raise ValueError(f"memory plan: no activation estimate for trainer.precision={precision!r}")


def layer_bytes_per_token(cfg: TransformerConfig, mode: str) -> float:
    """``a`` of the module doc: saved bytes per token of one Block."""
    cd, ck, ch = ACTIVATION_COEF[mode]
    return cd * cfg.dim + ck * cfg.kv_heads * cfg.head_dim + ch * cfg.hidden + 4 * cfg.n_heads + 16


def activation_bytes(cfg: TransformerConfig, tokens: int, mode: str, checkpointing: bool) -> dict[str, float]:
    """Bytes for ``tokens`` positions of one micro-batch: what the Blocks and the LM head keep for
    the backward, and the backward's peak on top (see the module doc)."""
    a = layer_bytes_per_token(cfg, mode)
    kept = (2 if mode == "bf16 weights" else 4) * cfg.dim if checkpointing else a
    vocab = cfg.vocab_size if cfg.lm_head else 0
    return {"blocks": tokens * cfg.n_layers * kept,
            "head": tokens * (LM_HEAD_BYTES_PER_VOCAB * vocab + LM_HEAD_BYTES_PER_DIM * cfg.dim),
            "backward": tokens * (a + LM_HEAD_BYTES_PER_VOCAB * vocab)}


def backbone(module: nn.Module) -> Transformer | None:
    """The transformer the model is built around (``net.net`` of a LightningModule, ``net`` of a
    Transfusion / image GPT / MaskGIT), or None (convolutional models: no activation estimate)."""
    m = module
    for _ in range(2):
        m = getattr(m, "net", None)
        if isinstance(m, Transformer):
            return m
    return None


def _size(b: float) -> str:
    return f"{b / GB:8.2f} GB" if b >= GB / 10 else f"{b / 1e6:8.2f} MB"


def _numel(params) -> int:
    return sum(p.numel() for p in params)  # a DTensor (a sharded FSDP parameter) counts its full size


@dataclass
class MemoryPlan:
    title: str
    params: int
    trainable: int
    parts: dict[str, tuple[float, str]] = field(default_factory=dict)  # name -> (bytes per GPU, how)
    device_bytes: float | None = None

    @property
    def total(self) -> float:
        return sum(b for b, _ in self.parts.values())

    @property
    def fits(self) -> bool | None:
        return None if self.device_bytes is None else self.total <= self.device_bytes

    def table(self) -> str:
        lines = [f"memory plan per GPU: {self.title}",
                 f"  parameters          {self.params / 1e6:.1f}M ({self.trainable / 1e6:.1f}M trainable)"]
        lines += [f"  {name:<17} {_size(b)}  {how}" for name, (b, how) in self.parts.items()]
        if self.device_bytes is None:
            verdict = "device memory n/a (no GPU; callbacks.memory_plan.device_memory_gb sets it)"
        else:
            verdict = (f"of {self.device_bytes / GB:.0f} GB: "
                       + ("fits" if self.fits else "DOES NOT FIT: lower data.collator.batch_size (raise "
                          "trainer.accumulate_grad_batches to keep the batch), set "
                          "model.net.transformer.grad_checkpointing=true, or use trainer=fsdp"))
        lines.append(f"  {'total':<17} {_size(self.total)}  {verdict}")
        return "\n".join(lines)

    def metrics(self) -> dict[str, float]:
        out = {f"memory_plan/{name.replace(' ', '_')}_gb": b / GB for name, (b, _) in self.parts.items()}
        out["memory_plan/total_gb"] = self.total / GB
        if self.device_bytes is not None:
            out["memory_plan/device_gb"] = self.device_bytes / GB
        return out


def plan_memory(module: nn.Module, *, world_size: int = 1, sharded: bool = False, precision: str = "32-true",
                optimizer: str = "AdamW", ema: bool = False, rows: int | None = None, seq_len: int | None = None,
                wrap: tuple[type, ...] = (Block,), bf16_params: bool = True, frozen_extra: int = 0,
                device_gb: float | None = None, reserve_fraction: float = 0.0) -> MemoryPlan:
    """The plan for ``module`` (a LightningModule or its net; real, sharded or on the meta device)
    trained on ``world_size`` ranks, replicated (DDP) or ``sharded`` (FSDP over ``wrap`` units),
    with micro-batches of ``rows`` x ``seq_len`` tokens per GPU. ``frozen_extra``: parameters held
    beside the module (the frozen image autoencoder)."""
    params = list(module.parameters())
    trainable = _numel(p for p in params if p.requires_grad)
    frozen = _numel(p for p in params if not p.requires_grad)
    w = world_size if sharded else 1
    half = str(precision) in ("bf16-true", "16-true")
    wb = 2 if half else 4
    gathered_bf16 = sharded and bf16_params and str(precision) in ("bf16-mixed", "16-mixed", "bf16-true")
    mode = activation_mode(precision, bf16_weights=gathered_bf16 or half)
    s = optimizer_states(optimizer)
    split = f" / {world_size} ranks" if sharded else ""
    p = {"weights": ((trainable + frozen) * wb / w, f"{wb} B x all parameters{split}"),
         "gradients": (trainable * wb / w, f"{wb} B x trainable{split}"),
         "optimizer state": (trainable * s * wb / w, f"{optimizer}: {s} x {wb} B x trainable{split}")}
    if sharded:
        units = [_numel(m.parameters()) for m in module.modules() if isinstance(m, wrap)]
        unit = max(units, default=0)
        root = trainable + frozen - sum(units)
        g = 2 if gathered_bf16 else 4
        p["gathered units"] = ((2 * unit + root) * g + (unit + root) * 4,
                               f"2 units of {unit / 1e6:.1f}M + root {root / 1e6:.1f}M in {g} B, their fp32 grads")
    else:
        if world_size > 1:
            p["DDP buckets"] = (trainable * 4, "4 B x trainable (gradient copies)")
        if mode == "bf16-mixed":
            p["autocast copies"] = ((trainable + frozen) * 2, "2 B x parameters (bf16 weights kept for the backward)")
    if ema:
        p["EMA"] = ((trainable + frozen) * 4 / w, f"4 B x all parameters{split}")
    if frozen_extra:
        p["frozen tokenizer"] = (frozen_extra * 4.0, "4 B x the image autoencoder's parameters")
    net = backbone(module)
    if net is not None and rows and seq_len:
        ckpt = net.cfg.grad_checkpointing
        act = activation_bytes(net.cfg, rows * seq_len, mode, ckpt)
        per = "input" if ckpt else f"{layer_bytes_per_token(net.cfg, mode) / 1e3:.1f} KB"
        p["activations"] = (act["blocks"], f"{rows} x {seq_len} tokens x {net.cfg.n_layers} layers x {per} "
                                           f"({mode}{', checkpointed' if ckpt else ''})")
        p["LM head"] = (act["head"], f"log-softmax over {net.cfg.vocab_size} tokens, final norm")
        p["backward peak"] = (act["backward"], "one layer's activations, the logits' gradient")
    if reserve_fraction and device_gb:
        p["reserve"] = (reserve_fraction * device_gb * GB,
                        f"{reserve_fraction:.0%} of the device: CUDA context, NCCL buffers, fragmentation")
    title = (f"{'FSDP' if sharded else 'DDP'} over {world_size} ranks" if world_size > 1 or sharded
             else "one device") + f", {precision}, {optimizer}"
    return MemoryPlan(title, trainable + frozen, trainable, p, None if device_gb is None else device_gb * GB)


class MemoryPlanCallback(L.Callback):
    """Prints the plan (rank 0) and logs it (``memory_plan/*_gb``) at the start of fit, after the
    strategy has wrapped or sharded the model and before the first step. ``device_memory_gb``:
    the GPU's memory (default: what the device reports; n/a on CPU). ``reserve_fraction``: the part of
    it set aside for the CUDA context, NCCL buffers and allocator fragmentation."""

    def __init__(self, device_memory_gb: float | None = None, reserve_fraction: float = 0.1):
        self.device_memory_gb, self.reserve_fraction = device_memory_gb, reserve_fraction
        self.plan: MemoryPlan | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        strategy = trainer.strategy
        device = strategy.root_device
        device_gb = self.device_memory_gb
        if device_gb is None and device.type == "cuda":
            device_gb = torch.cuda.get_device_properties(device).total_memory / GB
        collator = getattr(trainer.datamodule, "collator", None)
        opt = type(trainer.optimizers[0]).__name__ if trainer.optimizers else "AdamW"
        tok = getattr(pl_module, "tokenizer", None)
        sharded = isinstance(strategy, (ModelParallelStrategy, FSDPStrategy))
        self.plan = plan_memory(
            pl_module, world_size=trainer.world_size, sharded=sharded, precision=str(trainer.precision), optimizer=opt,
            ema=any(isinstance(c, WeightAveraging) for c in trainer.callbacks),
            rows=getattr(collator, "batch_size", None), seq_len=getattr(collator, "seq_len", None),
            wrap=getattr(strategy, "wrap", (Block,)), bf16_params=getattr(strategy, "bf16_params", False),
            frozen_extra=_numel(tok.parameters()) if isinstance(tok, nn.Module) else 0,
            device_gb=device_gb, reserve_fraction=self.reserve_fraction)
        if trainer.is_global_zero:
            log.info("%s", self.plan.table())
            for lg in trainer.loggers:
                lg.log_metrics(self.plan.metrics(), step=trainer.global_step)


# ----------------------------------------------------------------------------- from a config
class _VocabOnly:
    """A stand-in text tokenizer with the configured vocabulary size (nothing is trained or read)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size


def plan_from_config(cfg) -> MemoryPlan:
    """The plan of a composed training config, for the GPUs it names, without data, checkpoints or
    GPUs: the net is built on the meta device; a configured text tokenizer is replaced by its
    ``vocab_size`` (bytes: 256). The frozen image autoencoder is not counted (not built)."""
    from hydra.utils import instantiate

    t, net_cfg = cfg.trainer, cfg.model.net
    strategy = t.get("strategy")  # a name ("ddp", "fsdp") or a node with _target_
    opts = strategy if hasattr(strategy, "get") else {}
    target = str(opts.get("_target_", strategy or ""))
    sharded = "FSDP" in target.upper() or "ModelParallel" in target
    kw = {}
    if "text_tokenizer" in net_cfg:
        tok = net_cfg.text_tokenizer
        kw["text_tokenizer"] = _VocabOnly(int(tok.get("vocab_size", 256)) if tok is not None else 256)
    with torch.device("meta"):
        net = instantiate(net_cfg, **kw)
    mp = (cfg.get("callbacks") or {}).get("memory_plan") or {}
    targets = [import_class(str(c["_target_"])) for c in (cfg.get("callbacks") or {}).values() if c]
    wrap = tuple(import_class(w) for w in opts.get("wrap", [])) or (Block,)
    collator = cfg.data.get("collator") or {}
    optimizer = str((cfg.model.get("optimizer") or {}).get("_target_", "AdamW")).rsplit(".", 1)[-1]
    return plan_memory(
        _Wrapped(net), world_size=int(t.get("devices", 1)) * int(t.get("num_nodes", 1)), sharded=sharded,
        precision=str(t.get("precision", "32-true")), optimizer=optimizer,
        ema=any(issubclass(c, WeightAveraging) for c in targets), rows=collator.get("batch_size"),
        seq_len=collator.get("seq_len"), wrap=wrap, bf16_params=sharded and bool(opts.get("bf16_params", True)),
        device_gb=mp.get("device_memory_gb"), reserve_fraction=float(mp.get("reserve_fraction", 0.0)))


class _Wrapped(nn.Module):
    """The net as a LightningModule holds it (``.net``), so the plan finds the same backbone."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
