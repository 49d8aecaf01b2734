"""summary.md of a scope=decode / scope=generate folder: per (pass, heads, preset, B, L) ours beside
dense SDPA (ms, dense / ours, GB/s of the analytic bytes); generate adds time to first token and
per-token time. The sweep's plots draw prefill kernels and are not drawn here."""
from __future__ import annotations

import pandas as pd

from experiments.schema import DECODE_SCOPES

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
    for k in sparse + (["sdpa"] if ("median_ms", "sdpa") in wide.columns else []):
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
