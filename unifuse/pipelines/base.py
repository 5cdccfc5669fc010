"""What every pipeline holds: the net, the image tokenizer that decodes its output, the conditioning
type and the stored sampling settings."""

from __future__ import annotations

from torch import nn


class Pipeline:
    """What every pipeline holds: the net, the image tokenizer / autoencoder that decodes its
    output, the conditioning type and the stored sampling settings."""

    def __init__(self, net: nn.Module, tokenizer: nn.Module, cond: str = "text", sampling: dict | None = None):
        if cond not in ("text", "class"):
            raise ValueError(f"cond must be 'text' or 'class', not {cond!r}")
        self.net, self.tokenizer, self.cond = net, tokenizer, cond
        self.sampling = dict(sampling or {})

    def conditions(self, prompts: list) -> list:
        """Prompt strings -> the net's conditions (class-conditional nets take integers); an empty
        prompt or None is the unconditional branch."""
        return [None if p is None or p == "" else (int(p) if self.cond == "class" else p) for p in prompts]

    def to(self, device):
        self.net.to(device)
        self.tokenizer.to(device)
        return self
