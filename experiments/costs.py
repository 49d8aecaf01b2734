"""The cost-model numbers of one row: per kernel and scope, FLOPs and bytes of a forward (then
scaled per pass), the roofline time of predicted rows and a predicted extra memory."""
from __future__ import annotations

from experiments import cost_model as cm
from experiments.points import Point
from experiments.schema import HardwareConfig, SelectionConfig
from fsa.auto import rule_choice
from fsa import tuning
from nsa_baseline import fused_attention
from nsa_baseline.ops import compressed_sdpa

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
        branches = branch_costs(point, sel)
        cost = cost + branches["compressed"] + (branches["window"] if kernel != "fla" else cm.Cost(0, 0, 0))  # fla: no window
    return cost


def branch_costs(point: Point, sel: SelectionConfig) -> dict[str, cm.Cost]:
    """Forward costs of the module's compressed and sliding-window branches (kernel independent)."""
    n, b, hq, h, d = point.seqlen, point.batch, point.q_heads, point.kv_heads, point.head_dim
    elem = ELEM_BYTES[point.dtype]
    return {
        "compressed": cm.compressed_branch_cost(n, b, hq, h, d, sel.kernel_size, sel.kernel_stride, elem),
        "window": cm.window_branch_cost(n, b, hq, h, d, sel.window_size, elem),
    }


NOT_FIT = "would not fit"  # how a predicted row's message starts when it exceeds the device memory
NOT_FIT_PATTERN = r"needs ~(\d+) GB of the device's (\d+) GB"


def fit_note(need_gb: float, memory_gb: float) -> str:
    """The message prefix of a predicted row that needs more than the device has, else ""."""
    if need_gb <= memory_gb:
        return ""
    return f"{NOT_FIT}: needs ~{need_gb:.0f} GB of the device's {memory_gb:.0f} GB; "


def input_gb(point: Point) -> float:
    """q, k, v of the point (what exists before a timed call; the module's projections aside)."""
    return ELEM_BYTES[point.dtype] * point.num_tokens * (point.q_heads + 2 * point.kv_heads) * point.head_dim / 1e9


# q-sized ([N, HQ, D]) tensors the cuDNN compressed route adds to the module's backward: fitted to the
# H100's 128K NSA rows (44f7b49, results/tables67: 6.0-7.9 more than the Triton route, by g)
CUDNN_COMPRESSED_Q_COPIES = 7.5


def cudnn_compressed(point: Point) -> bool:
    """Whether the module sends this point's compressed branch to cuDNN (compressed_sdpa.routed_sequences
    for one sequence of 16-bit inputs)."""
    return (point.dtype in ("bfloat16", "float16") and point.batch == 1
            and compressed_sdpa.route_bounds_hold(point.seqlen, point.q_heads,
                                                  fused_attention.COMPRESSED_SDPA_MIN_TOKENS))


def predicted_extra_mem_gb(kernel: str, point: Point, pass_name: str, hw: HardwareConfig) -> float:
    """Peak device memory of one call beyond its inputs, as the timed rows measure it: fwd (no grad)
    = outputs + the kernel's temporaries; bwd = gradients + backward temporaries (what the forward
    saved exists already); fwd+bwd = what the forward keeps + bwd. The module adds its other
    branches' outputs and gradients. An estimate: allocator rounding and library internals aside."""
    n, hq, h, d, t = point.num_tokens, point.q_heads, point.kv_heads, point.head_dim, point.topk
    elem, g = ELEM_BYTES[point.dtype], point.gqa
    out = elem * n * hq * d + cm.STAT_BYTES * n * hq  # o, lse
    grads = elem * n * (hq + 2 * h) * d + cm.STAT_BYTES * n * hq  # dq, dk, dv, delta
    entries = n * h * t  # block_indices entries
    index_build = 24.0 * entries  # keys, sorted keys, int64 sort permutation, tokens, pair positions
    index_kept = 8.0 * entries  # tokens and pair positions (FSA keeps them for its backward)
    inputs = input_gb(point) * 1e9
    module = point.scope.startswith("module")
    # the module's other branches: compressed and window outputs, the gated sum, the block indices
    branch_out = (2 * out + elem * n * hq * d + 4.0 * entries) if module else 0.0

    def buffers(backward: bool, in_use: float) -> float:  # FSA's partial buffers: all heads, or the budget
        cfg = tuning.gpu_launch_config(d, point.block_size, backward)
        whole = tuning.pass_bytes(n, t, h, g, d, tuning.padded_head_dim(d), elem, point.block_size, cfg, backward)
        return min(whole, tuning.budget_for_free(hw.memory_gb * 1e9 - inputs - in_use))

    family = rule_choice(g) if kernel == "auto" else kernel  # auto: the family its rule picks
    bwd_buffers = 0.0
    if family == "fsa":
        kept = out + index_kept + branch_out
        fwd = out + branch_out + max(index_build, index_kept + buffers(False, kept))
        bwd_buffers = buffers(True, kept + grads)
        bwd = grads + bwd_buffers
    elif family == "sdpa":  # FlashAttention: fp32 dq accumulator; with G > 1, dK / dV per query head first
        fwd, kept = out, out
        bwd = grads + 4 * n * hq * d + (2 * elem * n * hq * d if g > 1 else 0)
    else:  # nsa, fla: query-outer; the backward builds the block index for its dK / dV
        fwd, kept, bwd = out + branch_out, out + branch_out, grads + index_build
    if module and family != "sdpa":
        # the other branches' gradients and their output grads (they accumulate into shared dq / dk / dv
        # buffers and the compression grads go in place: fitted to the H100's 256K rows, results/tables67)
        bwd += 3 * elem * n * hq * d + elem * n * h * d
        if cudnn_compressed(point):  # its row copies and cuDNN's fp32 accumulators, in the
            # compressed branch's backward (after FSA's selected backward freed its buffers)
            bwd = max(bwd, bwd - bwd_buffers + CUDNN_COMPRESSED_Q_COPIES * elem * n * hq * d)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": kept + bwd}[pass_name] / 1e9
