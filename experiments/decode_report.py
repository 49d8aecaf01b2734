"""summary.md of a scope=decode / scope=generate folder: per (pass, heads, preset, B, L) ours beside
dense SDPA (ms, dense / ours, GB/s of the analytic bytes); generate adds time to first token and
per-token time; scope=decode also gets one plot per (pass, heads, preset): dense / ours against the
cache length, a line per batch (the sweep's own plots draw prefill kernels and are not drawn here)."""
from __future__ import annotations

import pandas as pd

from experiments.schema import DECODE_SCOPES

PASS_TITLES = {"eager": "eager steps", "graph": "one step per CUDA-graph replay, completing a summary",
               "graph16": "mean of 16 consecutive steps in one CUDA graph"}

KEYS = ["scope", "pass", "q_heads", "kv_heads", "block_size", "topk", "batch", "seqlen"]


def is_decode_folder(df: pd.DataFrame) -> bool:
    return len(df) > 0 and df["scope"].isin(DECODE_SCOPES).all()


def decode_table(df: pd.DataFrame) -> pd.DataFrame:
    rows = df[df["status"].isin(["ok", "predicted"])]
    if rows.empty:
        return pd.DataFrame()
    values = ["median_ms", "gbps", "ttft_ms", "per_token_ms"]
    wide = rows.pivot_table(index=KEYS, columns="kernel", values=values, aggfunc="first")
    out = pd.DataFrame(index=wide.index)
    sparse = [k for k in ("fsa", "nsa", "auto") if ("median_ms", k) in wide.columns]
    generate = (rows["scope"] == "generate").any()
    for k in sparse + [k for k in ("sdpa", "flashinfer") if ("median_ms", k) in wide.columns]:
        out[f"{k} ms"] = wide[("median_ms", k)]
        if generate and ("ttft_ms", k) in wide.columns:
            out[f"{k} ttft ms"] = wide[("ttft_ms", k)]
            out[f"{k} ms/token"] = wide[("per_token_ms", k)]
        elif ("gbps", k) in wide.columns:
            out[f"{k} GB/s"] = wide[("gbps", k)]
    if sparse and "sdpa ms" in out:
        out["dense / ours"] = out["sdpa ms"] / out[f"{sparse[0]} ms"]
    return out.reset_index()


def summary_markdown(df: pd.DataFrame, markdown_table) -> str:
    """`markdown_table`: experiments.report's (passed in: report imports this module)."""
    predicted = (df["status"] == "predicted").any()
    lines = [f"# Decode summary ({'predicted: byte floor at the HBM peak' if predicted else 'measured'})", "",
             "GPU: " + ", ".join(sorted(set(df["gpu"].astype(str)))) + "  ",
             "Status counts: " + ", ".join(f"{k} {v}" for k, v in df["status"].value_counts().items()), ""]
    table = decode_table(df)
    lines.append(markdown_table(table) if len(table) else "No rows to summarise.")
    failed = df[df["status"].isin(["error", "oom", "unsupported"])]
    if len(failed):
        lines += ["", "## Not measured", "",
                  markdown_table(failed.groupby(["kernel", "status", "message"]).size().reset_index(name="rows"))]
    return "\n".join(lines) + "\n"


def decode_plots(df: pd.DataFrame, folder) -> list:
    """decode_<pass>_<HQ>q<H>kv_bs<BS>t<T>.png for every measured (pass, heads, preset) of scope=decode."""
    from pathlib import Path

    from experiments import plots

    table = decode_table(df[df["scope"] == "decode"]) if (df["scope"] == "decode").any() else pd.DataFrame()
    if table.empty or "dense / ours" not in table:
        return []
    predicted = (df["status"] == "predicted").any()
    written = []
    for (p, hq, h, bs, t), sub in table.groupby(["pass", "q_heads", "kv_heads", "block_size", "topk"]):
        fig, axes = plots._grid(1, 1, 6.0, 4.2)
        ax = axes[0][0]
        for b, line in sub.groupby("batch"):
            line = line.sort_values("seqlen")
            ax.plot(line["seqlen"], line["dense / ours"], marker="o", label=f"B = {b}")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cache length L (tokens)")
        ax.set_ylabel("dense SDPA time / NSA time (x)")
        gpu = ", ".join(sorted(set(df["gpu"].astype(str))))
        ax.set_title(f"One decode step, {'predicted (byte floor)' if predicted else gpu}: {PASS_TITLES.get(p, p)}\n"
                     f"{hq} query / {h} KV heads, (BS, T) = ({bs}, {t}), bf16", fontsize=9)
        ax.legend(title="batch", loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
        written.append(plots._save(fig, Path(folder) / f"decode_{p}_{hq}q{h}kv_bs{bs}t{t}.png"))
    return written
