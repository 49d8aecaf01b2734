"""Vanilla NSA selected-attention backward.
dQ: grid (N, H), query-outer like the forward (one token's G heads as a [G_PAD, D_PAD] tile, T
blocks); it also computes delta = rowsum(o * do) (- dlse). dK/dV: grid over work items, each one
chunk of the (KV head, key block) CSR row of nsa_baseline.utils.block_index: it walks the row's query
tokens in tiles of BLOCK_M flattened (token, head) rows. A row of one chunk writes its block once;
a longer row (e.g. the sink block 0) leaves fp32 partials that a reduce kernel sums in chunk order.
No atomics anywhere: dK/dV are bitwise deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from nsa_baseline.ops.selected_fwd import load_kv_block, pair_valid
from nsa_baseline.ops.tuning import (DKDV_MIN_CHUNK_TILES, DKDV_SPLIT_SLOTS, DQ_CONFIGS, dkdv_config,
                                    query_outer_config)
from nsa_baseline.utils.block_index import BlockIndex, build_block_index
from nsa_baseline.utils.triton_utils import LOG2E, is_interpreter, new_output, next_pow2


@triton.jit
def _dq_block(b_q, b_do, b_dq, b_lse, b_delta, k, v, bos, pos, idx, valid, i_h,
              H: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, D_PAD: tl.constexpr,
              scale_log2, IEEE: tl.constexpr):
    """dq (unscaled) += ds @ K over key block `idx`; p recomputed from lse (log2 units)."""
    b_k, b_v, m_key = load_kv_block(k, v, bos, pos, idx, valid, i_h, H, D, BS, D_PAD)
    if IEEE:
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")  # [G_PAD, BS]
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision="ieee")  # [G_PAD, BS]
    else:
        b_s = tl.dot(b_q, tl.trans(b_k))
        b_dp = tl.dot(b_do, tl.trans(b_v))
    b_p = tl.where(m_key[None, :], tl.exp2(b_s * scale_log2 - b_lse[:, None]), 0.)
    b_ds = b_p * (b_dp - b_delta[:, None])  # [G_PAD, BS]
    if IEEE:
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision="ieee")
    else:
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k)
    return b_dq


@triton.jit
def nsa_selected_bwd_dq_kernel(
    q, k, v, o, do, lse, dlse, delta, dq, block_indices, token_pos, N, scale, scale_log2,
    H: tl.constexpr, G: tl.constexpr, T: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    G_PAD: tl.constexpr, D_PAD: tl.constexpr, HAS_DLSE: tl.constexpr, SKIP_UNUSED: tl.constexpr,
    IEEE: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    """Grid (N, H): dq [N, HQ, D] of one token's G heads. ACCUMULATE: add to what dq holds (fp32 sum)
    instead of overwriting it (the module's fused backward sums its branches this way)."""
    i_n, i_h = tl.program_id(0), tl.program_id(1)
    i_n64 = i_n.to(tl.int64)
    pos = tl.load(token_pos + i_n)
    bos = i_n - pos
    last_block = pos // BS

    o_g = tl.arange(0, G_PAD)
    o_d = tl.arange(0, D_PAD)
    m_g = o_g < G
    m_gd = m_g[:, None] & (o_d < D)[None, :]
    p_q = (i_n64 * (H * G) + i_h * G + o_g[:, None]) * D + o_d[None, :]
    b_q = tl.load(q + p_q, mask=m_gd, other=0.)  # [G_PAD, D_PAD]
    b_do = tl.load(do + p_q, mask=m_gd, other=0.)  # [G_PAD, D_PAD]
    b_o = tl.load(o + p_q, mask=m_gd, other=0.)  # [G_PAD, D_PAD]
    p_row = (i_h * G + o_g).to(tl.int64) * N + i_n  # [G_PAD] into [HQ, N]
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)  # [G_PAD]
    if HAS_DLSE:  # d lse / d s = p, so a gradient on lse shifts delta
        b_delta -= tl.load(dlse + p_row, mask=m_g, other=0.)
    tl.store(delta + p_row, b_delta, mask=m_g)
    b_lse = tl.load(lse + p_row, mask=m_g, other=0.) * 1.4426950408889634  # log2 units

    b_dq = tl.zeros([G_PAD, D_PAD], tl.float32)
    p_idx = block_indices + (i_n64 * H + i_h) * T
    for t in range(T):
        idx = tl.load(p_idx + t)
        valid = pair_valid(idx, last_block)
        if SKIP_UNUSED:
            if valid:
                b_dq = _dq_block(b_q, b_do, b_dq, b_lse, b_delta, k, v, bos, pos, idx, valid, i_h,
                                 H, D, BS, D_PAD, scale_log2, IEEE)
        else:
            b_dq = _dq_block(b_q, b_do, b_dq, b_lse, b_delta, k, v, bos, pos, idx, valid, i_h,
                             H, D, BS, D_PAD, scale_log2, IEEE)
    b_dq = b_dq * scale
    if ACCUMULATE:
        b_dq += tl.load(dq + p_q, mask=m_gd, other=0.).to(tl.float32)
    tl.store(dq + p_q, b_dq.to(dq.dtype.element_ty), mask=m_gd)


@triton.jit
def _dkdv_tile(b_k, b_v, b_dk, b_dv, o_key, m_key, q, do, lse, delta, tokens, j, j1, i_h, N,
               scale_log2, H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
               BLOCK_M: tl.constexpr, IEEE: tl.constexpr):
    """dk (unscaled), dv += one tile of BLOCK_M flattened (pair, head) rows j .. j + BLOCK_M."""
    o_d = tl.arange(0, D_PAD)
    o_j = j + tl.arange(0, BLOCK_M)  # [BLOCK_M] row j = pair * G + head
    m_j = o_j < j1
    b_tok = tl.load(tokens + o_j // G, mask=m_j, other=0)  # [BLOCK_M] packed query rows
    o_hq = i_h * G + (o_j % G).to(tl.int32)  # [BLOCK_M] query heads
    p_q = (b_tok.to(tl.int64)[:, None] * (H * G) + o_hq[:, None]) * D + o_d[None, :]
    m_qd = m_j[:, None] & (o_d < D)[None, :]
    b_q = tl.load(q + p_q, mask=m_qd, other=0.)  # [BLOCK_M, D_PAD]
    b_do = tl.load(do + p_q, mask=m_qd, other=0.)  # [BLOCK_M, D_PAD]
    p_row = o_hq.to(tl.int64) * N + b_tok
    b_lse = tl.load(lse + p_row, mask=m_j, other=0.) * 1.4426950408889634  # [BLOCK_M] log2 units
    b_delta = tl.load(delta + p_row, mask=m_j, other=0.)  # [BLOCK_M]
    # causal in packed rows: key and query are in the same sequence for a listed pair
    m_vis = m_j[:, None] & m_key[None, :] & (o_key[None, :] <= b_tok[:, None])  # [BLOCK_M, BS]
    if IEEE:
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")  # [BLOCK_M, BS]
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision="ieee")  # [BLOCK_M, BS]
    else:
        b_s = tl.dot(b_q, tl.trans(b_k))
        b_dp = tl.dot(b_do, tl.trans(b_v))
    b_p = tl.where(m_vis, tl.exp2(b_s * scale_log2 - b_lse[:, None]), 0.)
    b_ds = b_p * (b_dp - b_delta[:, None])  # [BLOCK_M, BS]
    if IEEE:
        b_dv += tl.dot(tl.trans(b_p), b_do, input_precision="ieee")  # [BS, D_PAD]
        b_dk += tl.dot(tl.trans(b_ds), b_q, input_precision="ieee")  # [BS, D_PAD]
    else:
        b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do)
        b_dk += tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q)
    return b_dk, b_dv


@triton.jit
def nsa_selected_bwd_dkdv_kernel(
    q, k, v, do, lse, delta, dk, dv, part_dk, part_dv, row_offsets, tokens, block_start, block_end,
    work_row, work_chunk, row_chunks, row_slot, N, NB, NUM_ROWS, CHUNK, scale, scale_log2,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, IEEE: tl.constexpr, WHILE_LOOP: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    # Work item w = chunk `c` of CSR row (i_h, i_b): at most CHUNK flattened (pair, head) rows.
    # ACCUMULATE: a block written here adds to what dk / dv hold (fp32 sum).
    w = tl.program_id(0)
    row = tl.load(work_row + w)
    live = row < NUM_ROWS  # the grid is a no-sync bound: surplus items do nothing
    row = tl.minimum(row, NUM_ROWS - 1)
    i_h = row // NB
    i_b = row - i_h * NB
    c = tl.load(work_chunk + w).to(tl.int64)
    n_chunks = tl.load(row_chunks + row)

    r0 = tl.load(block_start + i_b)
    r1 = tl.load(block_end + i_b)  # r0 == r1 for a block that does not exist: all masks false
    o_c = tl.arange(0, BS)
    o_d = tl.arange(0, D_PAD)
    o_key = r0 + o_c  # [BS] packed key rows of this block
    m_key = o_key < r1
    p_kv = (o_key.to(tl.int64)[:, None] * H + i_h) * D + o_d[None, :]
    m_kd = m_key[:, None] & (o_d < D)[None, :]
    b_k = tl.load(k + p_kv, mask=m_kd, other=0.)  # [BS, D_PAD]
    b_v = tl.load(v + p_kv, mask=m_kd, other=0.)  # [BS, D_PAD]
    b_dk = tl.zeros([BS, D_PAD], tl.float32)
    b_dv = tl.zeros([BS, D_PAD], tl.float32)

    # The CSR row lists (ascending) the query tokens whose selection holds this block; each
    # token brings its G query heads: flattened rows j = pair * G + head, BLOCK_M at a time.
    j0 = tl.load(row_offsets + row).to(tl.int64) * G + c * CHUNK
    j1 = tl.minimum(tl.load(row_offsets + row + 1).to(tl.int64) * G, j0 + CHUNK)
    j1 = tl.where(live, j1, j0)
    if WHILE_LOOP:  # the interpreter cannot range() over loaded bounds
        j = j0
        while j < j1:
            b_dk, b_dv = _dkdv_tile(b_k, b_v, b_dk, b_dv, o_key, m_key, q, do, lse, delta, tokens, j, j1,
                                    i_h, N, scale_log2, H, G, D, D_PAD, BLOCK_M, IEEE)
            j += BLOCK_M
    else:
        for j in range(j0, j1, BLOCK_M):
            b_dk, b_dv = _dkdv_tile(b_k, b_v, b_dk, b_dv, o_key, m_key, q, do, lse, delta, tokens, j, j1,
                                    i_h, N, scale_log2, H, G, D, D_PAD, BLOCK_M, IEEE)
    # A row of one chunk writes its block directly; a split row leaves fp32 partials for the reduce.
    m_direct = m_kd & live & (n_chunks == 1)
    b_dk_out = b_dk * scale
    b_dv_out = b_dv
    if ACCUMULATE:
        b_dk_out += tl.load(dk + p_kv, mask=m_direct, other=0.).to(tl.float32)
        b_dv_out += tl.load(dv + p_kv, mask=m_direct, other=0.).to(tl.float32)
    tl.store(dk + p_kv, b_dk_out.to(dk.dtype.element_ty), mask=m_direct)
    tl.store(dv + p_kv, b_dv_out.to(dv.dtype.element_ty), mask=m_direct)
    slot = tl.load(row_slot + row).to(tl.int64) + c
    p_part = slot * (BS * D_PAD) + o_c[:, None] * D_PAD + o_d[None, :]
    m_part = live & (n_chunks > 1)
    tl.store(part_dk + p_part, b_dk, mask=m_part)
    tl.store(part_dv + p_part, b_dv, mask=m_part)


@triton.jit
def nsa_selected_bwd_dkdv_reduce_kernel(
    dk, dv, part_dk, part_dv, block_start, block_end, row_chunks, row_slot, NB, scale,
    H: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, D_PAD: tl.constexpr, WHILE_LOOP: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    # One program per CSR row; rows split into several chunks sum their partials in chunk order
    # (ACCUMULATE: after what dk / dv hold).
    row = tl.program_id(0)
    i_h = row // NB
    i_b = row - i_h * NB
    n_chunks = tl.load(row_chunks + row)
    n_sum = tl.where(n_chunks > 1, n_chunks, 0)
    slot0 = tl.load(row_slot + row).to(tl.int64)
    o_c = tl.arange(0, BS)
    o_d = tl.arange(0, D_PAD)
    p_part = slot0 * (BS * D_PAD) + o_c[:, None] * D_PAD + o_d[None, :]
    b_dk = tl.zeros([BS, D_PAD], tl.float32)
    b_dv = tl.zeros([BS, D_PAD], tl.float32)
    if WHILE_LOOP:
        c = 0
        while c < n_sum:
            b_dk += tl.load(part_dk + p_part + c * (BS * D_PAD))
            b_dv += tl.load(part_dv + p_part + c * (BS * D_PAD))
            c += 1
    else:
        for c in range(0, n_sum):
            b_dk += tl.load(part_dk + p_part + c * (BS * D_PAD))
            b_dv += tl.load(part_dv + p_part + c * (BS * D_PAD))
    r0 = tl.load(block_start + i_b)
    r1 = tl.load(block_end + i_b)
    o_key = r0 + o_c
    p_kv = (o_key.to(tl.int64)[:, None] * H + i_h) * D + o_d[None, :]
    m_kd = (o_key < r1)[:, None] & (o_d < D)[None, :] & (n_chunks > 1)
    b_dk = b_dk * scale
    if ACCUMULATE:
        b_dk += tl.load(dk + p_kv, mask=m_kd, other=0.).to(tl.float32)
        b_dv += tl.load(dv + p_kv, mask=m_kd, other=0.).to(tl.float32)
    tl.store(dk + p_kv, b_dk.to(dk.dtype.element_ty), mask=m_kd)
    tl.store(dv + p_kv, b_dv.to(dv.dtype.element_ty), mask=m_kd)


@dataclass
class DkdvSchedule:
    """Work list of the dK/dV kernel: item w is chunk work_chunk[w] of CSR row work_row[w]
    (rows longest first)."""

    chunk: int  # flattened (pair, head) rows per work item, a multiple of BLOCK_M
    num_items: int  # grid size (a bound; items with work_row == num_rows do nothing)
    num_slots: int  # partial-buffer slots (a bound)
    work_row: torch.Tensor  # int32 [num_items]
    work_chunk: torch.Tensor  # int32 [num_items]
    row_chunks: torch.Tensor  # int32 [num_rows] chunks of each row (>= 1: every block is written)
    row_slot: torch.Tensor  # int32 [num_rows] first partial slot of a split row


def dkdv_schedule(block_index: BlockIndex, group: int, max_pairs: int, block_m: int,
                  chunk: Optional[int] = None) -> DkdvSchedule:
    """Split the CSR rows into chunks on the device (no host sync); max_pairs bounds the pairs (N*H*T)."""
    total = max_pairs * group
    if chunk is None:
        chunk = max(DKDV_MIN_CHUNK_TILES * block_m, triton.cdiv(total, DKDV_SPLIT_SLOTS))
    chunk = triton.cdiv(chunk, block_m) * block_m
    offs = block_index.row_offsets.long()
    rows = (offs[1:] - offs[:-1]) * group
    row_chunks = ((rows + chunk - 1) // chunk).clamp_(min=1)  # <= 1 + rows / chunk
    # Longest rows first (LPT order): the chunks of the sink block start at once instead of
    # trailing the grid. The order only moves work between programs; results do not depend on it.
    num_rows = block_index.num_rows
    order = torch.argsort(rows, descending=True, stable=True)
    sorted_chunks = row_chunks[order]
    ends = torch.cumsum(sorted_chunks, 0)
    num_items = num_rows + triton.cdiv(total, chunk)
    w = torch.arange(num_items, device=offs.device)
    rank = torch.searchsorted(ends, w, right=True)  # == num_rows past the last item
    rank_c = rank.clamp(max=num_rows - 1)
    work_row = torch.where(rank < num_rows, order[rank_c], num_rows)
    work_chunk = w - (ends - sorted_chunks)[rank_c]
    split = torch.where(row_chunks > 1, row_chunks, 0)  # a split row has < 2 * rows / chunk chunks
    row_slot = torch.cumsum(split, 0) - split
    return DkdvSchedule(chunk, num_items, max(1, 2 * triton.cdiv(total, chunk)), work_row.int(),
                        work_chunk.int(), row_chunks.int(), row_slot.int())


def nsa_selected_bwd_dq(q, k, v, o, lse, do, block_indices, block_size, scale, token_pos, dlse=None,
                        num_warps=None, num_stages=None, skip_unused=None, dq=None, accumulate=False):
    """(dq [N, HQ, D], delta float32 [HQ, N]); launch of the query-outer dQ kernel (into `dq` when
    given; accumulate: adding to it)."""
    n, hq, d = q.shape
    h, t_sel = k.shape[1], block_indices.shape[2]
    d_pad = max(16, next_pow2(d))
    delta = new_output((hq, n), torch.float32, q.device)
    if dq is None:
        dq = new_output((n, hq, d), q.dtype, q.device)
    warps, stages, skip = query_outer_config(DQ_CONFIGS, d_pad, block_size, num_warps, num_stages, skip_unused)
    nsa_selected_bwd_dq_kernel[(n, h)](
        q, k, v, o, do, lse, dlse if dlse is not None else lse, delta, dq, block_indices, token_pos,
        n, scale, scale * LOG2E,
        H=h, G=hq // h, T=t_sel, D=d, BS=block_size, G_PAD=max(16, next_pow2(hq // h)), D_PAD=d_pad,
        HAS_DLSE=dlse is not None, SKIP_UNUSED=skip, IEEE=q.dtype == torch.float32, ACCUMULATE=accumulate,
        num_warps=warps, num_stages=stages,
    )
    return dq, delta


def nsa_selected_bwd_dkdv(q, k, v, do, lse, delta, block_index: BlockIndex, block_size, scale, topk,
                          block_m=None, num_warps=None, num_stages=None, chunk=None, out=None, accumulate=False):
    """(dk, dv) [N, H, D]: the block-owning dK/dV kernel over a chunked work list, then the reduce
    of split rows (both launches, a few small torch ops for the schedule, no host sync). `out`: the
    (dk, dv) buffers to write (None allocates); accumulate: add to what they hold."""
    n, hq, d = q.shape
    h = k.shape[1]
    g = hq // h
    d_pad = max(16, next_pow2(d))
    interp = is_interpreter()
    if out is None:
        out = new_output((n, h, d), k.dtype, k.device), new_output((n, h, d), v.dtype, v.device)
    dk, dv = out
    block_m, warps, stages = dkdv_config(d_pad, block_size, g, block_m, num_warps, num_stages)
    sched = dkdv_schedule(block_index, g, n * h * topk, block_m, chunk)
    part_dk = torch.empty(sched.num_slots, block_size, d_pad, dtype=torch.float32, device=q.device)
    part_dv = torch.empty_like(part_dk)
    bi = block_index
    nsa_selected_bwd_dkdv_kernel[(sched.num_items,)](
        q, k, v, do, lse, delta, dk, dv, part_dk, part_dv, bi.row_offsets, bi.tokens, bi.block_start,
        bi.block_end, sched.work_row, sched.work_chunk, sched.row_chunks, sched.row_slot,
        n, bi.nb_bound, bi.num_rows, sched.chunk, scale, scale * LOG2E,
        H=h, G=g, D=d, BS=block_size, D_PAD=d_pad, BLOCK_M=block_m, IEEE=q.dtype == torch.float32,
        WHILE_LOOP=interp, ACCUMULATE=accumulate, num_warps=warps, num_stages=stages,
    )
    nsa_selected_bwd_dkdv_reduce_kernel[(bi.num_rows,)](
        dk, dv, part_dk, part_dv, bi.block_start, bi.block_end, sched.row_chunks, sched.row_slot,
        bi.nb_bound, scale, H=h, D=d, BS=block_size, D_PAD=d_pad, WHILE_LOOP=interp, ACCUMULATE=accumulate,
        num_warps=8,
    )
    return dk, dv


def nsa_selected_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    scale: float,
    cu_seqlens: torch.Tensor,
    token_pos: torch.Tensor,
    dlse: Optional[torch.Tensor] = None,
    block_index: Optional[BlockIndex] = None,
    dq_warps: int | None = None,
    dq_stages: int | None = None,
    dkdv_block_m: int | None = None,
    dkdv_warps: int | None = None,
    dkdv_stages: int | None = None,
    dkdv_chunk: int | None = None,
    skip_unused: bool | None = None,
    out: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    accumulate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) for contiguous inputs laid out as in nsa_selected_fwd; o/lse from the forward,
    do like o, optional dlse float32 [HQ, N]. `block_index` is built when None. The knobs: launch
    sizes of the dQ and dK/dV kernels, dK/dV chunk (rows per work item), skip_unused (see fwd).
    `out`: the (dq, dk, dv) buffers to write (None allocates); accumulate: add to what they hold."""
    if block_index is None:
        block_index = build_block_index(block_indices, block_size, cu_seqlens, k.shape[1])
    dq, delta = nsa_selected_bwd_dq(q, k, v, o, lse, do, block_indices, block_size, scale, token_pos, dlse,
                                    dq_warps, dq_stages, skip_unused, None if out is None else out[0], accumulate)
    dk, dv = nsa_selected_bwd_dkdv(q, k, v, do, lse, delta, block_index, block_size, scale,
                                   block_indices.shape[2], dkdv_block_m, dkdv_warps, dkdv_stages, dkdv_chunk,
                                   None if out is None else out[1:], accumulate)
    return dq, dk, dv
