"""Entry point: `python -m experiments.sweep [axis=v1,v2 ...]` (a Hydra multirun, configs/sweep.yaml).

Each job measures one point (every kernel and pass of it) on CUDA, or writes the cost model's
prediction without CUDA; experiments.callbacks.SweepCallback checks all job configs first and
writes the CSV, plots and summary.md under results/<name>/ when all jobs end.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # measure=time on CPU runs Triton kernels through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from experiments import progress  # noqa: E402
from experiments.gpu_lease import exclusive_gpu  # noqa: E402
from experiments.runner import run_job  # noqa: E402
from experiments.schema import register_configs, validate  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="../configs", config_name="sweep")
def main(cfg: DictConfig) -> None:
    sweep_cfg = validate(cfg)
    num = HydraConfig.get().job.num
    if not torch.cuda.is_available():
        with progress.job(num, sweep_cfg) as on_step:
            run_job(sweep_cfg, on_step=on_step)
        return
    # Parallel launchers: each job holds one GPU to itself while it times (experiments/gpu_lease.py).
    with exclusive_gpu(torch.cuda.device_count(), first=num) as gpu:
        torch.cuda.set_device(gpu)
        with progress.job(num, sweep_cfg) as on_step:
            run_job(sweep_cfg, on_step=on_step)


if __name__ == "__main__":
    main()
