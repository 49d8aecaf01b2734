"""FSA forward: KV-block-outer selected attention, then a per-query reduction.

Loop order: programs over work items (KV head h, key block b, chunk of the pair rows that chose b);
the block's K/V are loaded once and the chunk's gathered queries stream past them in tiles of
BLOCK_M rows (tokens x query heads of the group, never padded). Each pair row's normalised partial
output and its log2-sum-exp go to a compact buffer at the pair's CSR position; the reduction combines
a query's T partials by log-sum-exp in slot order (deterministic). KV heads, and the query heads of a
group, may be split over several passes so the partial buffer fits a memory budget (fsa/tuning.py).
The budget follows the free device memory, so the split can change from one call to the next. A
split must not compile new kernel variants mid-run (on the H100 each cost the timed 128K prefill of
`sweep=generate`'s eager pass about 2 s; experiments/gpu/eager_prefill_probe.py): Triton does not
specialize the arguments that depend on it (pass offsets, row counts, and the alignment of
`row_offsets`, a view that starts at the pass's first CSR row), and the item search's constexpr steps
follow all KV heads' rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fsa.schedule import build_schedule, locate_item, reduce_rows, slot_rows
from fsa.tuning import launch_plan
from nsa_baseline.utils.triton_utils import LOG2E, new_output


@triton.jit(do_not_specialize=("NUM_ROWS", "H_OFF", "G_OFF"), do_not_specialize_on_alignment=("row_offsets",))
def fsa_selected_fwd_kernel(
    q, k, v, o_part, lse_part,
    row_offsets, tokens, block_start, block_end, item_offsets,
    scale_log2, NUM_ROWS, NB_BOUND, H_OFF,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, G_OFF, GC: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, CHUNK_TILES: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid >= tl.load(item_offsets + NUM_ROWS):
        return
    r = locate_item(item_offsets, pid, NUM_ROWS, SEARCH_STEPS)
    item = pid - tl.load(item_offsets + r)
    i_h = H_OFF + r // NB_BOUND
    i_b = r % NB_BOUND
    p0 = tl.load(row_offsets + r)
    n_rows = (tl.load(row_offsets + r + 1) - p0) * GC  # pair rows of this CSR row
    p_buf = (p0 - tl.load(row_offsets)).to(tl.int64) * GC  # this row's first pair row in the pass's buffer

    o_d = tl.arange(0, D_PAD)
    m_d = o_d < D
    k_lo = tl.load(block_start + i_b)
    k_hi = tl.load(block_end + i_b)
    o_k = k_lo + tl.arange(0, BS)
    m_k = o_k < k_hi
    kv_off = o_k[:, None].to(tl.int64) * (H * D) + i_h * D + o_d[None, :]
    b_k = tl.load(k + kv_off, mask=m_k[:, None] & m_d[None, :], other=0.0)  # [BS, D_PAD]
    b_v = tl.load(v + kv_off, mask=m_k[:, None] & m_d[None, :], other=0.0)  # [BS, D_PAD]

    f0 = item * (BLOCK_M * CHUNK_TILES)
    for i_t in range(CHUNK_TILES):
        o_f = f0 + i_t * BLOCK_M + tl.arange(0, BLOCK_M)  # pair rows inside this CSR row
        m_f = o_f < n_rows
        tok = tl.load(tokens + p0 + o_f // GC, mask=m_f, other=0)
        i_hq = i_h * G + G_OFF + o_f % GC
        q_off = tok[:, None].to(tl.int64) * (HQ * D) + i_hq[:, None] * D + o_d[None, :]
        b_q = tl.load(q + q_off, mask=m_f[:, None] & m_d[None, :], other=0.0)  # [BLOCK_M, D_PAD]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BS]
        visible = (o_k[None, :] <= tok[:, None]) & m_k[None, :] & m_f[:, None]
        b_s = tl.where(visible, b_s, float("-inf"))
        b_m = tl.max(b_s, 1)
        b_m = tl.where(b_m == float("-inf"), 0.0, b_m)
        b_p = tl.exp2(b_s - b_m[:, None])  # [BLOCK_M, BS]
        b_l = tl.sum(b_p, 1)
        b_o = tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)  # [BLOCK_M, D_PAD]
        b_l_safe = tl.where(b_l > 0, b_l, 1.0)
        b_o = b_o / b_l_safe[:, None]
        out_row = p_buf + o_f
        tl.store(o_part + out_row[:, None] * D + o_d[None, :], b_o.to(o_part.dtype.element_ty),
                 mask=m_f[:, None] & m_d[None, :])
        tl.store(lse_part + out_row, b_m + tl.log2(b_l_safe), mask=m_f)


@triton.jit(do_not_specialize=("H_OFF", "G_OFF"), do_not_specialize_on_alignment=("row_offsets",))
def fsa_selected_fwd_reduce_kernel(
    o_part, lse_part, pair_pos, row_offsets, o, lse, o_extra, lse_extra, N, H_OFF,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, G_OFF, GC: tl.constexpr, T: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, EXTRA: tl.constexpr = False,
):
    """EXTRA: o_extra [N, HQ, D] (normalised) and lse_extra float32 [HQ, N] (natural log) are one
    more partial of every row, merged first (the module's local blocks, from another kernel)."""
    i_h, i_j, i_hq, o_n, m_n = reduce_rows(N, H_OFF, G, G_OFF, GC, BLOCK_N)
    o_d = tl.arange(0, D_PAD)
    m_d = o_d < D
    p_out = o_n[:, None].to(tl.int64) * (HQ * D) + i_hq * D + o_d[None, :]

    if EXTRA:
        b_m = tl.load(lse_extra + i_hq.to(tl.int64) * N + o_n, mask=m_n, other=float("-inf")) * 1.4426950408889634
        b_l = tl.where(b_m > float("-inf"), 1.0, 0.0)
        b_acc = tl.load(o_extra + p_out, mask=m_n[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        b_acc = tl.where((b_l > 0)[:, None], b_acc, 0.0)
    else:
        b_m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        b_l = tl.zeros([BLOCK_N], tl.float32)
        b_acc = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    p_first = tl.load(row_offsets)  # the pass's first pair position
    for i_t in range(T):
        row, ok = slot_rows(pair_pos, p_first, o_n, m_n, i_h, i_j, i_t, H, T, GC)
        b_lt = tl.load(lse_part + row, mask=ok, other=float("-inf"))
        b_ot = tl.load(o_part + row[:, None] * D + o_d[None, :], mask=ok[:, None] & m_d[None, :], other=0.0)
        m_new = tl.maximum(b_m, b_lt)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(b_m - m_safe)
        beta = tl.exp2(b_lt - m_safe)
        b_acc = b_acc * alpha[:, None] + b_ot.to(tl.float32) * beta[:, None]
        b_l = b_l * alpha + beta
        b_m = m_new
    seen = b_l > 0
    b_o = b_acc / tl.where(seen, b_l, 1.0)[:, None]
    b_lse = tl.where(seen, (b_m + tl.log2(tl.where(seen, b_l, 1.0))) * 0.6931471805599453, float("-inf"))  # * ln 2
    tl.store(o + p_out, b_o.to(o.dtype.element_ty), mask=m_n[:, None] & m_d[None, :])
    tl.store(lse + i_hq.to(tl.int64) * N + o_n, b_lse, mask=m_n)


def fsa_selected_fwd(q, k, v, index, block_size: int, topk: int, scale: float, extra=None):
    """Host wrapper: returns o [N, HQ, D] (q.dtype) and lse float32 [HQ, N] (natural log). extra: (o, lse)
    of the same rows over keys the index does not hold (normalised [N, HQ, D], natural-log [HQ, N]),
    merged in as one more partial: o, lse are then the softmax over both key sets."""
    plan = launch_plan(q, k, block_size, topk, backward=False)
    n, hq, h, g, d, d_pad, cfg = plan.n, plan.hq, plan.h, plan.g, plan.d, plan.d_pad, plan.cfg
    o = new_output((n, hq, d), q.dtype, q.device)
    lse = new_output((hq, n), torch.float32, q.device)
    o_part = torch.empty(plan.pass_pairs * plan.heads_per_pass, d, dtype=q.dtype, device=q.device)
    lse_part = torch.empty(plan.pass_pairs * plan.heads_per_pass, dtype=torch.float32, device=q.device)
    for h0, hcur, g0, gcur in plan.passes():
        sched = build_schedule(index, h0, hcur, gcur, cfg.block_m * cfg.chunk_tiles, plan.pass_pairs)
        fsa_selected_fwd_kernel[(sched.grid_bound,)](
            q, k, v, o_part, lse_part,
            sched.row_offsets, index.tokens, index.block_start, index.block_end, sched.item_offsets,
            scale * LOG2E, sched.num_rows, index.nb_bound, h0,
            HQ=hq, H=h, G=g, G_OFF=g0, GC=gcur, D=d, D_PAD=d_pad, BS=block_size,
            BLOCK_M=cfg.block_m, CHUNK_TILES=cfg.chunk_tiles, SEARCH_STEPS=sched.search_steps,
            DOT_PRECISION=plan.precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        fsa_selected_fwd_reduce_kernel[(triton.cdiv(n, cfg.block_n), hcur * gcur)](
            o_part, lse_part, index.pair_pos, sched.row_offsets, o, lse, *(extra if extra is not None else (o, lse)),
            n, h0, HQ=hq, H=h, G=g, G_OFF=g0, GC=gcur, T=topk, D=d, D_PAD=d_pad, BLOCK_N=cfg.block_n,
            EXTRA=extra is not None, num_warps=4 if d_pad >= 128 else 2,
        )
    return o, lse
