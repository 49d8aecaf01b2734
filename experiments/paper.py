"""Entry point: `python -m experiments.paper [figure=...]` puts each FSA paper figure / table beside
ours: a PNG and a markdown table per figure under results/paper/, with the paper's number, ours
(read from the sweep CSVs under results/, "not measured" where no sweep has the point) and the
ratio ours / paper, naming the GPU. Without measurements it still writes the theory figure
(Figure 2) and every table, and says so.

Rows are read from every folder's results.csv and rows/ (a sweep cut short still counts).
Which sweep feeds what (each is `python -m experiments.sweep paper=<preset>`): fig3 -> Figure 3,
fig4 -> Figure 4, fig7_8 (+ fig8_selected) -> Figures 7 and 8, table5 -> Table 5, tables67 -> Tables 6-7.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import hydra
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from experiments import cost_model as cm  # noqa: E402
from experiments import paper_numbers as pn  # noqa: E402
from experiments import store  # noqa: E402
from experiments.plots import TARGETS  # noqa: E402
from experiments.report import markdown_table  # noqa: E402
from experiments.schema import PAPER_FIGURES, register_configs, validate_paper  # noqa: E402

NOT_MEASURED = "not measured"
SKIPPED_FOLDERS = ("paper", "targets")

register_configs()


def load_measured(results_dir: Path) -> pd.DataFrame:
    """Every row of every sweep under results_dir (merged or not yet), with the sweep's folder name
    (`pick` keeps the ok ones; `failure` reports the others)."""
    frames = []
    for folder in sorted(p for p in results_dir.glob("*") if p.is_dir() and p.name not in SKIPPED_FOLDERS):
        frames.append(store.read_rows(folder).assign(sweep=folder.name))
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def matching(df: pd.DataFrame, **equal) -> pd.DataFrame:
    """Rows whose column `col` equals `val` for every col=val given."""
    for col, val in equal.items():
        df = df[df[col] == val]
    return df


def pick(df: pd.DataFrame, prefer: str, status: str = "ok", one_gpu: bool = True, **equal) -> pd.DataFrame:
    """Rows of `status` matching `equal`, from the sweep folder `prefer` when it has any, and (one_gpu)
    from one GPU only, the one with the most such rows: a ratio never divides times of two GPUs."""
    if df.empty:
        return df
    df = matching(df[df["status"] == status], **equal)
    preferred = df[df["sweep"] == prefer]
    df = preferred if len(preferred) else df
    if one_gpu and len(df):
        counts = df["gpu"].astype(str).value_counts()
        main_gpu = sorted(counts[counts == counts.max()].index)[0]
        df = df[df["gpu"].astype(str) == main_gpu]
    return df


def median(df: pd.DataFrame, **equal) -> Optional[float]:
    if df.empty:
        return None
    df = matching(df, **equal)
    return float(df["median_ms"].iloc[-1]) if len(df) else None


def gpus(df: pd.DataFrame) -> str:
    return ", ".join(sorted(set(df["gpu"].astype(str)))) if len(df) else NOT_MEASURED


def fmt(x: Optional[float], failed: Optional[str] = None) -> object:
    """x, or why there is none: the status of a failed measurement (e.g. "oom"), else "not measured"."""
    return (failed or NOT_MEASURED) if x is None else x


def failure(df: pd.DataFrame, prefer: str, **equal) -> Optional[str]:
    """The status ("oom", "error", ...) of a point that was tried and has no ok row, else None."""
    for status in ("oom", "error", "unsupported"):
        if len(pick(df, prefer, status=status, one_gpu=False, **equal)):
            return status
    return None


def over(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b == 0 else a / b


def header(title: str, rows: pd.DataFrame, note: str) -> str:
    return f"# {title}\n\nOurs measured on: {gpus(rows)}. Paper: {pn.SOURCE}. {note}\n\n"


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- figures
def fig2(df: pd.DataFrame, out: Path) -> str:
    n, d, h = 65536, 128, 4
    rows = []
    for bs, t in pn.PRESETS:
        for g in (1, 2, 4, 8):
            mem, flops = cm.paper_ratios(n, d, g * h, h, bs, t)
            s = cm.stats_uniform_random(n, h, bs, t)
            nsa, fsa = cm.nsa_cost(s, g, d), cm.fsa_cost(s, g, d)
            paper = pn.FIG2_INFERRED.get(g) if (bs, t) == (64, 16) else ("not in paper",) * 2
            rows.append({"(BS,T)": f"({bs},{t})", "g": g,
                         "paper mem FSA/NSA [inferred]": paper[0],
                         "formula mem FSA/NSA": mem, "exact mem FSA/NSA": fsa.bytes / nsa.bytes,
                         "paper FLOPs FSA/NSA [inferred]": paper[1],
                         "formula FLOPs FSA/NSA": flops, "exact FLOPs FSA/NSA": fsa.flops / nsa.flops})
    table = pd.DataFrame(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, what in zip(axes, ("mem", "FLOPs")):
        for i, (bs, t) in enumerate(pn.PRESETS):
            sub = table[table["(BS,T)"] == f"({bs},{t})"]
            x = [j + 0.2 * (2 * i - 1) for j in range(len(sub))]
            ax.bar([v - 0.1 for v in x], 1 / sub[f"formula {what} FSA/NSA"], width=0.2, label=f"paper formula ({bs},{t})")
            ax.bar([v + 0.1 for v in x], 1 / sub[f"exact {what} FSA/NSA"], width=0.2, label=f"exact counts ({bs},{t})")
        ax.axhline(1.0, color="black", lw=1)
        ax.set_xticks(range(4), [f"g={g}" for g in (1, 2, 4, 8)])
        ax.set_ylabel(f"NSA {what} / FSA {what} (FSA = 1)")
        ax.set_title(f"{'memory traffic' if what == 'mem' else 'FLOPs'}, N=64K, 4 KV heads, d=128")
        ax.legend(fontsize=7)
    fig.suptitle("Figure 2 (theory): NSA cost normalised to FSA; exact = random causal indices, NSA G tile "
                 "padded to max(16, next_pow2(g))", fontsize=9)
    save(fig, out / "fig2.png")
    note = (f"Text: FSA/NSA memory {pn.FIG2_TEXT['memory']:.1%}, FLOPs {pn.FIG2_TEXT['flops']:.1%} at g=4, (64,16). "
            "Theory only: no GPU needed. 'formula' = the paper's App. E formulas (NSA loads T/2 blocks, "
            "8-row tile); 'exact' = experiments/cost_model.py counts of random causal indices (every valid "
            "block loaded whole, G tile padded to max(16, next_pow2(g)) rows, FSA stats + reduction included).")
    return header("Figure 2: theoretical memory traffic and FLOPs", pd.DataFrame(), note) + markdown_table(table)


def fig3(df: pd.DataFrame, out: Path) -> str:
    ours = pick(df, "fig3", scope="selected", seqlen=65536, kv_heads=4, block_size=64, topk=16)
    published = pd.read_csv(TARGETS) if TARGETS.exists() else pd.DataFrame()
    rows = []
    for g in (1, 2, 3, 4, 5, 6, 7, 8, 16):
        pub = published[(published["gqa"] == g) & (published["seqlen"] == 65536) & (published["block"] == 64)] \
            if len(published) else published
        for p in ("fwd", "bwd", "fwd+bwd"):
            ratio = over(median(ours, gqa=g, kernel="nsa", **{"pass": p}), median(ours, gqa=g, kernel="fsa", **{"pass": p}))
            pub_ratio = None
            if len(pub) and p != "fwd+bwd":
                pub_ratio = float(pub[f"nsa_{p}_ms"].iloc[0] / pub[f"fsa_{p}_ms"].iloc[0])
            rows.append({"g": g, "pass": p, "paper NSA/FSA": "not recoverable",
                         "published kernels on H100 NSA/FSA": fmt(pub_ratio), "ours NSA/FSA": fmt(ratio),
                         "ours / published": fmt(over(ratio, pub_ratio))})
    table = pd.DataFrame(rows)
    measured = table[table["ours NSA/FSA"] != NOT_MEASURED]
    if len(measured):
        fig, ax = plt.subplots(figsize=(8, 4))
        for p, sub in measured.groupby("pass"):
            ax.plot(sub["g"], sub["ours NSA/FSA"].astype(float), marker="o", label=f"ours {p}")
        pubs = table[(table["published kernels on H100 NSA/FSA"] != NOT_MEASURED)]
        for p, sub in pubs.groupby("pass"):
            ax.plot(sub["g"], sub["published kernels on H100 NSA/FSA"].astype(float), ls="--", label=f"published {p}")
        ax.axhline(1.0, color="black", lw=1)
        ax.set_xlabel("GQA group size g")
        ax.set_ylabel("NSA latency / FSA latency")
        ax.set_title(f"Figure 3: 64K tokens, 4 KV heads, (64,16), on {gpus(ours)}")
        ax.legend(fontsize=8)
        save(fig, out / "fig3.png")
    note = "The paper's bar values were not recoverable; the published kernels measured on our H100 stand in."
    return header("Figure 3: NSA / FSA latency vs g at 64K", ours, note) + markdown_table(table)


def fig4(df: pd.DataFrame, out: Path) -> str:
    ours = pick(df, "fig4", scope="module", q_heads=64, **{"pass": "fwd+bwd"})
    rows = []
    for (gpu, bs, t, g), (nsa_r, fa_r) in pn.FIG4.items():
        if gpu != "H200":
            continue
        h20 = pn.FIG4[("H20", bs, t, g)]
        for i, n in enumerate(pn.SEQLENS_FIG4):
            fsa = median(ours, gqa=g, seqlen=n, block_size=bs, kernel="fsa")
            nsa_ours = over(median(ours, gqa=g, seqlen=n, block_size=bs, kernel="nsa"), fsa)
            fa_ours = over(median(ours, gqa=g, seqlen=n, block_size=bs, kernel="sdpa"), fsa)
            rows.append({"(BS,T)": f"({bs},{t})", "g": g, "N": n, "paper H20 NSA/FSA": h20[0][i],
                         "paper H200 NSA/FSA": nsa_r[i], "ours NSA/FSA": fmt(nsa_ours),
                         "ours / H200": fmt(over(nsa_ours, nsa_r[i])), "paper H200 FA/FSA": fa_r[i],
                         "ours FA/FSA": fmt(fa_ours), "ours / H200 (FA)": fmt(over(fa_ours, fa_r[i]))})
    table = pd.DataFrame(rows)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, (bs, t) in zip(axes, pn.PRESETS):
        sub = table[table["(BS,T)"] == f"({bs},{t})"]
        for k, (g, line) in enumerate(sub.groupby("g")):
            ax.plot(line["N"], line["paper H200 NSA/FSA"], ls="--", color=f"C{k}", label=f"g={g} paper H200")
            mine = line[line["ours NSA/FSA"] != NOT_MEASURED]
            if len(mine):
                ax.plot(mine["N"], mine["ours NSA/FSA"].astype(float), marker="o", color=f"C{k}", label=f"g={g} ours")
        ax.axhline(1.0, color="black", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length N (tokens)")
        ax.set_ylabel("NSA / FSA fwd+bwd latency")
        ax.set_title(f"(BS,T)=({bs},{t}); ours on {gpus(ours)}")
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Figure 4: module fwd+bwd latency ratio, 64 query heads, d=128", fontsize=9)
    save(fig, out / "fig4.png")
    note = "Paper values are bar labels [fig-label]; some H200 labels are uncertain [?] (see NUMBERS.md 1.7)."
    return header("Figure 4: kernel latency grid (NSA/FSA and FA/FSA)", ours, note) + markdown_table(table)


def speedups(ours: pd.DataFrame, baseline: str, p: str) -> list[float]:
    out = []
    if ours.empty:
        return out
    for (g, bs), sub in ours[ours["pass"] == p].groupby(["gqa", "block_size"]):
        r = over(median(sub, kernel=baseline), median(sub, kernel="fsa"))
        if r is not None:
            out.append(r)
    return out


def fig7(df: pd.DataFrame, out: Path) -> str:
    ours = pick(df, "fig7_8", scope="module", seqlen=65536, q_heads=64)
    rows = []
    for (p, base), (mx, mean) in pn.FIG7.items():
        sp = speedups(ours, base, p)
        rows.append({"metric": f"FSA speedup over {base} ({p})", "paper max": mx, "paper mean": mean,
                     "ours max": fmt(max(sp) if sp else None), "ours mean": fmt(sum(sp) / len(sp) if sp else None),
                     "ours/paper (mean)": fmt(over(sum(sp) / len(sp), mean) if sp else None)})
    if len(ours):
        fig, ax = plt.subplots(figsize=(10, 4))
        piv = ours.pivot_table(index=["gqa", "block_size", "pass"], columns="kernel", values="median_ms")
        piv.plot.bar(ax=ax, logy=True)
        ax.set_ylabel("latency (ms, log)")
        ax.set_xlabel("(g, BS, pass)")
        ax.set_title(f"Figure 7: module forward vs backward, 64K, 64 query heads, on {gpus(ours)}")
        save(fig, out / "fig7.png")
    return header("Figure 7: forward vs backward", ours, "Paper numbers are the text's maxima and means "
                  "over its 8 panels.") + markdown_table(pd.DataFrame(rows))


def fig8(df: pd.DataFrame, out: Path) -> str:
    ours = pick(df, "fig7_8", seqlen=65536, q_heads=64)
    shares, speed = [], []
    for (g, bs, p), sub in (ours.groupby(["gqa", "block_size", "pass"]) if len(ours) else []):
        parts = [median(sub, kernel="nsa", scope=f"module/{b}") for b in ("compressed", "selected", "window")]
        if None not in parts:
            shares.append(parts[1] / sum(parts))
        r = over(median(sub, kernel="nsa", scope="selected"), median(sub, kernel="fsa", scope="selected"))
        if r is not None:
            speed.append(r)
    rows = [{"metric": "selected share of NSA attention time", "paper max": pn.FIG8_SELECTED_SHARE[0],
             "paper mean": pn.FIG8_SELECTED_SHARE[1], "ours max": fmt(max(shares) if shares else None),
             "ours mean": fmt(sum(shares) / len(shares) if shares else None)},
            {"metric": "FSA selected-branch speedup over NSA", "paper max": pn.FIG8_SELECTED_SPEEDUP[0],
             "paper mean": pn.FIG8_SELECTED_SPEEDUP[1], "ours max": fmt(max(speed) if speed else None),
             "ours mean": fmt(sum(speed) / len(speed) if speed else None)}]
    branches = ours[ours["scope"].str.startswith("module/")] if len(ours) else ours
    if len(branches):
        fig, ax = plt.subplots(figsize=(10, 4))
        piv = branches.pivot_table(index=["kernel", "gqa", "block_size", "pass"], columns="scope", values="median_ms")
        piv.plot.bar(stacked=True, ax=ax)
        ax.set_ylabel("latency (ms)")
        ax.set_xlabel("(kernel, g, BS, pass)")
        ax.set_title(f"Figure 8: compressed / selected / window, 64K, 64 query heads, on {gpus(branches)}")
        save(fig, out / "fig8.png")
    return header("Figure 8: per-branch breakdown", ours, "Paper numbers are from its text.") + \
        markdown_table(pd.DataFrame(rows))


def table5(df: pd.DataFrame, out: Path) -> str:
    ours = pick(df, "table5", kernel="fsa", scope="selected", head_dim=128, **{"pass": "fwd"})
    rows = []
    for (bs, t), by_n in pn.TABLE5.items():
        for n, gb in by_n.items():
            sub = ours[(ours["block_size"] == bs) & (ours["seqlen"] == n)] if len(ours) else ours
            mine = float(sub["peak_extra_mem_gb"].iloc[-1]) if len(sub) else None
            rows.append({"(BS,T)": f"({bs},{t})", "N": n, "paper GB": gb, "ours peak extra GB": fmt(mine),
                         "ours / paper": fmt(over(mine, gb))})
    table = pd.DataFrame(rows)
    mine = table[table["ours peak extra GB"] != NOT_MEASURED]
    if len(mine):
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, sub in table.groupby("(BS,T)"):
            ax.plot(sub["N"], sub["paper GB"], ls="--", marker="x", label=f"paper {key}")
        for key, sub in mine.groupby("(BS,T)"):
            ax.plot(sub["N"], sub["ours peak extra GB"].astype(float), marker="o", label=f"ours {key}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length N (tokens)")
        ax.set_ylabel("FSA extra memory (GB)")
        ax.set_title(f"Table 5: FSA buffer memory, on {gpus(ours)}")
        ax.legend(fontsize=8)
        save(fig, out / "table5.png")
    return header("Table 5: FSA buffer memory", ours, "The paper does not state head counts; ours is the "
                  "extra memory of one forward (sweep preset table5: 4 KV heads, g=1).") + markdown_table(table)


def tables67_figure(table: pd.DataFrame, gpu: str):
    """One panel per (pass, N): bars of ours per (preset, g) and kernel, the paper's H200 value as a
    black tick over each bar; a missing bar says why (oom / not measured). Log scale: dense attention
    is 3-10x the sparse kernels."""
    kernels = [k for k, _ in pn.TABLE67_COLUMNS[:3]]
    groups = list(dict.fromkeys(zip(table["(BS,T)"], table["g"])))
    fig, axes = plt.subplots(2, 2, figsize=(13, 7), sharey=True)
    for row, p in enumerate(("fwd", "fwd+bwd")):
        for col, n in enumerate(sorted(table["N"].unique())):
            ax = axes[row][col]
            for j, kernel in enumerate(kernels):
                sub = table[(table["pass"] == p) & (table["N"] == n) & (table["kernel"] == kernel)]
                sub = sub.set_index(["(BS,T)", "g"]).reindex(groups)
                x = [i + (j - 1) * 0.27 for i in range(len(groups))]
                ours = pd.to_numeric(sub["ours s"], errors="coerce")
                elsewhere = (sub["ours GPU"] != gpu) & ours.notna()  # measured on another GPU: hatched
                bars = ax.bar(x, ours.fillna(0), width=0.27, color=f"C{j}", label=f"{kernel} ours")
                for bar, e in zip(bars, elsewhere):
                    bar.set_hatch("//" if e else None)
                ax.scatter(x, sub["paper H200 s"], marker="_", s=120, color="black",
                           label="paper H200" if j == 0 else None, zorder=3)
                for xi, v, txt in zip(x, ours, sub["ours s"]):
                    if pd.isna(v):
                        ax.text(xi, 0.12, str(txt).replace("not measured", "n/m"), rotation=90, ha="center",
                                va="bottom", fontsize=7)
            ax.set_yscale("log")
            ax.set_ylim(0.1, 30)
            ax.set_xticks(range(len(groups)), [f"{bt}\ng={g}" for bt, g in groups], fontsize=7)
            ax.set_title(f"{p}, N = {n // 1024}K", fontsize=9)
            if col == 0:
                ax.set_ylabel("latency (s, log)")
    axes[0][0].legend(fontsize=7, ncol=2)
    others = sorted(set(table["ours GPU"]) - {gpu, ""})
    also = f" (hatched: {', '.join(others)})" if others else ""
    fig.suptitle(f"Tables 6-7: NSA module latency, 64 query heads, d=128; ours on {gpu}{also}, paper on H200",
                 fontsize=10)
    fig.tight_layout()
    return fig


def tables67(df: pd.DataFrame, out: Path) -> str:
    """Each point from the GPU with the most rows; a point only another GPU measured (e.g. one that
    needs more memory) comes from that GPU, named in the "ours GPU" column and hatched in the figure."""
    where = dict(scope="module", q_heads=64, head_dim=128)
    ours = pick(df, "tables67", **where)
    main_gpu = gpus(ours)
    everyone = pick(df, "tables67", one_gpu=False, **where)
    rows = []
    for key, h200 in pn.TABLE7_H200.items():
        bs, t, g, n = key
        for (kernel, p), paper_h200, paper_h20 in zip(pn.TABLE67_COLUMNS, h200, pn.TABLE6_H20[key]):
            point = dict(block_size=bs, gqa=g, seqlen=n, kernel=kernel, **{"pass": p})
            ms, gpu = median(ours, **point), main_gpu
            if ms is None and len(everyone):
                other = matching(everyone[everyone["gpu"].astype(str) != main_gpu], **point)
                if len(other):
                    ms, gpu = float(other["median_ms"].iloc[-1]), str(other["gpu"].iloc[-1])
            mine = None if ms is None else ms / 1e3
            failed = failure(df, "tables67", **where, **point)
            rows.append({"(BS,T)": f"({bs},{t})", "g": g, "N": n, "kernel": kernel, "pass": p,
                         "paper H20 s": paper_h20, "paper H200 s": paper_h200, "ours s": fmt(mine, failed),
                         "ours / H200": fmt(over(mine, paper_h200)), "ours GPU": gpu if mine is not None else ""})
    table = pd.DataFrame(rows)
    if pd.to_numeric(table["ours s"], errors="coerce").notna().any():
        save(tables67_figure(table, main_gpu), out / "tables67.png")
    return header("Tables 6 and 7: 128K / 256K latency", everyone, "FA = full attention (ours: SDPA).") + \
        markdown_table(table)


MAKERS = {"fig2": fig2, "fig3": fig3, "fig4": fig4, "fig7": fig7, "fig8": fig8, "table5": table5,
          "tables67": tables67}
assert tuple(MAKERS) == PAPER_FIGURES


@hydra.main(version_base="1.3", config_path="../configs", config_name="paper")
def main(cfg: DictConfig) -> None:
    paper = validate_paper(cfg)
    out = Path(paper.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = load_measured(Path(paper.results_dir))
    if df.empty:
        print(f"no measured sweep rows under {paper.results_dir}/ (timings need CUDA): writing the theory "
              "figure and the paper's tables with 'not measured'")
    for name in PAPER_FIGURES if paper.figure == "all" else (paper.figure,):
        (out / f"{name}.md").write_text(MAKERS[name](df, out) + "\n")
        made = [p.name for p in (out / f"{name}.md", out / f"{name}.png") if p.exists()]
        print(f"{name}: {', '.join(made)}")


if __name__ == "__main__":
    main()
