"""The sweep's figures, from its tidy rows: measured rows (status ok) when there are any, else the
cost model's predicted rows (titles say which, and name the GPU)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from experiments.calibration import CALIBRATED  # noqa: E402
from experiments.timed_calls import BRANCHES  # noqa: E402

POINT_COLUMNS = ["scope", "gqa", "kv_heads", "head_dim", "seqlen", "batch", "block_size", "topk", "dtype", "indices"]
KERNEL_COLORS = {"nsa": "tab:red", "fsa": "tab:blue", "auto": "tab:purple", "sdpa": "tab:gray", "fla": "tab:green"}
PASS_ORDER = ["fwd", "bwd", "fwd+bwd"]
TARGETS_DIR = Path(__file__).resolve().parent.parent / "results" / "targets"
TARGETS = TARGETS_DIR / "upstream_fsa_vs_nsa_h100.csv"
PEERS = TARGETS_DIR / "peers_h100.csv"


MAIN_SCOPES = ("selected", "module")  # rows of scope "module/<branch>" only feed breakdown.png


def plotted_rows(df: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """(rows to plot, predicted?): measured rows when there are any, else predicted ones."""
    main = df[df["scope"].isin(MAIN_SCOPES)]
    ok = main[main["status"] == "ok"]
    if len(ok) or not (main["status"] == "predicted").any():
        return ok, False
    return main[main["status"] == "predicted"], True


def prediction_kind(rows: pd.DataFrame) -> str:
    """Which model made predicted rows, from their messages (experiments/calibration.py writes them):
    "cost model calibrated on <GPU> rows" or "plain roofline of the cost model (not calibrated)"."""
    messages = rows["message"].astype(str)
    calibrated = messages.str.contains(CALIBRATED, regex=False)
    gpus = sorted(set(messages.str.extractall(r"fit (?:at other block sizes )?\(([^,)]+)")[0]))
    on = f"calibrated on {', '.join(gpus) or 'measured'} rows"
    if calibrated.all():
        return f"cost model {on}"
    return f"cost model, partly {on}, else plain roofline" if calibrated.any() else \
        "plain roofline of the cost model (not calibrated)"


CONFIG_COLUMNS = ["scope", "head_dim", "batch", "dtype", "indices", "gpu"]  # no plot facets on these


def configurations(rows: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The rows split by every setting no plot facets on (scope, head dim, batch, dtype, indices,
    GPU, and the heads unless q_heads or kv_heads is the same in all rows), as (file-name suffix,
    rows): one ("", rows) when the folder holds one configuration, so that no plot ever mixes two."""
    columns = [c for c in CONFIG_COLUMNS if rows[c].nunique() > 1]
    if rows["kv_heads"].nunique() > 1 and rows["q_heads"].nunique() > 1:
        columns.append("kv_heads")
    if not columns:
        return [("", rows)]
    out = []
    for values, sub in rows.groupby(columns, sort=True):
        values = values if isinstance(values, tuple) else (values,)
        suffix = "".join(f"_{c}-{re.sub(r'[^A-Za-z0-9.+-]+', '_', str(v))}" for c, v in zip(columns, values))
        out.append((suffix, sub))
    return out


def title_of(rows: pd.DataFrame, predicted: bool, what: str) -> str:
    first = rows.iloc[0]
    gpus = ", ".join(sorted(set(rows["gpu"].astype(str))))
    kv, hq = sorted(set(rows["kv_heads"])), sorted(set(rows["q_heads"]))
    heads = (f"kv_heads={kv[0]}" if len(kv) == 1 else f"q_heads={hq[0]} (kv_heads={'/'.join(map(str, kv))})"
             if len(hq) == 1 else f"kv_heads={'/'.join(map(str, kv))}")
    cfg = (f"{first['scope']} attention, {heads}, d={first['head_dim']}, "
           f"{first['dtype']}, indices={first['indices']}, batch={first['batch']}")
    mode = f" [predicted: {prediction_kind(rows)}]" if predicted else ""
    return f"{what} on {gpus}{mode}\n{cfg}"


def _seqlen_axis(ax) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length N (tokens)")


def _passes(rows: pd.DataFrame) -> list[str]:
    return [p for p in PASS_ORDER if p in set(rows["pass"])]


def _main_pass(rows: pd.DataFrame) -> str:
    present = _passes(rows)
    return "fwd+bwd" if "fwd+bwd" in present else present[0]


def _presets(rows: pd.DataFrame) -> list[tuple[int, int]]:
    return sorted(set(zip(rows["block_size"], rows["topk"])))


def nsa_fsa_ratio(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per point and pass with ratio = NSA median / FSA median."""
    keys = POINT_COLUMNS + ["pass"]
    nsa = rows[rows["kernel"] == "nsa"][keys + ["median_ms"]]
    fsa = rows[rows["kernel"] == "fsa"][keys + ["median_ms"]]
    both = nsa.merge(fsa, on=keys, suffixes=("_nsa", "_fsa"))
    both["ratio"] = both["median_ms_nsa"] / both["median_ms_fsa"]
    return both


def published_ratio() -> Optional[pd.DataFrame]:
    """NSA / FSA latency of the published kernels on our H100, one column per pass."""
    if not TARGETS.exists():
        return None
    t = pd.read_csv(TARGETS)
    t["fwd+bwd"] = (t["nsa_fwd_ms"] + t["nsa_bwd_ms"]) / (t["fsa_fwd_ms"] + t["fsa_bwd_ms"])
    t["fwd"] = t["nsa_fwd_ms"] / t["fsa_fwd_ms"]
    t["bwd"] = t["nsa_bwd_ms"] / t["fsa_bwd_ms"]
    return t


def published_latency() -> pd.DataFrame:
    """Published kernels on our H100 (results/targets, 4 KV heads, d=128, bf16, selected attention),
    long form: gqa, seqlen, block_size, topk, kernel, pass, median_ms."""
    frames = []
    sources = ((TARGETS, {"nsa": "nsa", "fsa": "fsa"}), (PEERS, {"fla": "fla", "sdpa": "sdpa_causal"}))
    for path, kernels in sources:
        if not path.exists():
            continue
        t = pd.read_csv(path)
        for kernel, prefix in kernels.items():
            fwd, bwd = t.get(f"{prefix}_fwd_ms"), t.get(f"{prefix}_bwd_ms")
            for p, ms in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", None if fwd is None or bwd is None else fwd + bwd)):
                if ms is not None:
                    frames.append(pd.DataFrame({"gqa": t["gqa"], "seqlen": t["seqlen"], "block_size": t["block"],
                                                "topk": t["topk"], "kernel": kernel, "pass": p,
                                                "median_ms": pd.to_numeric(ms, errors="coerce")}))
    return pd.concat(frames, ignore_index=True).dropna() if frames else pd.DataFrame()


def comparable_to_targets(rows: pd.DataFrame) -> bool:
    return (set(rows["kv_heads"]) == {4} and set(rows["head_dim"]) == {128} and set(rows["scope"]) == {"selected"}
            and set(rows["dtype"]) == {"bfloat16"} and set(rows["batch"]) == {1})


def _grid(nrows: int, ncols: int, width: float = 4.2, height: float = 3.3):
    # at least 8.4 inches wide: the two-line config title must fit a one-column grid
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(width * ncols, 8.4), height * nrows + 0.8), squeeze=False)
    return fig, axes


def _save(fig, path: Path, legend_outside: bool = False) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight" if legend_outside else None)
    plt.close(fig)
    return path


def _figure_legend(fig, axes, extra: tuple = (), title: Optional[str] = None) -> None:
    """One legend for the whole figure, right of the panels (it covers no data): every label of
    every panel once, then `extra` (handle, label) pairs."""
    entries: dict = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    for handle, label in extra:
        entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries.keys()), loc="upper left", bbox_to_anchor=(1.0, 0.93),
                   fontsize=8, title=title, title_fontsize=8, frameon=False)


SUM_OF_CALLS = "fwd+bwd: the sum of their fwd and bwd timed as separate calls"
G_STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1, 1, 1)), "v"),
            ((0, (1, 3)), "P"), ((0, (8, 2)), "X"), ((0, (3, 1, 3, 3)), "*"), ((0, (2, 2, 6, 2)), "h")]


def _g_style(i: int) -> tuple:
    """(linestyle, marker) of the i-th g: all distinct up to 9 values, then distinct pairs up to 36+."""
    ls, _ = G_STYLES[i % len(G_STYLES)]
    return ls, G_STYLES[(i + i // len(G_STYLES)) % len(G_STYLES)][1]


def auto_label(rows: pd.DataFrame, value: str = "median_ms") -> str:
    """"auto", saying which family it equals where its line lies exactly on another one's."""
    keys = POINT_COLUMNS + ["pass"]
    auto = rows[rows["kernel"] == "auto"][keys + [value]].reset_index(drop=True)
    same = {}
    for family in ("fsa", "nsa"):
        both = auto.merge(rows[rows["kernel"] == family][keys + [value]], on=keys, how="left", suffixes=("", "_f"))
        same[family] = np.isclose(both[value], both[f"{value}_f"], rtol=1e-6)
    if not len(auto):
        return "auto"
    if same["fsa"].all() or same["nsa"].all():
        return f"auto (= {'fsa' if same['fsa'].all() else 'nsa'} at every point here, drawn over it)"
    if (same["fsa"] | same["nsa"]).all():
        return "auto (= the family it picks at every point, drawn over it)"
    return "auto"


def plot_ratio(rows: pd.DataFrame, predicted: bool, path: Path) -> Optional[Path]:
    ratio = nsa_fsa_ratio(rows)
    if ratio.empty:
        return None
    presets, passes = _presets(ratio), _passes(ratio)
    published = published_ratio() if comparable_to_targets(ratio) else None
    fig, axes = _grid(len(presets), len(passes))
    drawn_published = False
    for i, (bs, t) in enumerate(presets):
        for j, p in enumerate(passes):
            ax = axes[i][j]
            sub = ratio[(ratio["block_size"] == bs) & (ratio["topk"] == t) & (ratio["pass"] == p)]
            for k, (g, line) in enumerate(sorted(sub.groupby("gqa"), key=lambda x: x[0])):
                line = line.sort_values("seqlen")
                ax.plot(line["seqlen"], line["ratio"], marker="o", color=f"C{k}", label=f"g={g}")
                if published is not None:
                    pub = published[(published["gqa"] == g) & (published["block"] == bs) & (published["topk"] == t)]
                    if len(pub):
                        ax.plot(pub["seqlen"], pub[p], ls="--", color=f"C{k}", alpha=0.6)
                        drawn_published = True
            ax.axhline(1.0, color="black", lw=1)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))  # 1 2 3 5, plain numbers
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            _seqlen_axis(ax)
            ax.set_ylabel("NSA latency / FSA latency (log; >1: FSA faster)")
            ax.set_title(f"(BS, T) = ({bs}, {t}), {p}")
    extra = []
    if drawn_published:
        note = f";\n{SUM_OF_CALLS}" if "fwd+bwd" in passes else ""
        extra = [(Line2D([], [], color="black", marker="o"), "ours (solid)"),
                 (Line2D([], [], color="black", ls="--", alpha=0.6),
                  f"published kernels on the H100\n(dashed, same colour per g{note})")]
    _figure_legend(fig, axes, tuple(extra))
    fig.suptitle(title_of(rows, predicted, "NSA / FSA latency ratio"), fontsize=9)
    return _save(fig, path, legend_outside=True)


def _draw_kernel(ax, kernel: str, x, y, label: str, **style) -> None:
    """A kernel's line; auto thinner, hollow and on top, so that the family under it stays visible."""
    if kernel == "auto":
        style.update(lw=1.0, ms=8, mfc="none", mew=1.2, zorder=3)
    ax.plot(x, y, color=KERNEL_COLORS.get(kernel), label=label, **style)


def plot_latency(rows: pd.DataFrame, predicted: bool, path: Path) -> Path:
    p = _main_pass(rows)
    rows_p = rows[rows["pass"] == p]
    presets, gqas = _presets(rows_p), sorted(set(rows_p["gqa"]))
    published = published_latency() if comparable_to_targets(rows_p) else pd.DataFrame()
    if len(published):
        published = published[published["pass"] == p]
    auto = auto_label(rows_p)
    fig, axes = _grid(len(presets), len(gqas), width=3.6)
    for i, (bs, t) in enumerate(presets):
        for j, g in enumerate(gqas):
            ax = axes[i][j]
            sub = rows_p[(rows_p["block_size"] == bs) & (rows_p["topk"] == t) & (rows_p["gqa"] == g)]
            for kernel, line in sorted(sub.groupby("kernel"), key=lambda x: x[0] == "auto"):  # auto last: on top
                line = line.sort_values("seqlen")
                _draw_kernel(ax, kernel, line["seqlen"], line["median_ms"], auto if kernel == "auto" else kernel,
                             marker="o")
            if len(published):
                pub = published[(published["block_size"] == bs) & (published["topk"] == t) & (published["gqa"] == g)]
                for kernel, line in pub.groupby("kernel"):
                    line = line.sort_values("seqlen")
                    ax.plot(line["seqlen"], line["median_ms"], ls="--", alpha=0.6, color=KERNEL_COLORS.get(kernel),
                            label=f"published {kernel} (H100)")
            ax.set_yscale("log")
            _seqlen_axis(ax)
            ax.set_ylabel(f"{p} latency (ms, log)")
            ax.set_title(f"g={g}, (BS, T) = ({bs}, {t})")
    note = f"dashed: published kernels\n({SUM_OF_CALLS.replace(': the', ' =')})" if len(published) and p == "fwd+bwd" \
        else None
    _figure_legend(fig, axes, title=note)
    fig.suptitle(title_of(rows, predicted, f"Latency ({p})"), fontsize=9)
    return _save(fig, path, legend_outside=True)


def plot_memory(rows: pd.DataFrame, predicted: bool, path: Path) -> Optional[Path]:
    mem = rows.dropna(subset=["peak_extra_mem_gb"])
    if mem.empty:
        return None
    p = "fwd" if "fwd" in set(mem["pass"]) else _main_pass(mem)
    mem = mem[mem["pass"] == p]
    presets, gqas = _presets(mem), sorted(set(mem["gqa"]))
    auto = auto_label(mem, "peak_extra_mem_gb")
    fig, axes = _grid(1, len(presets), width=5.0, height=3.8)
    for i, (bs, t) in enumerate(presets):
        ax = axes[0][i]
        sub = mem[(mem["block_size"] == bs) & (mem["topk"] == t)]
        for (kernel, g), line in sorted(sub.groupby(["kernel", "gqa"]), key=lambda x: (x[0][0] == "auto", x[0])):
            line = line.sort_values("seqlen")
            ls, marker = _g_style(gqas.index(g))
            _draw_kernel(ax, kernel, line["seqlen"], line["peak_extra_mem_gb"], "auto" if kernel == "auto" else kernel,
                         ls=ls, marker=marker, ms=5)
        _seqlen_axis(ax)
        ax.set_ylabel(f"peak extra memory of one {p} call (GB)")
        ax.set_title(f"(BS, T) = ({bs}, {t})")
    kernels = [k for k in KERNEL_COLORS if k in set(mem["kernel"])]
    extra = [(Line2D([], [], color=KERNEL_COLORS[k], lw=1.0 if k == "auto" else 1.5), auto if k == "auto" else k)
             for k in kernels]
    extra += [(Line2D([], [], color="black", ls=_g_style(i)[0], marker=_g_style(i)[1], ms=5), f"g={g}")
              for i, g in enumerate(gqas)]
    for ax in axes.flat:  # the figure legend lists colours (kernels) and styles (g) once each
        for line in ax.get_lines():
            line.set_label("_")
    _figure_legend(fig, axes, tuple(extra), title="colour: kernel; line and marker: g")
    fig.suptitle(title_of(rows, predicted, "Extra device memory"), fontsize=9)
    return _save(fig, path, legend_outside=True)


def breakdown_table(rows: pd.DataFrame, all_rows: pd.DataFrame, predicted: bool) -> pd.DataFrame:
    """Milliseconds of the compressed / selected / window branches per module row (the largest N
    per preset and g): the branch rows (scope "module/<branch>") of the same point, kernel, pass and
    GPU, and the module's own time. Measured, each branch timed alone; predicted, the module's
    prediction shared by the branches (experiments/calibration.py::predicted_branch_ms, the same
    model, calibrated or not, as the module rows and summary.md), so they sum to it."""
    module = rows[(rows["scope"] == "module") & (rows["kernel"] != "sdpa")]
    module = module[module["seqlen"] == module.groupby(["block_size", "gqa"])["seqlen"].transform("max")]
    module = module.sort_values(["pass", "gqa", "block_size", "kernel"], kind="stable")
    status = "predicted" if predicted else "ok"
    out = []
    for r in module.to_dict("records"):
        bar = {"pass": r["pass"], "bar": f"{r['kernel']} g={r['gqa']} ({r['block_size']},{r['topk']})"}
        same = all_rows[all_rows["status"] == status]
        for c in POINT_COLUMNS[1:] + ["kernel", "pass", "gpu"]:
            same = same[same[c] == r[c]]
        for branch in BRANCHES:
            hit = same[same["scope"] == f"module/{branch}"]["median_ms"]
            bar[branch] = float(hit.iloc[0]) if len(hit) else float("nan")
        bar["module total"] = r["median_ms"]
        out.append(bar)
    return pd.DataFrame(out)


def plot_breakdown(rows: pd.DataFrame, all_rows: pd.DataFrame, predicted: bool, path: Path) -> Optional[Path]:
    table = breakdown_table(rows, all_rows, predicted)
    if table.empty or table[list(BRANCHES)].isna().all().all():  # no branch timed (breakdown=false)
        return None
    passes = [p for p in PASS_ORDER if p in set(table["pass"])]
    most = max((table["pass"] == p).sum() for p in passes)
    fig, axes = plt.subplots(len(passes), 1, figsize=(max(7.0, 0.45 * most + 3), 3.2 * len(passes) + 1.0),
                             squeeze=False)
    for ax, p in zip(axes[:, 0], passes):
        sub = table[table["pass"] == p].set_index("bar")
        sub[list(BRANCHES)].plot.bar(stacked=True, ax=ax, color=["tab:orange", "tab:blue", "tab:green"], legend=False,
                                     rot=30)
        ax.scatter(range(len(sub)), sub["module total"], color="black", marker="_", s=400, zorder=3,
                   label="module attention (gated sum; no q/k/v/o projections)")
        ax.set_ylabel(f"{p} latency (ms)")
        ax.set_xlabel("")
        ax.set_title(p, fontsize=9)
        for label in ax.get_xticklabels():
            label.set_ha("right")
    axes[-1][0].set_xlabel("kernel, g, (BS, T) (largest N of the sweep)")
    title = ("branch: its share of the module's prediction\n(by the branches' plain rooflines)" if predicted
             else "branch timed alone")
    _figure_legend(fig, axes, title=title)
    fig.suptitle(title_of(rows[rows["scope"] == "module"], predicted, "NSA module breakdown"), fontsize=9)
    return _save(fig, path, legend_outside=True)

