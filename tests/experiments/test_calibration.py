"""Calibrated predictions: the fit, its fallbacks, and the committed H100 fit against the committed
H100 measurements (what a CPU-only user is shown must track what the GPU really does)."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from experiments import calibration, store
from experiments.points import COLUMNS, Point, make_row
from experiments.schema import HardwareConfig, SelectionConfig

REPO = Path(__file__).resolve().parents[2]
H100 = "NVIDIA H100 80GB HBM3"
META = {"gpu": "Fake GPU", "torch": "2.x", "triton": "3.x", "git_commit": "abc", "timestamp": "t"}


def test_fit_line_recovers_a_and_b_and_falls_back_to_a_ratio():
    x = np.array([1.0, 2.0, 4.0, 8.0])
    a, b = calibration.fit_line(x, 2.0 * x + 0.3)
    assert a == pytest.approx(2.0) and b == pytest.approx(0.3)
    assert calibration.fit_line(x[:2], 3.0 * x[:2]) == pytest.approx((3.0, 0.0))  # too few points for b
    a, b = calibration.fit_line(x, np.array([1.0, 2.5, 5.5, 11.5]))  # y = 1.5x - 0.5: b < 0 not allowed
    assert b == 0.0 and a == pytest.approx(np.median(np.array([1.0, 2.5, 5.5, 11.5]) / x))


def synthetic_measured(a: float, b: float) -> pd.DataFrame:
    """Rows whose median is exactly a * roofline + b for fsa, and 0.5 * roofline for nsa."""
    hw, sel = HardwareConfig(), SelectionConfig()
    rows = []
    for g in (1, 2, 4, 8):
        for n in (8192, 16384, 32768, 65536):
            point = Point("selected", g, 4, 128, n, 1, 64, 16, "bfloat16", "nsa")
            for kernel, (ka, kb) in (("fsa", (a, b)), ("nsa", (0.5, 0.0))):
                roof = calibration.roofline_ms(kernel, point, calibration.point_stats(point, sel), "fwd", sel, hw)
                rows.append(make_row(point, kernel, "fwd", "ok", META,
                                     median_ms=ka * roof + kb))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def test_fit_recovers_known_lines_and_the_lookup_falls_back(tmp_path):
    table = calibration.fit(synthetic_measured(1.7, 0.25), HardwareConfig())
    fsa = table[table["kernel"] == "fsa"].iloc[0]
    assert fsa["a"] == pytest.approx(1.7, rel=1e-3) and fsa["b_ms"] == pytest.approx(0.25, rel=1e-2)
    assert fsa["points"] == 16 and fsa["gpu"] == "Fake GPU"
    path = tmp_path / "fit.csv"
    table.to_csv(path, index=False)
    cal = calibration.Calibration.load(str(path))
    assert cal.line("selected", "fsa", "fwd", 64)[:2] == pytest.approx((1.7, 0.25), rel=1e-2)
    assert cal.line("selected", "fsa", "fwd", 128)[2].startswith("fsa fit at other block sizes")
    assert cal.line("selected", "fla", "fwd", 64)[0] == pytest.approx(0.5)  # fla: NSA's fit
    assert cal.line("selected", "fsa", "bwd", 64) == (1.0, 0.0, "no fit: plain roofline")
    with pytest.raises(FileNotFoundError, match="hardware.calibration"):
        calibration.Calibration.load(str(tmp_path / "missing.csv"))


def committed_h100():
    cal = calibration.Calibration.load("results/calibration/h100.csv")
    measured = store.read_rows(REPO / "results" / "sweep")
    measured = measured[(measured["status"] == "ok") & (measured["scope"] == "selected")
                        & (measured["gpu"] == H100)]
    return cal, measured


def test_committed_fit_is_a_fit_of_the_committed_measurements():
    """results/calibration/h100.csv is what `python -m experiments.calibration` makes of the committed
    rows (re-run it after new measurements: this test fails on a stale fit)."""
    frames = [store.read_rows(REPO / f) for f in calibration.SOURCES]
    measured = pd.concat([f for f in frames if len(f)], ignore_index=True)
    refit = calibration.fit(measured[measured["gpu"].astype(str).str.contains("H100")], HardwareConfig())
    committed, _ = committed_h100()
    merged = committed.table.merge(refit, on=calibration.KEYS, suffixes=("", "_refit"))
    assert len(merged) == len(committed.table) == len(refit)
    assert np.allclose(merged["a"], merged["a_refit"], rtol=1e-3)
    assert np.allclose(merged["b_ms"], merged["b_ms_refit"], rtol=1e-3, atol=1e-3)


def test_calibrated_predictions_track_the_measured_h100_nsa_fsa_ratio():
    """Predicted NSA/FSA ratios within [0.7, 1.6]x of the measured ones at every main-sweep point with
    N >= 16K, and the same faster family at every point; the plain roofline is off by more than 2x
    (NSA reads from L2, FSA pays launches), which is why predictions are calibrated."""
    cal, measured = committed_h100()
    hw, sel = HardwareConfig(), SelectionConfig()
    out = []
    for (g, n, bs, t, p, kv), grp in measured.groupby(["gqa", "seqlen", "block_size", "topk", "pass", "kv_heads"]):
        ms = grp.set_index("kernel")["median_ms"]
        if not {"nsa", "fsa"} <= set(ms.index):
            continue
        point = Point("selected", int(g), int(kv), 128, int(n), 1, int(bs), int(t), "bfloat16", "nsa")
        stats = calibration.point_stats(point, sel)
        pred = {k: calibration.predicted_ms(k, point, stats, p, sel, hw, cal)[0] for k in ("nsa", "fsa")}
        raw = {k: calibration.predicted_ms(k, point, stats, p, sel, hw, None)[0] for k in ("nsa", "fsa")}
        out.append(dict(n=n, measured=ms["nsa"] / ms["fsa"], calibrated=pred["nsa"] / pred["fsa"],
                        plain=raw["nsa"] / raw["fsa"]))
    df = pd.DataFrame(out)
    assert len(df) >= 90
    err = df["calibrated"] / df["measured"]
    long = err[df["n"] >= 16384]
    # 1.6, not 1.5: FSA's ~2 ms fwd+bwd at 16K g=1 is bound by host launches and moves by a third
    # between runs (a0de352, one H100 run: `auto`, the same kernels, 1.30 ms where `fsa` took 2.04)
    assert long.between(0.7, 1.6).all(), df[df["n"] >= 16384][~long.between(0.7, 1.6)]
    assert ((df["calibrated"] > 1) == (df["measured"] > 1)).all()
    assert (df["plain"] / df["measured"]).max() > 2.0


def test_default_hardware_predictions_are_calibrated_and_say_so():
    from experiments.runner import predicted_rows
    from experiments.schema import SweepConfig

    cfg = SweepConfig()
    cfg.hardware.calibration = "results/calibration/h100.csv"
    cfg.kernels, cfg.passes = ["nsa", "fsa", "auto"], ["fwd"]
    point = Point.from_config(cfg)
    rows = {r["kernel"]: r for r in predicted_rows(cfg, point, [(k, "fwd") for k in cfg.kernels], META)}
    assert "x roofline" in rows["fsa"]["message"] and H100 in rows["fsa"]["message"]
    assert rows["auto"]["median_ms"] == min(rows["nsa"]["median_ms"], rows["fsa"]["median_ms"])
    assert rows["auto"]["message"].startswith("auto -> fsa")
    cfg.hardware.calibration = None
    plain = predicted_rows(cfg, point, [("fsa", "fwd")], META)[0]
    assert plain["message"].startswith("plain roofline") and plain["median_ms"] < rows["fsa"]["median_ms"]


def test_cli_writes_the_fit_and_its_predicted_vs_measured_plot(tmp_path):
    out = tmp_path / "fit.csv"
    calibration.main(["results/sweep", "--out", str(out)])
    table = pd.read_csv(out)
    assert set(table["scope"]) == {"selected"} and {"nsa", "fsa", "sdpa"} <= set(table["kernel"])
    assert (table["gpu"] == H100).all() and (out.with_suffix(".png")).stat().st_size > 10_000


def test_predicted_memory_tracks_the_h100_and_foresees_its_out_of_memory_points():
    """Predicted peak extra memory (experiments/costs.py): NSA and dense forward within 5% of the
    measured rows, every selected-scope row within 0.15-2.5x; and at 256K x 64 query heads (Tables 6-7)
    the module's fwd+bwd is predicted not to fit 80 GB exactly where the H100 ran out of memory (at
    e03c37f nowhere: every 256K point ran), and within 0.8-1.1x of the measured peak where the rows
    were measured on today's code path."""
    from experiments import costs

    hw = HardwareConfig()
    _, measured = committed_h100()
    measured = measured[measured["kernel"] != "auto"]
    ratio = pd.Series([r["peak_extra_mem_gb"] / costs.predicted_extra_mem_gb(
        r["kernel"], calibration.point_of(r), r["pass"], hw)
        for _, r in measured.iterrows()], index=measured.index)
    fwd_exact = (measured["pass"] == "fwd") & measured["kernel"].isin(["nsa", "sdpa"])
    assert ratio[fwd_exact].between(0.95, 1.05).all()
    assert ratio.between(0.15, 2.5).all(), ratio.describe()
    big = store.read_rows(REPO / "results" / "tables67")
    big = big[(big["seqlen"] == 262144) & (big["pass"] == "fwd+bwd") & big["status"].isin(["ok", "oom"])]
    assert len(big) >= 12
    for _, r in big.iterrows():
        point = calibration.point_of(r)
        need = costs.predicted_extra_mem_gb(r["kernel"], point, "fwd+bwd", hw)
        assert (need + costs.input_gb(point) > hw.memory_gb) == (r["status"] == "oom"), (r["kernel"], r["gqa"])
        if r["status"] == "ok" and r["kernel"] != "sdpa":
            assert 0.8 <= r["peak_extra_mem_gb"] / need <= 1.1, (r["kernel"], r["gqa"], r["peak_extra_mem_gb"], need)


def test_predicted_rows_and_summary_say_what_would_not_fit():
    from experiments.report import summary_markdown
    from experiments.runner import predicted_rows
    from experiments.schema import SweepConfig

    # 384K x 64 heads: the sparse modules' fwd+bwd would not fit 80 GB (256K does since e03c37f: 49-55 GB)
    cfg = SweepConfig(gqa=1, q_heads=64, kv_heads=64, seqlen=393216, scope="module")
    point = Point.from_config(cfg)
    rows = pd.DataFrame(predicted_rows(cfg, point, [(k, p) for k in ("nsa", "fsa", "sdpa") for p in ("fwd", "fwd+bwd")],
                                       META), columns=list(COLUMNS))
    too_big = rows[rows["message"].str.startswith("would not fit")]
    assert sorted(zip(too_big["kernel"], too_big["pass"])) == [("fsa", "fwd+bwd"), ("nsa", "fwd+bwd")]
    summary = summary_markdown(rows)
    assert "## Predicted not to fit the device's memory" in summary and "| 80 |" in summary


def module_predictions(calibration_csv):
    """Predicted rows of one module point, every kernel and pass (branch rows included)."""
    from experiments.runner import predicted_rows
    from experiments.schema import SweepConfig

    out = []
    for g, bs, n in ((1, 64, 8192), (8, 128, 8192), (4, 64, 65536)):
        cfg = SweepConfig(scope="module", gqa=g, seqlen=n)
        cfg.sparsity.block_size, cfg.sparsity.topk = bs, 1024 // bs
        cfg.hardware.calibration = calibration_csv
        todo = [(k, p) for k in ("nsa", "fsa", "auto", "sdpa") for p in ("fwd", "bwd", "fwd+bwd")]
        out += predicted_rows(cfg, Point.from_config(cfg), todo, META)
    return pd.DataFrame(out, columns=list(COLUMNS))


@pytest.mark.parametrize("calibration_csv", ["results/calibration/h100.csv", None], ids=["calibrated", "plain"])
def test_predictions_add_up_fwd_plus_bwd_and_branches_to_the_module(calibration_csv):
    """fwd + bwd == fwd+bwd for every kernel (auto: of the family it picks with gradients), the
    branch rows of breakdown.png sum to the module's row, and summary.md, breakdown.png and every row
    say which model made them."""
    from experiments import plots, report

    df = module_predictions(calibration_csv)
    keys = ["kernel", "gqa", "seqlen", "block_size"]
    module = df[df["scope"] == "module"].pivot_table(index=keys, columns="pass", values="median_ms")
    plain = module.drop(index="auto")
    assert np.allclose(plain["fwd"] + plain["bwd"], plain["fwd+bwd"], rtol=1e-9)
    for _, r in df[(df["kernel"] == "auto") & (df["pass"] != "fwd") & (df["scope"] == "module")].iterrows():
        family = r["message"].split(":")[0].removeprefix("auto -> ")
        same = df[(df["kernel"] == family) & (df["scope"] == "module") & (df["pass"] == r["pass"])
                  & (df["gqa"] == r["gqa"]) & (df["seqlen"] == r["seqlen"]) & (df["block_size"] == r["block_size"])]
        assert r["median_ms"] == pytest.approx(float(same["median_ms"].iloc[0]), rel=1e-12)
    branches = df[df["scope"].str.startswith("module/")].groupby(keys + ["pass"])["median_ms"].sum()
    totals = df[(df["scope"] == "module") & (df["kernel"] != "sdpa")].set_index(keys + ["pass"])["median_ms"]
    assert len(branches) == len(totals) == 3 * 3 * 3
    assert np.allclose(branches.loc[totals.index], totals, rtol=1e-9)
    # breakdown.png draws exactly these rows: the module total is summary.md's number
    rows, predicted = plots.plotted_rows(df)
    table = plots.breakdown_table(rows, df, predicted)
    assert np.allclose(table[["compressed", "selected", "window"]].sum(axis=1), table["module total"], rtol=1e-9)
    kind = "cost model calibrated on NVIDIA H100 80GB HBM3 rows" if calibration_csv else \
        "plain roofline of the cost model (not calibrated)"
    assert plots.prediction_kind(rows) == kind
    assert f"predicted: {kind}" in report.summary_markdown(df)
    assert kind in plots.title_of(rows, predicted, "NSA module breakdown")
