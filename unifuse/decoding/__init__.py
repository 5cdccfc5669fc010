"""Decoding programs: what turns a trained net into samples, beside the nets (which hold only their
parameters, forward passes and the prefill / cached-step primitives these programs call).

* :mod:`.ar`: the AR image GPT's KV-cached token sampling;
* :mod:`.maskgit`: MaskGIT's parallel decoding;
* :mod:`.transfusion`: Transfusion's text -> image, image -> text (captions and caption
  likelihoods) and interleaved documents (:mod:`.document`).

Every prompt row comes from :mod:`unifuse.models.rows`; token draws and guidance from
:mod:`unifuse.sampling`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from unifuse.decoding import ar, maskgit
from unifuse.models.image_gpt import ImageGPT
from unifuse.models.maskgit import MaskGIT

# the decoding program of each discrete-token generator: (net, conds, **settings) -> (B, h, w) codes
CODE_DECODERS: dict[type, Callable] = {ImageGPT: ar.generate, MaskGIT: maskgit.generate}


def code_decoder(net: nn.Module) -> Callable:
    """The decoding program of a discrete-token generator (by its class or a base class)."""
    for cls in type(net).__mro__:
        if cls in CODE_DECODERS:
            return CODE_DECODERS[cls]
    known = ", ".join(c.__name__ for c in CODE_DECODERS)
    raise ValueError(f"no decoding program for a {type(net).__name__}; discrete-token generators: {known}")
