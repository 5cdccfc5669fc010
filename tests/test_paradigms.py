"""One spec per paradigm (``unifuse.paradigms``): the registry refuses duplicates, lookups name what
is missing, the modules, pipelines and checkpoints read their kind from it, and nothing else in the
package spells a kind."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from torch import nn

from unifuse import paradigms
from unifuse.config import plugin_overrides
from unifuse.paradigms import RECONSTRUCTION, TEXT_TO_IMAGE, Paradigm, paradigm_of, register

PACKAGE = Path(paradigms.__file__).resolve().parent
BUILTIN = ("vqvae", "kl_autoencoder", "identity", "ar_gpt", "maskgit", "ldm", "transfusion")
# string constants equal to a kind that are not a kind dispatch: (file, string, why)
NOT_KINDS = {("models/pixels.py", "identity"),  # the model.tokenizer_ckpt value that selects pixel space
             ("decoding/maskgit.py", "maskgit")}  # a progress bar's label


class Stub(nn.Module):
    def config(self) -> dict:
        return {}

    @classmethod
    def from_config(cls, config: dict) -> Stub:
        return cls()


class OtherStub(Stub):
    pass


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry: what a test registers is gone afterwards."""
    for name in ("_PARADIGMS", "_BY_NET", "_SCHEMAS"):
        monkeypatch.setattr(paradigms, name, dict(getattr(paradigms, name)))


def test_builtin_specs_resolve_to_their_classes():
    assert {p.name for p in paradigms.paradigms()} >= set(BUILTIN)
    for name in BUILTIN:
        spec = paradigms.get(name)
        assert paradigm_of(spec.net_class()) is spec
        for schema in spec.schema_nodes().values():
            assert hasattr(schema, "__dataclass_fields__")
        if spec.generates:
            assert spec.pipeline_class().__name__.endswith("Pipeline")
            assert all(t in BUILTIN and paradigms.get(t).task == RECONSTRUCTION for t in spec.tokenizers)
        if spec.module is not None:
            assert spec.module_class().__name__.endswith("Module")


def test_a_name_or_a_net_registered_twice_is_one_line_naming_both(registry):
    register(Paradigm("stub", Stub, RECONSTRUCTION))
    with pytest.raises(ValueError) as e:
        register(Paradigm("stub", OtherStub, RECONSTRUCTION))
    assert "\n" not in str(e.value) and "Stub" in str(e.value) and "OtherStub" in str(e.value)
    with pytest.raises(ValueError, match="net .*Stub is the net of two paradigms: 'stub' and 'again'"):
        register(Paradigm("again", f"{__name__}:Stub", RECONSTRUCTION))  # the same class named by a string
    with pytest.raises(ValueError, match="schema 'transformer' of paradigm 'odd' is .*Stub"):
        register(Paradigm("odd", OtherStub, RECONSTRUCTION, schemas={"transformer": Stub}))
    assert "odd" not in {p.name for p in paradigms.paradigms()}  # a refused spec leaves nothing behind


def test_incomplete_specs_are_refused():
    with pytest.raises(ValueError, match="names its pipeline and its image tokenizer kinds"):
        Paradigm("g", Stub, TEXT_TO_IMAGE)
    with pytest.raises(ValueError, match="task must be one of"):
        Paradigm("g", Stub, "video")


def test_lookups_name_what_is_missing_and_the_setting_to_pass():
    with pytest.raises(ValueError, match=r"x.ckpt: unknown checkpoint kind 'hologram' .*pass plugins=\["):
        paradigms.get("hologram", "x.ckpt")
    with pytest.raises(ValueError, match=r"Stub is the net of no registered paradigm.*plugins=\["):
        paradigm_of(Stub())


def test_a_subclass_of_a_registered_net_is_that_paradigm():
    """Sharding wraps a net in a subclass made at run time (FSDP2): its kind stays the net's."""
    from unifuse.models.dit import DiT

    wrapped = type("FSDPDiT", (DiT,), {})
    assert paradigm_of(wrapped).name == "ldm"


def test_modules_and_pipelines_read_their_kind_from_the_spec():
    from unifuse.lit.generators import TokenGeneratorModule
    from unifuse.lit.ldm import LatentDiffusionModule
    from unifuse.lit.transfusion import TransfusionModule
    from unifuse.models.dit import DiT, DiTConfig
    from unifuse.models.image_gpt import ImageGPT
    from unifuse.models.maskgit import MaskGIT
    from unifuse.models.pixels import PixelSpace
    from unifuse.models.transformer import TransformerConfig
    from unifuse.pipelines import LatentDiffusionPipeline
    from unifuse.text.vocab import VocabLayout

    tiny = TransformerConfig(dim=16, n_layers=1, n_heads=2)
    for cls, kind in ((ImageGPT, "ar_gpt"), (MaskGIT, "maskgit")):
        assert TokenGeneratorModule(cls(tiny, VocabLayout(image_codes=8), grid=2)).kind == kind
    dit = DiT(DiTConfig(latent_channels=3, latent_size=4, dim=16, n_layers=1, n_heads=2, text_layers=1, text_dim=16,
                        text_heads=2, max_text_len=8))
    module = LatentDiffusionModule(dit)
    assert module.kind == "ldm" and module.checkpoint_meta()["kind"] == "ldm"
    assert LatentDiffusionPipeline(dit, PixelSpace()).kind == "ldm"
    with pytest.raises(ValueError, match="TokenGeneratorModule holds a ldm net.*LatentDiffusionModule"):
        _ = TokenGeneratorModule(dit).kind
    # Transfusion shares the latent generator's base with latent diffusion, not latent diffusion's loss
    assert not issubclass(TransfusionModule, LatentDiffusionModule) and not hasattr(TransfusionModule, "_loss")


def test_evaluation_dispatch_hands_each_task_its_subject(registry):
    seen = []

    def evaluator(subject, cfg, weights="raw", **sampling):
        seen.append((subject, weights, sampling))
        return {"metrics": {}, "protocol": {}}

    ae = register(Paradigm("ae", Stub, RECONSTRUCTION, evaluator))
    gen = register(Paradigm("gen", OtherStub, TEXT_TO_IMAGE, evaluator, pipeline=object, tokenizers=("ae",)))
    ae.evaluate(lambda: "net", lambda: pytest.fail("an autoencoder has no pipeline"), None, "ema", cfg_scale=2.0)
    gen.evaluate(lambda: pytest.fail("a generator is evaluated by its pipeline"), lambda: "pipe", None, "raw",
                 cfg_scale=2.0)
    assert seen == [("net", "ema", {}), ("pipe", "raw", {"cfg_scale": 2.0})]
    assert gen.evaluate(lambda: "net", lambda: None, None) is None  # no pipeline yet (no tokenizer): skipped


def test_plugins_are_read_from_the_command_line_and_missing_ones_named():
    args = ["model=ldm", "plugins=[a.b,c]", "+plugins=d", "-m", "x=1", "plugins=e,f"]
    assert plugin_overrides(args) == ["a.b", "c", "d", "e", "f"]
    assert plugin_overrides(["plugins=null", "model.plugins=[z]"]) == []
    with pytest.raises(ValueError, match="plugins: no module named 'no_such_plugin_module'"):
        paradigms.load_plugins(["no_such_plugin_module"])


def test_no_module_but_the_registry_spells_a_kind():
    """A kind's name appears as a string only in unifuse/paradigms.py (and where it is no kind)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "paradigms.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in BUILTIN and (rel, node.value) not in NOT_KINDS:
                found.append(f"{rel}:{node.lineno} {node.value!r}")
    assert not found, found
