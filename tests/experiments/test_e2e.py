"""`python -m experiments.e2e`: its config, resumable rows (the timing itself is faked: it needs CUDA;
the generate step's body runs on CPU in test_e2e_generate.py), rows recorded before the generate
columns, the speedup table and plot from a small CSV, and the plain refusal without CUDA."""
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
    assert cfg.backends == ["dense", "nsa", "fsa"] and cfg.steps == ["train", "prefill", "generate", "generate_graph"]
    assert (cfg.reps, cfg.generate_reps) == (3, 1)
    assert load("backends=[fsa,dense]", "steps=prefill").backends == ["fsa", "dense"]
    assert load("steps=[generate]", "generate_reps=2").steps == ["generate"]
    for bad, key in (("model=llama2_7b", "model"), ("sparsity=bs32_t1", "sparsity"), ("backends=flash", "backends"),
                     ("steps=decode", "steps"), ("layers=0", "layers"), ("generate_reps=0", "generate_reps"),
                     ("redo_before=yesterday", "redo_before")):
        with pytest.raises(ConfigError, match=key):
            load(bad)


def _fake_row(backend, step):
    if (backend, step) == ("nsa", "prefill"):
        return dict(step=step, status="error", message="RuntimeError: boom")
    if step in ("generate", "generate_graph"):
        return dict(step=step, status="ok", message="eager", ms=600.0, ms_per_layer=300.0, peak_gb=1.0,
                    ttft_ms=88.0, ms_per_token=1.0)
    return dict(step=step, status="ok", message="", ms=10.0, ms_per_layer=5.0, peak_gb=1.0, attn_ms=3.0,
                mlp_ms=1.0, attn_share=0.75)


def _fake_timing(monkeypatch, calls, built=None):
    """measure() that records what it was asked and returns ok rows (prefill of nsa fails); build()
    records its max_len in `built`."""
    built = [] if built is None else built
    monkeypatch.setattr(e2e_timing, "build", lambda model, layers, n: built.append(n) or object())
    monkeypatch.setattr("experiments.gpu.provenance.run_meta", lambda: dict(META))
    monkeypatch.setattr(e2e.torch.cuda, "empty_cache", lambda: None)

    def measure(base, n, backend, preset, reps, steps, generate_reps):
        calls.append((backend, preset, tuple(steps)))
        return [_fake_row(backend, s) for s in steps]

    monkeypatch.setattr(e2e_timing, "measure", measure)


def test_rows_are_resumable_and_dense_is_shared_by_presets(tmp_path, monkeypatch):
    calls, built = [], []
    _fake_timing(monkeypatch, calls, built)
    cfg = load(f"results_dir={tmp_path}", "sparsity=bs64_t16", "seqlen=4096")
    rows = e2e.run_job(cfg)
    assert len(rows) == 12 and calls == [(b, (64, 16), ("train", "prefill", "generate", "generate_graph"))
                                         for b in ("dense", "nsa", "fsa")]
    assert built == [4096 + 512]  # positions for the generated tokens too
    assert {r["status"] for r in rows if r["backend"] == "nsa" and r["step"] == "prefill"} == {"error"}
    gen = [r for r in rows if r["step"].startswith("generate")]
    assert len(gen) == 6 and {(r["ttft_ms"], r["ms_per_token"]) for r in gen} == {(88.0, 1.0)}
    assert all(math.isnan(r["ttft_ms"]) for r in rows if not r["step"].startswith("generate"))
    assert all(r["git_commit"] == "abc1234" and r["timestamp"] for r in rows)
    calls.clear()
    assert e2e.run_job(cfg) == [] and calls == []  # everything recorded, the failure too
    assert len(e2e.run_job(load(f"results_dir={tmp_path}", "sparsity=bs64_t16", "seqlen=4096",
                                "retry_failed=true"))) == 1 and calls == [("nsa", (64, 16), ("prefill",))]
    calls.clear()
    e2e.run_job(load(f"results_dir={tmp_path}", "sparsity=bs128_t8", "seqlen=4096"))
    assert [c[0] for c in calls] == ["nsa", "fsa"]  # dense (block_size = topk = 0) already recorded
    df = store.merge(tmp_path / "e2e", e2e.COLUMNS, e2e.KEY_COLUMNS, e2e.SORT)
    assert len(df) == 20 and set(df[df.backend == "dense"].block_size) == {0}


def test_rows_recorded_before_generate_stay_valid(tmp_path, monkeypatch):
    """A job's rows file from before the generate step (no ttft_ms / ms_per_token columns): the rerun
    times only generate and rewrites the file under the new header; the old rows keep their values."""
    calls = []
    _fake_timing(monkeypatch, calls)
    cfg = load(f"results_dir={tmp_path}", "sparsity=bs64_t16", "seqlen=4096")
    old_columns = [c for c in e2e.COLUMNS if c not in ("ttft_ms", "ms_per_token")]
    old = [{**e2e.make_row(cfg, b, s, dict(META, timestamp="2026-11-25T12:00:00+00:00"), "ok"), "ms": 42.0}
           for b in cfg.backends for s in ("train", "prefill")]
    folder = tmp_path / "e2e"
    store.append_rows(folder, f"{e2e.label(cfg)}|{META['gpu']}", old, tuple(old_columns))
    assert len(e2e.run_job(cfg)) == 6 and calls == [(b, (64, 16), ("generate", "generate_graph"))
                                                    for b in ("dense", "nsa", "fsa")]
    (rows_file,) = (folder / "rows").glob("*.csv")
    assert list(pd.read_csv(rows_file, nrows=0).columns) == list(e2e.COLUMNS)
    df = store.merge(folder, e2e.COLUMNS, e2e.KEY_COLUMNS, e2e.SORT)
    assert len(df) == 12 and list(df.columns) == list(e2e.COLUMNS)
    gen = df.step.str.startswith("generate")
    assert set(df[~gen].ms) == {42.0} and df[~gen].ms_per_token.isna().all()
    assert set(df[gen].ms_per_token) == {1.0}


def test_speedups_and_plot_from_a_small_csv(tmp_path):
    folder = tmp_path / "e2e"
    folder.mkdir()
    rows = []
    for backend, bs, topk, ms, per_token in (("dense", 0, 0, 800.0, 2.0), ("nsa", 128, 8, 600.0, 1.1),
                                             ("fsa", 128, 8, 480.0, 1.0), ("nsa", 64, 16, 700.0, 1.2),
                                             ("fsa", 64, 16, 500.0, 1.0)):
        for step, scale in (("train", 1.0), ("prefill", 0.25), ("generate", 4.0)):
            gen = dict(ttft_ms=ms * 0.25, ms_per_token=per_token) if step == "generate" else {}
            rows.append(dict(model="llama3_8b", layers=2, seqlen=65536, backend=backend, block_size=bs, topk=topk,
                             step=step, dtype="bfloat16", ms=ms * scale, ms_per_layer=ms * scale / 2, peak_gb=30,
                             attn_ms=ms * scale / 4, mlp_ms=50, attn_share=0.6, **gen, status="ok", message="",
                             timestamp="2026-11-26T12:00:00+00:00", **META))
    pd.DataFrame(rows, columns=e2e.COLUMNS).to_csv(folder / "results.csv", index=False)
    sp = e2e_report.main(folder)
    assert len(sp) == 10 and len(pd.read_csv(folder / "speedups.csv")) == 10
    assert set(sp.kind) == {"train", "attention", "prefill", "generate", "decode"}
    sp = sp[sp.block_size == 128].set_index("kind")
    assert sp.loc["train", "fsa_over_nsa"] == pytest.approx(1.25) and sp.loc["train", "fsa_over_dense"] == 800 / 480
    assert sp.loc["train", "paper_over_nsa"] == pytest.approx(1.25)  # Figure 5, H200, (128, 8), 64K: +25%
    assert sp.loc["prefill", "paper_over_dense"] == pytest.approx(1.69)  # Figure 6: +69%
    assert "Tables 14-15 TP=1 NSA/FSA 1.28" in sp.loc["prefill", "paper_note"]
    assert sp.loc["attention", "fsa_over_nsa"] == pytest.approx(1.25) and math.isnan(sp.loc["attention", "paper_over_nsa"])
    assert sp.loc["generate", "fsa_over_nsa"] == pytest.approx(1.25) and sp.loc["generate", "fsa_ms"] == 1920
    assert (sp.loc["decode", "fsa_over_nsa"], sp.loc["decode", "fsa_over_dense"]) == pytest.approx((1.1, 2.0))
    # Tables 8-9 have 128K / 256K only; Tables 14-15 go to the note; Table 10 is (64, 16) only
    assert math.isnan(sp.loc["generate", "paper_over_nsa"]) and math.isnan(sp.loc["decode", "paper_over_nsa"])
    assert "Tables 14-15 TP=1 NSA/FSA 1.28 (whole model" in sp.loc["generate", "paper_note"]
    assert (folder / "speedup.png").stat().st_size > 10_000


def test_paper_generate_and_decode_are_the_attention_alone():
    """Table 9 (H200, prefill + 512 tokens) where it has our N and g, Table 10 (decode per token) at
    (64, 16); both noted as not the same measurement."""
    gen = e2e_report._paper("generate", "llama3_8b", 128, 8, 131072)  # g = 32 / 8 = 4
    assert (gen["paper_over_nsa"], gen["paper_over_dense"]) == pytest.approx((0.56 / 0.49, 1.86 / 0.49))
    assert "Table 9 H200 g=4" in gen["paper_note"] and "not the same measurement" in gen["paper_note"]
    assert math.isnan(e2e_report._paper("generate", "qwen3_14b", 128, 8, 131072)["paper_over_nsa"])  # g = 5
    dec = e2e_report._paper("decode", "llama3_8b", 64, 16, 65536)
    assert (dec["paper_over_nsa"], dec["paper_over_dense"]) == pytest.approx((0.53 / 0.54, 0.88 / 0.54))
    assert "FlashDecoding" in dec["paper_note"] and "not the same measurement" in dec["paper_note"]


def test_without_cuda_it_says_so_and_writes_nothing(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "experiments.e2e", f"results_dir={tmp_path}", "seqlen=4096"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == e2e.CPU_MESSAGE
    assert list(tmp_path.iterdir()) == []
