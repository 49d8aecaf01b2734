"""Moving rows between [N, HQ, D] and compressed_sdpa's residue layout, tile by tile.

The call's rows are ordered (sequence, KV head, residue, group head, a'), and row a' of residue s is
token stride * (a' + shift_s) + s: consecutive call rows read rows 16 * HQ * D elements apart.
torch's index_select walks the call rows in order and ran at ~0.85 TB/s on the H100 (632 us per
[16K x 64 heads, 128] move, 53% of the cuDNN compressed branch: results/sdpa_branch_probe). A
program here owns one (sequence, KV head) and A_T consecutive a' and moves all stride x G of its
(residue, group head) rows of them, so together it touches A_T x stride consecutive tokens of the G
heads: the reads (gather) or writes (scatter) on the [N, HQ, D] side land in a few contiguous spans
that L2 merges, and the call side is A_T-row runs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_baseline.utils.triton_utils import next_pow2

ROWS_PER_PROGRAM = 32  # A_T: a' per program (32 rows x 256 bytes per run on the call side at D = 128)


@triton.jit
def _move_rows_kernel(src, dst, idx, L, HEADS_PER_GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                      A_T: tl.constexpr, SCATTER: tl.constexpr, ACCUMULATE: tl.constexpr):
    """Grid (a' tiles, sequence x KV head). idx[r] = the [N * HQ] row of call row r, -1 for a call row
    that is no query. Gather: dst[r] = src[idx[r]] (0 where -1). Scatter: dst[idx[r]] = src[r]
    (+= with ACCUMULATE), nothing where -1."""
    o_a = tl.program_id(0) * A_T + tl.arange(0, A_T)
    m_a = o_a < L
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    base = tl.program_id(1).to(tl.int64) * HEADS_PER_GROUP
    for j in range(HEADS_PER_GROUP):
        r = (base + j) * L + o_a
        row = tl.load(idx + r, mask=m_a, other=-1).to(tl.int64)
        ok = (row >= 0)[:, None] & m_d[None, :]
        if SCATTER:
            x = tl.load(src + r[:, None] * D + o_d[None, :], mask=ok, other=0.)
            p = dst + row[:, None] * D + o_d[None, :]
            if ACCUMULATE:
                x = x.to(tl.float32) + tl.load(p, mask=ok, other=0.).to(tl.float32)
            tl.store(p, x.to(dst.dtype.element_ty), mask=ok)
        else:
            x = tl.load(src + row[:, None] * D + o_d[None, :], mask=ok, other=0.)
            tl.store(dst + r[:, None] * D + o_d[None, :], x.to(dst.dtype.element_ty),
                     mask=m_a[:, None] & m_d[None, :])


def _launch(src, dst, idx, groups: int, heads_per_group: int, length: int, scatter: bool, accumulate: bool):
    d = src.shape[-1]
    a_t = min(ROWS_PER_PROGRAM, next_pow2(length))
    _move_rows_kernel[(triton.cdiv(length, a_t), groups)](
        src, dst, idx, length, HEADS_PER_GROUP=heads_per_group, D=d, BLOCK_D=max(16, next_pow2(d)), A_T=a_t,
        SCATTER=scatter, ACCUMULATE=accumulate, num_warps=4 if a_t * d >= 4096 else 2)


def gather_rows(x: torch.Tensor, idx: torch.Tensor, groups: int, heads_per_group: int, length: int) -> torch.Tensor:
    """x [R, D] (contiguous) -> [groups * heads_per_group * length, D]: row r = x[idx[r]], 0 where idx is -1."""
    out = torch.empty(idx.numel(), x.shape[-1], dtype=x.dtype, device=x.device)
    _launch(x, out, idx, groups, heads_per_group, length, False, False)
    return out


def scatter_rows(x: torch.Tensor, idx: torch.Tensor, out: torch.Tensor, groups: int, heads_per_group: int,
                 length: int, accumulate: bool = False) -> torch.Tensor:
    """out[idx[r]] = x[r] (+= with accumulate) for the call rows r with idx[r] >= 0; out [R, D]
    contiguous; rows no call row maps to are left as they are."""
    _launch(x, out, idx, groups, heads_per_group, length, True, accumulate)
    return out
