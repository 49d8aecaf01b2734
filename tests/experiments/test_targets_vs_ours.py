"""results/targets_vs_ours.csv is what experiments.targets_vs_ours makes of the committed main sweep
(re-run it after new sweep rows: this test fails on a stale table)."""
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.targets_vs_ours import build

REPO = Path(__file__).resolve().parents[2]


def test_committed_table_is_current():
    committed = pd.read_csv(REPO / "results" / "targets_vs_ours.csv")
    fresh = build(REPO / "results" / "sweep", REPO / "results" / "targets" / "upstream_fsa_vs_nsa_h100.csv")
    assert list(committed.columns) == list(fresh.columns) and len(committed) == len(fresh)
    for col in ("fsa", "nsa", "sdpa", "pub_fsa", "pub_nsa"):
        assert np.allclose(committed[col], fresh[col], equal_nan=True), col
    # the ratios are the columns' ratios
    assert np.allclose(committed["fsa_vs_best_pub"],
                       committed[["pub_fsa", "pub_nsa"]].min(axis=1) / committed["fsa"], equal_nan=True)
