"""FSA Figures 5 and 6 (training step and prefill of real models, FSA over NSA and over full
attention, H200) beside ours: markdown only, from the rows of every `python -m experiments.e2e`
folder under results/ (results/e2e*, each run's GPU named), through experiments/e2e_report.speedups.
The paper's full attention is Triton FlashAttention-2, ours dense SDPA (a faster baseline)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from experiments import e2e_report
from experiments.paper import numbers as pn
from experiments.paper.measured import NOT_MEASURED
from experiments.report import markdown_table

KINDS = {"train": "Figure 5 (training step)", "prefill": "Figure 6 (prefill)"}


def _ours(df: pd.DataFrame) -> pd.DataFrame:
    """speedups() of each e2e folder's rows (train and prefill kinds), with the folder."""
    if df.empty or "step" not in df or "model" not in df:
        return pd.DataFrame()
    frames = []
    for sweep, rows in df[df["step"].isin(tuple(KINDS)) & df["model"].notna()].groupby("sweep"):
        sp = e2e_report.speedups(rows)
        if len(sp):
            frames.append(sp[sp["kind"].isin(tuple(KINDS))].assign(sweep=sweep))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def figs5_6(df: pd.DataFrame, out: Path) -> str:
    ours = _ours(df)
    rows = []
    for kind, (fig, table) in (("train", ("fig5", pn.FIG5_H200)), ("prefill", ("fig6", pn.FIG6_H200))):
        for (model, bs, topk), (nsa_pct, fa_pct) in table.items():
            for i, n in enumerate((32768, 65536)):
                mine = ours[(ours["kind"] == kind) & (ours["model"] == model) & (ours["block_size"] == bs)
                            & (ours["topk"] == topk) & (ours["seqlen"] == n)] if len(ours) else ours
                base = {"figure": fig, "model": model, "(BS,T)": f"({bs},{topk})", "N": n,
                        "paper H200 FSA / NSA": round(1 + nsa_pct[i] / 100, 3),
                        "paper H200 FSA / FA2": round(1 + fa_pct[i] / 100, 3),
                        "paper label": ", ".join(f"{series} uncertain" for series in
                                                 e2e_report.uncertain_labels(fig, model, bs, topk, n))}
                if mine.empty:
                    rows.append({**base, "ours FSA / NSA": NOT_MEASURED, "ours FSA / SDPA": NOT_MEASURED,
                                 "ours GPU, commit": ""})
                for r in mine.sort_values(["gpu", "sweep"]).to_dict("records"):
                    rows.append({**base, "ours FSA / NSA": round(r["fsa_over_nsa"], 3),
                                 "ours FSA / SDPA": round(r["fsa_over_dense"], 3),
                                 "ours GPU, commit": f"{r['gpu']}, {r['git_commit']} ({r['sweep']})"})
    gpus = ", ".join(sorted(ours["gpu"].unique())) if len(ours) else NOT_MEASURED
    note = ("Speedups of FSA as ratios (the paper's % labels as 1 + p / 100); ours: "
            "`python -m experiments.e2e` (2 decoder layers with random weights, one sequence of N tokens, bf16; "
            "training step = forward + backward + AdamW), one row per results folder and GPU. The paper's full "
            "attention is Triton FlashAttention-2, ours SDPA, so ours over dense is against a faster baseline.")
    return (f"# Figures 5 and 6: end-to-end training and prefill\n\nOurs measured on: {gpus}. Paper: {pn.SOURCE}, "
            f"Figures 5 and 6. {note}\n\n" + markdown_table(pd.DataFrame(rows)))
