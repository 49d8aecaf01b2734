"""experiments.gpu.module_vs_dense on CPU (tiny fp32 module, kernels under the interpreter, do_bench
replaced by one call): every timing runs the function it names, and the ratios are dense / ours."""
import pytest
import torch

from experiments.gpu import module_vs_dense


def test_point_times_ours_and_dense_forward_and_backward():
    calls = []

    def bench(fn):
        calls.append(fn.__name__)
        fn()
        return {"ours_fwd": 2.0, "ours": 4.0, "dense_fwd": 1.0, "dense": 6.0}[fn.__name__]

    torch.manual_seed(0)
    row = module_vs_dense.time_point(48, 2, "fsa", device="cpu", dtype=torch.float32, bench=bench, hq=4, d=16,
                                     kernel_size=8, kernel_stride=4, block_size=16, topk=3, window_size=16)
    assert calls == ["ours_fwd", "ours", "dense_fwd", "dense"]
    assert (row["N"], row["g"], row["HQ"], row["H"]) == (48, 2, 4, 2)
    assert row["dense_over_ours_fwd"] == "0.50" and row["dense_over_ours_fwdbwd"] == "1.50"


def test_points_are_checked():
    assert module_vs_dense.parse_points("8192:1,16384:4") == [(8192, 1), (16384, 4)]
    with pytest.raises(SystemExit, match="g dividing 64"):
        module_vs_dense.parse_points("8192:3")
