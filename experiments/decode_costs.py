"""Bytes per decode step (one new token per sequence over a cache of L tokens), analytic.

What a decode step must read from HBM at the least, per sequence and KV head, keys and values alike:
ours (the NSA module) the visible summaries (k_cmp, v_cmp), the T selected blocks (T * BS keys, or
all L when fewer) and the window (min(w, L) keys), each branch loading its own keys (the local blocks
lie inside the window and are read twice, as in the NSA paper's count); dense the L keys. Both add
the query in and the output out. Not counted: the append's few writes (one key, value and summary),
indices and softmax statistics (bytes per head, not per key), and any rereads of our kernels (the
compressed-select kernel walks the summaries twice; L2 takes part of it): a floor, not a measurement.
Predicted rows divide it by the nominal HBM peak (no launch overhead): labelled "predicted".

NSA paper Table 4 counts tokens the same way: floor((L - l) / d) summaries + 1024 selected + 512
window (l = kernel 32, d = stride 16); our count has one summary more ((L - l) // d + 1, the one that
ends exactly at L), e.g. 5631 vs the paper's 5632 (rounded from 5630) at 64K.
"""
from __future__ import annotations

from dataclasses import dataclass

ELEM_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
PAPER_SEQLENS = (8192, 16384, 32768, 65536)


def num_summaries(length: int, kernel_size: int, kernel_stride: int) -> int:
    """Summaries of a cache of `length` keys (nsa_baseline.utils.compressed_varlen.num_compressed)."""
    return (length - kernel_size) // kernel_stride + 1 if length >= kernel_size else 0


@dataclass(frozen=True)
class DecodeTokens:
    compressed: int
    selected: int
    window: int

    @property
    def total(self) -> int:
        return self.compressed + self.selected + self.window


def nsa_tokens(length: int, kernel_size: int, kernel_stride: int, block_size: int, topk: int,
               window_size: int) -> DecodeTokens:
    """Key positions one KV head of one sequence reads in a decode step over `length` keys."""
    return DecodeTokens(num_summaries(length, kernel_size, kernel_stride), min(topk * block_size, length),
                        min(window_size, length))


def decode_bytes(length: int, batch: int, q_heads: int, kv_heads: int, head_dim: int, elem: int,
                 tokens: int) -> int:
    """`tokens` keys and values per (sequence, KV head), plus q in and o out per query head."""
    return batch * kv_heads * tokens * head_dim * elem * 2 + 2 * batch * q_heads * head_dim * elem


def step_bytes(point, sel, dense: bool, length: int | None = None) -> int:
    """Bytes of one decode step of `point` (scope decode: seqlen = L, batch = B; sel: SelectionConfig);
    the new token attends `length` keys (default point.seqlen)."""
    length = point.seqlen if length is None else length
    tokens = length if dense else nsa_tokens(length, sel.kernel_size, sel.kernel_stride, point.block_size,
                                             point.topk, sel.window_size).total
    return decode_bytes(length, point.batch, point.q_heads, point.kv_heads, point.head_dim,
                        ELEM_BYTES[point.dtype], tokens)


def projection_cost(point, gates: bool) -> tuple[float, float]:
    """(FLOPs per token, weight bytes) of the q/k/v/o projections (+ NSA's gate projection), hidden =
    q_heads * head_dim: what a generate step adds to the attention on both sides."""
    hidden, hq, h, d = point.q_heads * point.head_dim, point.q_heads, point.kv_heads, point.head_dim
    outs = 2 * hq * d + 2 * h * d + (3 * hq if gates else 0)
    return 2.0 * hidden * outs, float(ELEM_BYTES[point.dtype] * hidden * outs)


def paper_table4_tokens(length: int, kernel_size: int = 32, kernel_stride: int = 16, selected: int = 1024,
                        window: int = 512) -> int:
    """NSA paper Table 4's count: floor((s - l) / d) compressed + n * l' selected + w window."""
    return (length - kernel_size) // kernel_stride + selected + window


def table4_rows(sel, block_size: int, topk: int, q_heads: int, kv_heads: int, head_dim: int,
                dtype: str = "bfloat16") -> list[dict]:
    """Per L of the paper: its tokens and expected speedup beside ours (tokens, and bytes with q / o)."""
    from experiments.paper import numbers as pn

    elem = ELEM_BYTES[dtype]
    rows = []
    for n in PAPER_SEQLENS:
        ours = nsa_tokens(n, sel.kernel_size, sel.kernel_stride, block_size, topk, sel.window_size)
        b_ours = decode_bytes(n, 1, q_heads, kv_heads, head_dim, elem, ours.total)
        b_dense = decode_bytes(n, 1, q_heads, kv_heads, head_dim, elem, n)
        paper_tokens, paper_x = pn.NSA_TABLE4[n]
        rows.append({"L": n, "paper NSA tokens": paper_tokens, "paper expected x": paper_x,
                     "ours tokens (cmp + sel + win)": f"{ours.total} ({ours.compressed} + {ours.selected} + "
                                                       f"{ours.window})",
                     "ours tokens x": n / ours.total, "ours bytes x (q, o incl.)": b_dense / b_ours,
                     "ours MB / step": b_ours / 1e6, "dense MB / step": b_dense / 1e6})
    return rows
