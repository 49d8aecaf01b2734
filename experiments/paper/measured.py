"""Our side of the paper comparison: the sweep rows under results/, picked per figure from one GPU,
and how a missing number is written ("not measured", or the status of a failed try)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from experiments import store  # noqa: E402
from experiments.paper import numbers as pn  # noqa: E402

NOT_MEASURED = "not measured"
SKIPPED_FOLDERS = ("paper", "targets")


def load_measured(results_dir: Path) -> pd.DataFrame:
    """Every row of every sweep under results_dir (merged or not yet), with the sweep's folder name
    (`pick` keeps the ok ones; `failure` reports the others). Folders of `python -m experiments.e2e`
    are read with their own columns and keys (model, step, ...)."""
    from experiments import e2e

    frames = []
    for folder in sorted(p for p in results_dir.glob("*") if p.is_dir() and p.name not in SKIPPED_FOLDERS):
        keys = (e2e.COLUMNS, e2e.KEY_COLUMNS) if _is_e2e(folder) else ()
        frames.append(store.read_rows(folder, *keys).assign(sweep=folder.name))
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


def measure(df: pd.DataFrame, column: str = "median_ms", **equal) -> Optional[float]:
    """`column` of the row matching `equal` (the last one if several), None without one."""
    if df.empty:
        return None
    df = matching(df, **equal)
    return float(df[column].iloc[-1]) if len(df) else None


def median(df: pd.DataFrame, **equal) -> Optional[float]:
    return measure(df, "median_ms", **equal)


def gpus(df: pd.DataFrame) -> str:
    return ", ".join(sorted(set(df["gpu"].astype(str)))) if len(df) else NOT_MEASURED


def _is_e2e(folder: Path) -> bool:
    """Whether a results folder holds `python -m experiments.e2e` rows (a `step` column)."""
    first = next((f for f in [folder / store.RESULTS_CSV, *sorted((folder / store.ROWS_DIR).glob("*.csv"))]
                  if f.exists() and f.stat().st_size > 0), None)
    if first is None:
        return False
    with open(first) as f:  # the header only: a merged results CSV can be large
        return "step" in f.readline().rstrip("\n").split(",")


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


def header(title: str, rows: pd.DataFrame, cite: str, note: str) -> str:
    """The title, our GPU and where in the paper its numbers are (`cite`: its figure or table)."""
    return f"# {title}\n\nOurs measured on: {gpus(rows)}. Paper: {pn.SOURCE}, {cite}. {note}\n\n"


def save(fig, path: Path) -> Path:
    fig.tight_layout(rect=(0, 0.12 if fig.legends else 0, 1, 1))  # room for a figure-level legend below
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

