"""The sweep's figures, from its tidy rows: measured rows (status ok) when there are any, else the
cost model's predicted rows (titles say which, and name the GPU)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
import pandas as pd  # noqa: E402

from experiments import cost_model as cm  # noqa: E402
from experiments import costs  # noqa: E402
from experiments.calibration import CALIBRATED  # noqa: E402
from experiments.timed_calls import BRANCHES  # noqa: E402
from experiments.points import Point  # noqa: E402
from experiments.schema import HardwareConfig, SelectionConfig  # noqa: E402

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
    """What predicted rows are, from their messages (experiments/calibration.py writes them)."""
    calibrated = rows["message"].astype(str).str.contains(CALIBRATED, regex=False)
    if calibrated.all():
        return "cost-model roofline calibrated on measured kernels"
    return "cost-model roofline, partly calibrated" if calibrated.any() else "roofline of the analytic cost model"


def title_of(rows: pd.DataFrame, predicted: bool, what: str) -> str:
    first = rows.iloc[0]
    gpus = ", ".join(sorted(set(rows["gpu"].astype(str))))
    heads = sorted(set(rows["kv_heads"]))
    cfg = (f"{first['scope']} attention, kv_heads={'/'.join(map(str, heads))}, d={first['head_dim']}, "
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


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ratio(rows: pd.DataFrame, predicted: bool, path: Path) -> Optional[Path]:
    ratio = nsa_fsa_ratio(rows)
    if ratio.empty:
        return None
    presets, passes = _presets(ratio), _passes(ratio)
    published = published_ratio() if comparable_to_targets(ratio) else None
    fig, axes = _grid(len(presets), len(passes))
    for i, (bs, t) in enumerate(presets):
        for j, p in enumerate(passes):
            ax = axes[i][j]
            sub = ratio[(ratio["block_size"] == bs) & (ratio["topk"] == t) & (ratio["pass"] == p)]
            for k, (g, line) in enumerate(sorted(sub.groupby("gqa"), key=lambda x: x[0])):
                line = line.sort_values("seqlen")
                ax.plot(line["seqlen"], line["ratio"], marker="o", color=f"C{k}", label=f"g={g} (ours)")
                if published is not None:
                    pub = published[(published["gqa"] == g) & (published["block"] == bs) & (published["topk"] == t)]
                    if len(pub):
                        ax.plot(pub["seqlen"], pub[p], ls="--", color=f"C{k}", alpha=0.6,
                                label=f"g={g} published kernels (H100)")
            ax.axhline(1.0, color="black", lw=1)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))  # 1 2 3 5, plain numbers
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            _seqlen_axis(ax)
            ax.set_ylabel("NSA latency / FSA latency (log; >1: FSA faster)")
            ax.set_title(f"(BS, T) = ({bs}, {t}), {p}")
            ax.legend(fontsize=7)
    fig.suptitle(title_of(rows, predicted, "NSA / FSA latency ratio"), fontsize=9)
    return _save(fig, path)


def plot_latency(rows: pd.DataFrame, predicted: bool, path: Path) -> Path:
    p = _main_pass(rows)
    rows_p = rows[rows["pass"] == p]
    presets, gqas = _presets(rows_p), sorted(set(rows_p["gqa"]))
    published = published_latency() if comparable_to_targets(rows_p) else pd.DataFrame()
    if len(published):
        published = published[published["pass"] == p]
    fig, axes = _grid(len(presets), len(gqas), width=3.6)
    for i, (bs, t) in enumerate(presets):
        for j, g in enumerate(gqas):
            ax = axes[i][j]
            sub = rows_p[(rows_p["block_size"] == bs) & (rows_p["topk"] == t) & (rows_p["gqa"] == g)]
            for kernel, line in sub.groupby("kernel"):
                line = line.sort_values("seqlen")
                ax.plot(line["seqlen"], line["median_ms"], marker="o", label=kernel,
                        color=KERNEL_COLORS.get(kernel))
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
            ax.legend(fontsize=7)
    fig.suptitle(title_of(rows, predicted, f"Latency ({p})"), fontsize=9)
    return _save(fig, path)


def plot_memory(rows: pd.DataFrame, predicted: bool, path: Path) -> Optional[Path]:
    mem = rows.dropna(subset=["peak_extra_mem_gb"])
    if mem.empty:
        return None
    p = "fwd" if "fwd" in set(mem["pass"]) else _main_pass(mem)
    mem = mem[mem["pass"] == p]
    presets = _presets(mem)
    fig, axes = _grid(1, len(presets), width=5.0, height=3.8)
    styles = ["-", "--", ":", "-."]
    for i, (bs, t) in enumerate(presets):
        ax = axes[0][i]
        sub = mem[(mem["block_size"] == bs) & (mem["topk"] == t)]
        for (kernel, g), line in sub.groupby(["kernel", "gqa"]):
            line = line.sort_values("seqlen")
            gi = sorted(set(sub["gqa"])).index(g)
            ax.plot(line["seqlen"], line["peak_extra_mem_gb"], marker=".", ls=styles[gi % 4],
                    color=KERNEL_COLORS.get(kernel), label=f"{kernel} g={g}")
        _seqlen_axis(ax)
        ax.set_ylabel(f"peak extra memory of one {p} call (GB)")
        ax.set_title(f"(BS, T) = ({bs}, {t})")
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(title_of(rows, predicted, "Extra device memory"), fontsize=9)
    return _save(fig, path)


def breakdown_table(rows: pd.DataFrame, all_rows: pd.DataFrame, predicted: bool) -> pd.DataFrame:
    """Milliseconds of the compressed / selected / window branches per module row (the largest N
    per preset and g): measured, the branch rows (scope "module/<branch>") of the same point, kernel,
    pass and GPU; predicted, the cost model's plain roofline per branch (nominal H100 peaks, not
    calibrated: branches have no fit of their own)."""
    module = rows[(rows["scope"] == "module") & (rows["kernel"] != "sdpa")]
    module = module[module["seqlen"] == module.groupby(["block_size", "gqa"])["seqlen"].transform("max")]
    module = module.sort_values(["pass", "gqa", "block_size", "kernel"], kind="stable")
    out = []
    for r in module.to_dict("records"):
        bar = {"bar": f"{r['kernel']} g={r['gqa']} ({r['block_size']},{r['topk']}) {r['pass']}"}
        if predicted:
            point = Point("selected", *(r[c] for c in POINT_COLUMNS[1:]))
            stats = cm.stats_uniform_random(point.seqlen, point.kv_heads, point.block_size, point.topk, point.batch)
            hw, sel = HardwareConfig(), SelectionConfig()
            parts = {"selected": costs.kernel_cost(r["kernel"], point, stats, sel, hw), **costs.branch_costs(point, sel)}
            for branch, c in parts.items():
                bar[branch] = cm.roofline_ms(c.for_pass(r["pass"]), hw.peak_tflops, hw.peak_gbps)
        else:
            same = all_rows[all_rows["status"] == "ok"]
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
    table = table.set_index("bar")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(table) + 3), 4.8))
    table[list(BRANCHES)].plot.bar(stacked=True, ax=ax,
                                                       color=["tab:orange", "tab:blue", "tab:green"])
    if "module total" in table:
        ax.scatter(range(len(table)), table["module total"], color="black", marker="_", s=400, zorder=3,
                   label="module attention (gated sum; no q/k/v/o projections)")
    ax.set_ylabel("latency (ms)")
    ax.set_xlabel("kernel, g, (BS, T), pass (largest N of the sweep)")
    ax.legend(title="branch (cost model)" if predicted else "branch timed alone", fontsize=8)
    fig.suptitle(title_of(rows[rows["scope"] == "module"], predicted, "NSA module breakdown"), fontsize=9)
    return _save(fig, path)

