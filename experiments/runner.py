"""One sweep job: the rows of every (kernel, pass) of one point, measured on CUDA or predicted by
the cost model, each failure recorded as a row (error / oom / unsupported) so the sweep goes on."""
from __future__ import annotations

import functools
import math
from dataclasses import replace
from typing import Callable, Optional

import torch

from experiments import accuracy, calibration, costs, progress, store, timed_calls, timing
from experiments import cost_model as cm
from experiments.inputs import make_inputs
from experiments.points import Point, make_row, row_key
from experiments.rowtools import MESSAGE_CHARS, describe, free_memory, git_commit, is_oom, now  # noqa: F401 (re-exported)
from experiments.schema import DECODE_SCOPES, SweepConfig

CPU_MESSAGE = "timings need CUDA; writing the analytic cost model only"


def measuring(cfg: SweepConfig) -> bool:
    return cfg.measure == "time" or (cfg.measure == "auto" and torch.cuda.is_available())


def environment(cfg: SweepConfig, device: torch.device) -> dict:
    import triton

    if not measuring(cfg):
        gpu = f"predicted {cfg.hardware.name}"
    elif device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    else:
        gpu = "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "git_commit": git_commit()}


def predicted_rows(cfg: SweepConfig, point: Point, todo: list[tuple[str, str]], meta: dict) -> list[dict]:
    """Roofline of the cost model on the closed-form counts of uniformly random causal indices,
    calibrated to measured kernels when hardware.calibration names a fit (experiments/calibration.py)."""
    stats = calibration.point_stats(point, cfg.selection)
    calib = calibration.Calibration.load(cfg.hardware.calibration)
    note = (f"cost model on {cfg.hardware.name} peaks, counts of uniformly random causal indices in closed form"
            + ("" if point.indices == "random" else " (stand-in for indices=nsa)"))
    rows = []
    for kernel, pass_name in todo:
        reason = timed_calls.unsupported_reason(kernel, point, check_installed=False)
        if reason:
            rows.append(make_row(point, kernel, pass_name, "unsupported", dict(meta, timestamp=now()), reason))
            continue
        cost = costs.kernel_cost(kernel, point, stats, cfg.selection, cfg.hardware).for_pass(pass_name)
        ms, how = calibration.predicted_ms(kernel, point, stats, pass_name, cfg.selection, cfg.hardware, calib)
        mem = costs.predicted_extra_mem_gb(kernel, point, pass_name, cfg.hardware)
        fits = costs.fit_note(mem + costs.input_gb(point), cfg.hardware.memory_gb)
        rows.append(make_row(point, kernel, pass_name, "predicted", dict(meta, timestamp=now()),
                             f"{fits}{how}; {note}", median_ms=ms, tflops=cost.useful_flops / ms / 1e9,
                             gbps=cost.bytes / ms / 1e6, peak_extra_mem_gb=mem,
                             model_gflop=cost.flops / 1e9, model_gbyte=cost.bytes / 1e9))
        if point.scope == "module" and kernel not in ("sdpa", "fla") and cfg.breakdown:  # fla: not our branches  # breakdown.png, as measured
            parts = calibration.predicted_branch_ms(kernel, point, stats, pass_name, cfg.selection, cfg.hardware,
                                                    calib)
            rows += [make_row(replace(point, scope=f"module/{b}"), kernel, pass_name, "predicted",
                              dict(meta, timestamp=now()), f"share of the module's prediction ({how}) by the "
                              "branches' plain rooflines", median_ms=ms_b) for b, ms_b in parts.items()]
    return rows


def _failed_rows(point, kernel, passes, meta, exc) -> list[dict]:
    status = "oom" if is_oom(exc) else "error"
    return [make_row(point, kernel, p, status, dict(meta, timestamp=now()), describe(exc)) for p in passes]


def _timed_rows(point: Point, kernel: str, passes: list[str], call, cost: cm.Cost, rel_err: float, note: str,
                meta: dict, cfg: SweepConfig, on_step) -> list[dict]:
    rows = []
    for pass_name in passes:
        if on_step:
            on_step(f"{kernel} {pass_name}" + ("" if point.scope in ("selected", "module") else f" {point.scope}"))
        try:
            t = timing.time_pass(call, pass_name, cfg.timing)
        except Exception as exc:
            free_memory()
            rows += _failed_rows(point, kernel, [pass_name], meta, exc)
            continue
        c = cost.for_pass(pass_name)
        rows.append(make_row(point, kernel, pass_name, "ok", dict(meta, timestamp=now()), note,
                             median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                             tflops=c.useful_flops / t.median_ms / 1e9, gbps=c.bytes / t.median_ms / 1e6,
                             peak_extra_mem_gb=t.peak_extra_mem_gb, rel_err=rel_err,
                             model_gflop=c.flops / 1e9, model_gbyte=c.bytes / 1e9))
    return rows


def branch_rows(cfg: SweepConfig, point: Point, kernel: str, passes: list[str], inp, stats, meta,
                on_step) -> list[dict]:
    """Rows of scope "module/<branch>": each branch of the module timed alone (breakdown.png)."""
    rows = []
    branch_cost = costs.branch_costs(point, cfg.selection)
    branch_cost["selected"] = costs.selected_cost("nsa" if kernel == "auto" else kernel, point, stats)
    try:
        calls = timed_calls.branch_calls(kernel, cfg, point, inp)
    except Exception as exc:
        free_memory()
        return [r for b in timed_calls.BRANCHES
                for r in _failed_rows(replace(point, scope=f"module/{b}"), kernel, passes, meta, exc)]
    for branch, call in calls.items():
        rows += _timed_rows(replace(point, scope=f"module/{branch}"), kernel, passes, call, branch_cost[branch],
                            math.nan, "", meta, cfg, on_step)
    return rows


def _module_reference(cfg: SweepConfig, point: Point, inp) -> Optional[Callable[[], torch.Tensor]]:
    """The torch-backend module output of the point, computed once on first use (every kernel of
    the point is compared with it), or None where it is not run (selected scope, long inputs)."""
    if point.scope != "module" or point.num_tokens > accuracy.MODULE_REFERENCE_MAX_TOKENS:
        return None
    @functools.cache
    def reference() -> torch.Tensor:
        with torch.no_grad():
            return timed_calls.build_call("torch", cfg, point, inp).run()

    return reference


def measured_rows(cfg: SweepConfig, point: Point, todo: list[tuple[str, str]], meta: dict, device,
                  on_step: Optional[Callable[[str], None]] = None) -> list[dict]:
    rows: list[dict] = []
    by_kernel: dict[str, list[str]] = {}
    for kernel, pass_name in todo:
        by_kernel.setdefault(kernel, []).append(pass_name)
    try:
        inp = make_inputs(point, cfg.selection, device, cfg.seed)
        stats = cm.stats_from_indices(inp.block_indices, point.block_size, inp.cu_seqlens)
    except Exception as exc:  # no inputs, no measurement: every row of the point says why
        free_memory()
        return [r for k, ps in by_kernel.items() for r in _failed_rows(point, k, ps, meta, exc)]
    module_ref = _module_reference(cfg, point, inp)
    for kernel, passes in by_kernel.items():
        reason = timed_calls.unsupported_reason(kernel, point)
        if reason:
            rows += [make_row(point, kernel, p, "unsupported", dict(meta, timestamp=now()), reason) for p in passes]
            continue
        try:
            call = timed_calls.build_call(kernel, cfg, point, inp)
            with torch.no_grad():
                out = call.run()
            rel_err, note = accuracy.output_rel_err(call.family, out, inp, point, cfg.timing.ref_rows,
                                                    cfg.seed, module_ref)
            del out
        except Exception as exc:
            free_memory()
            rows += _failed_rows(point, kernel, passes, meta, exc)
            continue
        cost = costs.kernel_cost(kernel, point, stats, cfg.selection, cfg.hardware)
        rows += _timed_rows(point, kernel, passes, call, cost, rel_err, note, meta, cfg, on_step)
        del call
        free_memory()
        if point.scope == "module" and kernel not in ("sdpa", "fla") and cfg.breakdown:  # fla: not our branches
            rows += branch_rows(cfg, point, kernel, passes, inp, stats, meta, on_step)
    return rows


def pending(cfg: SweepConfig, point: Point, meta: dict) -> list[tuple[str, str]]:
    """(kernel, pass) pairs of this job that are not recorded yet."""
    done = store.done_keys(store.sweep_dir(cfg.results_dir, cfg.name, not measuring(cfg)), cfg.retry_failed,
                           cfg.redo_before)
    return [(k, p) for k in cfg.kernels for p in cfg.passes
            if row_key(make_row(point, k, p, "ok", dict(meta, timestamp=""))) not in done]


def run_job(cfg: SweepConfig, device: Optional[torch.device] = None,
            on_step: Optional[Callable[[str], None]] = None) -> list[dict]:
    """Measure (or predict) what is left of one job's point, append the rows, return them."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    point = Point.from_config(cfg)
    meta = environment(cfg, device)
    todo = pending(cfg, point, meta)
    progress.count(skipped=len(cfg.kernels) * len(cfg.passes) - len(todo), done=len(todo))
    if not todo:
        return []
    if point.scope in DECODE_SCOPES:  # decode / generate: experiments/decode_jobs.py
        from experiments import decode_jobs

        rows = (decode_jobs.measured_rows(cfg, point, todo, meta, device, on_step) if measuring(cfg)
                else decode_jobs.predicted_rows(cfg, point, todo, meta))
    elif measuring(cfg):
        rows = measured_rows(cfg, point, todo, meta, device, on_step)
    else:
        rows = predicted_rows(cfg, point, todo, meta)
    store.append_rows(store.sweep_dir(cfg.results_dir, cfg.name, not measuring(cfg)), f"{point}|{meta['gpu']}", rows)
    return rows
