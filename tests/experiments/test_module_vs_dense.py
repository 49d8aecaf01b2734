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


def test_main_times_every_combination_of_the_switches(monkeypatch, tmp_path):
    """--in-place-linear both with --local-blocks off: two rows per point, each timed with the switch
    set as its row says (time_point replaced: it reports what it saw)."""
    import sys

    from nsa_baseline import fused_attention
    from nsa_baseline.ops import compression_grad

    monkeypatch.setattr(module_vs_dense, "require_cuda", lambda: None)
    monkeypatch.setattr(module_vs_dense, "out_dir", lambda: tmp_path)
    monkeypatch.setattr(module_vs_dense, "run_meta", lambda: dict(gpu="none", torch="t", triton="t", git_commit="c"))
    monkeypatch.setattr(module_vs_dense, "time_point", lambda n, g, backend, **sizes: dict(
        N=n, saw=(fused_attention.LOCAL_BLOCKS_KERNEL, compression_grad.IN_PLACE_LINEAR), sizes=sizes))
    monkeypatch.setattr(fused_attention, "LOCAL_BLOCKS_KERNEL", fused_attention.LOCAL_BLOCKS_KERNEL)
    monkeypatch.setattr(compression_grad, "IN_PLACE_LINEAR", compression_grad.IN_PLACE_LINEAR)
    monkeypatch.setattr(sys, "argv", ["module_vs_dense", "--points", "8192:1", "--in-place-linear", "both",
                                      "--local-blocks", "off", "--sparsity", "128:8"])
    assert module_vs_dense.main() == 0
    import csv

    with open(tmp_path / "module_vs_dense.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["local_blocks_kernel"], r["in_place_linear"], r["saw"]) for r in rows] == \
        [("False", "False", "(False, False)"), ("False", "True", "(False, True)")]
    assert {r["sizes"] for r in rows} == {"{'block_size': 128, 'topk': 8}"}  # --sparsity reaches the module
    assert {(r["block_size"], r["topk"]) for r in rows} == {("128", "8")}
