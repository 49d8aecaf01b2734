"""The rows of one scope=decode / scope=generate job (experiments/runner.py hands them here).

decode (`seqlen` = cache length L, `batch` = B): one decode step of the whole NSA attention between
the projections (append, compressed attention + selection, selected + window + gated sum; the
kernels are the same for nsa / fsa / auto) over a cache of L - 1 random tokens, so the new token
attends L keys; kernel sdpa = dense SDPA decode over [B, H, L, D], the fastest of its backends (the
row's message names it and torch's own pick); kernel flashinfer = FlashInfer's batch decode over the
same keys as a 16-row paged cache, the faster of its CUDA-core and tensor-core variants (measured only:
without CUDA its rows say so, its floor is sdpa's). pass = eager | graph (CUDA-graph replay). GB/s = the
analytic bytes of a step (experiments/decode_costs.py) / time.
generate: prefill L tokens then `decode_steps` steps of one layer, projections included
(experiments/generate_timing.py); median_ms = total, plus ttft_ms and per_token_ms.
Without CUDA: predicted rows, decode = bytes / HBM peak (a floor: no launch or host time), generate =
the calibrated prefill prediction of scope=module + projections + steps x the per-step floor.
Every failure is a row (error / oom / unsupported); rows resume like every sweep's.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from experiments import calibration, decode_costs, timed_calls
from experiments.points import Point, make_row
from experiments.rowtools import describe, free_memory, is_oom, now
from experiments.schema import SweepConfig

FLOOR_NOTE = ("predicted: bytes a step must read (experiments/decode_costs.py) / hardware.peak_gbps; launch and "
              "host time not modelled, eager and graph alike")
MEMORY_SHARE = 0.85  # a point whose tensors need more of the free device memory is recorded as oom, not run


def _group(todo):
    by_kernel: dict[str, list[str]] = {}
    for kernel, pass_name in todo:
        by_kernel.setdefault(kernel, []).append(pass_name)
    return by_kernel


def _row(point, kernel, pass_name, status, meta, message="", **measures):
    return make_row(point, kernel, pass_name, status, dict(meta, timestamp=now()), message, **measures)


def _failed(point, kernel, passes, meta, exc) -> list[dict]:
    return [_row(point, kernel, p, "oom" if is_oom(exc) else "error", meta, describe(exc)) for p in passes]


def floor_ms(point: Point, cfg: SweepConfig, dense: bool, length: int | None = None) -> tuple[float, int]:
    nbytes = decode_costs.step_bytes(point, cfg.selection, dense, length)
    return nbytes / (cfg.hardware.peak_gbps * 1e9) * 1e3, nbytes


def _projection_ms(point: Point, cfg: SweepConfig, dense: bool, tokens: int) -> float:
    flops, weights = decode_costs.projection_cost(point, gates=not dense)
    hw = cfg.hardware
    return max(flops * tokens / (hw.peak_tflops * 1e12), weights / (hw.peak_gbps * 1e9)) * 1e3


def predicted_rows(cfg: SweepConfig, point: Point, todo, meta) -> list[dict]:
    rows = []
    calib = calibration.Calibration.load(cfg.hardware.calibration) if point.scope == "generate" else None
    for kernel, pass_name in todo:
        reason = timed_calls.unsupported_reason(kernel, point, check_installed=False)
        if kernel == "flashinfer" and not reason:
            reason = "flashinfer: a measured peer only (no prediction: its byte floor is the sdpa rows')"
        if reason:
            rows.append(_row(point, kernel, pass_name, "unsupported", meta, reason))
            continue
        dense = kernel == "sdpa"
        if point.scope == "decode":
            ms, nbytes = floor_ms(point, cfg, dense)
            rows.append(_row(point, kernel, pass_name, "predicted", meta, FLOOR_NOTE, median_ms=ms,
                             gbps=cfg.hardware.peak_gbps, model_gbyte=nbytes / 1e9))
            continue
        prefill = replace(point, scope="module")
        stats = calibration.point_stats(prefill, cfg.selection)
        attn_ms, how = calibration.predicted_ms(kernel, prefill, stats, "fwd", cfg.selection, cfg.hardware, calib)
        ttft = attn_ms + _projection_ms(point, cfg, dense, point.num_tokens)
        mid = point.seqlen + cfg.decode_steps // 2  # the mean length the steps attend
        per_token = floor_ms(point, cfg, dense, mid)[0] + _projection_ms(point, cfg, dense, point.batch)
        rows.append(_row(point, kernel, pass_name, "predicted", meta,
                         f"predicted: prefill = scope=module fwd ({how}) + projections at peak; per token = "
                         "byte floor + projection weights at peak; launch and host time not modelled",
                         median_ms=ttft + cfg.decode_steps * per_token, ttft_ms=ttft, per_token_ms=per_token))
    return rows


def _fits(need: float) -> str:
    free, _ = torch.cuda.mem_get_info()
    if need > MEMORY_SHARE * free:
        return f"not run: needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return ""


def _decode_kernel_rows(cfg, point, kernel, passes, meta, device) -> list[dict]:
    from experiments import decode_timing as dt

    elem = decode_costs.ELEM_BYTES[point.dtype]
    b, n, h, d = point.batch, point.seqlen, point.kv_heads, point.head_dim
    cache_bytes = 2 * b * n * h * d * elem
    dense = kernel in ("sdpa", "flashinfer")
    too_big = _fits(cache_bytes * (2.0 if kernel == "flashinfer" else 1.0 if dense else 1.1))  # + its paged copy
    if too_big:
        return [_row(point, kernel, p, "oom", meta, too_big) for p in passes]
    _, nbytes = floor_ms(point, cfg, dense)
    tm = cfg.timing
    rows = []
    if dense:
        dtype = getattr(torch, point.dtype)
        qd = torch.randn(b, point.q_heads, 1, d, device=device, dtype=dtype)
        kd, vd = (torch.randn(b, h, n, d, device=device, dtype=dtype) for _ in range(2))
        if kernel == "flashinfer":
            picked = f"paged, {dt.FLASHINFER_PAGE}-row pages"
            results = dt.time_flashinfer(qd, kd, vd, passes, tm.warmup_ms, tm.rep_ms)
        else:
            picked = f"torch picks {dt.sdpa_choice(qd, kd, vd) or '?'}"
            results = dt.time_sdpa_backends(qd, kd, vd, passes, tm.warmup_ms, tm.rep_ms)
        for p in passes:
            ok = sorted((t[1], t, name) for name, mode, t, _ in results if mode == p and t is not None)
            others = "; ".join(f"{name} {t[1]:.4f} ms" if t else f"{name}: {err}"
                               for name, mode, t, err in results if mode == p)
            if not ok:
                rows.append(_row(point, kernel, p, "error", meta, f"no {kernel} variant ran: {others}"[:300]))
                continue
            _, t, name = ok[0]
            rows.append(_row(point, kernel, p, "ok", meta, f"best {kernel} variant {name} ({picked}); "
                             f"all: {others}"[:300], median_ms=t[1], p20_ms=t[0], p80_ms=t[2],
                             gbps=nbytes / t[1] / 1e6, model_gbyte=nbytes / 1e9))
        return rows
    module = timed_calls.build_module(kernel, cfg, point, device)
    cache = dt.fill_cache(module, b, n)
    step, out = dt.attention_step(module, cache, cfg.seed)
    if not bool(torch.isfinite(out).all()):
        return [_row(point, kernel, p, "error", meta, "non-finite decode output") for p in passes]
    for p in passes:
        try:
            if p == "graph16":
                t = dt.time_consecutive(module, cache, tm.warmup_ms, tm.rep_ms, cfg.seed)
                note = (f"attention between the projections (decode kernels), per step of {dt.STEPS_PER_GRAPH} "
                        "consecutive steps in one graph (1 in kernel_stride completes a summary)")
            else:
                t = dt.bench(step if p == "eager" else dt.graphed(step), tm.warmup_ms, tm.rep_ms)
                note = "attention between the projections (decode kernels), a step that completes a summary"
        except Exception as exc:  # this mode fails (e.g. capture): a row, the other mode still runs
            rows += _failed(point, kernel, [p], meta, exc)
            continue
        rows.append(_row(point, kernel, p, "ok", meta, note, median_ms=t[1], p20_ms=t[0], p80_ms=t[2],
                         gbps=nbytes / t[1] / 1e6, model_gbyte=nbytes / 1e9))
    if cache.lengths.tolist() != [n - 1] * b:
        raise RuntimeError("a timed decode step did not give its length back")
    return rows


def _generate_kernel_rows(cfg, point, kernel, passes, meta, device) -> list[dict]:
    from experiments import generate_timing as gt

    elem = decode_costs.ELEM_BYTES[point.dtype]
    tokens = point.seqlen + cfg.decode_steps
    need = elem * point.batch * (2 * tokens * point.kv_heads * point.head_dim  # the cache
                                 + 6 * point.seqlen * point.q_heads * point.head_dim)  # x, q, o, temporaries
    too_big = _fits(need)
    if too_big:
        return [_row(point, kernel, p, "oom", meta, too_big) for p in passes]
    dense = kernel == "sdpa"
    module = timed_calls.build_module("fsa" if dense else kernel, cfg, point, device)  # dense: its projections
    rows = []
    for p in passes:
        run = gt.dense if dense else gt.ours
        try:
            t = run(module, point.batch, point.seqlen, cfg.decode_steps, p, cfg.seed)
        except Exception as exc:  # e.g. no SDPA backend for the masked graph step: the other mode still runs
            rows += _failed(point, kernel, [p], meta, exc)
            free_memory()
            continue
        note = ("dense: SDPA prefill, SDPA decode over a plain KV cache" + (" (graph: masked over the "
                "preallocated cache)" if p == "graph" else "") if dense else "NSA module with an NSACache")
        rows.append(_row(point, kernel, p, "ok" if t.finite else "error", meta,
                         f"{note}; {cfg.decode_steps} steps" + ("" if t.finite else "; non-finite output"),
                         median_ms=t.total_ms, ttft_ms=t.ttft_ms, per_token_ms=t.per_token_ms))
    return rows


def measured_rows(cfg: SweepConfig, point: Point, todo, meta, device, on_step=None) -> list[dict]:
    rows = []
    for kernel, passes in _group(todo).items():
        reason = timed_calls.unsupported_reason(kernel, point)
        if reason:
            rows += [_row(point, kernel, p, "unsupported", meta, reason) for p in passes]
            continue
        if device.type != "cuda":  # measure=time without CUDA: the decode timings need CUDA graphs and events
            rows += [_row(point, kernel, p, "error", meta, f"scope={point.scope} timings need CUDA") for p in passes]
            continue
        if on_step:
            on_step(f"{kernel} {point.scope}")
        make = _decode_kernel_rows if point.scope == "decode" else _generate_kernel_rows
        try:
            rows += make(cfg, point, kernel, passes, meta, device)
        except Exception as exc:
            rows += _failed(point, kernel, passes, meta, exc)
        free_memory()
    return rows
