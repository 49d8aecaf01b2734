"""scope=decode / scope=generate (issue #15 benchmarks) on CPU: config parsing, the bytes model
against a hand count, NSA Table 4 against the paper, the decode tables from a small fake CSV, and
what the sweep does without CUDA (predicted rows; measure=time records that timings need CUDA)."""
from pathlib import Path

import pandas as pd
import pytest
import torch

from experiments import decode_costs, folders, runner, store
from experiments.paper import decode_tables, numbers
from experiments.points import COLUMNS, Point, make_row
from experiments.schema import ConfigError, SelectionConfig, SweepConfig, validate
from tests.experiments.test_plots import META
from tests.experiments.test_schema import load


def test_decode_and_generate_presets_compose():
    cfg = validate(load("sweep=decode"))
    assert (cfg.scope, cfg.q_heads, cfg.kv_heads, cfg.head_dim) == ("decode", 32, 8, 128)
    assert cfg.kernels == ["fsa", "sdpa", "flashinfer"] and cfg.passes == ["eager", "graph", "graph16"]
    cfg = validate(load("sweep=generate", "gqa=8"))
    assert (cfg.scope, cfg.kv_heads, cfg.decode_steps, cfg.passes) == ("generate", 8, 512, ["eager", "graph"])
    assert validate(load("scope=decode", "pass=all")).passes == ["eager", "graph", "graph16"]
    assert validate(load("scope=generate", "pass=all")).passes == ["eager", "graph"]
    with pytest.raises(ConfigError, match="pass"):
        validate(load("scope=generate", "pass=graph16"))  # consecutive steps in one graph: scope=decode only
    with pytest.raises(ConfigError, match="pass"):
        validate(load("scope=decode", "pass=fwd"))  # a prefill pass has no meaning for a decode step
    with pytest.raises(ConfigError, match="pass"):
        validate(load("pass=graph"))  # nor a decode mode for the prefill scopes
    with pytest.raises(ConfigError, match="decode_steps"):
        validate(load("scope=generate", "decode_steps=0", "pass=eager"))


def test_batch_is_a_grid_axis_of_the_decode_folders_only():
    base = {"name": "decode", "scope": "decode", "batch": 1}
    assert folders.folder_name(dict(base, batch=64), base, False) == "decode"
    base = {"name": "sweep", "scope": "selected", "batch": 1}
    assert folders.folder_name(dict(base, batch=2), base, False) == "sweep_batch-2"


def test_bytes_model_matches_a_hand_count():
    """Llama3-8B heads, B = 8, L = 64K, (64, 16), window 512, bf16 (issue #15's byte floor)."""
    point = Point("decode", 4, 8, 128, 65536, 8, 64, 16, "bfloat16", "nsa")
    keys = (65536 - 32) // 16 + 1 + 16 * 64 + 512  # 4095 summaries + 1024 selected + 512 window
    assert keys == 5631
    q_and_o = 2 * 8 * 32 * 128 * 2
    assert decode_costs.step_bytes(point, SelectionConfig(), dense=False) == 8 * 8 * keys * 128 * 2 * 2 + q_and_o
    assert decode_costs.step_bytes(point, SelectionConfig(), dense=True) == 8 * 8 * 65536 * 128 * 2 * 2 + q_and_o
    floor_ms = decode_costs.step_bytes(point, SelectionConfig(), dense=False) / 3350e9 * 1e3
    assert floor_ms == pytest.approx(0.055, abs=0.0005)  # the "byte floor 0.055 ms" on an H100
    short = decode_costs.nsa_tokens(100, 32, 16, 64, 16, 512)  # a cache shorter than T * BS and the window
    assert (short.compressed, short.selected, short.window) == (5, 100, 100)


def test_nsa_table4_within_one_percent_of_the_paper():
    """Ours counts one summary more than floor((L - l) / d) and the paper rounds tokens and ratios."""
    rows = decode_costs.table4_rows(SelectionConfig(), 64, 16, q_heads=64, kv_heads=4, head_dim=128)
    for row in rows:
        paper_tokens, paper_x = numbers.NSA_TABLE4[row["L"]]
        assert row["ours tokens x"] == pytest.approx(paper_x, rel=0.01)
        assert abs(int(row["ours tokens (cmp + sel + win)"].split()[0]) - paper_tokens) <= 2
        assert row["ours bytes x (q, o incl.)"] == pytest.approx(paper_x, rel=0.01)
        assert decode_costs.paper_table4_tokens(row["L"]) == pytest.approx(paper_tokens, abs=2)
    md = decode_tables.nsa_table4(pd.DataFrame(), Path("."))
    assert "11.6" in md and "NSA paper" in md


def _write(results: Path, name: str, rows: list) -> None:
    (results / name).mkdir(parents=True)
    pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(results / name / "results.csv", index=False)


def test_decode_tables_from_a_small_fake_csv(tmp_path):
    gen = []
    for kernel, total_ms in (("fsa", 500.0), ("sdpa", 2000.0)):
        p = Point("generate", 4, 16, 128, 131072, 1, 64, 16, "bfloat16", "nsa")
        gen.append(make_row(p, kernel, "graph", "ok", META, median_ms=total_ms, ttft_ms=total_ms - 100,
                            per_token_ms=100 / 512))
    _write(tmp_path, "generate", gen)
    dec = [make_row(Point("decode", 4, 16, 128, 65536, 1, 64, 16, "bfloat16", "nsa"), "fsa", "graph", "ok", META,
                    median_ms=0.2),
           make_row(Point("decode", 4, 16, 128, 65536, 1, 64, 16, "bfloat16", "nsa"), "sdpa", "eager", "ok", META,
                    median_ms=0.8)]
    long = Point("decode", 4, 16, 128, 131072, 1, 64, 16, "bfloat16", "nsa")  # graph16 for both: taken over graph
    dec += [make_row(long, k, p, "ok", META, median_ms=ms)
            for k, p, ms in (("fsa", "graph", 0.3), ("fsa", "graph16", 0.1), ("sdpa", "graph", 1.0),
                             ("sdpa", "graph16", 0.9))]
    _write(tmp_path, "decode", dec)
    from experiments.paper.measured import load_measured

    df = load_measured(tmp_path)
    t89 = decode_tables.tables89(df, tmp_path)
    line = next(x for x in t89.splitlines() if x.startswith("| FSA | (64,16) | 4 | 131072"))
    assert "| 0.5 |" in line and "0.55" in line  # ours 0.5 s beside the paper's H200 0.55 s
    line = next(x for x in t89.splitlines() if x.startswith("| FA (ours: SDPA) |  | 4 | 131072"))
    assert "| 2 |" in line
    assert "not measured" in t89  # every other (g, N, preset)
    t10 = decode_tables.table10(df, tmp_path)
    line = next(x for x in t10.splitlines() if x.startswith("| 65536 |"))
    assert "| 0.2 |" in line and "| 0.8 |" in line and "| 4 |" in line  # ours, dense, dense / ours
    line = next(x for x in t10.splitlines() if x.startswith("| 131072 |"))
    assert "| 0.1 | graph16 | 0.3 | 0.9 |" in line and "| 9 |" in line  # dense / ours in graph16 mode
    assert "Fake GPU" in t10


def decode_config(tmp_path, scope="decode", measure="auto") -> SweepConfig:
    cfg = SweepConfig(results_dir=str(tmp_path), name="dec", scope=scope, q_heads=32, gqa=4, seqlen=65536,
                      batch=8, kernels=["fsa", "sdpa", "fla", "flashinfer"], passes="all", measure=measure)
    return validate(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path")
def test_without_cuda_decode_rows_are_predicted_and_resume(tmp_path):
    rows = runner.run_job(decode_config(tmp_path))
    by = {(r["kernel"], r["pass"]): r for r in rows}
    assert by[("fla", "eager")]["status"] == "unsupported"
    assert by[("flashinfer", "graph")]["status"] == "unsupported" and "measured peer only" in by[("flashinfer", "graph")]["message"]
    ours, dense = by[("fsa", "graph")], by[("sdpa", "graph")]
    assert ours["status"] == dense["status"] == "predicted" and "predicted" in ours["message"]
    assert ours["median_ms"] == pytest.approx(0.055, abs=0.0005) and ours["gpu"].startswith("predicted")
    assert dense["median_ms"] / ours["median_ms"] == pytest.approx(65536 / 5631, rel=0.01)
    assert (tmp_path / "dec_predicted").exists() and not (tmp_path / "dec").exists()
    assert runner.run_job(decode_config(tmp_path)) == []  # recorded: skipped
    gen = runner.run_job(decode_config(tmp_path, "generate"))
    g = {(r["kernel"], r["pass"]): r for r in gen}[("fsa", "graph")]
    assert g["median_ms"] == pytest.approx(g["ttft_ms"] + 512 * g["per_token_ms"])
    timed = runner.run_job(decode_config(tmp_path / "t", measure="time"))
    ours_dense = [r for r in timed if r["kernel"] in ("fsa", "sdpa")]
    assert {r["status"] for r in ours_dense} == {"error"} and all("need CUDA" in r["message"] for r in ours_dense)
    fi = [r for r in timed if r["kernel"] == "flashinfer"]  # not installed here: says so; else needs CUDA too
    assert fi and all(("not installed" in r["message"]) if r["status"] == "unsupported" else "need CUDA" in r["message"]
                      for r in fi)
    merged = store.merge(tmp_path / "dec_predicted")
    from experiments import decode_report
    from experiments.report import markdown_table

    assert "dense / ours" in decode_report.summary_markdown(merged, markdown_table)
    pngs = {p.name for p in decode_report.decode_plots(merged, tmp_path / "dec_predicted")}
    assert pngs == {f"decode_{p}_32q8kv_bs64t16.png" for p in ("eager", "graph", "graph16")}


def test_consecutive_steps_grow_the_cache_and_give_the_lengths_back():
    """graph16's step function (interpreter, fp32, tiny module): n steps append at lengths L - n .. L - 1
    (the last completes a summary), then the lengths go back to L - n; the caller adds n - 1."""
    from experiments import decode_timing as dt
    from nsa_baseline.module import NativeSparseAttention

    torch.manual_seed(0)
    module = NativeSparseAttention(32, 4, 2, 16, kernel_size=8, kernel_stride=4, block_size=16, topk=3,
                                   window_size=16, backend="fsa")
    length, n = 72, 4
    cache = dt.fill_cache(module, 2, length)
    steps, out = dt.consecutive_steps(module, cache, n)
    assert cache.lengths.tolist() == [length - n] * 2 and torch.isfinite(out).all()
    cmp_before = cache.k_cmp.clone()
    steps()
    assert cache.lengths.tolist() == [length - n] * 2
    due = (length - module.kernel_size) // module.kernel_stride  # the summary position length - 1 completes
    assert not torch.equal(cache.k_cmp[:, due], cmp_before[:, due])
