"""The cost-model numbers of one row: per kernel and scope, FLOPs and bytes of a forward (then
scaled per pass), the roofline time of predicted rows and a predicted extra memory."""
from __future__ import annotations

from experiments import cost_model as cm
from experiments.points import Point
from experiments.schema import HardwareConfig, SelectionConfig

ELEM_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def selected_cost(kernel: str, point: Point, stats: cm.SelectionStats) -> cm.Cost:
    elem = ELEM_BYTES[point.dtype]
    if kernel == "fsa":
        return cm.fsa_cost(stats, point.gqa, point.head_dim, elem)
    return cm.nsa_cost(stats, point.gqa, point.head_dim, elem)  # nsa, fla (query-outer too), auto's fallback


def kernel_cost(kernel: str, point: Point, stats: cm.SelectionStats, sel: SelectionConfig,
                hw: HardwareConfig) -> cm.Cost:
    """One forward of `kernel` at `point` (selected attention, or the module's three branches)."""
    n, b, hq, h, d = point.seqlen, point.batch, point.q_heads, point.kv_heads, point.head_dim
    elem = ELEM_BYTES[point.dtype]
    if kernel == "sdpa":
        return cm.dense_causal_cost(n, b, hq, h, d, elem)
    if kernel == "auto":  # the faster of the two on this hardware
        costs = [selected_cost(k, point, stats) for k in ("nsa", "fsa")]
        cost = min(costs, key=lambda c: cm.roofline_ms(c, hw.peak_tflops, hw.peak_gbps))
    else:
        cost = selected_cost(kernel, point, stats)
    if point.scope == "module":
        cost = cost + branch_costs(point, sel)["compressed"] + branch_costs(point, sel)["window"]
    return cost


def branch_costs(point: Point, sel: SelectionConfig) -> dict[str, cm.Cost]:
    """Forward costs of the module's compressed and sliding-window branches (kernel independent)."""
    n, b, hq, h, d = point.seqlen, point.batch, point.q_heads, point.kv_heads, point.head_dim
    elem = ELEM_BYTES[point.dtype]
    return {
        "compressed": cm.compressed_branch_cost(n, b, hq, h, d, sel.kernel_size, sel.kernel_stride, elem),
        "window": cm.window_branch_cost(n, b, hq, h, d, sel.window_size, elem),
    }


def predicted_extra_mem_gb(kernel: str, point: Point, stats: cm.SelectionStats) -> float:
    """Outputs (o, lse) of every kernel; FSA adds a float32 partial output per (pair, query head)."""
    n, hq, d = point.num_tokens, point.q_heads, point.head_dim
    out = ELEM_BYTES[point.dtype] * n * hq * d + cm.STAT_BYTES * n * hq
    if kernel == "fsa":
        out += 4.0 * stats.pairs * point.gqa * d + cm.INDEX_BYTES * 2 * stats.pairs
    return out / 1e9
