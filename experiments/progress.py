"""A tqdm bar over the jobs of a multirun (what runs now, how many are left), shared by the
callback that knows the job count and the jobs that advance it. Jobs launched in other processes
(joblib, SLURM) run without it."""
from __future__ import annotations

import contextlib
from typing import Optional

from tqdm import tqdm

from experiments.points import Point

_bar: Optional[tqdm] = None


def start(total_jobs: int) -> None:
    global _bar
    _bar = tqdm(total=total_jobs, unit="job", desc="sweep", dynamic_ncols=True)


def close() -> None:
    global _bar
    if _bar is not None:
        _bar.close()
        _bar = None


@contextlib.contextmanager
def job(job_num: int, cfg):
    """Label the bar with the running point; yields a callback for the (kernel, pass) step."""
    label = Point.from_config(cfg).label()
    if _bar is not None:
        _bar.set_description_str(f"job {job_num}: {label}")

    def on_step(step: str) -> None:
        if _bar is not None:
            _bar.set_postfix_str(step)

    yield on_step
    if _bar is not None:
        _bar.update(1)
