"""Sampling shared by every generator, below the nets and the diffusion module: the typed settings
(:mod:`.settings`), token draws (:mod:`.tokens`), classifier-free guidance (:mod:`.guidance`) and
:func:`eval_mode`. Prompt rows are built by :mod:`unifuse.models.rows`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from unifuse.sampling.guidance import Guidance, guidance_scale
from unifuse.sampling.settings import SamplingSettings


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the block, then back in the mode it was in (also on error)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


__all__ = ["Guidance", "SamplingSettings", "eval_mode", "guidance_scale"]
