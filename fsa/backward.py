"""FSA backward: block-owning dK/dV with dQ partials, then deterministic reductions. No atomics.

Loop order as in the forward: programs over (work item, key tile), a work item being (KV head h,
key block b, chunk of the pair rows that chose b) and a key tile KEY_TILE keys of the block (a block
of 128 keys is split in two so the fp32 dK/dV accumulators stay in registers). A program recomputes P from the saved lse, accumulates dK/dV for its block in
registers and writes each pair row's dQ contribution to a compact buffer at the pair's CSR position.
A block whose pairs span one item writes dK/dV straight to the output (fp32 accumulator when
the query heads of a group are split over passes); a busy block (the
initial block is chosen by every query) is split over several items whose partial dK/dV are summed
in item order by a reduction kernel, so the result is bitwise reproducible. dQ partials are summed
per query in slot order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fsa.schedule import build_schedule, locate_item, reduce_rows, slot_rows
from fsa.tuning import launch_plan
from nsa_baseline.utils.attention_bwd import softmax_bwd_delta
from nsa_baseline.utils.triton_utils import LOG2E, new_output


@triton.jit(do_not_specialize=("NUM_ROWS", "H_OFF", "G_OFF", "SUB_STRIDE"),  # see fsa/forward.py
            do_not_specialize_on_alignment=("row_offsets",))
def fsa_selected_bwd_kernel(
    q, k, v, do, lse, delta, dq_part, dk_acc, dv_acc, dkv_part,
    row_offsets, tokens, block_start, block_end, item_offsets,
    scale, scale_log2, N, NUM_ROWS, NB_BOUND, H_OFF, SUB_STRIDE,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, G_OFF, GC: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, CHUNK_TILES: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    KEY_TILE: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    i_sub = tl.program_id(1)
    if pid >= tl.load(item_offsets + NUM_ROWS):
        return
    r = locate_item(item_offsets, pid, NUM_ROWS, SEARCH_STEPS)
    first_item = tl.load(item_offsets + r)
    n_items = tl.load(item_offsets + r + 1) - first_item
    item = pid - first_item
    i_h = H_OFF + r // NB_BOUND
    i_b = r % NB_BOUND
    p0 = tl.load(row_offsets + r)
    n_rows = (tl.load(row_offsets + r + 1) - p0) * GC
    p_buf = (p0 - tl.load(row_offsets)).to(tl.int64) * GC  # this row's first pair row in the pass's buffer

    o_d = tl.arange(0, D_PAD)
    m_d = o_d < D
    k_lo = tl.load(block_start + i_b)
    k_hi = tl.load(block_end + i_b)
    o_k = k_lo + i_sub * KEY_TILE + tl.arange(0, KEY_TILE)
    m_k = o_k < k_hi
    m_kd = m_k[:, None] & m_d[None, :]
    kv_off = o_k[:, None].to(tl.int64) * (H * D) + i_h * D + o_d[None, :]
    b_k = tl.load(k + kv_off, mask=m_kd, other=0.0)  # [KEY_TILE, D_PAD]
    b_v = tl.load(v + kv_off, mask=m_kd, other=0.0)  # [KEY_TILE, D_PAD]
    b_dk = tl.zeros([KEY_TILE, D_PAD], tl.float32)
    b_dv = tl.zeros([KEY_TILE, D_PAD], tl.float32)
    dq_sub = dq_part + i_sub.to(tl.int64) * SUB_STRIDE * D  # each key tile has its own dQ partials

    f0 = item * (BLOCK_M * CHUNK_TILES)
    for i_t in range(CHUNK_TILES):
        o_f = f0 + i_t * BLOCK_M + tl.arange(0, BLOCK_M)
        m_f = o_f < n_rows
        m_fd = m_f[:, None] & m_d[None, :]
        tok = tl.load(tokens + p0 + o_f // GC, mask=m_f, other=0)
        i_hq = i_h * G + G_OFF + o_f % GC
        q_off = tok[:, None].to(tl.int64) * (HQ * D) + i_hq[:, None] * D + o_d[None, :]
        b_q = tl.load(q + q_off, mask=m_fd, other=0.0)  # [BLOCK_M, D_PAD]
        b_do = tl.load(do + q_off, mask=m_fd, other=0.0)  # [BLOCK_M, D_PAD]
        stat_off = i_hq.to(tl.int64) * N + tok
        b_lse = tl.load(lse + stat_off, mask=m_f, other=0.0) * 1.4426950408889634
        b_delta = tl.load(delta + stat_off, mask=m_f, other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, KEY_TILE]
        visible = (o_k[None, :] <= tok[:, None]) & m_k[None, :] & m_f[:, None]
        b_p = tl.where(visible, tl.exp2(b_s - b_lse[:, None]), 0.0)  # [BLOCK_M, KEY_TILE]
        b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision=DOT_PRECISION)  # [KEY_TILE, D_PAD]
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)  # [BLOCK_M, KEY_TILE]
        b_ds = (b_p * (b_dp - b_delta[:, None])).to(b_q.dtype)  # [BLOCK_M, KEY_TILE]
        b_dk += tl.dot(tl.trans(b_ds), b_q, input_precision=DOT_PRECISION)  # [KEY_TILE, D_PAD]
        b_dq = tl.dot(b_ds, b_k, input_precision=DOT_PRECISION) * scale  # [BLOCK_M, D_PAD]
        out_row = p_buf + o_f
        tl.store(dq_sub + out_row[:, None] * D + o_d[None, :], b_dq.to(dq_part.dtype.element_ty), mask=m_fd)
    b_dk = b_dk * scale

    if n_items == 1:
        acc_off = o_k[:, None].to(tl.int64) * (H * D) + i_h * D + o_d[None, :]
        if ACCUMULATE:
            b_dk += tl.load(dk_acc + acc_off, mask=m_kd, other=0.0)
            b_dv += tl.load(dv_acc + acc_off, mask=m_kd, other=0.0)
        tl.store(dk_acc + acc_off, b_dk.to(dk_acc.dtype.element_ty), mask=m_kd)
        tl.store(dv_acc + acc_off, b_dv.to(dv_acc.dtype.element_ty), mask=m_kd)
    else:  # partial of a busy block: layout [item, 2, BS, D_PAD], this program fills its key tile
        o_bd = (i_sub * KEY_TILE + tl.arange(0, KEY_TILE))[:, None] * D_PAD + o_d[None, :]
        part = dkv_part + pid.to(tl.int64) * (2 * BS * D_PAD)
        tl.store(part + o_bd, b_dk)
        tl.store(part + BS * D_PAD + o_bd, b_dv)


@triton.jit(do_not_specialize=("H_OFF",))  # see fsa/forward.py
def fsa_selected_bwd_dkdv_reduce_kernel(
    dk_acc, dv_acc, dkv_part, item_offsets, block_start, block_end, NB_BOUND, H_OFF,
    H: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr, KEY_ROWS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    """One program per (CSR row, KEY_ROWS keys of the block): zero for a block no query chose, sum of
    item partials (in item order) for a block split over several items; single-item blocks were
    written by the pairs kernel. The initial block is chosen by every query, so its row has thousands
    of items: splitting the keys keeps that sum from being one long serial tail."""
    r = tl.program_id(0)
    i_key = tl.program_id(1)
    i_h = H_OFF + r // NB_BOUND
    i_b = r % NB_BOUND
    first = tl.load(item_offsets + r)
    n_items = tl.load(item_offsets + r + 1) - first
    if n_items == 1:
        return
    if ACCUMULATE:
        if n_items == 0:  # nothing to add to the block's keys
            return
    o_d = tl.arange(0, D_PAD)
    o_r = i_key * KEY_ROWS + tl.arange(0, KEY_ROWS)  # keys inside the block
    o_k = tl.load(block_start + i_b) + o_r
    m_kd = (o_k < tl.load(block_end + i_b))[:, None] & (o_d < D)[None, :]
    acc_off = o_k[:, None].to(tl.int64) * (H * D) + i_h * D + o_d[None, :]
    o_bd = o_r[:, None] * D_PAD + o_d[None, :]
    b_dk = tl.zeros([KEY_ROWS, D_PAD], tl.float32)
    b_dv = tl.zeros([KEY_ROWS, D_PAD], tl.float32)
    if ACCUMULATE:
        b_dk += tl.load(dk_acc + acc_off, mask=m_kd, other=0.0)
        b_dv += tl.load(dv_acc + acc_off, mask=m_kd, other=0.0)
    i = first
    while i < first + n_items:  # a while loop: the interpreter cannot range() over a loaded value
        part = dkv_part + i.to(tl.int64) * (2 * BS * D_PAD)
        b_dk += tl.load(part + o_bd)
        b_dv += tl.load(part + BS * D_PAD + o_bd)
        i += 1
    tl.store(dk_acc + acc_off, b_dk.to(dk_acc.dtype.element_ty), mask=m_kd)
    tl.store(dv_acc + acc_off, b_dv.to(dv_acc.dtype.element_ty), mask=m_kd)


@triton.jit(do_not_specialize=("H_OFF", "G_OFF", "SUB_STRIDE"),  # see fsa/forward.py
            do_not_specialize_on_alignment=("row_offsets",))
def fsa_selected_bwd_dq_reduce_kernel(
    dq_part, pair_pos, row_offsets, dq, N, H_OFF,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, G_OFF, GC: tl.constexpr, T: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SUB: tl.constexpr, SUB_STRIDE,
    ACCUMULATE: tl.constexpr,
):
    """Grid (token tiles, query heads of the pass): dq [N, HQ, D] of each token = its pair rows' dQ
    partials summed in slot order, then key tile order (deterministic). ACCUMULATE: dq's value is the
    first term of that sum (the module's fused backward adds its branches this way)."""
    i_h, i_j, i_hq, o_n, m_n = reduce_rows(N, H_OFF, G, G_OFF, GC, BLOCK_N)
    o_d = tl.arange(0, D_PAD)
    m_d = o_d < D
    p_dq = dq + o_n[:, None].to(tl.int64) * (HQ * D) + i_hq * D + o_d[None, :]
    m_dq = m_n[:, None] & m_d[None, :]
    b_dq = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    if ACCUMULATE:
        b_dq += tl.load(p_dq, mask=m_dq, other=0.0).to(tl.float32)
    p_first = tl.load(row_offsets)  # the pass's first pair position
    for i_t in range(T):
        row, ok = slot_rows(pair_pos, p_first, o_n, m_n, i_h, i_j, i_t, H, T, GC)
        for i_sub in tl.static_range(NUM_SUB):
            b_dq += tl.load(dq_part + (i_sub * SUB_STRIDE + row)[:, None] * D + o_d[None, :],
                            mask=ok[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    tl.store(p_dq, b_dq.to(dq.dtype.element_ty), mask=m_dq)


def _dkdv_buffers(out, k, whole_groups: bool, accumulate: bool):
    """(dk_acc, dv_acc) the kernels write. Whole groups per pass: every block's dK/dV is final when
    written, so it goes to the output itself (at 256K x 64 KV heads, fp32 accumulators and their cast
    cost 13 GB more at the peak); else fp32 accumulators (holding the output's value when accumulating)."""
    if whole_groups:
        if out is not None:
            return out
        return new_output(k.shape, k.dtype, k.device), new_output(k.shape, k.dtype, k.device)
    if accumulate:
        return out[0].float(), out[1].float()
    return new_output(k.shape, torch.float32, k.device), new_output(k.shape, torch.float32, k.device)


def fsa_selected_bwd(q, k, v, o, lse, do, index, block_size: int, topk: int, scale: float, dlse=None,
                     out=None, accumulate: bool = False, delta=None):
    """Host wrapper: returns dq, dk, dv (input dtype). dlse [HQ, N] is the gradient of the returned
    lse, if any: d lse / d s = p, so it folds into delta (ds = p * (dp - delta + dlse)). `out`: the
    (dq, dk, dv) buffers to write (contiguous, q's / k's shape and dtype; None allocates); accumulate:
    add this branch's gradients to what they hold (each element once, in a fixed order: deterministic);
    delta: rowsum(o * do) - dlse float32 [HQ, N] when the caller has it (else one pass computes it)."""
    plan = launch_plan(q, k, block_size, topk, backward=True)
    n, hq, h, g, d, d_pad, cfg = plan.n, plan.hq, plan.h, plan.g, plan.d, plan.d_pad, plan.cfg
    do = do.contiguous()
    if delta is None:
        delta = softmax_bwd_delta(o, do, dlse)  # [HQ, N] fp32, one pass
    dq = out[0] if out is not None else new_output((n, hq, d), q.dtype, q.device)
    whole_groups = plan.heads_per_pass == g
    dk_acc, dv_acc = _dkdv_buffers(None if out is None else out[1:], k, whole_groups, accumulate)
    key_tile = min(block_size, cfg.key_tile)
    reduce_rows = min(block_size, cfg.reduce_key_rows)  # a larger setting would launch no program
    num_sub = block_size // key_tile
    sub_stride = plan.pass_pairs * plan.heads_per_pass
    dq_part = torch.empty(num_sub * sub_stride, d, dtype=q.dtype, device=q.device)
    for h0, hcur, g0, gcur in plan.passes():
        sched = build_schedule(index, h0, hcur, gcur, cfg.block_m * cfg.chunk_tiles, plan.pass_pairs)
        dkv_part = torch.empty(sched.grid_bound, 2, block_size, d_pad, dtype=torch.float32, device=q.device)
        fsa_selected_bwd_kernel[(sched.grid_bound, num_sub)](
            q, k, v, do, lse, delta, dq_part, dk_acc, dv_acc, dkv_part,
            sched.row_offsets, index.tokens, index.block_start, index.block_end, sched.item_offsets,
            scale, scale * LOG2E, n, sched.num_rows, index.nb_bound, h0, sub_stride,
            HQ=hq, H=h, G=g, G_OFF=g0, GC=gcur, D=d, D_PAD=d_pad, BS=block_size,
            BLOCK_M=cfg.block_m, CHUNK_TILES=cfg.chunk_tiles, SEARCH_STEPS=sched.search_steps,
            KEY_TILE=key_tile, ACCUMULATE=g0 > 0 or accumulate, DOT_PRECISION=plan.precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        fsa_selected_bwd_dkdv_reduce_kernel[(sched.num_rows, block_size // reduce_rows)](
            dk_acc, dv_acc, dkv_part, sched.item_offsets, index.block_start, index.block_end, index.nb_bound, h0,
            H=h, D=d, D_PAD=d_pad, BS=block_size, KEY_ROWS=reduce_rows, ACCUMULATE=g0 > 0 or accumulate,
            num_warps=4 if reduce_rows * d_pad >= 2048 else 2,
        )
        fsa_selected_bwd_dq_reduce_kernel[(triton.cdiv(n, cfg.block_n), hcur * gcur)](
            dq_part, index.pair_pos, sched.row_offsets, dq, n, h0,
            HQ=hq, H=h, G=g, G_OFF=g0, GC=gcur, T=topk, D=d, D_PAD=d_pad, BLOCK_N=cfg.block_n,
            NUM_SUB=num_sub, SUB_STRIDE=sub_stride, ACCUMULATE=accumulate,
            num_warps=4 if d_pad >= 128 else 2,
        )
    if whole_groups:
        return dq, dk_acc, dv_acc
    if out is None:
        return dq, dk_acc.to(k.dtype), dv_acc.to(v.dtype)
    out[1].copy_(dk_acc)  # query heads split over passes (very long inputs): the fp32 sums' one cast
    out[2].copy_(dv_acc)
    return out
