"""Scaling figures on this machine, for the Transfusion model at a small size (width 256, 4 layers,
batch of packed rows: one caption + one 4x8x8 latent per row), a training step being forward +
backward + AdamW:

1. DDP scaling: the step time of 1 process at batch B against 2 processes at batch B each (gloo;
   each process gets cores / processes threads, as Lightning does). Throughput ratio
   (2 B / t2) / (B / t1), and scaling efficiency = that ratio / 2 = t1 / t2 (1.0: perfect).
2. bf16 against float32 on CPU: the step time of one process with one thread under bf16 autocast
   (what ``trainer.precision=bf16-mixed`` does) against float32, same batch, the two interleaved
   step by step. Whether the CPU has native bf16 instructions (AMX / AVX512-BF16) decides which
   one wins.

Each figure is the fastest of ``--steps`` timed steps after 2 warm-up steps (the least disturbed
one), with the median and the process's CPU time per step beside it. Other processes share the
cores: a process with 2 threads that loses one core to them waits for it at every parallel region,
which can make a step tens of times slower; the load average is printed with the figures.

    python experiments/bench/scale.py [--rows 8] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from unifuse.data.collate import PackingCollator
from unifuse.data.samples import Sample
from unifuse.diffusion import DiffusionConfig
from unifuse.models.transformer import TransformerConfig
from unifuse.models.transfusion import Transfusion, TransfusionConfig

SEQ = 96  # BOS + caption (<= 28 bytes) + BOI + 64 latent patches + EOI + EOS: one document per row


def model() -> Transfusion:
    torch.manual_seed(0)
    return Transfusion(TransformerConfig(dim=256, n_layers=4, n_heads=4, qk_norm=True),
                       TransfusionConfig(latent_channels=4, latent_size=8, diffusion=DiffusionConfig(transport="flow")))


def batch(m: Transfusion, rows: int, seed: int) -> tuple[dict, torch.Tensor]:
    col = PackingCollator(batch_size=rows, seq_len=SEQ, vocab=m.vocab, image_tokens=m.n_patches, caption_first=1.0)
    rng = np.random.default_rng(seed)
    for i in range(rows):
        col.add(Sample(key=str(i), url="", text=f"emoji {seed}-{i}, flat colours",
                       codes=rng.standard_normal((8, 8, 8)).astype(np.float16)))
    b = col.pop()
    assert len(b.get("latents", ())) == rows, "expected one document per row"
    return b, b["latents"][:, :4].float()


class Step(nn.Module):
    """The loss as a module's forward, so DDP sees the forward it synchronises."""

    def __init__(self, net: Transfusion):
        super().__init__()
        self.net = net

    def forward(self, b: dict, z: torch.Tensor) -> torch.Tensor:
        return self.net.loss(b, z)["loss"]


def step_times(module: nn.Module, b: dict, z: torch.Tensor, steps: int, modes=(False,)) -> dict[bool, list[float]]:
    """(wall, CPU) seconds of each step for each autocast mode in ``modes`` (bf16 on or off), the modes
    interleaved step by step after 2 warm-up steps each (the machine is shared and its speed drifts)."""
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    times: dict[bool, list[tuple[float, float]]] = {m: [] for m in modes}
    for i in range(steps + 2):
        for bf16 in modes:
            t, c = time.perf_counter(), time.process_time()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = module(b, z)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 2:
                times[bf16].append((time.perf_counter() - t, time.process_time() - c))
    return times


def ddp_worker(rank: int, world: int, rows: int, steps: int, port: int, out) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    net = model()
    b, z = batch(net, rows, seed=rank)
    times = step_times(DistributedDataParallel(Step(net)), b, z, steps)[False]
    gathered = [None] * world
    dist.all_gather_object(gathered, times)
    if rank == 0:  # a step ends when the slowest rank's all-reduce does
        out.put([max(ts, key=lambda t: t[0]) for ts in zip(*gathered, strict=True)])
    dist.destroy_process_group()


def precision_worker(rank: int, rows: int, steps: int, out) -> None:
    torch.set_num_threads(1)
    net = model()
    b, z = batch(net, rows, seed=0)
    times = step_times(Step(net), b, z, steps, modes=(False, True))
    out.put((times[False], times[True]))


def spawned(fn, nprocs: int, *args):
    """Run ``fn`` in ``nprocs`` fresh processes (each measurement starts from a clean interpreter) and
    return what rank 0 put in the queue."""
    out = mp.get_context("spawn").Queue()
    mp.start_processes(fn, args=(*args, out), nprocs=nprocs, start_method="spawn")
    return out.get()


def fastest(times: list[tuple[float, float]]) -> float:
    return min(t for t, _ in times)


def fmt(times: list[tuple[float, float]]) -> str:
    wall, cpu = [t for t, _ in times], [c for _, c in times]
    return (f"{min(wall) * 1e3:7.1f} ms/step (median {statistics.median(wall) * 1e3:7.1f}, "
            f"CPU {statistics.median(cpu) * 1e3:7.1f})")


def native_bf16() -> str:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown"
    found = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return ", ".join(found) if found else "none"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8, help="rows per process (B)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--port", type=int, default=29533)
    a = ap.parse_args()
    cores = os.cpu_count()
    print(f"Transfusion width 256, 4 layers, {a.rows} rows x {SEQ} positions per process; {cores} cores; "
          f"load average {os.getloadavg()[0]:.1f}")

    t1 = spawned(ddp_worker, 1, 1, a.rows, a.steps, a.port)
    t2 = spawned(ddp_worker, 2, 2, a.rows, a.steps, a.port + 1)
    ratio = (2 * a.rows / fastest(t2)) / (a.rows / fastest(t1))
    print(f"DDP, 1 process  : {fmt(t1)}  {a.rows / fastest(t1):6.1f} rows/s")
    print(f"DDP, 2 processes: {fmt(t2)}  {2 * a.rows / fastest(t2):6.1f} rows/s  "
          f"throughput x{ratio:.2f}, scaling efficiency {ratio / 2:.2f}")

    fp32, bf16 = spawned(precision_worker, 1, a.rows, a.steps)
    print(f"float32, 1 thread: {fmt(fp32)}")
    print(f"bf16 autocast    : {fmt(bf16)}  bf16/fp32 time {fastest(bf16) / fastest(fp32):.2f} "
          f"(native bf16 instructions: {native_bf16()})")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
