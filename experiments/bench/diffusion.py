"""Latent-diffusion figures, each against a baseline timed in the same run:

1. DiT float32 training step at width 384 (joint text + 16x16 patches): achieved FLOP/s (counted
   by torch's FlopCounterMode) against this machine's float32 peak (``unifuse.run.perf``: the best
   GEMM rate of a few shapes). The emoji-sized DiT beside the other generators, in the dtype the
   presets train in: ``experiments/bench/mfu.py``.
2. Sampling 16 images with classifier-free guidance: cond + uncond as one batched forward (what
   ``Guidance`` does) vs two separate forwards per step (target >= 1.6x).
3. DDIM 50 steps vs DDPM 1000 steps: wall-time ratio for the same 16 images.
4. Training samples/s with latents encoded on the fly by the frozen autoencoder vs latents
   already encoded (the upper bound of pre-encoded latent shards: no decode cost counted).
5. With ``--ckpt`` (a trained ldm checkpoint): FID@domain n256 of DPM-Solver++(2M) 20 steps vs
   DDIM 50 steps (target: within 10%).

    python experiments/bench/diffusion.py [--quick] [--ckpt outputs/ldm_emoji/.../last.ckpt]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from unifuse.diffusion import Guidance, make_sampler
from unifuse.models.autoencoder import AutoencoderConfig
from unifuse.models.dit import DiT, DiTConfig
from unifuse.models.kl_autoencoder import KLAutoencoder
from unifuse.run.perf import cpu_peak_flops


def timed(fn, reps: int = 1, warmup: bool = True) -> float:
    if warmup:
        fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def dit(width: int, layers: int, latent: int) -> DiT:
    torch.manual_seed(0)
    return DiT(DiTConfig(latent_channels=4, latent_size=latent, patch_size=2, dim=width, n_layers=layers,
                         n_heads=width // 64, text_layers=2, text_dim=256, text_heads=4, max_text_len=48))


def captions(n: int) -> list[str]:
    base = ["twemoji grinning face", "openmoji red heart", "a cat on a mat", "", "twemoji rocket", "sun"]
    return [base[i % len(base)] for i in range(n)]


def mfu(width: int, layers: int, batch: int, steps: int) -> None:
    net = dit(width, layers, 32)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    z = torch.randn(batch, 4, 32, 32)
    cond = net.encode_conditions(captions(batch), "cpu")

    def step():
        loss = net.diffusion.loss(lambda x, t: net(x, t, cond), z).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    counter = FlopCounterMode(display=False)
    with counter:
        net.diffusion.loss(lambda x, t: net(x, t, cond), z).mean().backward()
    flops = counter.get_total_flops()  # forward + backward as executed
    dt = timed(step, steps)
    seq = (32 // 2) ** 2 + cond["text_tokens"].shape[1]
    peak, source = cpu_peak_flops(torch.float32)
    print(f"[1] DiT training width {width}, {layers} layers, batch {batch} x ({seq} tokens), float32: {batch / dt:.1f} "
          f"samples/s, {flops / dt / 1e9:.1f} GFLOP/s of {peak / 1e9:.1f} GFLOP/s ({source}) -> "
          f"MFU {100 * flops / dt / peak:.0f}%")


def guidance_and_samplers(width: int, layers: int, n: int, quick: bool) -> None:
    net = dit(width, layers, 8).eval()
    with torch.no_grad():
        for p in net.parameters():  # non-trivial outputs (adaLN-Zero starts at zero)
            if p.dim() > 1:
                p.normal_(0, 0.05)
    conds = captions(n)
    both = net.text_states(net.encode_conditions(conds + [None] * n, "cpu"))  # as the pipeline does
    cond, uncond = ({k: v[:n] for k, v in both.items()}, {k: v[n:] for k, v in both.items()})
    x = torch.randn(n, 4, 8, 8)
    steps = 10 if quick else 20

    def separate(xx, t):
        c, u = net(xx, t, cond), net(xx, t, uncond)
        return u + 3.0 * (c - u)

    ddim = make_sampler("ddim", net.diffusion, steps)
    with torch.inference_mode():
        batched = Guidance(3.0).wrap(net, cond, uncond, steps)
        t_b = timed(lambda: ddim.run(batched, x.clone()))
        t_s = timed(lambda: ddim.run(separate, x.clone()))
        same = torch.allclose(ddim.run(batched, x.clone()), ddim.run(separate, x.clone()), atol=1e-4)
        print(f"[2] {n} images, DDIM {steps} steps with CFG: batched cond+uncond {t_b:.2f}s vs two forwards "
              f"{t_s:.2f}s -> {t_s / t_b:.2f}x (target >= 1.6x); same images: {same}")
        t50 = timed(lambda: make_sampler("ddim", net.diffusion, 50).run(batched, x.clone()), 1, warmup=False)
        n_ddpm = 200 if quick else 1000
        t1000 = timed(lambda: make_sampler("ddpm", net.diffusion, n_ddpm).run(
            Guidance(3.0).wrap(net, cond, uncond, n_ddpm), x.clone()), 1, warmup=False)
        print(f"[3] {n} images with CFG: DDIM 50 steps {t50:.2f}s vs DDPM {n_ddpm} steps {t1000:.2f}s -> "
              f"{t1000 / t50:.1f}x faster")


def on_the_fly(width: int, layers: int, batch: int, steps: int) -> None:
    net = dit(width, layers, 8)
    ae = KLAutoencoder(AutoencoderConfig(channels=32, ch_mult=[1, 2, 4], num_res_blocks=1, z_channels=64), 4)
    ae.requires_grad_(False)
    ae.measure_latent_stats([torch.rand(8, 3, 32, 32) * 2 - 1])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    images = torch.rand(batch, 3, 32, 32) * 2 - 1
    cond = net.encode_conditions(captions(batch), "cpu")
    with torch.no_grad():
        stored = ae.normalise(ae.posterior(images).sample())

    def step(encode: bool):
        with torch.no_grad():
            z = ae.normalise(ae.posterior(images).sample()) if encode else stored
        loss = net.diffusion.loss(lambda x, t: net(x, t, cond), z).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_fly = timed(lambda: step(True), steps)
    t_pre = timed(lambda: step(False), steps)
    print(f"[4] training 32x32 images -> 4x8x8 latents, DiT width {width}: on-the-fly encoding {batch / t_fly:.0f} "
          f"samples/s vs pre-encoded latents {batch / t_pre:.0f} samples/s -> {t_fly / t_pre:.2f}x")


def fid(ckpt: str, n: int) -> None:
    from unifuse.evaluate import evaluate_checkpoint

    res = {}
    for sampler, steps in (("ddim", 50), ("dpmpp_2m", 20)):
        t = time.perf_counter()
        r = evaluate_checkpoint(ckpt, n=n, sampler=sampler, steps=steps)
        res[sampler] = r["metrics"]["fid"]
        print(f"[5] {r['metric_names']['fid']} = {res[sampler]:.2f} ({time.perf_counter() - t:.0f}s)")
    print(f"[5] DPM-Solver++ 20 steps vs DDIM 50: FID ratio {res['dpmpp_2m'] / res['ddim']:.3f} (target <= 1.10)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ckpt", default=None, help="a trained ldm checkpoint for the sampler FID comparison")
    ap.add_argument("--n", type=int, default=256)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    mfu(384, 2 if a.quick else 6, 8, 2 if a.quick else 4)
    guidance_and_samplers(384, 2 if a.quick else 6, 16, a.quick)
    on_the_fly(384, 2 if a.quick else 6, 32, 2 if a.quick else 4)
    if a.ckpt:
        fid(a.ckpt, a.n)


if __name__ == "__main__":
    main()
