"""Timing of one (kernel, pass): triton.testing.do_bench quantiles 0.2 / 0.5 / 0.8 after warm-up,
and the peak device memory one call allocates beyond what existed before it.

fwd: the forward under torch.no_grad (prefill); bwd: backward alone, on a graph built once outside
the timed region (retain_graph=True); fwd+bwd: both. Gradients are reset to None between calls
(do_bench's grad_to_none). Calls slower than `SLOW_CALL_MS` are timed with 3 CUDA-event runs
instead (do_bench would spend 8 or more calls on them). On CPU (measure=time without CUDA, used by
the tests) a perf_counter loop stands in for do_bench.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch._functorch.config

from experiments.timed_calls import Call
from experiments.schema import TimingConfig

# The bwd pass replays one graph (retain_graph=True); torch.compile'd backwards (FlexAttention) refuse
# that when they donate their saved buffers. Donation off for every pass (set once, at import), so
# fwd, bwd and fwd+bwd rows are compiled alike whatever order a sweep runs them in.
torch._functorch.config.donated_buffer = False

SLOW_CALL_MS = 250.0
SLOW_CALL_RUNS = 3
QUANTILES = (0.2, 0.5, 0.8)


@dataclass
class Timing:
    p20_ms: float
    median_ms: float
    p80_ms: float
    peak_extra_mem_gb: float


def pass_function(call: Call, pass_name: str) -> Callable[[], None]:
    if pass_name == "fwd":
        def fwd():
            with torch.no_grad():
                call.run()
        return fwd
    if pass_name == "bwd":
        out = call.run()
        grad = torch.randn_like(out)
        return lambda: out.backward(grad, retain_graph=True)
    grad = torch.randn_like(call.run().detach())
    return lambda: call.run().backward(grad)


def _reset_grads(leaves) -> None:
    for t in leaves:
        t.grad = None


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    qs = statistics.quantiles(samples, n=10, method="inclusive")
    return qs[1], statistics.median(samples), qs[7]


def _cuda_call_ms(fn, leaves) -> float:
    _reset_grads(leaves)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _time_cuda(fn, leaves, cfg: TimingConfig) -> Timing:
    import triton.testing

    fn()  # compile / autotune outside everything measured
    torch.cuda.synchronize()
    _reset_grads(leaves)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    first_ms = _cuda_call_ms(fn, leaves)
    peak_gb = (torch.cuda.max_memory_allocated() - base) / 1e9
    if first_ms > SLOW_CALL_MS:
        p20, p50, p80 = _quantiles([_cuda_call_ms(fn, leaves) for _ in range(SLOW_CALL_RUNS)])
    else:
        p20, p50, p80 = triton.testing.do_bench(fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms, grad_to_none=leaves,
                                                quantiles=list(QUANTILES))
    return Timing(p20, p50, p80, peak_gb)


def _time_cpu(fn, leaves, cfg: TimingConfig) -> Timing:
    fn()
    samples, deadline = [], time.perf_counter() + cfg.rep_ms / 1e3
    while len(samples) < 3 or (time.perf_counter() < deadline and len(samples) < 100):
        _reset_grads(leaves)
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    p20, p50, p80 = _quantiles(samples)
    return Timing(p20, p50, p80, float("nan"))


def time_pass(call: Call, pass_name: str, cfg: TimingConfig) -> Timing:
    fn = pass_function(call, pass_name)
    timer = _time_cuda if torch.cuda.is_available() and call.leaves[0].is_cuda else _time_cpu
    return timer(fn, call.leaves, cfg)
