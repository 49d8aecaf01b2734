"""Decoding beside the papers: FSA Tables 8-9 (prefill + 512 tokens), FSA Table 10 (per-token decode)
and NSA Table 4 (decoding memory access, analytic). Markdown only; ours from the sweep's
scope=generate (preset sweep=generate) and scope=decode rows, "not measured" where there are none;
Table 4 needs no GPU (experiments/decode_costs.py)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from experiments.decode_costs import table4_rows
from experiments.paper import numbers as pn
from experiments.paper.measured import NOT_MEASURED, failure, fmt, gpus, header, over, pick
from experiments.report import markdown_table
from experiments.schema import SelectionConfig

HEADS = dict(q_heads=64, head_dim=128)  # FSA Tables 8-10: 64 query heads, d = 128
TABLE10_G = 4  # the paper does not state Table 10's g; ours at g = 4 (16 KV heads)


def _best(rows: pd.DataFrame, column: str, prefer_pass: str | None = None):
    """`column` of the fastest pass (or of `prefer_pass` when it has a row), None without rows."""
    if rows.empty:
        return None
    if prefer_pass is not None and (rows["pass"] == prefer_pass).any():
        rows = rows[rows["pass"] == prefer_pass]
    return float(rows.sort_values("median_ms")[column].iloc[0])


def _sel(df, **equal):
    for col, val in equal.items():
        df = df[df[col] == val]
    return df


def tables89(df: pd.DataFrame, out: Path) -> str:
    where = dict(scope="generate", batch=1, **HEADS)
    ours = pick(df, "generate", **where)
    rows = []
    for (gpu, kernel, bs, t), by_g in pn.TABLE89.items():
        if gpu != "H200":
            continue
        h20 = pn.TABLE89[("H20", kernel, bs, t)]
        for g, (p128, p256) in by_g.items():
            for n, paper, paper_h20 in zip(pn.TABLE89_SEQLENS, (p128, p256), h20[g]):
                sub = _sel(ours, kernel=kernel, gqa=g, seqlen=n)
                if bs is not None:
                    sub = _sel(sub, block_size=bs)
                ms = _best(sub, "median_ms", None if kernel == "sdpa" else "graph")
                mine = None if ms is None else ms / 1e3
                failed = failure(df, "generate", **where, kernel=kernel, gqa=g, seqlen=n) if mine is None else None
                rows.append({"kernel": "FA (ours: SDPA)" if kernel == "sdpa" else kernel.upper(),
                             "(BS,T)": "" if bs is None else f"({bs},{t})", "g": g, "N": n,
                             "paper H20 s": paper_h20, "paper H200 s": paper, "ours s": fmt(mine, failed),
                             "ours / H200": fmt(over(mine, paper))})
    note = (f"Prefill of N tokens + {pn.TABLE89_STEPS} decode steps, one attention layer with its projections, "
            "batch 1; ours: graph replay of the steps (dense: the faster of eager and graph). Ours from "
            "`python -m experiments.sweep sweep=generate`.")
    return header("Tables 8 and 9: prefill + 512 tokens", ours, "Tables 8 (H20) and 9 (H200)", note) + \
        markdown_table(pd.DataFrame(rows))


def table10(df: pd.DataFrame, out: Path) -> str:
    where = dict(scope="decode", batch=1, gqa=TABLE10_G, block_size=64, topk=16, **HEADS)
    ours = pick(df, "decode", **where)
    rows = []
    for n, by_gpu in pn.TABLE10.items():
        fd20, nsa20, fsa20 = by_gpu["H20"]
        fd, nsa, fsa = by_gpu["H200"]
        at = {k: _sel(ours, kernel=k, seqlen=n) for k in ("fsa", "sdpa")}
        # the paper averages consecutive tokens: graph16 (16 consecutive steps per graph) when recorded,
        # else graph (one step that completes a summary); dense in the same mode
        mode = "graph16" if all((s["pass"] == "graph16").any() for s in at.values()) else "graph"
        mine = _best(_sel(at["fsa"], **{"pass": mode}), "median_ms")
        worst = _best(_sel(at["fsa"], **{"pass": "graph"}), "median_ms")
        dense = _best(_sel(at["sdpa"], **{"pass": mode}), "median_ms")
        if dense is None:  # no dense row in that mode: its fastest
            dense = _best(at["sdpa"], "median_ms")
        rows.append({"N": n, "paper H20 FD / NSA / FSA ms": f"{fd20} / {nsa20} / {fsa20}",
                     "paper H200 FlashDecoding ms": fd, "paper H200 NSA ms": nsa, "paper H200 FSA ms": fsa,
                     "ours ms": fmt(mine, failure(df, "decode", **where, kernel="fsa", seqlen=n)), "ours mode": mode,
                     "ours ms, a step completing a summary": fmt(worst), "ours dense SDPA ms": fmt(dense),
                     "ours / paper FSA": fmt(over(mine, fsa)), "ours dense / ours": fmt(over(dense, mine))})
    note = (f"One decode step of the attention (no projections), batch 1, (64, 16), g = {TABLE10_G} (the paper "
            "does not state g); the paper averages 1K generated tokens. Ours: mode graph16 = per step of 16 "
            "consecutive steps replayed from one CUDA graph (the cache grows; 1 step in 16 completes a summary), "
            "dense SDPA in the same mode (else its fastest); graph = one replayed step that completes a summary (the worst step, "
            "graph launch included). Ours from `python -m experiments.sweep sweep=decode q_heads=64 batch=1 "
            "seqlen=32768,65536,131072,262144`.")
    return header("Table 10: decode latency per token", ours, "Table 10", note) + markdown_table(pd.DataFrame(rows))


def nsa_table4(df: pd.DataFrame, out: Path) -> str:
    """Analytic: our module's keys read per decode step (and bytes with q / o) vs dense, from the
    config (the NSA paper's: kernel 32 / stride 16, (64, 16), window 512; 64 query heads, 4 KV heads, d 128
    for the bytes, which the paper's token ratio does not depend on)."""
    rows = pd.DataFrame(table4_rows(SelectionConfig(), 64, 16, q_heads=64, kv_heads=4, head_dim=128))
    rows["ours / paper x"] = rows["ours tokens x"] / rows["paper expected x"]
    text = (f"# NSA Table 4: decoding memory access (analytic)\n\nPaper: {pn.NSA_SOURCE}, Table 4 (expected speedup "
            "= tokens read by full attention / by NSA). Ours: experiments/decode_costs.py from the config, no GPU: "
            "(L - 32) // 16 + 1 summaries + 16 x 64 selected + 512 window keys per KV head (each branch reads its "
            "own keys). Ours has one summary more than the paper's floor((L - l) / d) and the paper rounds its "
            "token counts (2046 -> 2048 at 8K), hence ours within 0.5% of the printed one-decimal ratio (1% tolerance in "
            "tests/experiments/test_decode_sweep.py). The bytes column adds q in and o out (64 query heads, 4 KV "
            "heads, d 128, bf16).\n\n")
    return text + markdown_table(rows)


__all__ = ["tables89", "table10", "nsa_table4", "NOT_MEASURED", "gpus"]
