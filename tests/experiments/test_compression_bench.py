"""experiments.gpu.compression_bench --fused-grad's point on CPU (fp32, the kernel under the
interpreter, do_bench replaced): both settings run, agree, and the switch is left as it was."""
import torch

from experiments.gpu import compression_bench
from nsa_baseline.ops import compression_grad


def test_fused_grad_point_checks_and_times_both_paths(monkeypatch):
    monkeypatch.setattr(compression_bench, "DEV", "cpu")
    monkeypatch.setattr(compression_bench, "DTYPE", torch.float32)
    monkeypatch.setattr(compression_bench, "D", 16)
    times = iter([3.0, 2.0, 0.5])  # off, on, the clone both include
    monkeypatch.setattr(compression_bench, "fused_grad_bench", lambda fn: (fn(), next(times))[1])
    calls = []
    real = compression_grad.add_linear_block_grad
    monkeypatch.setattr(compression_grad, "add_linear_block_grad", lambda *a: (calls.append(1), real(*a))[1])
    monkeypatch.setattr(compression_grad, "FUSED_BLOCK_GRAD", "as before")
    rows = []
    compression_bench.fused_grad_point(rows, 96, 2)
    assert rows[0]["ok"] and float(rows[0]["rel_err"]) < 1e-5 and calls
    assert (rows[0]["gemm_add_ms"], rows[0]["fused_ms"], rows[0]["speedup"]) == ("2.500", "1.500", "1.67")
    assert rows[0]["path"] == "block"
    assert compression_grad.FUSED_BLOCK_GRAD == "as before"


def test_in_place_point_checks_and_times_both_paths(monkeypatch):
    """--in-place's point on CPU (fp32, the kernels under the interpreter, do_bench replaced), one
    sequence and sequences starting on the stride grid: both settings run and agree, the in-place
    kernels run, the switch is left as it was."""
    monkeypatch.setattr(compression_bench, "DEV", "cpu")
    monkeypatch.setattr(compression_bench, "DTYPE", torch.float32)
    monkeypatch.setattr(compression_bench, "D", 16)
    monkeypatch.setattr(compression_bench, "bench", lambda fn: (fn(), 1.0)[1])
    calls = []
    real = compression_grad.compress_linear_fwd
    monkeypatch.setattr(compression_grad, "compress_linear_fwd", lambda *a: (calls.append(1), real(*a))[1])
    monkeypatch.setattr(compression_grad, "IN_PLACE_LINEAR", "as before")
    rows = []
    compression_bench.in_place_point(rows, 96, 2, "single", None)
    compression_bench.in_place_point(rows, 96, 2, "varlen", torch.tensor([0, 32, 48, 96], dtype=torch.int32))
    assert all(r["ok"] and float(r["max_rel_err"]) < 1e-5 for r in rows) and len(calls) >= 2
    assert compression_grad.IN_PLACE_LINEAR == "as before"
