"""results/targets_vs_ours.csv: every main-sweep point (selected attention, fwd and bwd) beside the
published kernels measured on the same GPU model (results/targets/upstream_fsa_vs_nsa_h100.csv).

    python -m experiments.targets_vs_ours [--sweep results/sweep] [--out results/targets_vs_ours.csv]

fsa_vs_best_pub = the faster published kernel's ms / ours FSA; nsa_vs_pub_nsa = published NSA / ours
NSA. Points the sweep lacks keep the published numbers and blank ours; `commit` is our rows' commit.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from experiments import store

TARGETS = Path("results/targets/upstream_fsa_vs_nsa_h100.csv")


def build(sweep: Path, targets: Path = TARGETS) -> pd.DataFrame:
    keys = ["block_size", "topk", "gqa", "seqlen", "pass"]
    rows = store.read_rows(sweep)
    rows = rows[(rows["status"] == "ok") & (rows["scope"] == "selected") & rows["pass"].isin(["fwd", "bwd"])]
    ours = rows.pivot_table(index=keys, columns="kernel", values="median_ms", aggfunc="first")
    commits = rows.groupby(keys)["git_commit"].first()
    pub = pd.read_csv(targets)
    table = []
    for _, p in pub.iterrows():
        for pass_ in ("fwd", "bwd"):
            key = (int(p["block"]), int(p["topk"]), int(p["gqa"]), int(p["seqlen"]), pass_)
            got = ours.loc[key] if key in ours.index else {}
            fsa, nsa, sdpa = (got.get(k, float("nan")) for k in ("fsa", "nsa", "sdpa"))
            pub_fsa, pub_nsa = p[f"fsa_{pass_}_ms"], p[f"nsa_{pass_}_ms"]
            table.append(dict(BS=key[0], T=key[1], g=key[2], N=key[3], pass_=pass_, fsa=fsa, nsa=nsa,
                             pub_fsa=pub_fsa, pub_nsa=pub_nsa, sdpa=sdpa,
                             fsa_vs_best_pub=min(pub_fsa, pub_nsa) / fsa, nsa_vs_pub_nsa=pub_nsa / nsa,
                             commit=commits.get(key, "")))
    return pd.DataFrame(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=Path("results/sweep"))
    parser.add_argument("--out", type=Path, default=Path("results/targets_vs_ours.csv"))
    args = parser.parse_args()
    df = build(args.sweep)
    df.to_csv(args.out, index=False)
    print(f"{args.out}: {len(df)} rows, {int(df['fsa'].notna().sum())} with ours")


if __name__ == "__main__":
    main()
