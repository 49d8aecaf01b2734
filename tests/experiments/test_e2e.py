"""`python -m experiments.e2e`: its config, resumable rows (the timing itself is faked: it needs CUDA),
the speedup table and plot from a small CSV, and the plain refusal without CUDA."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from experiments import e2e, e2e_report, e2e_timing, store
from experiments.schema import ConfigError, register_configs, validate_e2e

REPO = Path(__file__).resolve().parents[2]
register_configs()
META = dict(gpu="NVIDIA H200", torch="2.11", triton="3.6", git_commit="abc1234")


def load(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "configs" / "e2e"), version_base="1.3"):
        return validate_e2e(compose(config_name="e2e", overrides=list(overrides)))


def test_config_parses_and_bad_values_are_named():
    cfg = load("model=qwen3_14b", "seqlen=32768", "sparsity=bs64_t16")
    assert (cfg.model, cfg.seqlen, cfg.sparsity, cfg.layers) == ("qwen3_14b", 32768, "bs64_t16", 2)
    assert cfg.backends == ["dense", "nsa", "fsa"] and cfg.steps == ["train", "prefill"]
    assert load("backends=[fsa,dense]", "steps=prefill").backends == ["fsa", "dense"]
    for bad, key in (("model=llama2_7b", "model"), ("sparsity=bs32_t1", "sparsity"), ("backends=flash", "backends"),
                     ("steps=decode", "steps"), ("layers=0", "layers"), ("redo_before=yesterday", "redo_before")):
        with pytest.raises(ConfigError, match=key):
            load(bad)


def _fake_timing(monkeypatch, calls):
    """measure() that records what it was asked and returns ok rows (prefill of nsa fails)."""
    monkeypatch.setattr(e2e_timing, "build", lambda model, layers, n: object())
    monkeypatch.setattr("experiments.gpu.provenance.run_meta", lambda: dict(META))
    monkeypatch.setattr(e2e.torch.cuda, "empty_cache", lambda: None)

    def measure(base, n, backend, preset, reps, steps):
        calls.append((backend, preset, tuple(steps)))
        return [dict(step=s, status="error", message="RuntimeError: boom") if (backend, s) == ("nsa", "prefill")
                else dict(step=s, status="ok", message="", ms=10.0, ms_per_layer=5.0, peak_gb=1.0, attn_ms=3.0,
                          mlp_ms=1.0, attn_share=0.75) for s in steps]

    monkeypatch.setattr(e2e_timing, "measure", measure)


def test_rows_are_resumable_and_dense_is_shared_by_presets(tmp_path, monkeypatch):
    calls = []
    _fake_timing(monkeypatch, calls)
    cfg = load(f"results_dir={tmp_path}", "sparsity=bs64_t16", "seqlen=4096")
    rows = e2e.run_job(cfg)
    assert len(rows) == 6 and calls == [(b, (64, 16), ("train", "prefill")) for b in ("dense", "nsa", "fsa")]
    assert {r["status"] for r in rows if r["backend"] == "nsa" and r["step"] == "prefill"} == {"error"}
    assert all(r["git_commit"] == "abc1234" and r["timestamp"] for r in rows)
    calls.clear()
    assert e2e.run_job(cfg) == [] and calls == []  # everything recorded, the failure too
    assert len(e2e.run_job(load(f"results_dir={tmp_path}", "sparsity=bs64_t16", "seqlen=4096",
                                "retry_failed=true"))) == 1 and calls == [("nsa", (64, 16), ("prefill",))]
    calls.clear()
    e2e.run_job(load(f"results_dir={tmp_path}", "sparsity=bs128_t8", "seqlen=4096"))
    assert [c[0] for c in calls] == ["nsa", "fsa"]  # dense (block_size = topk = 0) already recorded
    df = store.merge(tmp_path / "e2e", e2e.COLUMNS, e2e.KEY_COLUMNS, e2e.SORT)
    assert len(df) == 10 and set(df[df.backend == "dense"].block_size) == {0}


def test_speedups_and_plot_from_a_small_csv(tmp_path):
    folder = tmp_path / "e2e"
    folder.mkdir()
    rows = []
    for backend, bs, topk, ms in (("dense", 0, 0, 800.0), ("nsa", 128, 8, 600.0), ("fsa", 128, 8, 480.0)):
        for step, scale in (("train", 1.0), ("prefill", 0.25)):
            rows.append(dict(model="llama3_8b", layers=2, seqlen=65536, backend=backend, block_size=bs, topk=topk,
                             step=step, dtype="bfloat16", ms=ms * scale, ms_per_layer=ms * scale / 2, peak_gb=30,
                             attn_ms=ms * scale / 4, mlp_ms=50, attn_share=0.6, status="ok", message="",
                             timestamp="2026-11-26T12:00:00+00:00", **META))
    pd.DataFrame(rows, columns=e2e.COLUMNS).to_csv(folder / "results.csv", index=False)
    sp = e2e_report.main(folder).set_index("kind")
    assert sp.loc["train", "fsa_over_nsa"] == pytest.approx(1.25) and sp.loc["train", "fsa_over_dense"] == 800 / 480
    assert sp.loc["train", "paper_over_nsa"] == pytest.approx(1.25)  # Figure 5, H200, (128, 8), 64K: +25%
    assert sp.loc["prefill", "paper_over_dense"] == pytest.approx(1.69)  # Figure 6: +69%
    assert "Tables 14-15 TP=1 NSA/FSA 1.28" in sp.loc["prefill", "paper_note"]
    assert sp.loc["attention", "fsa_over_nsa"] == pytest.approx(1.25) and math.isnan(sp.loc["attention", "paper_over_nsa"])
    assert len(pd.read_csv(folder / "speedups.csv")) == 3
    assert (folder / "speedup.png").stat().st_size > 10_000


def test_without_cuda_it_says_so_and_writes_nothing(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "experiments.e2e", f"results_dir={tmp_path}", "seqlen=4096"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == e2e.CPU_MESSAGE
    assert list(tmp_path.iterdir()) == []
