"""results/<name>/ of `python -m experiments.e2e`: results.csv (every row), speedups.csv (FSA over NSA
and over dense per model, N, preset and step, beside the FSA paper's H200 numbers) and speedup.png.

Kinds: train, prefill and generate (the whole call: prefill + 512 decode steps) compare the steps'
ms; decode compares the generate rows' ms_per_token (the 512 steps alone); generate_graph and
decode_graph the same for the generate_graph step (decode steps replayed from CUDA graphs); attention
compares layer 0's self_attn alone in the training step (attn_ms).

Paper columns (experiments/paper/numbers.py): train = Figure 5, prefill = Figure 6 (labels printed as
% speed-up, here as ratios 1 + p / 100; its dense is Triton FlashAttention-2, ours SDPA), attention =
Figure 10's text (max / mean of the attention time of training, (128, 8)), and Tables 14-15 (TP = 1,
Llama3-8B inference seconds, NSA / FSA) beside prefill and generate over NSA, in the notes only.
generate = Tables 8-9 (H200: prefill + 512 tokens) and decode = Table 10 (H200: ms per token,
(64, 16)) where they have our N (and g): both time the attention alone (64 query heads), not L
decoder layers, so they are not the same measurement (the notes and the plot say so).
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from experiments import e2e, store
from experiments.paper import numbers

SPEEDUPS_CSV = "speedups.csv"
PLOT = "speedup.png"
KINDS = ("train", "prefill", "generate", "decode", "generate_graph", "decode_graph", "attention")
# what each fsa row of a step is compared on: (kind, column)
STEP_KINDS = {"train": (("train", "ms"), ("attention", "attn_ms")), "prefill": (("prefill", "ms"),),
              "generate": (("generate", "ms"), ("decode", "ms_per_token")),
              "generate_graph": (("generate_graph", "ms"), ("decode_graph", "ms_per_token"))}
# the graph kinds compare with the paper's numbers of their eager kinds
PAPER_KIND = {"generate_graph": "generate", "decode_graph": "decode"}
# the paper's source per kind, for the plot's legend
PAPER_LABEL = {"train": "Fig. 5", "prefill": "Fig. 6", "generate": "Tab. 9, attn alone",
               "decode": "Tab. 10, attn alone"}
NOT_SAME = "attention alone, 64 query heads: not the same measurement"


def _paper(kind: str, model: str, bs: int, topk: int, n: int) -> dict:
    out = {"paper_over_nsa": math.nan, "paper_over_dense": math.nan, "paper_note": ""}
    if kind == "attention":
        if (bs, topk) == (128, 8):
            out.update(paper_note="Figure 10 text: over NSA max 1.4 / mean 1.23, over FA max 3.87 / mean 2.91")
        return out
    kind = PAPER_KIND.get(kind, kind)
    if kind in ("generate", "decode"):
        return {**out, **(_paper_generate(model, bs, topk, n) if kind == "generate" else _paper_decode(bs, topk, n))}
    fig, table = ("fig5", numbers.FIG5_H200) if kind == "train" else ("fig6", numbers.FIG6_H200)
    if (model, bs, topk) not in table or n not in (32768, 65536):
        return out
    i = 0 if n == 32768 else 1
    nsa_pct, fa_pct = table[(model, bs, topk)][0][i], table[(model, bs, topk)][1][i]
    notes = [f"{fig} H200"] + [f"{series} label uncertain" for series in uncertain_labels(fig, model, bs, topk, n)]
    tp1 = _tables14_15(kind, model, bs, topk, n)
    out.update(paper_over_nsa=1 + nsa_pct / 100, paper_over_dense=1 + fa_pct / 100,
               paper_note="; ".join(notes + ([tp1] if tp1 else [])))
    return out


def uncertain_labels(fig: str, model: str, bs: int, topk: int, n: int) -> list[str]:
    """The series ("nsa", "fa") whose label the paper's Figure 5 / 6 (fig "fig5" / "fig6") prints
    with [?] at this point."""
    return [s for s in ("nsa", "fa") if (fig, model, bs, topk, s, n) in numbers.E2E_UNCERTAIN]


def _tables14_15(kind: str, model: str, bs: int, topk: int, n: int) -> str:
    """Tables 14-15's TP = 1 ratio as a note (Llama3-8B; whether they include generated tokens is unclear)."""
    tp1 = numbers.TABLE14_15_H200_TP1.get((bs, topk, n)) if model == "llama3_8b" else None
    if not tp1 or kind not in ("prefill", "generate"):
        return ""
    return f"Tables 14-15 TP=1 NSA/FSA {tp1[1] / tp1[0]:.2f}"


def _paper_generate(model: str, bs: int, topk: int, n: int) -> dict:
    """Table 9 (H200, prefill + 512 tokens, seconds) at our N and g, if it has them; Tables 14-15 noted."""
    from experiments.e2e_timing import heads

    hq, h, _ = heads(model)
    g = hq // h
    fsa, nsa, fa = (numbers.TABLE89.get(("H200", k, b, t), {}).get(g) for k, b, t in
                    (("fsa", bs, topk), ("nsa", bs, topk), ("sdpa", None, None)))
    out, notes = {}, []
    if n in numbers.TABLE89_SEQLENS and fsa and nsa:
        i = numbers.TABLE89_SEQLENS.index(n)
        out = dict(paper_over_nsa=nsa[i] / fsa[i], paper_over_dense=fa[i] / fsa[i])
        notes.append(f"Table 9 H200 g={g}, {NOT_SAME}")
    tp1 = _tables14_15("generate", model, bs, topk, n)
    if tp1:
        notes.append(f"{tp1} (whole model; generated tokens unclear)")
    return dict(out, paper_note="; ".join(notes))


def _paper_decode(bs: int, topk: int, n: int) -> dict:
    """Table 10 (H200, decode ms per token; FlashDecoding / NSA / FSA), (64, 16) only."""
    if (bs, topk) != (64, 16) or n not in numbers.TABLE10:
        return {}
    fd, nsa, fsa = numbers.TABLE10[n]["H200"]
    return dict(paper_over_nsa=nsa / fsa, paper_over_dense=fd / fsa,
                paper_note=f"Table 10 H200 (1K tokens; dense: FlashDecoding; g not stated), {NOT_SAME}")


def speedups(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (gpu, model, layers, seqlen, preset, kind) with an ok FSA row."""
    ok = df[df["status"] == "ok"]
    out = []
    for _, r in ok[ok["backend"] == "fsa"].iterrows():
        same = ok[(ok["gpu"] == r["gpu"]) & (ok["model"] == r["model"]) & (ok["layers"] == r["layers"])
                  & (ok["seqlen"] == r["seqlen"])]
        nsa = same[(same["backend"] == "nsa") & (same["block_size"] == r["block_size"]) & (same["topk"] == r["topk"])]
        dense = same[same["backend"] == "dense"]
        for kind, col in STEP_KINDS[r["step"]]:
            def ratio(rows):
                rows = rows[rows["step"] == r["step"]]
                return float(rows[col].iloc[0]) / float(r[col]) if len(rows) else math.nan

            out.append(dict(gpu=r["gpu"], model=r["model"], layers=int(r["layers"]), seqlen=int(r["seqlen"]),
                            block_size=int(r["block_size"]), topk=int(r["topk"]), kind=kind, fsa_ms=float(r[col]),
                            fsa_over_nsa=ratio(nsa), fsa_over_dense=ratio(dense),
                            **_paper(kind, r["model"], int(r["block_size"]), int(r["topk"]), int(r["seqlen"])),
                            git_commit=r["git_commit"]))
    cols = ["gpu", "model", "layers", "seqlen", "block_size", "topk", "kind", "fsa_ms", "fsa_over_nsa",
            "fsa_over_dense", "paper_over_nsa", "paper_over_dense", "paper_note", "git_commit"]
    return pd.DataFrame(out, columns=cols)


def _paper_label(kind: str, what: str) -> str:
    kind = PAPER_KIND.get(kind, kind)
    label = f"paper, H200, {PAPER_LABEL.get(kind, '')}".rstrip(", ")
    if what == "dense":
        label += " (FlashDec.)" if kind == "decode" else " (FA2)"
    return label


def _title(kind: str, has_paper: bool) -> str:
    """What a generate / decode panel times, and that the paper's bars are another measurement."""
    what = {"generate": "prefill + 512 decode steps (eager)", "decode": "per token, the 512 eager decode steps",
            "generate_graph": "prefill + 512 decode steps (CUDA graph)",
            "decode_graph": "per token, the 512 decode steps (CUDA graph)"}
    if kind not in what:
        return ""
    return what[kind] + ("\npaper: attention alone, not the same measurement" if has_paper
                         else "\nno paper value at this N / preset")


def plot(sp: pd.DataFrame, path: Path) -> Path:
    """Bars of our FSA speedups (over NSA, over dense) per model, N and preset, one row of panels per
    kind (train step, prefill, generate, decode per token, attention alone), the paper's H200 values
    hatched beside them (for generate / decode the attention alone, said in the panel's title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in KINDS if (sp["kind"] == k).any()]
    fig, axes = plt.subplots(len(kinds), 2, figsize=(max(7.0, 1.1 * sp.groupby("kind").size().max() + 3),
                                                      3.2 * len(kinds)), squeeze=False)
    for row, kind in zip(axes, kinds):
        part = sp[sp["kind"] == kind].sort_values(["model", "block_size", "seqlen", "gpu"])
        names = [f"{m}\n({b},{t}) {n // 1024}K" for m, b, t, n in
                 zip(part["model"], part["block_size"], part["topk"], part["seqlen"])]
        x = range(len(part))
        for ax, (ours, paper, what) in zip(row, (("fsa_over_nsa", "paper_over_nsa", "NSA"),
                                                 ("fsa_over_dense", "paper_over_dense", "dense"))):
            bars = ax.bar([i - 0.2 for i in x], part[ours].fillna(0), 0.4, label="ours")
            ax.bar_label(bars, labels=[f"{v:.2f}" if v == v else "" for v in part[ours]], fontsize=7)
            if part[paper].notna().any():
                pb = ax.bar([i + 0.2 for i in x], part[paper].fillna(0), 0.4, hatch="//", fill=False,
                            label=_paper_label(kind, what))
                ax.bar_label(pb, labels=[f"{v:.2f}" if v == v else "" for v in part[paper]], fontsize=7)
            if kind == "attention":
                series = "nsa" if what == "NSA" else "fa"
                mx, mean = numbers.FIG10_ATTENTION[series]
                ax.axhline(mean, ls="--", color="gray", lw=1, label=f"paper Fig. 10 mean {mean} (max {mx})")
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_xticks(list(x), names, fontsize=7)
            ax.set_xlim(-0.8, max(len(part), 2) - 0.2)  # a lone bar keeps a bar's width
            ax.set_ylabel(f"{kind}: FSA over {what}")
            ax.set_title(_title(kind, part[paper].notna().any()), fontsize=7)
            top = max([1.0, *part[ours].dropna(), *part[paper].dropna()]
                      + ([numbers.FIG10_ATTENTION["nsa" if what == "NSA" else "fa"][0]] if kind == "attention" else []))
            ax.set_ylim(0, 1.5 * top)  # headroom: the legend sits above the bars and their labels
            ax.legend(fontsize=7, loc="upper left")
            ax.grid(axis="y", alpha=0.3)
    gpus = ", ".join(sorted(set(sp["gpu"])))
    commits = ", ".join(sorted(set(map(str, sp["git_commit"]))))
    fig.suptitle(f"NSA in model layers, FSA speedup (above 1: FSA faster)\nours on {gpus}, commit {commits}",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # room for the two-line title
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(folder: Path) -> pd.DataFrame:
    """Merge the rows of `folder`, write speedups.csv and speedup.png; returns the speedups."""
    df = store.merge(folder, e2e.COLUMNS, e2e.KEY_COLUMNS, e2e.SORT)
    sp = speedups(df)
    if len(sp):
        sp.to_csv(folder / SPEEDUPS_CSV, index=False, float_format="%.4g")
        plot(sp, folder / PLOT)
        print(f"e2e: wrote {folder / SPEEDUPS_CSV} and {folder / PLOT}", flush=True)
    else:
        print(f"e2e: no FSA rows with status ok in {folder}: nothing to plot", flush=True)
    return sp
