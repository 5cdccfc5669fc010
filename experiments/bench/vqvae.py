"""VQ-VAE training-step throughput at the default preset (conf/model/vqvae.yaml, 32x32, batch 32),
and the quantizer's nearest-code search (one GEMM: |z|^2 + |e|^2 - 2 z.e) against torch.cdist,
timed in the same run.

    python experiments/bench/vqvae.py [--steps 20]
"""

from __future__ import annotations

import argparse
import time

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from unifuse.config import CONF_DIR
from unifuse.models.quantize import nearest_code


def timeit(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=vqvae_emoji"])
    net = instantiate(cfg.model.net)
    bs, size = cfg.data.collator.batch_size, cfg.data.decode.image_size
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4)
    x = torch.rand(bs, 3, size, size) * 2 - 1

    def step():
        recon, _, q = net(x)
        loss = (recon - x).abs().mean() + q
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    dt = timeit(step, a.steps)
    print(f"VQ-VAE train step ({sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params, batch {bs}, "
          f"{size}x{size}, {torch.get_num_threads()} threads): {dt * 1e3:.1f} ms/step = {bs / dt:.0f} images/s")

    for m, k, d in [(bs * (size // net.downsample_factor) ** 2, cfg.model.net.quantizer.codebook_size, 8),
                    (16384, 8192, 8), (16384, 8192, 256)]:
        z, e = torch.randn(m, d), torch.randn(k, d)
        t_ours = timeit(lambda: nearest_code(z, e), 10)
        t_cdist = timeit(lambda: torch.cdist(z, e).argmin(1), 10)
        same = torch.equal(nearest_code(z, e), torch.cdist(z, e).argmin(1))
        print(f"nearest code, {m} vectors x {k} codes x {d} dims: one-GEMM {t_ours * 1e3:7.2f} ms | "
              f"torch.cdist {t_cdist * 1e3:7.2f} ms | speedup {t_cdist / t_ours:4.2f}x | same argmin: {same}")


if __name__ == "__main__":
    main()
