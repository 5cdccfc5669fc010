"""The sampling package: typed settings, the one classifier-free guidance, eval mode."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from tests.test_transformer import gpt
from unifuse.config import SamplingOverrides
from unifuse.lit.generators import TokenGeneratorModule
from unifuse.sampling import Guidance, SamplingSettings, eval_mode


def test_guidance_on_logits_is_uncond_plus_scale_times_the_difference():
    out = torch.randn(6, 11)  # 3 conditional rows, then 3 unconditional
    c, u = out[:3], out[3:]
    assert torch.equal(Guidance(3.0).combine(out, 0.5), u + 3.0 * (c - u))
    assert torch.equal(Guidance(1.0).combine(out, 0.5), u + 1.0 * (c - u))  # a token decoder's rows ran anyway
    # the linear ramp from 1 to the scale over decoding
    assert torch.equal(Guidance(3.0, "linear").combine(out, 0.25), u + 1.5 * (c - u))
    # outside the interval: the conditional rows
    assert torch.equal(Guidance(3.0, interval=(0.5, 1.0)).combine(out, 0.25), c)
    plain = torch.randn(3, 11)
    assert Guidance(None).combine(plain, 0.5) is plain


def test_guidance_rows_are_the_conditions_then_as_many_unconditional_rows():
    assert Guidance(2.0).rows(["a", "b"]) == ["a", "b", None, None]
    assert Guidance(2.0).rows([[1, 5], [1, 6]], uncond=[1]) == [[1, 5], [1, 6], [1], [1]]
    assert Guidance(None).rows(["a", "b"]) == ["a", "b"]
    assert Guidance.of(SamplingSettings(cfg_scale=4.0, cfg_schedule="linear")) == Guidance(4.0, "linear")


def test_guidance_on_a_denoiser_is_the_same_formula_on_one_doubled_batch():
    rows = []

    def net(x, t, cond):
        rows.append(x.shape[0])
        return x * cond["w"][:, None] + t[:, None]

    x, t = torch.randn(2, 5), torch.full((2,), 0.5)
    cond, uncond = {"w": torch.tensor([2.0, 3.0])}, {"w": torch.tensor([0.5, 0.25])}
    model = Guidance(3.0, "linear").denoiser(net, cond, uncond, calls=4)
    c, u = net(x, t, cond), net(x, t, uncond)
    rows.clear()
    first, second = model(x, t), model(x, t)
    assert rows == [4, 4]  # cond and uncond rows as one batch of 2B
    assert torch.equal(first, u + 1.5 * (c - u)) and torch.equal(second, u + 2.0 * (c - u))
    rows.clear()
    assert torch.equal(Guidance(1.0).denoiser(net, cond, uncond, 4)(x, t), c) and rows == [2]  # scale 1: cond only


def test_sampling_settings_reject_unknown_names_and_bad_values_naming_the_field():
    s = SamplingSettings(cfg_scale=3.0, steps=8)
    assert s.override(top_k=5) == SamplingSettings(cfg_scale=3.0, steps=8, top_k=5)
    with pytest.raises(ValueError, match=r"^unknown sampling setting 'cfg'; known: cfg_scale, ") as e:
        s.override(cfg=2.0)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown sampling setting 'progress'"):
        SamplingSettings.from_dict({"progress": True})
    for bad, field in [({"cfg_schedule": "cosine"}, "cfg_schedule"), ({"top_p": 0.0}, "top_p"),
                       ({"steps": 0}, "steps"), ({"temperature": -1.0}, "temperature"), ({"eta": -0.5}, "eta"),
                       ({"seed": 1.5}, "seed"), ({"top_k": True}, "top_k"), ({"cfg_scale": "3"}, "cfg_scale")]:
        with pytest.raises(ValueError, match=f"^sampling.{field} must be"):
            s.override(**bad)


def test_sampling_settings_read_and_write_the_checkpoint_dict():
    s = SamplingSettings(cfg_scale=None, temperature=0.8, top_p=0.95, sampler="ddim", steps=12, seed=3)
    stored = s.to_dict()  # unset fields dropped, cfg_scale kept (None there means: no guidance)
    assert stored == {"cfg_scale": None, "cfg_schedule": "constant", "temperature": 0.8, "top_p": 0.95, "steps": 12,
                      "sampler": "ddim", "eta": 0.0, "seed": 3}
    assert SamplingSettings.from_dict(stored) == s and SamplingSettings.from_dict(None) == SamplingSettings()
    # a checkpoint written before cfg_schedule existed
    assert SamplingSettings.from_dict({"cfg_scale": 2.0, "seed": 0}).cfg_schedule == "constant"
    assert s.only(("cfg_scale", "top_k", "steps")) == {"cfg_scale": None, "steps": 12}


def test_the_cli_overrides_are_the_settings_fields():
    names = [f.name for f in dataclasses.fields(SamplingOverrides)]
    assert names == list(SamplingSettings.names())


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_restores_the_mode_it_found_even_on_error(training):
    m = nn.Sequential(nn.Dropout(0.5))
    m.train(training)
    with eval_mode(m):
        assert not m.training and not m[0].training
    assert m.training == training and m[0].training == training
    with pytest.raises(RuntimeError), eval_mode(m):
        raise RuntimeError("in the block")
    assert m.training == training and m[0].training == training


def test_a_generator_module_checks_its_sampling_settings_when_it_is_built():
    module = TokenGeneratorModule(gpt(), sampling={"top_p": 0.9, "top_k": None})
    assert module.sampling["top_p"] == 0.9 and "top_k" not in module.sampling
    with pytest.raises(ValueError, match="top_p"):
        TokenGeneratorModule(gpt(), sampling={"top_p": 0.0})  # a typo'd run fails at start, not at its first grid
    with pytest.raises(ValueError, match="unknown sampling setting"):
        TokenGeneratorModule(gpt(), sampling={"cfg": 3.0})
