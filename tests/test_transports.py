"""Each transport owns its time convention (network time, clean time, default sampler) and each
sampler declares its model calls per step and its options; nothing outside the diffusion module
asks which transport or sampler it has."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from unifuse.diffusion import DiffusionConfig, FlowMatching, GaussianDiffusion, NoiseSchedule
from unifuse.diffusion.samplers import (
    SAMPLERS,
    guided_sample,
    make_sampler,
    sampler_defaults,
    sampler_options,
    sampler_spec,
)
from unifuse.models.dit import DiT, DiTConfig
from unifuse.pipelines.latent import LatentDiffusionPipeline
from unifuse.sampling.settings import SamplingSettings

DDPM = GaussianDiffusion(NoiseSchedule("linear", 1000))
FLOW = FlowMatching()


def transport_of(name: str):
    return FLOW if SAMPLERS[name].transport is FlowMatching else DDPM


def test_network_time_is_1000_t_for_flow_and_the_timestep_for_ddpm():
    t = torch.tensor([0.0, 0.25, 0.7, 1.0])
    assert torch.equal(FLOW.network_time(t), t * 1000.0)
    steps = torch.tensor([0, 250, 999])
    assert torch.equal(FLOW.network_time(steps), steps)  # integer times are already on the network's scale
    assert DDPM.network_time(steps) is steps


def test_clean_time_is_zero_in_each_transports_own_dtype():
    flow, ddpm = FLOW.clean_time(3, "cpu"), DDPM.clean_time(3, "cpu")
    assert flow.dtype == torch.float32 and torch.equal(flow, torch.zeros(3))
    assert ddpm.dtype == torch.long and torch.equal(ddpm, torch.zeros(3, dtype=torch.long))


def test_a_dit_embeds_the_network_time_of_its_transport():
    """The same weights under flow at time t and under DDPM at timestep 1000 t give one output."""
    cfg = dict(latent_channels=2, latent_size=4, patch_size=2, dim=32, n_layers=1, n_heads=2, text_layers=0)
    torch.manual_seed(0)
    flow = DiT(DiTConfig(**cfg, diffusion=DiffusionConfig(transport="flow")))
    ddpm = DiT(DiTConfig(**cfg, diffusion=DiffusionConfig(transport="ddpm")))
    torch.nn.init.normal_(flow.patch_out.weight)  # the zero-initialised output layers would hide the time
    torch.nn.init.normal_(flow.ada_out[1].weight)
    ddpm.load_state_dict(flow.state_dict())
    z, t = torch.randn(2, 2, 4, 4), torch.tensor([0.3, 0.8])
    assert torch.equal(flow(z, t), ddpm(z, t * 1000.0))
    assert not torch.equal(flow(z, t), ddpm(z, t))


def test_the_default_sampler_and_steps_come_from_the_transport_and_the_sampler():
    assert sampler_defaults(FLOW, None, None) == ("euler", 50)
    assert sampler_defaults(DDPM, None, None) == ("ddim", 50)
    assert sampler_defaults(DDPM, "ddpm", None) == ("ddpm", 1000)
    assert sampler_defaults(FLOW, "heun", 7) == ("heun", 7)
    with pytest.raises(ValueError, match=r"^sampler 'ddim' needs a GaussianDiffusion transport; for FlowMatching: "
                                         r"\['euler', 'heun'\]$"):
        sampler_defaults(FLOW, "ddim", 7)
    with pytest.raises(ValueError, match="^sampler must be one of"):
        sampler_defaults(FLOW, "plms", 7)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 4])
def test_each_sampler_calls_the_model_as_often_as_it_declares(name, steps):
    smp = make_sampler(name, transport_of(name), steps)
    calls, per_step = [0], []

    def model(x, t):
        calls[0] += 1
        return torch.zeros_like(x)

    smp.run(model, torch.randn(2, 3), generator=torch.Generator().manual_seed(0),
            callback=lambda i, x: per_step.append(calls[0] - sum(per_step)))
    declared = [smp.calls_per_step] * (steps - 1) + [smp.last_step_calls]
    assert per_step == declared and calls[0] == sum(declared) == smp.model_calls


def test_options_belong_to_the_samplers_that_declare_them():
    assert {n for n, s in SAMPLERS.items() if s.options} == {"ddim"}
    assert sampler_options("ddim", SamplingSettings(eta=0.5)) == {"eta": 0.5}
    assert sampler_options("euler", SamplingSettings()) == {}  # eta at its default: nothing to refuse
    with pytest.raises(ValueError, match=r"^sampling.eta=0.5 does nothing with sampler 'heun' \(only ddim takes it\)$"):
        sampler_options("heun", SamplingSettings(eta=0.5))
    with pytest.raises(ValueError, match=r"^sampler 'dpmpp_2m' takes no 'eta' \(only ddim\)$"):
        make_sampler("dpmpp_2m", DDPM, 4, eta=0.5)
    assert make_sampler("ddim", DDPM, 4, eta=0.5).eta == 0.5
    assert sampler_spec("ddim", DDPM).cls.__name__ == "DDIM"


def test_guided_sample_uses_the_settings_sampler_or_the_transports_default():
    calls = []

    def net(x, t, cond):
        calls.append(t[0].item())
        return torch.zeros_like(x)

    guided_sample(FLOW, net, (1, 2), SamplingSettings(steps=3))
    assert len(calls) == 3 and calls[0] == 1.0  # euler from t = 1
    calls.clear()
    guided_sample(DDPM, net, (1, 2), SamplingSettings(steps=3, sampler="ddpm"))
    assert calls == [666.0, 333.0, 0.0]  # DDPM's leading spacing over the integer timesteps
    with pytest.raises(ValueError, match="sampling.eta=1.0 does nothing with sampler 'euler'"):
        guided_sample(FLOW, net, (1, 2), SamplingSettings(steps=3, eta=1.0))


@pytest.mark.parametrize("transport,sampler", [("flow", "euler"), ("ddpm", "ddim")])
def test_a_latent_pipeline_takes_its_defaults_from_the_transport_and_refuses_unknown_settings(transport, sampler):
    net = DiT(DiTConfig(latent_channels=2, latent_size=4, patch_size=2, dim=32, n_layers=1, n_heads=2, text_layers=0,
                        diffusion=DiffusionConfig(transport=transport)))
    pipe = LatentDiffusionPipeline(net, SimpleNamespace(latent_channels=2), sampling={"cfg_scale": 2.0, "seed": 3})
    s = pipe.settings()
    assert (s.sampler, s.steps, s.cfg_scale, s.seed) == (sampler, 50, 2.0, 3)
    assert pipe.settings(sampler=None, steps=7).steps == 7
    assert pipe.arguments(s) == {"sampler": sampler, "steps": 50, "cfg_scale": 2.0, "cfg_schedule": "constant",
                                 "eta": 0.0, "seed": 3}
    with pytest.raises(ValueError, match="^unknown sampling setting 'cfg'; known: "):
        pipe.generate(["x"], cfg=2.0)
