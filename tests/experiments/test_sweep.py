"""The sweep end to end on CPU (subprocess, like a user runs it): multirun aggregation, resume,
bad values rejected before anything runs; and the runner's failure recording in-process."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from experiments import runner, store, timed_calls
from experiments.points import COLUMNS
from experiments.schema import ConfigError, SweepConfig, validate

REPO = Path(__file__).resolve().parents[2]


def run_sweep(*overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "experiments.sweep", *overrides, "hydra/job_logging=disabled",
           "hydra/hydra_logging=disabled"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def predicted_sweep(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    args = ("gqa=2,4", "seqlen=8192,16384", f"results_dir={results}", f"hydra.sweep.dir={results}/hydra")
    first = run_sweep(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (results / "sweep").exists(), "predicted rows must not land in the measured sweep's folder"
    return results / "sweep_predicted", args, first


def test_multirun_aggregates_every_job_into_one_csv_and_plots(predicted_sweep):
    folder, _, proc = predicted_sweep
    assert "timings need CUDA; writing the analytic cost model only" in proc.stdout
    df = pd.read_csv(folder / "results.csv")
    assert list(df.columns) == list(COLUMNS)
    # 2 gqa x 2 seqlen x 2 sparsity presets (default grid) x 5 kernels x 3 passes
    assert len(df) == 2 * 2 * 2 * 5 * 3
    assert set(df["status"]) == {"predicted", "unsupported"}  # fla needs g >= 16
    assert (df[df["status"] == "predicted"]["median_ms"] > 0).all()
    assert df[df["status"] == "predicted"]["message"].str.contains("x roofline").all(), "calibrated (h100)"
    summary = (folder / "summary.md").read_text()
    assert "calibrated on NVIDIA H100 80GB HBM3 rows" in summary and "## Which kernel" in summary
    for name in ("ratio_vs_seqlen.png", "latency.png", "memory.png", "summary.md"):
        assert (folder / name).stat().st_size > 0, name
    assert "NSA/FSA" in (folder / "summary.md").read_text()


def test_rerun_skips_recorded_points(predicted_sweep):
    folder, args, _ = predicted_sweep
    before = {p.name: p.read_text() for p in (folder / "rows").glob("*.csv")}
    again = run_sweep(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p.name: p.read_text() for p in (folder / "rows").glob("*.csv")} == before


def test_a_bad_swept_value_stops_the_sweep_before_anything_runs(tmp_path):
    # the bad value is in the second job: the first must not run either
    proc = run_sweep("seqlen=1024,-5", f"results_dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/hydra")
    assert proc.returncode != 0
    assert "seqlen=-5 must be a positive integer" in proc.stderr + proc.stdout
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "sweep_predicted").exists()


def tiny_config(tmp_path, kernels_=("nsa", "sdpa")) -> SweepConfig:
    cfg = SweepConfig(results_dir=str(tmp_path), name="tiny", gqa=2, kv_heads=1, head_dim=16, seqlen=128,
                      dtype="float32", indices="random", kernels=list(kernels_), passes=["fwd", "fwd+bwd"],
                      measure="time")
    cfg.sparsity.block_size, cfg.sparsity.topk = 16, 4
    cfg.timing.rep_ms, cfg.timing.ref_rows = 1, 16
    return cfg


def test_a_raising_kernel_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    real = timed_calls.build_call

    def build_call(kernel, *args):
        if kernel == "nsa":
            raise RuntimeError("kernel exploded")
        return real(kernel, *args)

    monkeypatch.setattr(timed_calls, "build_call", build_call)
    cfg = tiny_config(tmp_path)
    rows = runner.run_job(cfg, device=torch.device("cpu"))
    by = {(r["kernel"], r["pass"]): r for r in rows}
    assert by[("nsa", "fwd")]["status"] == "error" and "kernel exploded" in by[("nsa", "fwd")]["message"]
    assert by[("sdpa", "fwd")]["status"] == "ok" and by[("sdpa", "fwd+bwd")]["median_ms"] > 0
    assert by[("sdpa", "fwd")]["rel_err"] < 1e-5  # float32 SDPA vs the float32 reference rows
    assert len(store.read_rows(tmp_path / "tiny")) == 4


def test_oom_is_recorded_as_oom_and_retried_only_when_asked(tmp_path, monkeypatch):
    from experiments import timing

    def time_pass(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    monkeypatch.setattr(timing, "time_pass", time_pass)
    cfg = tiny_config(tmp_path, kernels_=("sdpa",))
    rows = runner.run_job(cfg, device=torch.device("cpu"))
    assert {r["status"] for r in rows} == {"oom"}
    assert runner.run_job(cfg, device=torch.device("cpu")) == []  # recorded: skipped
    cfg.retry_failed = True
    assert len(runner.run_job(cfg, device=torch.device("cpu"))) == 2


def test_redo_before_measures_old_rows_again_and_resumes(tmp_path, monkeypatch):
    """redo_before re-measures rows older than it (a kernel changed) and, rerun, skips what the
    refresh itself recorded: a refresh cut short continues where it stopped."""
    cfg = tiny_config(tmp_path, kernels_=("sdpa",))
    monkeypatch.setattr(runner, "now", lambda: "2026-01-01T00:00:00+00:00")
    assert len(runner.run_job(cfg, device=torch.device("cpu"))) == 2
    cfg.redo_before = "2025-12-31"  # every row is newer: nothing to do
    assert runner.run_job(cfg, device=torch.device("cpu")) == []
    cfg.redo_before = "2026-03-01T12:00"
    monkeypatch.setattr(runner, "now", lambda: "2026-03-01T12:30:00+00:00")
    assert len(runner.run_job(cfg, device=torch.device("cpu"))) == 2
    assert runner.run_job(cfg, device=torch.device("cpu")) == []
    assert set(store.read_rows(tmp_path / "tiny")["timestamp"]) == {"2026-03-01T12:30:00+00:00"}


def test_redo_before_must_be_a_date():
    cfg = SweepConfig(redo_before="last tuesday")
    with pytest.raises(ConfigError, match="redo_before='last tuesday' must be an ISO date"):
        validate(cfg)


def test_fla_is_unsupported_below_g16():
    from experiments.points import Point

    point = Point("selected", 4, 4, 128, 1024, 1, 64, 16, "bfloat16", "random")
    assert "power of two >= 16" in timed_calls.unsupported_reason("fla", point, check_installed=False)


def test_commit_hashes_that_look_like_numbers_stay_text(tmp_path):
    """A commit such as 90384e6 is valid scientific notation; rows must read it back as text."""
    row = {c: "" for c in COLUMNS}
    row.update(git_commit="90384e6", gpu="GPU", torch="2.11", triton="3.6", timestamp="t")
    store.append_rows(tmp_path, "job", [row])
    assert store.read_rows(tmp_path)["git_commit"].tolist() == ["90384e6"]


def test_fla_module_scope_runs_its_whole_path_with_our_gates(monkeypatch):
    """scope=module times fla-core's own parallel_nsa (no block indices given: its compression and
    top-T; no window), fed the point's q, k, v and the compressed / selected gates; its output has
    no shared reference (another NSA variant). A stand-in records the call (fla-core is GPU-only)."""
    from experiments.inputs import make_inputs
    from experiments.points import Point

    seen = {}

    def parallel_nsa(q, k, v, g_cmp=None, g_slc=None, g_swa=None, block_indices=None, block_counts=16,
                     block_size=64, window_size=0, scale=None, cu_seqlens=None):
        seen.update(q=q.shape, k=k.shape, g_cmp=g_cmp.shape, g_slc=g_slc.shape, block_indices=block_indices,
                    block_counts=block_counts, block_size=block_size, window_size=window_size, cu=cu_seqlens)
        return q * g_slc.unsqueeze(-1) + q * g_cmp.unsqueeze(-1)

    monkeypatch.setattr(timed_calls, "_entry", lambda module, name: parallel_nsa)
    point = Point("module", 16, 1, 32, 256, 1, 64, 4, "float32", "nsa")
    assert timed_calls.unsupported_reason("fla", point, check_installed=False) == "fla: float32 inputs are not supported"
    cfg = SweepConfig()
    inp = make_inputs(point, cfg.selection, torch.device("cpu"), 0)
    call = timed_calls.build_call("fla", cfg, point, inp)
    out = call.run()
    assert out.shape == (256, 16, 32) and call.family == "peer"
    assert seen["q"] == (1, 256, 16, 32) and seen["k"] == (1, 256, 1, 32) and seen["g_cmp"] == (1, 256, 16)
    assert seen["block_indices"] is None and seen["block_counts"] == 4 and seen["block_size"] == 64
    assert seen["window_size"] == 0 and seen["cu"] is None
    expect = inp.q * (inp.gates[..., 0] + inp.gates[..., 1]).unsqueeze(-1)
    torch.testing.assert_close(out, expect)
    out.sum().backward()  # the gates and q, k, v are the leaves the timed backward resets
    assert all(t.grad is not None for t in call.leaves[:1] + call.leaves[3:])
    from experiments import accuracy
    rel, note = accuracy.output_rel_err("peer", out, inp, point, 8, 0)
    assert rel != rel and "no shared reference" in note
