"""Everything a sweep folder shows: the plots and a short summary.md. The sweep writes them when
all jobs end; `python -m experiments.report results/<name> ...` rewrites them from the rows
recorded so far (after a sweep cut short by a time limit, or rows copied in from another machine)."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from experiments import costs, plots


def markdown_table(df: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub markdown table; floats to `digits` significant digits, NaN as an empty cell."""
    def cell(v) -> str:
        if isinstance(v, float):
            return "" if v != v else f"{v:.{digits}g}"
        return str(v)

    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def varying_settings(rows: pd.DataFrame) -> list[str]:
    """Settings besides the table keys that differ between rows (a folder of several configurations):
    they become table keys too, so no cell hides another configuration's time."""
    return [c for c in ("head_dim", "batch", "dtype", "indices", "gpu") if rows[c].nunique() > 1]


SPARSE_FAMILIES = ("fsa", "nsa", "fla")  # "auto" dispatches to one of the first two: not a verdict
DENSE = "sdpa"


def verdict_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Which sparse kernel to use: per (scope, preset, pass, gqa, heads) a row, per seqlen a cell
    "fsa 2.7x" (the fastest family and its speedup over the next one), with "; 1.2x dense" (dense
    SDPA time / the winner's) when dense attention was timed too, a value below 1 meaning dense wins."""
    keys = ["scope", *varying_settings(rows), "block_size", "topk", "pass", "gqa", "kv_heads"]
    ms = rows.pivot_table(index=keys + ["seqlen"], columns="kernel", values="median_ms", aggfunc="first")
    families = [k for k in SPARSE_FAMILIES if k in ms.columns]
    if not families:
        return pd.DataFrame()
    cells = {}
    for idx, r in ms.iterrows():
        times = r[families].dropna().sort_values()
        if times.empty:
            continue
        cell = str(times.index[0]) + (f" {times.iloc[1] / times.iloc[0]:.2g}x" if len(times) > 1 else "")
        if DENSE in r and r[DENSE] == r[DENSE]:
            cell += f"; {r[DENSE] / times.iloc[0]:.2g}x dense"
        cells[idx] = cell
    table = pd.Series(cells, dtype=object)
    table.index = pd.MultiIndex.from_tuples(table.index, names=keys + ["seqlen"])
    table = table.unstack("seqlen")
    table.columns = [f"N={n}" for n in table.columns]
    return table.reset_index()


def summary_markdown(df: pd.DataFrame) -> str:
    rows, predicted = plots.plotted_rows(df)
    mode = (f"predicted: {plots.prediction_kind(rows)}" if predicted else "measured" if len(rows)
            else "nothing measured")
    lines = [f"# Sweep summary ({mode})", ""]
    lines.append("GPU: " + ", ".join(sorted(set(df["gpu"].astype(str)))) + "  ")
    lines.append("Status counts: " + ", ".join(f"{k} {v}" for k, v in df["status"].value_counts().items()))
    lines.append("")
    if rows.empty:
        return "\n".join(lines + ["No rows to summarise."]) + "\n"
    verdict = verdict_table(rows)
    if len(verdict):
        lines += ["## Which kernel", "",
                  "The fastest sparse family at each point, its speedup over the other family, and dense "
                  "SDPA's time over it (below 1: dense attention is faster there).", "",
                  markdown_table(verdict), "", "## Every point", ""]
    keys = ["scope", *varying_settings(rows), "block_size", "topk", "pass", "gqa", "kv_heads", "seqlen"]
    table = rows.pivot_table(index=keys, columns="kernel", values="median_ms", aggfunc="first")
    table.columns = [f"{k} ms" for k in table.columns]
    if {"nsa ms", "fsa ms"} <= set(table.columns):
        table["NSA/FSA"] = table["nsa ms"] / table["fsa ms"]
    err = rows.pivot_table(index=keys, columns="kernel", values="rel_err", aggfunc="first")
    if not predicted and err.notna().any().any():
        table["max rel_err"] = err.max(axis=1)
    lines.append(markdown_table(table.reset_index()))
    if not predicted:
        lines += _accuracy_lines(rows)
    too_big = rows[rows["message"].astype(str).str.startswith(costs.NOT_FIT)] if predicted else rows.iloc[:0]
    if len(too_big):
        lines += ["", "## Predicted not to fit the device's memory", ""]
        need = too_big["message"].str.extract(costs.NOT_FIT_PATTERN)
        table_big = too_big[["scope", "kernel", "pass", "gqa", "kv_heads", "seqlen", "block_size"]].assign(
            **{"needs GB": need[0], "device GB": need[1]})
        lines.append(markdown_table(table_big))
    failed = df[df["status"].isin(["error", "oom", "unsupported"])]
    if len(failed):
        lines += ["", "## Not measured", ""]
        counts = failed.groupby(["kernel", "status", "message"]).size().reset_index(name="rows")
        lines.append(markdown_table(counts))
    return "\n".join(lines) + "\n"


def _accuracy_lines(rows: pd.DataFrame) -> list[str]:
    """summary.md's accuracy section: the rows above accuracy.REL_ERR_LIMIT, or that there are none."""
    from experiments import accuracy

    over = accuracy.over_limit(rows)
    limits = ", ".join(f"{k} {v:g}" for k, v in accuracy.REL_ERR_LIMIT.items())
    if over.empty:
        return ["", f"Accuracy: every measured rel_err is within its dtype's limit ({limits})."]
    cols = ["scope", "kernel", "pass", "gqa", "seqlen", "block_size", "dtype", "rel_err", "git_commit"]
    return ["", f"## Accuracy: {len(over)} rows above their dtype's rel_err limit ({limits})", "",
            markdown_table(over[[c for c in cols if c in over.columns]], digits=4)]


PLOTS = ("ratio_vs_seqlen", "latency", "breakdown", "memory")


def write_report(df: pd.DataFrame, folder: Path) -> list[Path]:
    """results.csv's plots (one set per configuration the folder holds: plots.configurations, file
    names suffixed by the settings that differ) and summary.md."""
    folder.mkdir(parents=True, exist_ok=True)
    from experiments import decode_report

    if decode_report.is_decode_folder(df):  # scope=decode / generate: a table, no prefill plots
        (folder / "summary.md").write_text(decode_report.summary_markdown(df, markdown_table))
        return [folder / "results.csv", folder / "summary.md"] + decode_report.decode_plots(df, folder)
    rows, predicted = plots.plotted_rows(df)
    written = [folder / "results.csv"]
    configs = plots.configurations(rows) if len(rows) else []
    if len(configs) > 1:  # one set of plots per configuration; a stale mixed one would mislead
        for name in PLOTS:
            (folder / f"{name}.png").unlink(missing_ok=True)
    for suffix, sub in configs:
        made = [plots.plot_ratio(sub, predicted, folder / f"ratio_vs_seqlen{suffix}.png"),
                plots.plot_latency(sub, predicted, folder / f"latency{suffix}.png"),
                plots.plot_breakdown(sub, df, predicted, folder / f"breakdown{suffix}.png"),
                plots.plot_memory(sub, predicted, folder / f"memory{suffix}.png")]
        written += [p for p in made if p is not None]
    (folder / "summary.md").write_text(summary_markdown(df))
    return written + [folder / "summary.md"]


def main(folders: list[str]) -> None:
    from experiments import store

    for folder in map(Path, folders):
        df = store.merge(folder)
        if len(df):
            written = write_report(df, folder)
            print(f"{folder}: {len(df)} rows; wrote {', '.join(p.name for p in written)}")


if __name__ == "__main__":
    main(sys.argv[1:])
