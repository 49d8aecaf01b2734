"""Where a sweep's rows live: one CSV per job under results/<name>/rows/ (parallel jobs never share
a file), merged into results/<name>/results.csv when all jobs end. The columns and the key default to
the sweep's (experiments/points.py); the e2e entry passes its own (experiments/e2e.py)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from experiments.points import COLUMNS, KEY_COLUMNS, row_key
from experiments.schema import utc_time

RESULTS_CSV = "results.csv"
ROWS_DIR = "rows"
RETRY_STATUSES = ("error", "oom")


TEXT_COLUMNS = {"git_commit": str, "gpu": str, "torch": str, "triton": str, "message": str}


def sweep_dir(results_dir: str, name: str, predicted: bool = False) -> Path:
    """results/<name>/ for measured rows; cost-model rows (no CUDA) go to results/<name>_predicted/ so
    that a CPU run never mixes predictions into a measured sweep."""
    return Path(results_dir) / (f"{name}_predicted" if predicted else name)


def read_rows(folder: Path, columns: tuple = COLUMNS, key_columns: tuple = KEY_COLUMNS) -> pd.DataFrame:
    """Every row recorded for a sweep (merged CSV and per-job files), the latest per key."""
    files = [folder / RESULTS_CSV] + sorted((folder / ROWS_DIR).glob("*.csv"))
    # Text columns read as text: a commit such as 90384e6 would otherwise parse as the float 9.0384e10.
    frames = [pd.read_csv(f, dtype=TEXT_COLUMNS) for f in files if f.exists() and f.stat().st_size > 0]
    if not frames:
        return pd.DataFrame(columns=list(columns))
    df = pd.concat(frames, ignore_index=True)
    # rows recorded before a column was added get it blank; the known columns first, in their order
    df = df.reindex(columns=list(columns) + [c for c in df.columns if c not in columns])
    df["message"] = df["message"].fillna("")
    df = df.sort_values("timestamp", kind="stable")
    return df.drop_duplicates(subset=list(key_columns), keep="last").reset_index(drop=True)


def done_keys(folder: Path, retry_failed: bool, redo_before: str | None = None, columns: tuple = COLUMNS,
              key_columns: tuple = KEY_COLUMNS) -> set:
    """Keys a rerun skips: everything recorded, except error / oom rows when retry_failed, and rows
    recorded before `redo_before` (an ISO date or time, UTC unless it says otherwise) when given."""
    df = read_rows(folder, columns, key_columns)
    if retry_failed:
        df = df[~df["status"].isin(RETRY_STATUSES)]
    if redo_before:  # an unreadable timestamp (NaT) counts as old
        df = df[pd.to_datetime(df["timestamp"], utc=True, errors="coerce", format="ISO8601") >= utc_time(redo_before)]
    return {row_key(r, key_columns) for r in df.to_dict("records")}


def append_rows(folder: Path, job_id: str, rows: list[dict], columns: tuple = COLUMNS) -> None:
    if not rows:
        return
    path = folder / ROWS_DIR / (hashlib.sha1(job_id.encode()).hexdigest()[:16] + ".csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    new = pd.DataFrame(rows, columns=list(columns))
    started = path.exists() and path.stat().st_size > 0
    if started and list(pd.read_csv(path, nrows=0).columns) != list(columns):
        # written before the columns changed: appending would shift the values under the old header,
        # so the file is rewritten under the new one (old rows keep their values, blank in new columns)
        old = pd.read_csv(path, dtype=TEXT_COLUMNS)
        pd.concat([old, new], ignore_index=True).reindex(columns=list(columns)).to_csv(path, index=False)
        return
    new.to_csv(path, mode="a", header=not started, index=False)


SORT = ("scope", "block_size", "gqa", "seqlen", "kernel", "pass")


def merge(folder: Path, columns: tuple = COLUMNS, key_columns: tuple = KEY_COLUMNS,
          sort: tuple = SORT) -> pd.DataFrame:
    """Write results.csv from every row recorded so far and return it."""
    df = read_rows(folder, columns, key_columns)
    if len(df):
        df = df.sort_values(list(sort), kind="stable")
        df.to_csv(folder / RESULTS_CSV, index=False)
    return df
