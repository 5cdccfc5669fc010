"""The evaluation settings (typed: a misspelled key fails when the config is composed, naming it).

``EvalConfig`` is the protocol of one FID/KID evaluation: ``python -m unifuse.evaluate`` takes it
field by field, and training runs store it in their checkpoints (``eval`` in the training config,
plus ``every_n_epochs``), so the offline CLI repeats the online number.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalConfig:
    extractor: str = "domain"  # domain | inception
    domain_weights: str | None = None
    inception_weights: str | None = None
    reference: str | None = None  # image shards of the reference split (e.g. data/emoji32/val)
    reference_name: str = "val"
    n: int = 256
    metrics: list[str] = field(default_factory=lambda: ["fid", "kid"])
    batch_size: int = 128
    cache_dir: str | None = None
    seed: int = 0
    # ema | raw: the weights evaluated (and, in training, validated and sampled); ema falls back to
    # raw for a checkpoint written without callbacks.ema
    weights: str = "ema"


@dataclass
class OnlineEvalConfig(EvalConfig):
    """``eval`` in the training config: the protocol, and how often the callback runs it."""

    every_n_epochs: int = 1
