"""A tqdm bar over the jobs of a multirun (what runs now, how many are left), shared by the
callback that knows the job count and the jobs that advance it. Jobs launched in other processes
(joblib, SLURM) run without it."""
from __future__ import annotations

import contextlib
from typing import Optional

from tqdm import tqdm

from experiments.points import Point

_bar: Optional[tqdm] = None
_counts = {"skipped": 0, "done": 0}  # (kernel, pass) pairs of this process's jobs


def start(total_jobs: int, launcher: str = "BasicLauncher") -> None:
    """The bar over `total_jobs`, when `launcher` (hydra.launcher._target_) runs the jobs in this
    process; other launchers' jobs cannot advance it, so each prints its own line when it ends."""
    global _bar
    name = launcher.rsplit(".", 1)[-1]
    if name == "BasicLauncher":
        _bar = tqdm(total=total_jobs, unit="job", desc="sweep", dynamic_ncols=True)
    else:
        print(f"sweep: {total_jobs} jobs through {name}; each job prints a line when it ends", flush=True)


def close() -> None:
    global _bar
    if _bar is not None:
        _bar.close()
        _bar = None


def in_multirun() -> bool:
    """Whether the launching process runs this job (the bar exists there only)."""
    return _bar is not None


def count(skipped: int, done: int) -> None:
    """A job's (kernel, pass) pairs: skipped as already recorded, and measured (or predicted) now."""
    _counts["skipped"] += skipped
    _counts["done"] += done


def counts_line(predicted: bool, counts: Optional[dict] = None, unit: str = "(kernel, pass)") -> str:
    c = _counts if counts is None else counts
    how = "predicted" if predicted else "measured"
    line = f"{c['done']} {unit} points {how}, {c['skipped']} skipped (already recorded)"
    return line + ("; retry_failed=true / redo_before=<time> measure recorded ones again" if c["skipped"] else "")


def take_counts() -> dict:
    """The counts so far, reset (a multirun reports its own)."""
    out = dict(_counts)
    _counts.update(skipped=0, done=0)
    return out


@contextlib.contextmanager
def job(job_num: int, cfg, label: Optional[str] = None):
    """Label the bar with the running point (`label`, else the sweep point of `cfg`); yields a callback
    for the (kernel, pass) step."""
    label = label or Point.from_config(cfg).label()
    if _bar is not None:
        _bar.set_description_str(f"job {job_num}: {label}")

    def on_step(step: str) -> None:
        if _bar is not None:
            _bar.set_postfix_str(step)

    yield on_step
    if _bar is not None:
        _bar.update(1)
