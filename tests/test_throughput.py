"""The MFU denominator: the dtype a step computes in (from trainer.precision), the GPU peak from
Lightning's table in that dtype, the CPU peak measured in that dtype once per process."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from unifuse.run import perf
from unifuse.run.callbacks import StepThroughput

TALLEST = 1 + max(m for m, _, _ in perf.CPU_GEMM_SHAPES) / 1e5  # fake_gemms' best
H100 = "NVIDIA H100 80GB HBM3"  # Lightning's "h100 sxm" row: fp32 66.9, TF32 494.7, bf16/fp16 989.4 TFLOP/s


@pytest.mark.parametrize("precision,dtype", [
    ("bf16-mixed", torch.bfloat16), ("bf16-true", torch.bfloat16), ("bf16", torch.bfloat16),
    ("16-mixed", torch.float16), ("16-true", torch.float16), (16, torch.float16),
    ("32-true", torch.float32), ("32", torch.float32), (32, torch.float32),
    ("64-true", torch.float64), ("transformer-engine", torch.int8),
])
def test_compute_dtype_follows_trainer_precision(precision, dtype):
    assert perf.compute_dtype(precision) is dtype


def test_unknown_precision_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match=r"trainer.precision='8-mixed'"):
        perf.compute_dtype("8-mixed")


@pytest.fixture
def fake_h100(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: H100)
    monkeypatch.setattr("lightning.fabric.accelerators.cuda._is_ampere_or_later", lambda device=None: True)
    before = torch.get_float32_matmul_precision()
    yield torch.device("cuda", 0)
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("precision,matmul,tflops", [
    ("bf16-mixed", "highest", 989.4), ("16-mixed", "highest", 989.4),
    ("32-true", "highest", 66.9), ("32-true", "high", 494.7),  # float32, then TF32 when allowed
])
def test_gpu_peak_is_lightnings_in_the_step_dtype(fake_h100, precision, matmul, tflops):
    torch.set_float32_matmul_precision(matmul)
    cb = StepThroughput()
    cb.on_train_start(SimpleNamespace(precision=precision, is_global_zero=True), SimpleNamespace(device=fake_h100))
    assert cb.peak == pytest.approx(tflops * 1e12)
    assert H100 in cb.peak_source


def test_gpu_missing_from_the_table_gives_no_mfu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Imaginary GPU 9000")
    with pytest.warns(UserWarning, match="FLOPs not found"):
        peak, source = perf.peak_flops(torch.device("cuda", 0), torch.bfloat16)
    assert math.isnan(peak) and "Imaginary GPU 9000" in source


@pytest.fixture
def fake_gemms(monkeypatch):
    """CPU GEMM rates by dtype without running them: bf16 6x float32, float16 at 1 GFLOP/s."""
    calls = []

    def rate(m, k, n, dtype, seconds=perf.CPU_GEMM_SECONDS):
        calls.append((dtype, (m, k, n)))
        base = {torch.bfloat16: 600e9, torch.float32: 100e9, torch.float16: 1e9}[dtype]
        return base * (1 + m / 1e5)  # taller shapes a little faster: the best is the tallest

    perf._cpu_peak.cache_clear()
    monkeypatch.setattr(perf, "gemm_rate", rate)
    yield calls
    perf._cpu_peak.cache_clear()


def test_cpu_peak_is_measured_in_the_step_dtype_once_per_process(fake_gemms):
    cb = StepThroughput()
    cb.on_train_start(SimpleNamespace(precision="bf16-mixed", is_global_zero=True),
                      SimpleNamespace(device=torch.device("cpu")))
    assert cb.peak == pytest.approx(600e9 * TALLEST) and "bfloat16" in cb.peak_source
    assert {d for d, _ in fake_gemms} == {torch.bfloat16}
    assert [s for _, s in fake_gemms] == list(perf.CPU_GEMM_SHAPES)  # best of every shape
    again = perf.cpu_peak_flops(torch.bfloat16)
    assert len(fake_gemms) == len(perf.CPU_GEMM_SHAPES) and again == (cb.peak, cb.peak_source)  # cached
    fp32, _ = perf.peak_flops(torch.device("cpu"), torch.float32)
    assert fp32 == pytest.approx(100e9 * TALLEST)


def test_slow_cpu_dtype_stops_before_shapes_that_take_too_long(fake_gemms):
    peak, source = perf.cpu_peak_flops(torch.float16)  # 1 GFLOP/s: a 1024^3 product would take 2 s
    assert [s for _, s in fake_gemms] == [perf.CPU_GEMM_SHAPES[0]]
    assert peak == pytest.approx(1e9 * (1 + 512 / 1e5)) and "float16" in source


def test_cpu_gemm_rate_is_real():
    rate = perf.gemm_rate(256, 256, 256, torch.float32, seconds=0.01)
    assert 1e8 < rate < 1e14  # a real product on this CPU: between 0.1 GFLOP/s and 100 TFLOP/s


def test_measuring_the_cpu_peak_leaves_the_run_random_stream_alone():
    """The peak is measured when training starts, after a resumed run has restored its generators:
    a draw from the global generator there would give the resumed run other noise than the run it
    continues (and an unresumed run other numbers than before the measurement existed)."""
    from unifuse.run.perf import gemm_rate

    torch.manual_seed(0)
    before = torch.get_rng_state()
    gemm_rate(64, 64, 64, torch.float32, seconds=0.0)
    assert torch.equal(torch.get_rng_state(), before)
