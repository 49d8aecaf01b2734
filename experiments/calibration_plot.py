"""The calibration's figure: predicted vs measured latency of every fitted row (written beside the
fit's CSV by `python -m experiments.calibration`)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def plot_calibration(rows: pd.DataFrame, path: Path) -> Path:
    """Predicted vs measured latency of every fitted row: the plain roofline and the calibrated
    prediction (experiments/calibration.py); points on the diagonal are predicted exactly."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharex=True, sharey=True)
    lo, hi = rows[["median_ms", "roofline_ms", "calibrated_ms"]].min().min(), rows["median_ms"].max() * 3
    panels = (("roofline_ms", "plain roofline"), ("calibrated_ms", "calibrated: a * roofline + b"))
    for ax, (col, what) in zip(axes, panels):
        for i, (kernel, sub) in enumerate(sorted(rows.groupby("kernel"), key=lambda x: x[0])):
            for scope, marker in (("selected", "o"), ("module", "s")):
                pts = sub[sub["scope"] == scope]
                ax.scatter(pts["median_ms"], pts[col], s=14, marker=marker, color=f"C{i}", alpha=0.7,
                           label=f"{kernel} {scope}" if len(pts) else None)
        ax.plot([lo, hi], [lo, hi], color="black", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured latency (ms, log)")
        ax.set_title(what, fontsize=10)
    axes[0].set_ylabel("predicted latency (ms, log)")
    axes[1].legend(fontsize=7, ncol=2)
    gpus = ", ".join(sorted(set(rows["gpu"].astype(str))))
    fig.suptitle(f"Cost model vs measurement on {gpus}: {len(rows)} rows (fwd, bwd, fwd+bwd; "
                 "selected attention and module)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
