"""Entry point: `python -m experiments.e2e [model=..] [seqlen=..] [sparsity=..]` (a Hydra multirun,
configs/e2e/e2e.yaml): NSA inside L decoder layers of a real model (experiments/e2e_timing.py), one
training step, one prefill and one prefill + 512 generated tokens (experiments/e2e_generate.py) per
backend (dense SDPA, NSA, FSA), on CUDA only.

Each job is one (model, seqlen, sparsity) point; its rows (GPU, torch, Triton, commit, timestamp;
failures as oom / error rows) go to results/<name>/rows/ through experiments.store, and a rerun skips
what is recorded (retry_failed=true, redo_before=<time> measure again). Dense attention does not
depend on the preset: its rows carry block_size = topk = 0, so the second preset's job skips them.
experiments.callbacks.E2ECallback checks every job's config first (and that CUDA is there) and writes
results.csv, speedups.csv and speedup.png (experiments/e2e_report.py) when all jobs end.
"""
from __future__ import annotations

import math
import sys

import torch

CPU_MESSAGE = ("experiments.e2e: timings need CUDA (torch.cuda.is_available() is False); nothing was run "
               "and no rows were written (plot_only=true redraws the plots from recorded rows)")
AXES = ("model", "layers", "seqlen", "backend", "block_size", "topk", "step", "dtype")
# ttft_ms, ms_per_token: generate rows only (blank in the others and in rows recorded before them)
MEASURES = ("ms", "ms_per_layer", "peak_gb", "attn_ms", "mlp_ms", "attn_share", "ttft_ms", "ms_per_token")
PROVENANCE = ("status", "message", "gpu", "torch", "triton", "git_commit", "timestamp")
COLUMNS = AXES + MEASURES + PROVENANCE
KEY_COLUMNS = AXES + ("gpu",)
SORT = ("model", "layers", "seqlen", "block_size", "topk", "backend", "step")
UNIT = "(backend, step)"


def make_row(cfg, backend: str, step: str, meta: dict, status: str, message: str = "", **measures) -> dict:
    from experiments.schema import sparsity_preset

    preset = sparsity_preset(cfg.sparsity)
    dense = backend == "dense"  # one row per (model, N) for both presets
    row = dict(model=cfg.model, layers=cfg.layers, seqlen=cfg.seqlen, backend=backend,
               block_size=0 if dense else preset.block_size, topk=0 if dense else preset.topk, step=step,
               dtype="bfloat16", **{m: measures.get(m, math.nan) for m in MEASURES}, status=status, message=message)
    row.update(meta)
    return {c: row.get(c, "") for c in COLUMNS}


def label(cfg) -> str:
    return f"{cfg.model} L={cfg.layers} N={cfg.seqlen} {cfg.sparsity}"


def pending(cfg, meta: dict) -> list[tuple[str, str]]:
    """(backend, step) pairs of this job that are not recorded yet."""
    from experiments import store
    from experiments.points import row_key

    done = store.done_keys(store.sweep_dir(cfg.results_dir, cfg.name), cfg.retry_failed, cfg.redo_before,
                           COLUMNS, KEY_COLUMNS)
    return [(b, s) for b in cfg.backends for s in cfg.steps
            if row_key(make_row(cfg, b, s, meta, "ok"), KEY_COLUMNS) not in done]


def run_job(cfg, on_step=None) -> list[dict]:
    """Time what is left of one job's point, append the rows, return them (CUDA only)."""
    from experiments import e2e_generate, e2e_timing, progress, store
    from experiments.gpu.provenance import run_meta
    from experiments.runner import now
    from experiments.schema import sparsity_preset

    meta = run_meta()
    todo = pending(cfg, meta)
    progress.count(skipped=len(cfg.backends) * len(cfg.steps) - len(todo), done=len(todo))
    if not todo:
        return []
    preset = sparsity_preset(cfg.sparsity)
    rows: list[dict] = []
    try:
        base = e2e_timing.build(cfg.model, cfg.layers, cfg.seqlen + e2e_generate.NEW_TOKENS)
    except Exception as err:  # no model, no measurement: every row says why
        status, message = e2e_timing.failure(err)
        rows = [make_row(cfg, b, s, dict(meta, timestamp=now()), status, message) for b, s in todo]
    else:
        for backend in dict.fromkeys(b for b, _ in todo):
            steps = [s for b, s in todo if b == backend]
            if on_step:
                on_step(f"{backend} {','.join(steps)}")
            for res in e2e_timing.measure(base, cfg.seqlen, backend, (preset.block_size, preset.topk), cfg.reps,
                                          steps, cfg.generate_reps):
                measures = {m: res[m] for m in MEASURES if m in res}
                rows.append(make_row(cfg, backend, res["step"], dict(meta, timestamp=now()), res["status"],
                                     res["message"], **measures))
        del base
        torch.cuda.empty_cache()
    store.append_rows(store.sweep_dir(cfg.results_dir, cfg.name), f"{label(cfg)}|{meta['gpu']}", rows, COLUMNS)
    return rows


def run(cfg, num: int) -> None:
    """Job `num`: on CUDA it holds one GPU to itself while it times (experiments/gpu_lease.py)."""
    from experiments import progress
    from experiments.gpu_lease import exclusive_gpu

    if not torch.cuda.is_available():
        sys.exit(CPU_MESSAGE)
    with exclusive_gpu(torch.cuda.device_count(), first=num) as gpu:
        torch.cuda.set_device(gpu)
        with progress.job(num, cfg, label=label(cfg)) as on_step:
            run_job(cfg, on_step)
    if not progress.in_multirun():
        print(f"job {num}: {progress.counts_line(False, progress.take_counts(), UNIT)}", flush=True)


def _main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from experiments.schema import register_configs, validate_e2e

    register_configs()

    @hydra.main(version_base="1.3", config_path="../configs/e2e", config_name="e2e")
    def main(cfg: DictConfig) -> None:
        e2e_cfg = validate_e2e(cfg)
        if not e2e_cfg.plot_only:
            run(e2e_cfg, HydraConfig.get().job.num)

    main()


if __name__ == "__main__":
    _main()
