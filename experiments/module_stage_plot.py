"""Issue #14's stage breakdown as a picture: where one `module.attention` fwd+bwd spends its GPU time,
from the torch.profiler tables that experiments/gpu/module_profile.py writes, beside dense SDPA.

    python -m experiments.module_stage_plot results/module_profile/h100_5862855_module_profile_16384_1.txt \
        --stages results/module_profile/h100_5862855.csv

Each profiled kernel goes to one stage (STAGES: FSA's pair kernels, its reductions and index build,
the selection, the window, compressed attention, gates, compression, PyTorch glue); the bars are the
stages' CUDA self time (ms) of one step, under two bars for the module's total and dense causal SDPA
fwd+bwd at the same size (module_profile's do_bench median, from the stages CSV). Writes
<profile stem>.png beside the profile (or --out). Runs without a GPU.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd

# (stage, kernel-name patterns), first match wins; the names are the profiler's (possibly truncated)
STAGES = [
    ("FSA pairs backward", [r"^fsa_selected_bwd_kernel"]),
    ("FSA pairs forward", [r"^fsa_selected_fwd_kernel"]),
    ("FSA reductions", [r"^fsa_selected_.*reduce"]),
    ("FSA index build", [r"_pair_keys_kernel", r"_scatter_pairs_kernel", r"_block_layout_kernel",
                         r"_items_per_row_kernel", r"RadixSort", r"fill_reverse_indices"]),
    ("NSA selected", [r"^nsa_selected_"]),
    ("selection (scores + top-T)", [r"_selection_scores_kernel"]),
    ("sliding window", [r"^window_"]),
    ("compressed attention", [r"^compressed_"]),
    ("gates + branch sum", [r"^gated_sum", r"_row_terms_kernel"]),
    ("compression (k, v)", [r"_add_block_grad_kernel", r"^nvjet", r"gemm", r"reduce_kernel"]),
    ("PyTorch glue (copies, fills)", [r"elementwise_kernel", r"FillFunctor", r"direct_copy", r"CatArrayBatched"]),
]
OTHER = "other"
_TIME = re.compile(r"^([\d.]+)(us|ms|s)$")


def _ms(text: str) -> float:
    m = _TIME.match(text)
    if not m:
        raise ValueError(f"not a profiler time: {text!r}")
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]


def read_profile(path: Path) -> pd.DataFrame:
    """Rows (name, self_cuda_ms, calls) of a torch.profiler key_averages() table."""
    rows = []
    for line in path.read_text().splitlines():
        parts = re.split(r"\s{2,}", line.strip())
        if len(parts) < 10 or not parts[-1].isdigit():
            continue
        rows.append(dict(name=parts[0], self_cuda_ms=_ms(parts[6]), calls=int(parts[-1])))
    if not rows:
        raise ValueError(f"{path}: no profiler rows (expected module_profile's key_averages table)")
    return pd.DataFrame(rows)


def stage_of(name: str) -> str:
    for stage, patterns in STAGES:
        if any(re.search(p, name) for p in patterns):
            return stage
    return OTHER


def stage_times(profile: pd.DataFrame) -> pd.Series:
    """ms per stage, in STAGES order (stages with no kernel dropped)."""
    ms = profile.assign(stage=profile["name"].map(stage_of)).groupby("stage")["self_cuda_ms"].sum()
    order = [s for s, _ in STAGES] + [OTHER]
    return ms.reindex([s for s in order if s in ms.index])


def plot(times: pd.Series, dense_ms: float | None, title: str, out: Path) -> None:
    """Horizontal bars: the module's total and dense SDPA on top, then each stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["NSA module, all stages"] + (["dense SDPA (causal, fwd+bwd)"] if dense_ms else []) + list(times.index)
    values = [times.sum()] + ([dense_ms] if dense_ms else []) + list(times.values)
    colors = ["tab:gray"] + (["tab:red"] if dense_ms else []) + ["tab:blue"] * len(times)
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(labels) + 1.6))
    y = list(range(len(labels)))[::-1]
    bars = ax.barh(y, values, color=colors)
    ax.set_yticks(y, labels)
    for bar, v in zip(bars, values):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:.2f}", va="center", fontsize=8)
    ax.set_xlabel("GPU time of one fwd+bwd step (ms; kernels' CUDA self time)")
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, max(values) * 1.12)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def dense_from_stages(stages_csv: Path, n: int, g: int) -> tuple[float | None, dict]:
    """(dense SDPA fwd+bwd ms, provenance) of point (n, g) in module_profile's stages CSV."""
    df = pd.read_csv(stages_csv, dtype={"git_commit": str})  # "4e95142" would parse as a float
    row = df[(df["N"] == n) & (df["g"] == g) & (df["stage"] == "sdpa full fwd+bwd")]
    if row.empty:
        return None, {}
    r = row.iloc[0]
    return float(r["ms"]), {k: r[k] for k in ("gpu", "torch", "triton", "git_commit") if k in r}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile", type=Path, help="module_profile_<N>_<g>.txt")
    ap.add_argument("--stages", type=Path, help="module_profile's stages CSV (dense SDPA and provenance)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    m = re.search(r"module_profile_(\d+)_(\d+)(_per_branch)?\.txt$", args.profile.name)
    if not m:
        raise SystemExit(f"profile: expected a name like module_profile_<N>_<g>.txt, got {args.profile.name}")
    n, g = int(m.group(1)), int(m.group(2))
    times = stage_times(read_profile(args.profile))
    dense, meta = dense_from_stages(args.stages, n, g) if args.stages else (None, {})
    where = ", ".join(str(meta[k]) for k in ("gpu", "git_commit") if k in meta)
    backend = "NSA" if "NSA selected" in times.index else "FSA"  # the selected branch's kernels tell
    title = (f"NSA module.attention ({backend} backend), fwd+bwd\n{n // 1024}K tokens, g={g}, 64 query heads, d=128"
             + (f"; {where}" if where else ""))
    out = args.out or args.profile.with_suffix(".png")
    plot(times, dense, title, out)
    print(times.round(3).to_string())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
