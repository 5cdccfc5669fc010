"""Transfusion figures, each against a baseline timed in the same run (medians of interleaved reps):

1. Training step (forward + backward + AdamW), width 256, 4 layers, batch 8 x (64 text tokens + one
   4x8x8 latent, patch 1): our Transfusion vs a bare transformer on the same positions with the
   same dense mask (the cost floor; target ours/bare <= 1.15) and vs lucidrains'
   transfusion-pytorch with the same width/depth/heads (peer/ours, reported).
2. Sampling one image from a text prompt at the peer's defaults (16 flow steps, CFG 3): ours
   (Euler, KV cache, cond + uncond batched) vs the peer's ``sample_one`` forced to start with one
   8x8 image and stop right after it (target peer/ours >= 2.5). The peer integrates with
   torchdiffeq's midpoint method by default (2 evaluations per interval); the same-NFE Euler
   figure is printed beside it.
3. Peak memory of one masked attention forward at sequence 4096 (4 documents, image blocks) on
   CPU, ``attend(impl="flex")`` vs ``attend(impl="dense")``, each in a fresh subprocess (target
   flex/dense <= 0.25). Also shown: flex with a ``torch.compile``d kernel (``attend`` runs the
   eager reference on CPU, which materialises the scores).
4. MFU of our float32 training step at width 512 (4 layers, 8 heads, same batch): FLOPs counted
   by FlopCounterMode on the forward (x3) against this machine's float32 peak (``unifuse.run.perf``:
   the best GEMM rate of a few shapes, measured in this run). The four generators side by side, in
   the dtype the presets train in: ``experiments/bench/mfu.py``.

    python experiments/bench/transfusion.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from unifuse.data.collate import PackingCollator
from unifuse.data.samples import Sample
from unifuse.decoding.transfusion import generate
from unifuse.diffusion import DiffusionConfig
from unifuse.models import attention
from unifuse.models.attention import MaskSpec, attend
from unifuse.models.transformer import Transformer, TransformerConfig
from unifuse.models.transfusion import Transfusion, TransfusionConfig
from unifuse.run.perf import cpu_peak_flops

PROMPT = "twemoji grinning face with big eyes"
SEQ = 132  # BOS + 64 text + BOI + 64 image + EOI + EOS: one document per row


def timed(fns: dict, reps: int, warmup: bool = True, clock=time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each fn, the fns interleaved rep by rep (the machine is noisy),
    on ``clock`` (e.g. ``time.process_time``: CPU seconds, which other processes do not inflate)."""
    if warmup:
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = clock()
            fn()
            times[k].append(clock() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def ours(width: int = 256, heads: int = 4) -> Transfusion:
    torch.manual_seed(0)
    return Transfusion(TransformerConfig(dim=width, n_layers=4, n_heads=heads),
                       TransfusionConfig(latent_channels=4, latent_size=8, patch_size=1,
                                         diffusion=DiffusionConfig(transport="flow")))


def packed_batch(model: Transfusion, n: int = 8) -> tuple[dict, torch.Tensor]:
    col = PackingCollator(batch_size=n, seq_len=SEQ, vocab=model.vocab, image_tokens=64, caption_first=1.0)
    rng = np.random.default_rng(0)
    for i in range(n):
        text = f"sample {i}: a small emoji on a white background, flat colours. "[:64].ljust(64, ".")
        col.add(Sample(key=str(i), url="", text=text, codes=rng.standard_normal((8, 8, 8)).astype(np.float16)))
    batch = col.pop()
    assert batch["tokens"].shape == (n, SEQ) and len(batch["latents"]) == n, "expected one document per row"
    return batch, batch["latents"][:, :4]


def train_step(model, loss_fn):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the model configs set it

    def step():
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def peer(width: int = 256, heads: int = 4):
    try:
        from loguru import logger
        from transfusion_pytorch import Transfusion as PeerTransfusion
    except ImportError:
        sys.exit("the peer is a benchmark-only extra: pip install -e '.[bench]' (transfusion-pytorch==0.20.0)")

    logger.disable("transfusion_pytorch")  # it logs every sampling run
    torch.manual_seed(0)
    return PeerTransfusion(num_text_tokens=256, dim_latent=4, modality_default_shape=(8, 8),
                           transformer=dict(dim=width, depth=4, heads=heads, dim_head=64))


def n_params(m) -> str:
    return f"{sum(p.numel() for p in m.parameters()) / 1e6:.1f}M"


def training(reps: int) -> None:
    model = ours()
    batch, z = packed_batch(model)
    bare = Transformer(TransformerConfig(vocab_size=model.vocab.size, dim=256, n_layers=4, n_heads=4))
    tok = batch["tokens"]

    def bare_loss():
        logits = bare(tok, batch["position"], doc_id=batch["doc_id"], image_id=batch["image_id"])
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), tok[:, 1:].flatten())

    lucid = peer()
    # the same 64 text ids (bytes) and latent per row; the peer takes latents channels last (H, W, C)
    data = [[tok[i, 1:65].clone(), z[i].permute(1, 2, 0).contiguous()] for i in range(len(z))]
    t = timed({"ours": train_step(model, lambda: model.loss(batch, z)["loss"]),
               "bare": train_step(bare, bare_loss), "peer": train_step(lucid, lambda: lucid(data))}, reps)
    print(f"[1] training step, width 256, 4 layers, batch 8 x {SEQ} positions: ours {t['ours'] * 1e3:.0f} ms "
          f"({n_params(model)} params) | bare transformer, dense mask {t['bare'] * 1e3:.0f} ms | transfusion-pytorch "
          f"{t['peer'] * 1e3:.0f} ms ({n_params(lucid)}) -> ours/bare {t['ours'] / t['bare']:.2f} (target <= 1.15), "
          f"peer/ours {t['peer'] / t['ours']:.2f}x")


def sampling(reps: int, steps: int = 16) -> None:
    from functools import partial

    from torchdiffeq import odeint

    model, lucid = ours().eval(), peer()
    prompt = torch.tensor(list(PROMPT.encode()))  # byte ids: the same prompt for both
    default_ode = lucid.odeint_fn

    def ours_fn(n=steps):
        return generate(model, [PROMPT], sampler="euler", steps=n, cfg_scale=3.0, seed=0)

    def peer_fn(n=steps, ode=default_ode):
        lucid.odeint_fn = ode
        # the prompt ends with [meta] 8,8 [som]: decoding starts in the image; max_length 0 stops right after it
        with contextlib.redirect_stderr(io.StringIO()):  # tqdm bar
            out = lucid.sample_one(prompt=prompt, max_length=0, force_modality_at_start=(0, (8, 8)),
                                   modality_steps=n, cfg_scale=3.0, cache_kv=True, return_without_prompt=True)
        return out

    with torch.no_grad():
        ours_fn(2), peer_fn(2)  # warm-up
        images = peer_fn(2)
        one = len(images) == 1 and tuple(images[0].tensor.shape) == (8, 8, 4)
        t = timed({"ours": ours_fn, "peer": peer_fn,
                   "peer_euler": lambda: peer_fn(ode=partial(odeint, method="euler"))}, reps, warmup=False)
    print(f"[2] one 8x8 latent from a prompt, {steps} flow steps, CFG 3: ours (Euler, {steps} evaluations of "
          f"cond+uncond batched) {t['ours']:.2f}s | transfusion-pytorch sample_one at its defaults (midpoint, "
          f"{2 * (steps - 1)} evaluations of cond then uncond) {t['peer']:.2f}s -> peer/ours "
          f"{t['peer'] / t['ours']:.2f}x (target >= 2.5) | peer with Euler ({steps - 1} evaluations) "
          f"{t['peer_euler']:.2f}s -> {t['peer_euler'] / t['ours']:.2f}x | peer made exactly one image: {one}")


def _hwm_mb(field: str = "VmHWM") -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def attention_child(impl: str, length: int = 4096) -> None:
    """Runs in a fresh process: peak RSS growth (MB) and seconds of one attend() after a warm-up."""
    from torch.nn.attention.flex_attention import flex_attention

    if impl == "flex-compiled":
        kernel = torch.compile(flex_attention, dynamic=False)
        attention._flex_kernel = lambda cuda: kernel
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, length, 64) for _ in range(3))
    pos = torch.arange(length)
    doc, inner = pos // 1024, pos % 1024  # 4 documents, each with a 256-position image block
    image = torch.where((inner >= 256) & (inner < 512), doc, -1)

    def run():  # a fresh spec each time: the mask is built inside, as in a model forward
        return attend(q, k, v, MaskSpec(causal=True, doc_id=doc[None], image_id=image[None]), impl=impl.split("-")[0])

    with torch.no_grad():
        run()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the RSS high-water mark
        base, t = _hwm_mb("VmRSS"), time.perf_counter()
        run()
        print(f"{_hwm_mb() - base:.1f} {time.perf_counter() - t:.3f}")


def attention_memory() -> None:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # large buffers come from and return to the OS
    res = {}
    for impl in ("dense", "flex", "flex-compiled"):
        out = subprocess.run([sys.executable, __file__, "--attention-child", impl], env=env, check=True,
                             capture_output=True, text=True).stdout.split()
        res[impl] = (float(out[-2]), float(out[-1]))
    (d, td), (f, tf), (c, tc) = res["dense"], res["flex"], res["flex-compiled"]
    print(f"[3] attention forward, seq 4096, 4 heads x 64, doc + image mask, CPU peak memory: dense {d:.0f} MB "
          f"({td:.2f}s) | flex {f:.0f} MB ({tf:.2f}s) -> flex/dense {f / d:.2f} (target <= 0.25) | flex with a "
          f"compiled kernel {c:.0f} MB ({tc:.2f}s) -> {c / d:.2f}")


def mfu(reps: int, width: int = 512, heads: int = 8) -> None:
    model = ours(width, heads)
    batch, z = packed_batch(model)
    step = train_step(model, lambda: model.loss(batch, z)["loss"])
    counter = FlopCounterMode(display=False)
    with counter:
        model.loss(batch, z)
    flops = 3 * counter.get_total_flops()  # forward + backward (2x forward)
    t = timed({"step": step}, reps)["step"]
    peak, source = cpu_peak_flops(torch.float32)
    print(f"[4] training width {width}, 4 layers, batch 8 x {SEQ} positions, float32: {t * 1e3:.0f} ms/step, "
          f"{flops / t / 1e9:.1f} GFLOP/s of {peak / 1e9:.1f} GFLOP/s ({source}) -> MFU {100 * flops / t / peak:.0f}%")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one timed rep per figure")
    ap.add_argument("--attention-child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.attention_child:
        return attention_child(a.attention_child)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    training(1 if a.quick else 5)
    sampling(1 if a.quick else 3)
    attention_memory()
    mfu(1 if a.quick else 5)


if __name__ == "__main__":
    main()
