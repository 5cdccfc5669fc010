"""What a paradigm is, in one place: one :class:`Paradigm` spec per kind of model.

A spec names everything the entry points need to handle a kind of model without knowing it:

* ``net``: the ``nn.Module`` class; ``from_config(config)`` rebuilds it and ``config()`` describes it,
  so a checkpoint (its ``kind`` is the spec's name) loads without Lightning,
* ``module``: the LightningModule that trains it (None: nothing to train, e.g. the pixel space),
* ``pipeline``: for generators, the class that turns prompts into images (net + image tokenizer),
* ``decoder``: for a pipeline that serves several nets (the discrete-token one), the net's decoding
  program, ``decoder(net, conds, **sampling settings) -> codes``,
* ``tokenizers``: the kinds of image tokenizer a generator decodes with (the first is the one a
  checkpoint that does not say was trained with; the identity pixel space where listed),
* ``task`` and ``evaluator``: what evaluation means for it and the function that measures it
  (``reconstruction``: the net itself; ``text-to-image``: its pipeline),
* ``schemas``: the typed dataclasses its model configs compose, stored in Hydra's ConfigStore as
  ``schema/<name>``.

The checkpoint loader, the LightningModules, the pipelines, ``python -m unifuse.evaluate``, the
online FID callback and the config store all read the spec; a new paradigm registers one.

Classes are given as ``"module:Class"`` strings or as the objects. Strings are imported on first
use, so looking a spec up imports nothing (the sampling CLI never imports Lightning) and the
modules a spec names can read it without an import cycle.

A paradigm defined outside unifuse registers its spec when its module is imported: the CLIs
import the modules listed in ``plugins=[...]`` first (:func:`load_plugins`). Nothing is imported
because a checkpoint names it: an unknown kind is an error that says which setting to pass.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

RECONSTRUCTION, TEXT_TO_IMAGE = "reconstruction", "text-to-image"
TASKS = (RECONSTRUCTION, TEXT_TO_IMAGE)

Target = str | type | Callable  # "module:Class" or the object itself


def target_name(target: Target) -> str:
    """``"module:Qualname"`` of a target, the form strings name it by."""
    return target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"


def resolve(target: Target, what: str = "target"):
    """The object a target names (a string is imported)."""
    if not isinstance(target, str):
        return target
    module, sep, name = target.partition(":")
    if not sep:
        raise ValueError(f"{what} {target!r} is not 'module:Class'")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Paradigm:
    name: str
    net: Target
    task: str
    evaluator: Target | None = None  # (net or pipeline, EvalConfig, weights=..., **sampling) -> result
    module: Target | None = None
    pipeline: Target | None = None
    decoder: Target | None = None  # (net, conds, **settings) -> codes: the program a shared pipeline runs
    tokenizers: tuple[str, ...] = ()
    schemas: Mapping[str, Target] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"paradigm {self.name!r}"
        if self.task not in TASKS:
            raise ValueError(f"{where}: task must be one of {', '.join(TASKS)}, not {self.task!r}")
        if self.task == TEXT_TO_IMAGE and (self.pipeline is None or not self.tokenizers):
            raise ValueError(f"{where}: a text-to-image paradigm names its pipeline and its image tokenizer kinds")
        if self.task == RECONSTRUCTION and (self.pipeline is not None or self.tokenizers):
            raise ValueError(f"{where}: a reconstruction paradigm is an image tokenizer: no pipeline, no tokenizers")
        object.__setattr__(self, "tokenizers", tuple(self.tokenizers))
        object.__setattr__(self, "schemas", dict(self.schemas))

    def net_class(self) -> type:
        return resolve(self.net, f"{self.name} net")

    def module_class(self) -> type:
        if self.module is None:
            raise ValueError(f"a {self.name} model is not trained (its paradigm names no LightningModule)")
        return resolve(self.module, f"{self.name} module")

    def pipeline_class(self) -> type:
        if self.pipeline is None:
            raise ValueError(f"a {self.name} checkpoint does not generate images from prompts")
        return resolve(self.pipeline, f"{self.name} pipeline")

    def decoder_function(self) -> Callable:
        if self.decoder is None:
            raise ValueError(f"a {self.name} net has no decoding program for its pipeline (its paradigm names none)")
        return resolve(self.decoder, f"{self.name} decoder")

    def check_module(self, module) -> None:
        """Raise unless ``module`` (a LightningModule holding this paradigm's net) is its module."""
        if self.module is not None and not isinstance(module, self.module_class()):
            raise ValueError(f"{target_name(type(module))} holds a {self.name} net, which the paradigm trains with "
                             f"{target_name(self.module)}: set model._target_ to it")

    def schema_nodes(self) -> dict[str, type]:
        return {name: resolve(node, f"{self.name} schema") for name, node in self.schemas.items()}

    @property
    def generates(self) -> bool:
        return self.task == TEXT_TO_IMAGE

    def evaluate(self, net: Callable[[], object], pipeline: Callable[[], object | None], cfg,
                 weights: str = "raw", **sampling) -> dict | None:
        """The paradigm's evaluation of what its task measures: ``net()`` (reconstruction) or the
        images of ``pipeline()`` (text-to-image; returns None when ``pipeline()`` is None, e.g.
        before a tokenizer is loaded). ``sampling`` overrides a generator's stored settings.
        ``python -m unifuse.evaluate`` and the online FID callback both evaluate here."""
        if self.evaluator is None:
            raise ValueError(f"a {self.name} model has no evaluation (its paradigm names no evaluator)")
        evaluator = resolve(self.evaluator, f"{self.name} evaluator")
        if not self.generates:
            return evaluator(net(), cfg, weights=weights)
        pipe = pipeline()
        return None if pipe is None else evaluator(pipe, cfg, weights=weights, **sampling)


_PARADIGMS: dict[str, Paradigm] = {}
_BY_NET: dict[str, Paradigm] = {}  # target_name(net class) -> spec
_SCHEMAS: dict[str, tuple[str, Paradigm]] = {}  # schema name -> (target name, first spec storing it)


def register(spec: Paradigm) -> Paradigm:
    """Add a spec. A name, or a net class, registered twice is an error; a schema name two specs
    store must name the same dataclass."""
    old = _PARADIGMS.get(spec.name)
    if old is not None:
        raise ValueError(f"paradigm {spec.name!r} is registered twice: net {target_name(old.net)}, "
                         f"then net {target_name(spec.net)}")
    net = target_name(spec.net)
    if net in _BY_NET:
        raise ValueError(f"net {net} is the net of two paradigms: {_BY_NET[net].name!r} and {spec.name!r}")
    for name, node in spec.schemas.items():
        stored = _SCHEMAS.get(name)
        if stored is not None and stored[0] != target_name(node):
            raise ValueError(f"schema {name!r} of paradigm {spec.name!r} is {target_name(node)}, but paradigm "
                             f"{stored[1].name!r} stores {stored[0]} under that name")
    for name, node in spec.schemas.items():
        _SCHEMAS.setdefault(name, (target_name(node), spec))
    _PARADIGMS[spec.name] = spec
    _BY_NET[net] = spec
    return spec


def paradigms() -> tuple[Paradigm, ...]:
    return tuple(_PARADIGMS.values())


def get(name: str | None, where: str = "checkpoint") -> Paradigm:
    """The spec of a checkpoint kind; unknown: an error naming ``where`` and the setting to pass."""
    if name not in _PARADIGMS:
        raise ValueError(f"{where}: unknown checkpoint kind {name!r} (known: {', '.join(sorted(_PARADIGMS))}); "
                         "a paradigm defined outside unifuse is registered by its module: pass plugins=[<module>]")
    return _PARADIGMS[name]


def paradigm_of(net) -> Paradigm:
    """The spec whose net ``net`` (an instance or a class) is, found along its class hierarchy (a
    wrapper class made by sharding, e.g. FSDP2's, subclasses the registered one)."""
    cls = net if isinstance(net, type) else type(net)
    for c in cls.__mro__:
        spec = _BY_NET.get(target_name(c))
        if spec is not None:
            return spec
    raise ValueError(f"{target_name(cls)} is the net of no registered paradigm (known: "
                     f"{', '.join(sorted(_PARADIGMS))}): register its spec with unifuse.paradigms.register, "
                     "in a module passed as plugins=[<module>]")


def load_plugins(modules) -> list[str]:
    """Import the modules of ``plugins=[...]`` (each registers its paradigms). A module that is not
    there is an error naming it; one already imported is not imported again."""
    names = [str(m) for m in (modules or [])]
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
                raise  # the plugin is there but something it imports is not: its own traceback says what
            raise ValueError(f"plugins: no module named {name!r} (is its directory on PYTHONPATH?)") from None
    return names


_FIDELITY = "unifuse.eval.fidelity"
_LATENT_TOKENIZERS = ("kl_autoencoder", "identity")  # a KL autoencoder's latents, or the pixels themselves

register(Paradigm("vqvae", "unifuse.models.vqvae:VQVAE", RECONSTRUCTION, f"{_FIDELITY}:evaluate_tokenizer",
                  module="unifuse.lit.vqvae:VQVAEModule",
                  schemas={"autoencoder": "unifuse.models.autoencoder:AutoencoderConfig",
                           "quantizer": "unifuse.models.quantize:QuantizerConfig",
                           "adversarial": "unifuse.models.discriminator:AdversarialConfig"}))
register(Paradigm("kl_autoencoder", "unifuse.models.kl_autoencoder:KLAutoencoder", RECONSTRUCTION,
                  f"{_FIDELITY}:evaluate_tokenizer", module="unifuse.lit.kl_autoencoder:KLAutoencoderModule",
                  schemas={"autoencoder": "unifuse.models.autoencoder:AutoencoderConfig",
                           "adversarial": "unifuse.models.discriminator:AdversarialConfig"}))
register(Paradigm("identity", "unifuse.models.pixels:PixelSpace", RECONSTRUCTION))  # pixels as latents
register(Paradigm("ar_gpt", "unifuse.models.image_gpt:ImageGPT", TEXT_TO_IMAGE, f"{_FIDELITY}:evaluate_generator",
                  module="unifuse.lit.generators:TokenGeneratorModule",
                  pipeline="unifuse.pipelines:TokenImagePipeline", decoder="unifuse.decoding.ar:generate",
                  tokenizers=("vqvae",),
                  schemas={"transformer": "unifuse.models.transformer:TransformerConfig"}))
register(Paradigm("maskgit", "unifuse.models.maskgit:MaskGIT", TEXT_TO_IMAGE, f"{_FIDELITY}:evaluate_generator",
                  module="unifuse.lit.generators:TokenGeneratorModule",
                  pipeline="unifuse.pipelines:TokenImagePipeline", decoder="unifuse.decoding.maskgit:generate",
                  tokenizers=("vqvae",),
                  schemas={"transformer": "unifuse.models.transformer:TransformerConfig"}))
register(Paradigm("ldm", "unifuse.models.dit:DiT", TEXT_TO_IMAGE, f"{_FIDELITY}:evaluate_generator",
                  module="unifuse.lit.ldm:LatentDiffusionModule",
                  pipeline="unifuse.pipelines:LatentDiffusionPipeline", tokenizers=_LATENT_TOKENIZERS,
                  schemas={"dit": "unifuse.models.dit:DiTConfig"}))
register(Paradigm("transfusion", "unifuse.models.transfusion:Transfusion", TEXT_TO_IMAGE,
                  f"{_FIDELITY}:evaluate_generator", module="unifuse.lit.transfusion:TransfusionModule",
                  pipeline="unifuse.pipelines:TransfusionPipeline", tokenizers=_LATENT_TOKENIZERS,
                  schemas={"transformer": "unifuse.models.transformer:TransformerConfig",
                           "transfusion": "unifuse.models.transfusion:TransfusionConfig"}))
