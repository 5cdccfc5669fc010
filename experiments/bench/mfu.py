"""Training MFU of the four text-to-image models in one table, timed in the same run against the
peak of the dtype their steps compute in, and where each step's time goes.

* Models: the AR GPT, MaskGIT, DiT and Transfusion of experiment=ar_emoji, maskgit_emoji,
  ldm_emoji and transfusion_emoji, each composed from its preset with one backbone size for all
  (width 512, 6 layers, 8 heads by default).
* Batches: each preset's own, built by its collator from the emoji validation captions: AR and
  MaskGIT 64 rows of 120 positions (caption bytes + 64 VQ codes), DiT 32 images of 8x8x4 latents
  at patch 1 with its BPE caption encoder, Transfusion 12 rows of 88 positions (about three caption
  + 16-patch documents a row). Codes and latents are random (their values do not change the work);
  the frozen tokenizer / autoencoder is left out, as in training on pre-encoded shards.
* A step: the module's ``training_step`` (under autocast for ``*-mixed``, as Lightning's precision
  plugin runs it), backward, fused AdamW. Steps of the four models interleave rep by rep; medians.
* MFU = the module's ``flops_per_batch`` (what ``callbacks.throughput`` logs as ``perf/mfu``) per
  second / the peak of :mod:`unifuse.run.perf` in the step's dtype (the best GEMM rate of a few shapes),
  measured between the steps in every rep and taken as the median, so that a shared machine's load
  weighs on both sides of the ratio alike. The float32 peak is printed beside it.
* Where the time goes: torch.profiler's top operators by self CPU time, per step.

    python experiments/bench/mfu.py [--quick] [--precision 32-true] [--threads 1 --clock cpu] [--width 512 ...]
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode
from transfusion import timed, train_step  # this directory's Transfusion bench: the shared harness

from unifuse.config import compose_app, native_bf16_precision
from unifuse.data.read import iter_texts
from unifuse.data.samples import Sample
from unifuse.models.pixels import PixelSpace
from unifuse.models.transformer import Transformer, TransformerConfig
from unifuse.paradigms import paradigm_of
from unifuse.run.perf import compute_dtype, cpu_peak_flops, measure_cpu_peak

ROOT = Path(__file__).resolve().parents[2]  # the checkout: data/ and conf/ under it
# name -> (preset, the net's config key for width / depth / heads)
PRESETS = {"AR": ("ar_emoji", "transformer"), "MaskGIT": ("maskgit_emoji", "transformer"),
           "DiT": ("ldm_emoji", "dit"), "Transfusion": ("transfusion_emoji", "transformer")}
# operators that are matrix products (attention's fused kernels included)
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}


def compose(preset: str, key: str, width: int, layers: int, heads: int):
    net = f"model.net.{key}"
    return compose_app("train", [f"experiment={preset}", f"paths.root_dir={ROOT}", "model.tokenizer_ckpt=null",
                                 f"{net}.dim={width}",
                                 f"{net}.n_layers={layers}", f"{net}.n_heads={heads}"])


def emoji_batch(cfg, module, captions: list[str], seed: int = 0) -> dict:
    """One batch of the preset's collator: real captions, random VQ codes or KL latents (mean, std)."""
    collator, rng = instantiate(cfg.data.collator), np.random.default_rng(seed)
    codes = getattr(module.net.vocab, "image_codes", 0)
    for i, text in enumerate(itertools.cycle(captions)):
        if codes:
            image = rng.integers(0, codes, (module.net.grid,) * 2)
        else:
            c, h, w = module.net.latent_shape()
            image = np.concatenate([rng.standard_normal((c, h, w)), np.full((c, h, w), 0.1)]).astype(np.float16)
        collator.add(Sample(key=str(i), url="", text=text, codes=image))
        if collator.ready():
            return collator.pop()
    raise AssertionError("unreachable: the caption cycle is endless")


def build(name: str, args, captions: list[str]) -> dict:
    preset, key = PRESETS[name]
    cfg = compose(preset, key, args.width, args.layers, args.heads)
    module = instantiate(cfg.model)
    if paradigm_of(PixelSpace).name in module.paradigm.tokenizers:  # latents arrive normalised-ready: no autoencoder
        object.__setattr__(module, "tokenizer", PixelSpace(module.net.latent_shape()[0]))
    batch = emoji_batch(cfg, module, captions)
    mixed = args.precision.endswith("-mixed")

    def loss():
        with torch.autocast("cpu", dtype=compute_dtype(args.precision), enabled=mixed):
            return module.training_step(batch, 0)

    params = sum(p.numel() for p in module.parameters()) / 1e6
    return {"module": module, "batch": batch, "loss": loss, "step": train_step(module, loss), "preset": preset,
            "preset_precision": cfg.trainer.precision, "flops": module.flops_per_batch(batch), "params": params}


def describe(batch: dict) -> str:
    if "tokens" in batch:
        b, length = batch["tokens"].shape
        docs = int((batch["doc_id"].amax(1) + 1).sum())
        return f"{b}x{length} positions, {docs} docs, {100 * float((batch['doc_id'] < 0).float().mean()):.0f}% pad"
    return f"{len(batch['latents'])} latents {'x'.join(map(str, batch['latents'].shape[1:]))}"


def counted_flops(loss_fn) -> float:
    """FLOPs of one forward + backward as torch's FlopCounterMode counts them."""
    counter = FlopCounterMode(display=False)
    with counter:
        loss_fn().backward()
    return float(counter.get_total_flops())


def dit_backbone(dit: dict, args) -> dict:
    """A bare backbone for the DiT row: the shared Transformer at the DiT's width, depth, heads and
    QK-norm, without adaLN, caption encoder or patch layers, over the same positions (caption +
    patches) and padding mask, stepped the same way. Both get FlopCounterMode's count, so that the
    ratio of their times per FLOP shows what the DiT's own parts cost."""
    net = dit["module"].net
    text_doc = net.encode_conditions(dit["batch"]["caption"], "cpu")["text_doc"]
    doc = torch.cat([text_doc, torch.zeros(len(text_doc), net.cfg.grid**2, dtype=torch.long)], 1)
    torch.manual_seed(0)
    bare = Transformer(TransformerConfig(vocab_size=1, dim=net.cfg.dim, n_layers=net.cfg.n_layers,
                                         n_heads=net.cfg.n_heads, qk_norm=net.cfg.qk_norm, rope_2d=True, lm_head=False))
    x = torch.randn(*doc.shape, net.cfg.dim)

    def loss():
        with torch.autocast("cpu", dtype=compute_dtype(args.precision), enabled=args.precision.endswith("-mixed")):
            return bare.forward_hidden(x, causal=False, doc_id=doc).float().pow(2).mean()

    dit["counted"] = counted_flops(dit["loss"])
    return {"step": train_step(bare, loss), "counted": counted_flops(loss), "shape": tuple(doc.shape)}


def top_ops(step, n: int, steps: int = 2) -> tuple[list[str], float, int]:
    """The n operators with the most self CPU time over ``steps`` steps (ms per step, share), the
    share of all self time spent in matrix products, and how many operators a step runs."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / total
    calls = sum(e.count for e in events if e.key.startswith("aten::")) // steps
    lines = [f"{e.key} {e.self_cpu_time_total / steps / 1e3:.0f} ms ({100 * e.self_cpu_time_total / total:.0f}%, "
             f"{e.count // steps} calls)" for e in events[:n]]
    return lines, matmul, calls


def table(models: dict, seconds: dict, peak: float) -> None:
    print(f"{'model':<12}{'preset (its precision)':<32}{'params':>8}  {'batch':<34}{'ms/step':>9}{'GFLOP':>8}"
          f"{'GFLOP/s':>9}{'MFU':>6}")
    for name, m in models.items():
        rate = m["flops"] / seconds[name]
        print(f"{name:<12}{m['preset'] + ' (' + str(m['preset_precision']) + ')':<32}{m['params']:>7.1f}M  "
              f"{describe(m['batch']):<34}{seconds[name] * 1e3:>9.0f}{m['flops'] / 1e9:>8.1f}{rate / 1e9:>9.0f}"
              f"{100 * rate / peak:>5.0f}%")


def measure(models: dict, args, dtype: torch.dtype) -> tuple[dict, float]:
    """(median seconds per step of each entry, the median peak), the peak measured between the
    steps rep by rep, under the same load as they are. Prints the peak and the CPU share."""
    peaks = []
    steps = {name: m["step"] for name, m in models.items()}
    wall, cpu = time.perf_counter(), time.process_time()
    clock = time.perf_counter if args.clock == "wall" else lambda: time.process_time() / args.threads
    t = timed({**steps, "peak": lambda: peaks.append(measure_cpu_peak(dtype))}, 2 if args.quick else 5, clock=clock)
    share = (time.process_time() - cpu) / (time.perf_counter() - wall) / args.threads
    peak, fp32 = statistics.median(p for p, _ in peaks), cpu_peak_flops(torch.float32)[0]
    print(f"{str(dtype).removeprefix('torch.')} peak {peak / 1e9:.0f} GFLOP/s, median of {len(peaks)} measurements "
          f"between the steps ({min(p for p, _ in peaks) / 1e9:.0f}-{max(p for p, _ in peaks) / 1e9:.0f}; "
          f"{peaks[-1][1]}): {peak / fp32:.1f}x the float32 peak")
    busy = "" if share > 0.9 or args.clock == "cpu" else (
        ": other processes slowed the steps, their many short operators more than the GEMMs of the peak "
        "(--threads 1 --clock cpu discounts them)")
    print(f"while timing, this process ran {100 * share:.0f}% of the time its {args.threads} threads could have "
          f"(load average {os.getloadavg()[0]:.1f}){busy}\n")
    return t, peak


def arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer reps, 2 layers")
    ap.add_argument("--precision", default=native_bf16_precision(), choices=["bf16-mixed", "16-mixed", "32-true"],
                    help="Lightning precision of every step (default: bf16-mixed where bf16 matmuls are native)")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--top", type=int, default=6, help="profiler lines per model")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: steps timed in process CPU seconds / threads, which other processes on the machine "
                         "do not inflate (exact with --threads 1; with more, waiting threads spin and count)")
    args = ap.parse_args()
    args.layers = 2 if args.quick else args.layers
    return args


def main() -> None:
    args = arguments()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*self.trainer.* reference is not registered")
    dtype = compute_dtype(args.precision)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; "
          f"steps in {args.precision} ({str(dtype).removeprefix('torch.')}), width {args.width}, "
          f"{args.layers} layers, {args.heads} heads, {args.clock} clock")
    fp32, fp32_source = cpu_peak_flops(torch.float32)
    print(f"float32 peak {fp32 / 1e9:.0f} GFLOP/s ({fp32_source})")
    captions = list(iter_texts(str(ROOT / "data/emoji32/val")))
    random.Random(0).shuffle(captions)
    models = {name: build(name, args, captions) for name in PRESETS}
    bare = dit_backbone(models["DiT"], args)
    t, peak = measure({**models, "bare": bare}, args, dtype)
    table(models, t, peak)
    dit = models["DiT"]
    print(f"\nDiT against a bare backbone over the same {bare['shape'][0]} x {bare['shape'][1]} positions and mask "
          f"(no adaLN, caption encoder or patch layers; FLOPs by FlopCounterMode on both): {t['DiT'] * 1e3:.0f} ms "
          f"for {dit['counted'] / 1e9:.1f} GFLOP vs {t['bare'] * 1e3:.0f} ms for {bare['counted'] / 1e9:.1f} GFLOP: "
          f"{t['DiT'] / dit['counted'] / (t['bare'] / bare['counted']):.2f}x the backbone's time per FLOP")
    for name, m in models.items():
        lines, matmul, calls = top_ops(m["step"], args.top)
        print(f"\n{name}: {calls} aten operators a step ({m['flops'] / calls / 1e6:.0f} MFLOP each on average), "
              f"matrix products {100 * matmul:.0f}% of self CPU time; top operators by self CPU time per step:")
        print("\n".join("  " + line for line in lines))


if __name__ == "__main__":
    main()
