"""The conv autoencoders' training step at their emoji presets (32x32, batch 32), and the
quantizer's nearest-code search, each against a baseline timed in the same run.

1. Training step of ``experiment=vqvae_emoji`` and ``experiment=kl_emoji`` (forward, backward,
   fused AdamW) in float32 and under bf16 autocast, with the images contiguous (N, C, H, W) as the
   collator makes them and as a channels-last view (what a bare ``permute`` of decoded (N, H, W, C)
   images gives). Reps interleave the four variants; medians. bf16 rows only where bf16 matmuls
   are native (``unifuse.config.native_bf16_precision``).
2. The nearest-code search (one GEMM: |z|^2 + |e|^2 - 2 z.e) against torch.cdist.

    python experiments/bench/autoencoders.py [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from unifuse.config import CONF_DIR, native_bf16_precision
from unifuse.models.quantize import nearest_code


def timeit(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def preset(name: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={name}"])
    torch.manual_seed(0)
    return cfg, instantiate(cfg.model.net)


def training_step(name: str, reps: int, bf16_ok: bool) -> None:
    cfg, net = preset(name)
    bs, size = cfg.data.collator.batch_size, cfg.data.decode.image_size
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    x = torch.rand(bs, 3, size, size) * 2 - 1
    layouts = {"NCHW": x, "channels-last": x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)}
    assert layouts["channels-last"].is_contiguous(memory_format=torch.channels_last)

    def step(images: torch.Tensor, bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(images)  # VQ: (recon, indices, vq loss); KL: (recon, kl, posterior)
            recon, extra = out[0], out[2] if name.startswith("vq") else out[1]
            loss = (recon.float() - x).abs().mean() + 1e-6 * extra.float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    variants = {(p, lay): (lambda im=im, b=(p == "bf16"): step(im, b))
                for p in (["fp32", "bf16"] if bf16_ok else ["fp32"]) for lay, im in layouts.items()}
    times: dict = {k: [] for k in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(reps):
        for k, fn in variants.items():
            times[k].append(timeit(fn, 3))
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    params = sum(p.numel() for p in net.parameters()) / 1e6
    threads = torch.get_num_threads()
    print(f"[1] {name} train step ({params:.2f}M params, batch {bs}, {size}x{size}, {threads} threads):")
    for p in ("fp32", "bf16"):
        if (p, "NCHW") in ms:
            a, b = ms[(p, "NCHW")], ms[(p, "channels-last")]
            print(f"    {p}: NCHW {a:6.1f} ms ({bs / a * 1e3:4.0f} images/s) | channels-last view {b:6.1f} ms "
                  f"-> channels-last/NCHW {b / a:.2f}")
    if bf16_ok:
        print(f"    bf16 NCHW vs fp32 NCHW: {ms[('fp32', 'NCHW')] / ms[('bf16', 'NCHW')]:.2f}x faster")
    else:
        print("    bf16: skipped (bf16 matmuls are emulated on this CPU)")


def nearest_codes(codebook_size: int, vectors: int) -> None:
    for m, k, d in [(vectors, codebook_size, 8), (16384, 8192, 8), (16384, 8192, 256)]:
        z, e = torch.randn(m, d), torch.randn(k, d)
        t_ours = timeit(lambda: nearest_code(z, e), 10)
        t_cdist = timeit(lambda: torch.cdist(z, e).argmin(1), 10)
        same = torch.equal(nearest_code(z, e), torch.cdist(z, e).argmin(1))
        print(f"[2] nearest code, {m} vectors x {k} codes x {d} dims: one-GEMM {t_ours * 1e3:7.2f} ms | "
              f"torch.cdist {t_cdist * 1e3:7.2f} ms | speedup {t_cdist / t_ours:4.2f}x | same argmin: {same}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    bf16_ok = native_bf16_precision() == "bf16-mixed" and not torch.cuda.is_available()
    for name in ("vqvae_emoji", "kl_emoji"):
        training_step(name, a.reps, bf16_ok)
    cfg, net = preset("vqvae_emoji")
    bs, size = cfg.data.collator.batch_size, cfg.data.decode.image_size
    nearest_codes(cfg.model.net.quantizer.codebook_size, bs * (size // net.downsample_factor) ** 2)


if __name__ == "__main__":
    main()
