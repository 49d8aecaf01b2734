"""Plots, summary and paper tables from synthetic measured rows (what a GPU sweep writes)."""
import itertools
import math

import pandas as pd

from experiments import report
from experiments.paper import figures, measured
from experiments.paper import tables as paper_tables
from experiments.points import COLUMNS, Point, make_row

META = {"gpu": "Fake GPU 80GB", "torch": "2.x", "triton": "3.x", "git_commit": "abc", "timestamp": "t"}


def synthetic_rows(q_heads=None) -> pd.DataFrame:
    rows = []
    presets = [(64, 16), (128, 8)]
    for g, n, (bs, t), p in itertools.product((1, 4), (32768, 65536), presets, ("fwd", "bwd", "fwd+bwd")):
        kv = q_heads // g if q_heads else 4
        for scope in ("selected", "module", "module/compressed", "module/selected", "module/window"):
            for kernel, base in (("nsa", 10.0), ("fsa", 5.0 / g), ("sdpa", 8.0)):
                if kernel == "sdpa" and scope.startswith("module/"):
                    continue
                point = Point(scope, g, kv, 128, n, 1, bs, t, "bfloat16", "nsa")
                ms = base * n / 32768 * (2 if p == "fwd+bwd" else 1) * (3 if scope == "module" else 1)
                rows.append(make_row(point, kernel, p, "ok", META, median_ms=ms, p20_ms=ms * 0.9, p80_ms=ms * 1.1,
                                     peak_extra_mem_gb=0.1 * n / 32768, rel_err=1e-3))
    rows.append(make_row(Point("selected", 1, 4, 128, 32768, 1, 64, 16, "bfloat16", "nsa"), "fla", "fwd",
                         "unsupported", META, "fla: needs gqa a power of two >= 16"))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def test_report_writes_every_plot_and_the_summary(tmp_path):
    df = synthetic_rows()
    one = df[(df["scope"] != "selected") | (df["status"] != "ok")]  # module rows (and fla's unsupported one)
    written = report.write_report(one, tmp_path)
    names = {p.name for p in written}
    for name in ("ratio_vs_seqlen.png", "latency.png", "breakdown.png", "memory.png", "summary.md"):
        assert name in names and (tmp_path / name).stat().st_size > 1000, name
    summary = (tmp_path / "summary.md").read_text()
    assert "NSA/FSA" in summary and "Fake GPU 80GB" in summary and "unsupported" in summary


def test_a_folder_of_two_configurations_gets_one_set_of_plots_each(tmp_path):
    """Rows of selected and module scope (like results/fig7_8): no plot mixes them."""
    (tmp_path / "latency.png").write_bytes(b"stale plot of both scopes")
    names = {p.name for p in report.write_report(synthetic_rows(), tmp_path)}
    for scope in ("selected", "module"):
        for plot in ("ratio_vs_seqlen", "latency", "memory"):
            assert f"{plot}_scope-{scope}.png" in names, (plot, scope)
    assert "breakdown_scope-module.png" in names and "breakdown_scope-selected.png" not in names
    assert not (tmp_path / "latency.png").exists()


def test_paper_tables_use_measured_rows_and_say_not_measured_otherwise(tmp_path):
    for name, df in (("fig7_8", synthetic_rows(q_heads=64)), ("fig3", synthetic_rows())):
        (tmp_path / name).mkdir()
        df.to_csv(tmp_path / name / "results.csv", index=False)
    df = measured.load_measured(tmp_path)
    out = tmp_path / "paper"
    out.mkdir()
    fig7 = figures.fig7(df, out)
    assert "Fake GPU 80GB" in fig7 and (out / "fig7.png").stat().st_size > 0
    # FSA fwd speedup over NSA in the synthetic rows: 10 / (5 / g) = 2g -> max 8 (g=4), mean 5
    row = [line for line in fig7.splitlines() if "over nsa (fwd)" in line][0]
    assert "| 8 |" in row and "| 5 |" in row
    fig8 = figures.fig8(df, out)
    assert (out / "fig8.png").exists() and "not measured" not in fig8
    tables = paper_tables.tables67(df, out)
    assert "not measured" in tables and not (out / "tables67.png").exists()
    fig2 = figures.fig2(df, out)
    assert "0.213" in fig2 and (out / "fig2.png").stat().st_size > 0
    assert not math.isnan(float(df["median_ms"].iloc[0]))


def test_paper_never_mixes_gpus_in_a_ratio_and_names_the_gpu_of_a_fallback_point(tmp_path):
    """Rows of a second GPU: fig7's ratios come from the GPU with most rows only (the other GPU's
    NSA times are 100x: mixing would show); a Tables 6-7 point only the other GPU measured is
    taken from it and named in the "ours GPU" column."""
    main = synthetic_rows(q_heads=64)
    other = main[(main["kernel"] == "nsa")].head(6).assign(gpu="Other GPU 141GB",
                                                           median_ms=lambda d: d["median_ms"] * 100)
    point = Point("module", 1, 64, 128, 262144, 1, 128, 8, "bfloat16", "nsa")
    big = pd.DataFrame([make_row(point, "fsa", "fwd+bwd", "ok", dict(META, gpu="Other GPU 141GB"), median_ms=1234.0),
                        make_row(point, "nsa", "fwd+bwd", "oom", META, "out of memory"),
                        make_row(point, "fsa", "fwd", "ok", META, median_ms=1000.0),
                        make_row(point, "nsa", "fwd", "ok", META, median_ms=2000.0)], columns=list(COLUMNS))
    (tmp_path / "fig7_8").mkdir()
    pd.concat([main, other]).to_csv(tmp_path / "fig7_8" / "results.csv", index=False)
    (tmp_path / "tables67").mkdir()
    big.to_csv(tmp_path / "tables67" / "results.csv", index=False)
    df = measured.load_measured(tmp_path)
    out = tmp_path / "paper"
    out.mkdir()
    fig7 = figures.fig7(df, out)
    row = [line for line in fig7.splitlines() if "over nsa (fwd)" in line][0]
    assert "| 8 |" in row and "| 5 |" in row and "Other GPU" not in fig7.split("\n\n")[1]
    table = paper_tables.tables67(df, out)
    rows = {tuple(c.strip() for c in ln.split("|")[4:6]): ln for ln in table.splitlines()
            if ln.startswith("| (128,8) | 1 | 262144 |")}
    assert "| 1.23 |" in rows["fsa", "fwd+bwd"] and "Other GPU 141GB" in rows["fsa", "fwd+bwd"], table
    assert "| 1 |" in rows["fsa", "fwd"] and "Fake GPU 80GB" in rows["fsa", "fwd"]
    nsa = [ln for ln in table.splitlines() if "(128,8)" in ln and "| 1 | 262144 |" in ln and "oom" in ln]
    assert nsa, "the NSA point tried on the main GPU stays oom"
    assert (out / "tables67.png").stat().st_size > 0


def test_which_kernel_table_names_the_winner_its_margin_and_dense():
    """Synthetic times: nsa 10, fsa 5 / g, sdpa 8 (x N / 32K): at g=1 FSA wins 2x and is 1.6x faster
    than dense; at g=4 8x and 6.4x."""
    rows = synthetic_rows()
    table = report.verdict_table(rows[(rows["status"] == "ok") & (rows["scope"] == "selected")])
    cell = table.set_index(["block_size", "pass", "gqa"])["N=32768"]
    assert cell[(64, "fwd", 1)] == "fsa 2x; 1.6x dense"
    assert cell[(64, "fwd", 4)] == "fsa 8x; 6.4x dense"


def figures_of(monkeypatch) -> list:
    """The figures the plots save (plots._save closes them; this keeps them for inspection)."""
    from experiments import plots

    saved = []
    real = plots._save

    def keep(fig, path, legend_outside=False):
        saved.append(fig)
        return real(fig, path, legend_outside)

    monkeypatch.setattr(plots, "_save", keep)
    return saved


def legend_texts(fig) -> str:
    return "\n".join(t.get_text() for legend in fig.legends for t in legend.get_texts()
                     ) + "\n" + "\n".join(legend.get_title().get_text() for legend in fig.legends)


def test_legends_sit_outside_the_panels_and_say_what_the_published_lines_are(tmp_path, monkeypatch):
    from experiments import plots

    saved = figures_of(monkeypatch)
    rows = synthetic_rows()
    rows = rows[(rows["scope"] == "selected") & (rows["status"] == "ok")]
    plots.plot_ratio(rows, False, tmp_path / "ratio.png")
    plots.plot_latency(rows, False, tmp_path / "latency.png")
    plots.plot_memory(rows, False, tmp_path / "memory.png")
    for fig in saved:
        assert all(ax.get_legend() is None for ax in fig.axes), "a legend inside a panel covers data"
        assert len(fig.legends) == 1
    ratio, latency, memory = map(legend_texts, saved)
    # the published fwd+bwd is not one call: their fwd and bwd timed apart, summed
    assert "sum of their fwd and bwd timed as separate calls" in ratio
    assert "sum of their fwd and bwd timed as separate calls" in latency
    assert "g=1" in memory and "g=4" in memory


def test_memory_styles_every_g_apart():
    from experiments import plots

    styles = [plots._g_style(i) for i in range(9)]  # fig3: g = 1..8 and 16
    assert len({str(ls) for ls, _ in styles}) == 9 and len(set(styles)) == 9
    assert len({str(plots._g_style(i)) for i in range(30)}) == 30


def test_auto_says_which_family_it_is_drawn_over():
    from experiments import plots

    rows = synthetic_rows()
    rows = rows[(rows["scope"] == "selected") & rows["kernel"].isin(["nsa", "fsa"])]
    auto = rows[rows["kernel"] == "fsa"].assign(kernel="auto")
    assert plots.auto_label(pd.concat([rows, auto])) == "auto (= fsa at every point here, drawn over it)"
    auto = auto.assign(median_ms=auto["median_ms"] * 1.1)
    assert plots.auto_label(pd.concat([rows, auto])) == "auto"


def test_configurations_split_every_setting_no_plot_facets_on():
    from experiments import plots

    rows = synthetic_rows()
    rows = rows[(rows["scope"] == "selected") & (rows["status"] == "ok")]
    assert [s for s, _ in plots.configurations(rows)] == [""]
    other = rows.assign(head_dim=64)
    split = plots.configurations(pd.concat([rows, other]))
    assert [s for s, _ in split] == ["_head_dim-64", "_head_dim-128"]
    assert all(sub["head_dim"].nunique() == 1 for _, sub in split)
    assert "| scope | head_dim | block_size |" in report.summary_markdown(pd.concat([rows, other]))
    # fig4-like: q_heads fixed, kv_heads = q_heads / g varies with g: one configuration
    fig4 = rows.assign(q_heads=64, kv_heads=64 // rows["gqa"])
    assert [s for s, _ in plots.configurations(fig4)] == [""]
    assert "q_heads=64 (kv_heads=16/64)" in plots.title_of(fig4, False, "x")
    # several heads layouts that neither fix: split by kv_heads
    mixed = pd.concat([rows, rows.assign(kv_heads=8, q_heads=8 * rows["gqa"])])
    assert [s for s, _ in plots.configurations(mixed)] == ["_kv_heads-4", "_kv_heads-8"]


def test_summary_lists_rows_above_the_accuracy_limit():
    """A measured rel_err above its dtype's limit (accuracy.REL_ERR_LIMIT) is listed in summary.md with
    its commit; within the limit the summary says so in one line."""
    rows = synthetic_rows()
    assert "Accuracy: every measured rel_err is within" in report.summary_markdown(rows)
    bad = rows.copy()
    hit = (bad["kernel"] == "fsa") & (bad["scope"] == "module") & (bad["seqlen"] == 65536) & (bad["pass"] == "fwd")
    bad.loc[hit, "rel_err"] = 0.02
    text = report.summary_markdown(bad)
    assert f"## Accuracy: {int(hit.sum())} rows above their dtype's rel_err limit" in text
    assert "| module | fsa | fwd | 1 | 65536 | 64 | bfloat16 | 0.02 |" in text
