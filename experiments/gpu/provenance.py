"""What every one-call GPU script needs first (a CUDA device), records beside its numbers, and where
it writes them."""
from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import torch
import triton

from experiments.rowtools import git_commit


def require_cuda() -> None:
    """Exit with status 1 and a one-line message when there is no CUDA device (these scripts time
    kernels on the GPU; without one torch would fail deep inside with an AssertionError). Called
    after argument parsing, so --help works anywhere."""
    if not torch.cuda.is_available():
        script = Path(sys.argv[0]).stem
        sys.exit(f"experiments.gpu.{script} needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "nothing was run")


def run_meta() -> dict:
    """GPU, torch, Triton and commit (NSA_GIT_COMMIT first: a lent box's .git may be stale)."""
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                git_commit=git_commit())


def out_dir() -> Path:
    """$OUT (the device tool's folder that comes back), else ./out; created."""
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_rows(path: Path, rows: list[dict], meta: dict) -> None:
    """CSV of `rows` (columns in order of first appearance) with the provenance `meta` on every row."""
    if not rows:
        return
    keys = list(dict.fromkeys([k for r in rows for k in r] + list(meta)))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **meta})


def print_table(rows: list[dict]) -> None:
    """`rows` as aligned text columns on stdout."""
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    width = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(width[k]) for k in keys))
    for r in rows:
        print("  ".join(str(r.get(k, "")).ljust(width[k]) for k in keys))
