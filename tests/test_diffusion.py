"""The diffusion module against huggingface diffusers' schedulers (a test-only oracle): schedule
tables, the forward process and every sampler step on the same tensors and model outputs; plus the
properties the samplers promise (q(x_t|x0) moments, deterministic DDIM, landing on x0, guidance)."""

from __future__ import annotations

import pytest
import torch

from unifuse.diffusion import FlowMatching, GaussianDiffusion, NoiseSchedule, make_sampler
from unifuse.diffusion.flow import shift_time
from unifuse.diffusion.samplers import DDIM, DDPM, DPMSolverPP, FlowEuler, FlowHeun, guided_sample
from unifuse.sampling.guidance import Guidance
from unifuse.sampling.settings import SamplingSettings

diffusers = pytest.importorskip("diffusers")

KINDS = {"linear": ("linear", 1e-4, 0.02), "scaled_linear": ("scaled_linear", 0.00085, 0.012),
         "cosine": ("squaredcos_cap_v2", 1e-4, 0.02)}
PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def ours(kind: str, prediction: str = "eps") -> GaussianDiffusion:
    _, b0, b1 = KINDS[kind]
    return GaussianDiffusion(NoiseSchedule(kind, 1000, b0, b1), prediction)


def theirs(cls, kind: str, prediction: str = "eps", **kw):
    name, b0, b1 = KINDS[kind]
    return cls(num_train_timesteps=1000, beta_schedule=name, beta_start=b0, beta_end=b1,
               prediction_type=PRED[prediction], **kw)


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic, t-dependent stand-in for a network's output."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.dim() - 1)))
    return torch.tanh(0.7 * x + 0.3 * torch.sin(t / 97.0 + x))


@pytest.mark.parametrize("kind", list(KINDS))
def test_schedule_tables_and_add_noise_equal_diffusers(kind):
    d = ours(kind)
    ref = theirs(diffusers.DDPMScheduler, kind)
    torch.testing.assert_close(d.schedule.betas, ref.betas, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(d.schedule.alphas_cumprod, ref.alphas_cumprod, atol=1e-6, rtol=1e-5)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    torch.testing.assert_close(d.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), atol=1e-5, rtol=1e-5)
    # v target as diffusers defines it
    torch.testing.assert_close(GaussianDiffusion(d.schedule, "v").target(x0, eps, t), ref.get_velocity(x0, eps, t),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_forward_process_moments(kind):
    """x_t of a fixed x0 has mean sqrt(abar) x0 and variance 1 - abar, at every t tried."""
    d = ours(kind)
    x0 = torch.full((200_000,), 0.8)
    for t in (0, 100, 500, 900, 999):
        a = d.schedule.alphas_cumprod[t].item()
        xt = d.add_noise(x0, torch.randn_like(x0), torch.full((1,), t))
        assert abs(xt.mean().item() - a**0.5 * 0.8) < 0.01
        assert abs(xt.var().item() - (1 - a)) < 0.01


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_prediction_targets_convert_into_each_other(prediction):
    d = ours("cosine", prediction)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    t = torch.tensor([3, 200, 700, 990])
    xt = d.add_noise(x0, eps, t)
    got_x0, got_eps = d.to_x0_eps(d.target(x0, eps, t), xt, t)
    torch.testing.assert_close(got_x0, x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(got_eps, eps, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("kind,prediction,steps,clip", [("linear", "eps", 1000, None), ("cosine", "v", 50, None),
                                                         ("scaled_linear", "x0", 20, 1.0)])
def test_ddpm_every_step_equals_diffusers(kind, prediction, steps, clip):
    d = ours(kind, prediction)
    ref = theirs(diffusers.DDPMScheduler, kind, prediction, clip_sample=clip is not None, clip_sample_range=clip or 1.0)
    ref.set_timesteps(steps)
    s = DDPM(d, steps, spacing="leading", clip_x0=clip)
    assert s.grid() == ref.timesteps.tolist()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(ref.timesteps):  # each step from the same x_t and model output
        out = fake_model(x, t)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + i))
        mine = s.step(i, x, out, noise)
        x = ref.step(out, t, x, generator=torch.Generator().manual_seed(100 + i)).prev_sample
        torch.testing.assert_close(mine, x, atol=1e-5, rtol=1e-5, msg=f"step {i} (t={int(t)})")


@pytest.mark.parametrize("kind,prediction,spacing,steps,eta", [("linear", "eps", "leading", 50, 0.0),
                                                                ("cosine", "v", "trailing", 50, 0.0),
                                                                ("scaled_linear", "eps", "trailing", 25, 0.5)])
def test_ddim_every_step_equals_diffusers(kind, prediction, spacing, steps, eta):
    d = ours(kind, prediction)
    ref = theirs(diffusers.DDIMScheduler, kind, prediction, clip_sample=False, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    s = DDIM(d, steps, eta=eta, spacing=spacing)
    assert s.grid() == ref.timesteps.tolist()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(ref.timesteps):  # each step from the same x_t and model output
        out = fake_model(x, t)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i)) if eta else None
        mine = s.step(i, x, out, noise)
        x = ref.step(out, t, x, eta=eta, generator=torch.Generator().manual_seed(i)).prev_sample
        torch.testing.assert_close(mine, x, atol=1e-5, rtol=1e-5, msg=f"step {i} (t={int(t)})")


@pytest.mark.parametrize("kind,prediction,steps", [("linear", "eps", 20), ("cosine", "v", 10),
                                                   ("scaled_linear", "eps", 25)])
def test_dpm_solver_pp_2m_every_step_equals_diffusers(kind, prediction, steps):
    d = ours(kind, prediction)
    ref = theirs(diffusers.DPMSolverMultistepScheduler, kind, prediction, solver_order=2,
                 algorithm_type="dpmsolver++", timestep_spacing="trailing")
    ref.set_timesteps(steps)
    s = DPMSolverPP(d, steps)
    assert s.grid() == ref.timesteps.tolist()
    torch.testing.assert_close(s.sigmas, ref.sigmas, atol=1e-5, rtol=1e-5)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    s.reset()
    for i, t in enumerate(ref.timesteps):  # each step from the same x_t, model output and history
        out = fake_model(x, t)
        mine = s.step(i, x, out)
        x = ref.step(out, t, x).prev_sample
        torch.testing.assert_close(mine, x, atol=1e-5, rtol=1e-4, msg=f"step {i} (t={int(t)})")


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_every_step_equals_diffusers(shift):
    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(12)
    s = FlowEuler(FlowMatching(shift=shift), 12)
    s.ts = ref.sigmas.float()  # their grid (ours spans [1, 0] exactly); the step rule is compared
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(ref.timesteps):
        out = fake_model(x, t)
        mine = s.step(i, x, out)
        x = ref.step(out, t, x).prev_sample
        torch.testing.assert_close(mine, x, atol=1e-5, rtol=1e-5, msg=f"step {i}")
    # and diffusers' forward process is ours: scale_noise(x0, t, eps) = (1 - sigma) x0 + sigma eps
    x0, eps = torch.randn(2, 5), torch.randn(2, 5)
    t = ref.timesteps[3:4]
    sigma = ref.sigmas[3:4]
    torch.testing.assert_close(FlowMatching().add_noise(x0, eps, sigma.expand(2)), ref.scale_noise(x0, t, eps))


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (2, 1.0), (5, 1.0), (12, 1.0), (12, 3.0), (7, 0.5)])
def test_flow_heun_every_step_equals_diffusers(steps, shift):
    """Each Heun step from the same x_t: an Euler predictor to the next time, the model again there,
    the average of the two slopes; the last step (to t = 0) is Euler alone, one model call, in both.
    Diffusers' scheduler is called twice per step (state_in_first_order: which half comes next)."""
    ref = diffusers.FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(steps)
    grid = torch.cat([ref.sigmas[0::2], ref.sigmas[-1:]])  # sigmas repeat each inner time: each once
    # their grid is our time shift of evenly spaced times (they end at sigma_min, then 0; ours at 0)
    even = torch.linspace(1.0, ref.sigma_min, steps, dtype=torch.float64)
    torch.testing.assert_close(shift_time(even, shift).float(), grid[:-1], atol=1e-6, rtol=1e-6)
    s = FlowHeun(FlowMatching(shift=shift), steps)
    s.ts = grid.float()  # their grid (ours spans [1, 0] evenly); the step rule is compared
    calls, states = [], []

    def model(x, t):  # ours: flow times in [0, 1]; theirs: sigma * 1000, as their pipelines pass them
        calls.append(t[0] * 1000)
        return fake_model(x, t * 1000)

    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    s.run(model, x.clone(), callback=lambda i, xi: states.append(xi))
    assert len(states) == steps and len(calls) == s.model_calls == len(ref.timesteps) == 2 * steps - 1
    torch.testing.assert_close(torch.stack(calls), ref.timesteps)  # the times the model is asked at
    for i, x_t in enumerate([x, *states[:-1]]):
        y = x_t
        for t in ref.timesteps[2 * i : 2 * i + 2]:  # predictor, then corrector at the next time
            y = ref.step(fake_model(y, t), t, y).prev_sample
        # atol: diffusers recovers the slope as (x - x0) / sigma in float32, which loses ~1e-7 |x| / sigma
        # (3e-5 on the 2-step grid's step from 1 to sigma = 0.001)
        torch.testing.assert_close(states[i], y, atol=5e-5, rtol=1e-5, msg=lambda m: f"step {i}: {m}")
        assert ref.state_in_first_order == (i < steps - 1)  # the last step stopped after its Euler half


def test_flow_grid_time_sampling_and_conversion():
    f = FlowMatching(time_sampling="uniform", shift=3.0)
    g = f.grid(4, shift=1.0)
    torch.testing.assert_close(g, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    gs = f.grid(4)
    assert gs[0] == 1 and gs[-1] == 0 and (gs[1:-1] > g[1:-1]).all()  # shift > 1 spends more steps near noise
    t = FlowMatching(time_sampling="logit_normal").sample_t(100_000, "cpu")
    assert 0 < t.min() and t.max() < 1 and abs(t.mean().item() - 0.5) < 0.01 and t.std() < 0.25
    x0, eps, tt = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0.1, 0.5, 0.9])
    xt = f.add_noise(x0, eps, tt)
    a, b = f.to_x0_eps(f.target(x0, eps), xt, tt)
    torch.testing.assert_close(a, x0) and torch.testing.assert_close(b, eps)


def linear_gaussian_posterior_model(d, mu: float, var: float):
    """The exact eps-prediction for data ~ N(mu, var): samplers must then produce N(mu, var)."""
    def model(x, t):
        a = d.schedule.abar(t).reshape(-1, *([1] * (x.dim() - 1)))
        # E[eps | x_t] for x0 ~ N(mu, var): Cov(eps, x_t) / Var(x_t) * (x_t - E x_t)
        return (1 - a).sqrt() / (a * var + 1 - a) * (x - a.sqrt() * mu)
    return model


@pytest.mark.parametrize("name,steps,opts", [("ddpm", 1000, {}), ("ddim", 50, {}),
                                             ("dpmpp_2m", 20, {})])
def test_samplers_reach_the_data_distribution_with_the_exact_model(name, steps, opts):
    d = ours("linear")
    mu, var = 1.5, 0.25
    s = make_sampler(name, d, steps, **opts)
    x_T = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(0))
    x = s.run(linear_gaussian_posterior_model(d, mu, var), x_T, generator=torch.Generator().manual_seed(1))
    assert abs(x.mean().item() - mu) < 0.03 and abs(x.var().item() - var) < 0.03


def test_flow_samplers_reach_the_data_distribution_with_the_exact_velocity():
    mu, var = -1.0, 0.09

    def v(x, t):  # E[eps - x0 | x_t] for x0 ~ N(mu, var), x_t = (1-t) x0 + t eps
        t = t.reshape(-1, 1)
        m = (1 - t) * mu
        s2 = (1 - t) ** 2 * var + t**2
        e_eps = t / s2 * (x - m)
        e_x0 = mu + (1 - t) * var / s2 * (x - m)
        return e_eps - e_x0

    for cls, steps in ((FlowEuler, 100), (FlowHeun, 20)):
        x = cls(FlowMatching(), steps).run(v, torch.randn(20_000, 1, generator=torch.Generator().manual_seed(0)))
        assert abs(x.mean().item() - mu) < 0.03 and abs(x.var().item() - var) < 0.02, cls.__name__


def test_ddim_eta0_is_deterministic_and_lands_on_x0():
    d = ours("cosine")
    s = DDIM(d, 10)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    a = s.run(fake_model, x.clone(), generator=torch.Generator().manual_seed(1))
    b = s.run(fake_model, x.clone(), generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    # the last step returns the x0 predicted at the last grid time
    seen = []
    s.run(fake_model, x.clone(), callback=lambda i, xi: seen.append(xi))
    t_last = torch.full((3,), s.grid()[-1])
    x0_last, _ = d.to_x0_eps(fake_model(seen[-2], t_last), seen[-2], t_last)
    torch.testing.assert_close(seen[-1], x0_last)


def test_guidance_scale_one_is_the_conditional_output_and_batches_cond_with_uncond():
    calls = []

    def net(x, t, cond):
        calls.append(x.shape[0])
        return x * cond.reshape(-1, 1)

    x, t = torch.randn(4, 3), torch.zeros(4)
    cond, uncond = torch.full((4,), 2.0), torch.full((4,), 0.5)
    torch.testing.assert_close(Guidance(1.0).denoiser(net, cond, uncond, 10)(x, t), net(x, t, cond))
    calls.clear()
    out = Guidance(3.0).denoiser(net, cond, uncond, 10)(x, t)
    assert calls == [8]  # one batched forward of cond and uncond
    torch.testing.assert_close(out, x * 0.5 + 3.0 * (x * 2.0 - x * 0.5))
    # interval: guidance only inside it; linear ramp: 1 -> scale
    g = Guidance(3.0, interval=(0.6, 1.0)).denoiser(net, cond, uncond, 4)  # calls at progress 1/4, 2/4, 3/4, 1
    calls.clear()
    for _ in range(4):
        g(x, t)
    assert calls == [4, 4, 8, 8]
    ramp = Guidance(3.0, schedule="linear").denoiser(net, cond, uncond, 2)
    first = ramp(x, t)
    torch.testing.assert_close(first, x * 0.5 + 2.0 * (x * 2.0 - x * 0.5))  # progress 1/2: 1 + (3-1)/2


@pytest.mark.parametrize("sampler,calls", [("heun", 7), ("euler", 4)])
def test_a_linear_guidance_ramp_reaches_its_scale_on_the_samplers_last_call(sampler, calls, monkeypatch):
    """guided_sample measures progress in the sampler's model calls: Heun makes 2 * steps - 1."""
    import unifuse.sampling.guidance as guidance

    progress, real = [], guidance.guidance_scale
    monkeypatch.setattr(guidance, "guidance_scale", lambda s, schedule, p: progress.append(p) or real(s, schedule, p))
    guided_sample(FlowMatching(), lambda x, t, c: x * c.reshape(-1, 1), (2, 3),
                  SamplingSettings(sampler=sampler, steps=4, cfg_scale=3.0, cfg_schedule="linear"),
                  cond=torch.ones(2), uncond=torch.zeros(2))
    assert len(progress) == calls and progress[-1] == 1.0 and progress == sorted(set(progress))


def test_losses_in_float32_under_bf16_autocast_and_min_snr_weights():
    d = GaussianDiffusion(NoiseSchedule("cosine"), "eps", weighting="min_snr", min_snr_gamma=5.0)
    x0 = torch.randn(4, 2, 4, 4)
    t = torch.tensor([1, 100, 500, 999])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = d.loss(lambda x, tt: (x * 0.5).to(torch.bfloat16), x0, t)
    assert loss.dtype == torch.float32 and loss.shape == (4,)
    snr = d.schedule.snr(t)
    torch.testing.assert_close(d.loss_weight(t), snr.clamp_max(5.0) / snr)
    assert d.loss_weight(t)[0] < 1 and d.loss_weight(t)[-1] == 1  # low noise (high SNR) down-weighted
    f = FlowMatching(time_sampling="uniform")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert f.loss(lambda x, tt: x.to(torch.bfloat16), x0).dtype == torch.float32


def test_sampler_registry_checks_the_transport():
    with pytest.raises(ValueError, match="FlowMatching"):
        make_sampler("euler", ours("linear"), 10)
    with pytest.raises(ValueError, match="one of"):
        make_sampler("plms", ours("linear"), 10)
