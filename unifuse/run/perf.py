"""Peak FLOP/s for model FLOPs utilisation (MFU): what a device can do in the dtype a training step
computes in. One place for the training callback (``unifuse.run.callbacks.StepThroughput``) and the
benchmarks under ``experiments/bench``.

* GPUs (and TPUs): Lightning's datasheet table, ``get_available_flops(device, dtype)``. For float32
  it gives the TF32 tensor-core figure when ``torch.get_float32_matmul_precision()`` is not
  ``"highest"`` (``matmul_precision: high`` in the train config) on Ampere or later.
* CPUs: no datasheet covers them (cores, clocks, AVX-512 / AMX units, threads given to torch), so
  the peak is measured: the best rate of a few GEMM shapes in that dtype, with torch's current
  thread count. A CPU with bf16 matrix units runs a bf16 GEMM several times faster than a float32
  one, so a bf16-mixed step measured against the float32 rate reads as near 100% whatever it does.
  Measured once per process, dtype and thread count (0.5-2 s).
"""

from __future__ import annotations

import functools
import math
import time

import torch

# Lightning's trainer.precision values, by the part before the first "-", and the dtype their
# matrix products run in. transformer-engine computes in FP8, whose tensor-core peak is the
# int8 one (Lightning's table has no FP8 column and uses int8 for it too).
PRECISION_DTYPES = {"64": torch.float64, "32": torch.float32, "16": torch.float16, "bf16": torch.bfloat16,
                    "transformer": torch.int8}

# (m, k, n) GEMM shapes whose best rate is the CPU peak, smallest first: square ones and the
# tall-skinny (tokens x width) @ (width x MLP width) products of transformer training
CPU_GEMM_SHAPES = ((512, 512, 512), (1024, 1024, 1024), (4096, 512, 2048), (2048, 1024, 4096))
CPU_GEMM_SECONDS = 0.1  # timed calls per shape: the fastest call in this window counts
CPU_GEMM_MAX_CALL = 0.5  # seconds: larger shapes are not tried once one call would take longer


def compute_dtype(precision) -> torch.dtype:
    """The dtype a step's matrix products run in under Lightning's ``trainer.precision``:
    ``bf16-mixed`` / ``bf16-true`` -> bfloat16, ``16-mixed`` / ``16-true`` -> float16, ``32-true``
    -> float32 (TF32 on GPUs is the float32 peak's business), ``64-true`` -> float64; the short
    forms (``bf16``, ``16``, ``32``, 64) too."""
    key = str(precision).split("-")[0]
    if key not in PRECISION_DTYPES:
        raise ValueError(f"trainer.precision={precision!r}: no compute dtype known for it "
                         f"(known: {', '.join(k + '-...' for k in PRECISION_DTYPES)})")
    return PRECISION_DTYPES[key]


def gemm_rate(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = CPU_GEMM_SECONDS) -> float:
    """FLOP/s of the fastest (m, k) @ (k, n) product in ``dtype`` over ``seconds`` of calls, on CPU."""
    g = torch.Generator().manual_seed(0)  # its own generator: measuring must not move the run's random stream
    a, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)
    a @ b  # first call: allocation and kernel selection
    best, start = math.inf, time.perf_counter()
    while True:
        t = time.perf_counter()
        a @ b
        now = time.perf_counter()
        best = min(best, now - t)
        if now - start >= seconds:
            return 2.0 * m * k * n / best


def measure_cpu_peak(dtype: torch.dtype = torch.float32) -> tuple[float, str]:
    """(FLOP/s, how it was found): the best rate of :data:`CPU_GEMM_SHAPES` in ``dtype`` with
    torch's current thread count, measured now (:func:`cpu_peak_flops` caches it)."""
    best, shape = 0.0, None
    for m, k, n in CPU_GEMM_SHAPES:
        if best and 2.0 * m * k * n / best > CPU_GEMM_MAX_CALL:  # e.g. float16 on CPUs without fp16
            break  # units, ~1 GFLOP/s: a 2048 x 1024 x 4096 product would take 17 s
        rate = gemm_rate(m, k, n, dtype)
        if rate > best:
            best, shape = rate, (m, k, n)
    name = str(dtype).removeprefix("torch.")
    return best, f"measured {name} GEMM, best of {len(CPU_GEMM_SHAPES)} shapes ({'x'.join(map(str, shape))}), " \
                 f"{torch.get_num_threads()} threads"


@functools.cache
def _cpu_peak(dtype: torch.dtype, threads: int) -> tuple[float, str]:
    return measure_cpu_peak(dtype)


def cpu_peak_flops(dtype: torch.dtype = torch.float32) -> tuple[float, str]:
    """:func:`measure_cpu_peak`, measured on first use in this process for this dtype and thread
    count, then cached."""
    return _cpu_peak(dtype, torch.get_num_threads())


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s of one ``device`` computing in ``dtype``, where the figure comes from); NaN
    when there is none (a GPU missing from Lightning's table: MFU is then not logged)."""
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_peak_flops(dtype)
    from lightning.fabric.utilities.throughput import get_available_flops

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    peak = get_available_flops(device, dtype)
    if peak is None:
        return math.nan, f"no peak for {name} in {dtype} in Lightning's table"
    return float(peak), f"Lightning's table: {name}, {dtype}"
