"""experiments.gpu.chunk_bench's point on CPU (tiny fp32 module, the kernels under the interpreter,
do_bench replaced by one call): every way runs once, and the rows name what was skipped and why."""
import torch

from experiments.gpu import chunk_bench
from nsa_baseline.module import NativeSparseAttention


def test_chunk_point_runs_every_way_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(chunk_bench, "DEV", "cpu")
    monkeypatch.setattr(chunk_bench, "DTYPE", torch.float32)
    monkeypatch.setattr(chunk_bench.timing, "bench", lambda fn: (calls.append(fn()), (1.0, 2.0, 3.0))[1])
    torch.manual_seed(0)
    m = NativeSparseAttention(32, 6, 2, 16, backend="fsa", kernel_size=8, kernel_stride=4, block_size=16, topk=3,
                              window_size=12)
    rows = []
    chunk_bench.time_point(rows, m, 40, 5, None, torch_max=1000)
    chunk_bench.time_point(rows, m, 40, 12, 16, torch_max=400)  # 480 > 400: no PyTorch path
    assert [(r["chunk"], r["impl"], r["status"][:7]) for r in rows] == [
        (5, "nsa_kernels", "ok"), (5, "nsa_pytorch", "ok"), (5, "sdpa", "ok"),
        (12, "nsa_pytorch", "skipped"), (12, "nsa_kernels", "ok"), (12, "sdpa", "ok")]
    assert rows[0]["ms"] == "2.0000" and rows[0]["us_per_token"] == "400.00" and rows[3]["page_size"] == 16
    assert len(calls) == 5
