"""Entry point: `python -m experiments.sweep [axis=v1,v2 ...]` (a Hydra multirun, configs/sweep.yaml).

Each job measures one point (every kernel and pass of it) on CUDA, or writes the cost model's
prediction without CUDA; experiments.callbacks.SweepCallback checks all job configs first and
writes the CSV, plots and summary.md under results/<name>/ when all jobs end.
"""
from __future__ import annotations

import contextlib
import os
import time

import torch

if not torch.cuda.is_available():  # measure=time on CPU runs Triton kernels through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from experiments import folders, progress  # noqa: E402
from experiments.gpu_lease import exclusive_gpu  # noqa: E402
from experiments.runner import measuring, run_job  # noqa: E402
from experiments.schema import register_configs, validate  # noqa: E402

register_configs()


def run(sweep_cfg, num: int) -> None:
    """Job `num` of the multirun; on CUDA it holds one GPU to itself while it times, so parallel
    launchers never put two jobs on one GPU (experiments/gpu_lease.py)."""
    lease = (exclusive_gpu(torch.cuda.device_count(), first=num) if torch.cuda.is_available()
             else contextlib.nullcontext(None))
    start = time.monotonic()
    with lease as gpu:
        if gpu is not None:
            torch.cuda.set_device(gpu)
        with progress.job(num, sweep_cfg) as on_step:
            run_job(sweep_cfg, on_step=on_step)
    if not progress.in_multirun():  # a job of another process (joblib, SLURM) reports its own counts
        where = f" on GPU {gpu} ({os.getpid()})" if gpu is not None else ""
        print(f"job {num}{where}, {time.monotonic() - start:.1f} s: "
              f"{progress.counts_line(not measuring(sweep_cfg), progress.take_counts())}", flush=True)


@hydra.main(version_base="1.3", config_path="../configs", config_name="sweep")
def main(cfg: DictConfig) -> None:
    sweep_cfg = validate(cfg)
    sweep_cfg.name = folders.configured_name(cfg, HydraConfig.get(), predicted=not measuring(sweep_cfg))
    run(sweep_cfg, HydraConfig.get().job.num)


if __name__ == "__main__":
    main()
