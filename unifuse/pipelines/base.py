"""What every pipeline holds: the net, the image tokenizer that decodes its output, the conditioning
type and the stored sampling settings."""

from __future__ import annotations

from torch import nn

from unifuse.paradigms import paradigm_of
from unifuse.sampling.settings import SamplingSettings


class Pipeline:
    """What every pipeline holds: the net, the image tokenizer / autoencoder that decodes its
    output, the conditioning type and the stored sampling settings (``sampling``: settings or the
    dict a checkpoint stores). A pipeline names the settings its generator takes in
    ``setting_names``; the others do not apply to it."""

    setting_names: tuple[str, ...] = ()

    def __init__(self, net: nn.Module, tokenizer: nn.Module, cond: str = "text",
                 sampling: SamplingSettings | dict | None = None):
        if cond not in ("text", "class"):
            raise ValueError(f"cond must be 'text' or 'class', not {cond!r}")
        self.net, self.tokenizer, self.cond = net, tokenizer, cond
        self.sampling = SamplingSettings.from_dict(sampling)

    def settings(self, **overrides) -> SamplingSettings:
        """The stored settings with ``overrides`` applied (an unknown name is refused)."""
        return self.sampling.override(**overrides)

    def arguments(self, settings: SamplingSettings) -> dict:
        """The set fields of ``settings`` that this pipeline's generator takes, as keyword
        arguments (the generator's own defaults stand for the unset ones)."""
        return settings.only(self.setting_names)

    @property
    def kind(self) -> str:
        """The paradigm of the net (what evaluation protocols name as the sampler)."""
        return paradigm_of(self.net).name

    def conditions(self, prompts: list) -> list:
        """Prompt strings -> the net's conditions (class-conditional nets take integers); an empty
        prompt or None is the unconditional branch."""
        return [None if p is None or p == "" else (int(p) if self.cond == "class" else p) for p in prompts]

    def to(self, device):
        self.net.to(device)
        self.tokenizer.to(device)
        return self
