"""Decode, kernel 1 split FlashDecoding style: when slots x KV heads leave SMs idle, each (slot, KV
head)'s summaries are split over S programs (decode_select.py picks S; S = 1 runs its fused kernel).

Split s of a slot whose token is at position t owns the selection blocks [j_lo, j_hi) of a partition
of blocks 0 .. t // BS into S chunks of ceil((t // BS + 1) / S) blocks (empty splits at the end), and
the summaries [j_lo * R, min(j_hi * R, nvis)) that start in them (R = BS / stride): split boundaries
sit on block boundaries, so every block's score is made in exactly one split.
  pass 1 (_split_attend_kernel, grid (B, H, S)): compressed attention over the split's summaries ->
      normalised partial o [G, D] and base-2 lse [G_PAD] (-inf where the split saw nothing);
  pass 2 (_split_select_kernel, grid (B, H, S)): the final lse from the S partial lse, then the block
      scores of the split's blocks and its own top-T (packed keys, _pack_desc). The first block of a
      split also receives the spill of the previous block's summaries (a summary overlaps its own
      block and the next one): _spill_into recomputes those R summaries' share;
  merge (_split_merge_kernel, grid (B, H)): o_cmp combined by lse, the S sorted candidate sets merged
      by bitonic merges into the final top-T (same order and -1 rule as the fused kernel).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_baseline.ops.decode_tiles import _attend_summaries, _finish, _load_q
from nsa_baseline.ops.selection_kernel import _merge_packed, _pack_desc, _rank_packed, _scores_tile, _store_sorted
from nsa_baseline.utils.triton_utils import new_output, next_pow2


@triton.jit
def _split_range(pos, i_s, S: tl.constexpr, KS: tl.constexpr, STRIDE: tl.constexpr, BS: tl.constexpr,
                 R: tl.constexpr):
    """(nvis, j_lo, j_hi, i_hi): the token's visible summaries, split i_s's blocks [j_lo, j_hi) and
    the end of its summaries (they start at j_lo * R)."""
    nvis = tl.where(pos >= KS - 1, (pos - (KS - 1)) // STRIDE + 1, 0)
    nblk = pos // BS + 1
    chunk = (nblk + S - 1) // S
    j_lo = tl.minimum(i_s * chunk, nblk)
    j_hi = tl.minimum(j_lo + chunk, nblk)
    return nvis, j_lo, j_hi, tl.minimum(nvis, j_hi * R)


@triton.jit
def _split_attend_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, o_part_ptr, lse_part_ptr, MAX_CMP, qk_scale,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr, BC: tl.constexpr, R: tl.constexpr, KS: tl.constexpr, STRIDE: tl.constexpr,
    BS: tl.constexpr, S: tl.constexpr, IEEE: tl.constexpr, WHILE_LOOP: tl.constexpr,
):
    i_b, i_h, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pos = tl.load(pos_ptr + i_b)
    nvis, j_lo, j_hi, i_hi = _split_range(pos, i_s, S, KS, STRIDE, BS, R)
    b_q = _load_q(q_ptr, i_b, i_h, HQ, G, G_PAD, D, BLOCK_D)
    o_g = tl.arange(0, G_PAD)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    base = (i_b.to(tl.int64) * MAX_CMP * H + i_h) * D
    p_k = k_ptr + base + tl.arange(0, BC).to(tl.int64)[:, None] * (H * D) + o_d[None, :]  # [BC, BLOCK_D]
    p_v = v_ptr + base + tl.arange(0, BC).to(tl.int64)[:, None] * (H * D) + o_d[None, :]
    b_m, b_l, b_acc = _attend_summaries(b_q, p_k, p_v, j_lo * R, i_hi, qk_scale, H, D, G_PAD, BLOCK_D, BC, IEEE,
                                        WHILE_LOOP)
    part = ((i_b * H + i_h) * S + i_s).to(tl.int64)
    p_o = o_part_ptr + (part * G + o_g)[:, None] * D + o_d[None, :]
    tl.store(p_o, _finish(b_l, b_acc), mask=(o_g < G)[:, None] & m_d[None, :])
    b_lse = tl.where(b_l > 0, b_m + tl.log2(tl.where(b_l > 0, b_l, 1.)), float("-inf"))
    tl.store(lse_part_ptr + part * G_PAD + o_g, b_lse)


@triton.jit
def _lse_weights(lse_part_ptr, part0, S: tl.constexpr, S_PAD: tl.constexpr, G_PAD: tl.constexpr):
    """(m_ref [G_PAD], lse [G_PAD]): the largest partial lse (0 where none) and the combined base-2
    lse of the S splits (0 for rows that saw no summary: their p is masked anyway)."""
    o_p = tl.arange(0, S_PAD)
    o_g = tl.arange(0, G_PAD)
    b_ls = tl.load(lse_part_ptr + (part0 + o_p)[:, None] * G_PAD + o_g[None, :], mask=(o_p < S)[:, None],
                   other=float("-inf"))  # [S_PAD, G_PAD]
    b_mx = tl.max(b_ls, axis=0)
    m_ref = tl.where(b_mx == float("-inf"), 0., b_mx)
    b_l = tl.sum(tl.exp2(b_ls - m_ref[None, :]), axis=0)
    return m_ref, tl.where(b_l > 0, m_ref + tl.log2(tl.where(b_l > 0, b_l, 1.)), 0.)


@triton.jit
def _spill_into(b_q, b_lse, k_base, j, nvis, m_g, qk_scale, H: tl.constexpr, D: tl.constexpr,
                BLOCK_D: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """[1]: the share of block j - 1's visible summaries that goes to block j (0 for j == 0), summed over
    the group; elementwise products (R rows are too few for tl.dot)."""
    if C > 1:
        o_u = tl.arange(0, R)
        o_d = tl.arange(0, BLOCK_D)
        i = (j - 1) * R + o_u
        m_u = (j > 0) & (i < nvis)
        b_k = tl.load(k_base + tl.where(m_u, i, 0).to(tl.int64)[:, None] * (H * D) + o_d[None, :],
                      mask=m_u[:, None] & (o_d < D)[None, :], other=0.).to(tl.float32)  # [R, BLOCK_D]
        b_s = tl.sum(b_q.to(tl.float32)[:, None, :] * b_k[None, :, :], axis=2) * qk_scale  # [G_PAD, R]
        b_p = tl.where(m_g[:, None] & m_u[None, :], tl.exp2(b_s - b_lse[:, None]), 0.)
        w_next = tl.maximum(o_u + C - R, 0).to(tl.float32)
        spill = tl.sum(tl.sum(b_p, axis=0) * w_next, axis=0)
    else:  # a summary never reaches past its own block
        spill = 0.
    return spill + tl.zeros([1], tl.float32)


@triton.jit
def _split_select_kernel(
    q_ptr, k_ptr, pos_ptr, lse_part_ptr, keys_part_ptr, MAX_CMP, qk_scale,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr, BJ: tl.constexpr, R: tl.constexpr, C: tl.constexpr, KS: tl.constexpr,
    STRIDE: tl.constexpr, BS: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr, T_PAD: tl.constexpr,
    INIT: tl.constexpr, LOCAL: tl.constexpr, IEEE: tl.constexpr, WHILE_LOOP: tl.constexpr,
):
    BC: tl.constexpr = BJ * R
    i_b, i_h, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pos = tl.load(pos_ptr + i_b)
    nvis, j_lo, j_hi, i_hi = _split_range(pos, i_s, S, KS, STRIDE, BS, R)
    b_q = _load_q(q_ptr, i_b, i_h, HQ, G, G_PAD, D, BLOCK_D)
    o_g = tl.arange(0, G_PAD)
    m_g = o_g < G
    part0 = (i_b * H + i_h) * S
    _, b_lse = _lse_weights(lse_part_ptr, part0, S, S_PAD, G_PAD)
    k_base = k_ptr + (i_b.to(tl.int64) * MAX_CMP * H + i_h) * D
    p_k = k_base + tl.arange(0, BC).to(tl.int64)[:, None] * (H * D) + tl.arange(0, BLOCK_D)[None, :]
    cur_t = pos // BS + tl.zeros([1], tl.int32)
    in_t = cur_t >= 0
    nvis_m = i_hi + tl.zeros([G_PAD], tl.int32)
    keys = _pack_desc(tl.full([1, T_PAD], float("-inf"), tl.float32), tl.zeros([1, T_PAD], tl.int32) - 1)
    empty = _pack_desc(tl.full([1, BJ], float("-inf"), tl.float32), tl.zeros([1, BJ], tl.int32) - 1)
    carry = _spill_into(b_q, b_lse, k_base, j_lo, nvis, m_g, qk_scale, H, D, BLOCK_D, R, C)
    if WHILE_LOOP:
        j0 = j_lo
        while j0 < j_hi:
            b_sc, carry = _scores_tile(b_q, b_lse, carry, p_k, j0, i_hi, nvis_m, m_g, qk_scale,
                                       H, D, BLOCK_D, 1, G_PAD, BJ, R, C, IEEE)
            o_b = j0 + tl.arange(0, BJ)
            cand = tl.where((o_b < j_hi)[None, :], _rank_packed(b_sc, o_b, cur_t, in_t, INIT, LOCAL), empty)
            keys = _merge_packed(keys, cand, BJ, T_PAD)
            j0 += BJ
    else:
        for j0 in range(j_lo, j_hi, BJ):
            b_sc, carry = _scores_tile(b_q, b_lse, carry, p_k, j0, i_hi, nvis_m, m_g, qk_scale,
                                       H, D, BLOCK_D, 1, G_PAD, BJ, R, C, IEEE)
            o_b = j0 + tl.arange(0, BJ)
            cand = tl.where((o_b < j_hi)[None, :], _rank_packed(b_sc, o_b, cur_t, in_t, INIT, LOCAL), empty)
            keys = _merge_packed(keys, cand, BJ, T_PAD)
    o_t = tl.arange(0, T_PAD)
    tl.store(keys_part_ptr + (part0 + i_s).to(tl.int64) * T_PAD + o_t[None, :], keys)


@triton.jit
def _split_merge_kernel(
    o_part_ptr, lse_part_ptr, keys_part_ptr, o_ptr, idx_ptr,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr, TOPK: tl.constexpr, T_PAD: tl.constexpr,
):
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    o_g = tl.arange(0, G_PAD)
    o_d = tl.arange(0, BLOCK_D)
    m_gd = (o_g < G)[:, None] & (o_d < D)[None, :]
    part0 = (i_b * H + i_h) * S
    m_ref, _ = _lse_weights(lse_part_ptr, part0, S, S_PAD, G_PAD)
    b_acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    b_w = tl.zeros([G_PAD], tl.float32)
    o_t = tl.arange(0, T_PAD)
    keys = _pack_desc(tl.full([1, T_PAD], float("-inf"), tl.float32), tl.zeros([1, T_PAD], tl.int32) - 1)
    for s in range(S):
        part = (part0 + s).to(tl.int64)
        b_ls = tl.load(lse_part_ptr + part * G_PAD + o_g)
        w = tl.where(b_ls > float("-inf"), tl.exp2(b_ls - m_ref), 0.)
        b_o = tl.load(o_part_ptr + (part * G + o_g)[:, None] * D + o_d[None, :], mask=m_gd, other=0.)
        b_acc += w[:, None] * b_o
        b_w += w
        cand = tl.load(keys_part_ptr + part * T_PAD + o_t[None, :])  # [1, T_PAD] sorted descending
        if T_PAD == 1:
            keys = tl.maximum(keys, cand)
        else:
            keys = tl.bitonic_merge(tl.maximum(keys, tl.flip(cand, 1)), 1, True)
    p_o = o_ptr + (i_b * HQ + i_h * G + o_g).to(tl.int64)[:, None] * D + o_d[None, :]
    tl.store(p_o, _finish(b_w, b_acc), mask=m_gd)
    p_idx = idx_ptr + (i_b * H + i_h).to(tl.int64) * TOPK + tl.zeros([1], tl.int64)
    _store_sorted(keys, p_idx, tl.full([1], 1, tl.int1), TOPK, T_PAD)


def split_compressed_select(q, k_cmp, v_cmp, pos, o_cmp, idx, *, splits: int, max_cmp: int, qk_scale: float,
                            g: int, g_pad: int, block_d: int, bj: int, r: int, c: int, kernel_size: int,
                            kernel_stride: int, block_size: int, topk: int, init_blocks: int,
                            local_blocks: int, ieee: bool, while_loop: bool):
    """Run the three split kernels; fills o_cmp [B, HQ, D] and idx [B, H, topk] (decode_select's
    outputs, already allocated) from arguments it has checked."""
    b, hq, d = q.shape
    h = k_cmp.shape[2]
    s, s_pad, t_pad = splits, max(2, next_pow2(splits)), next_pow2(topk)
    o_part = new_output((b * h * s, g, d), torch.float32, q.device)
    lse_part = new_output((b * h * s, g_pad), torch.float32, q.device)
    keys_part = new_output((b * h * s, t_pad), torch.int64, q.device)
    common = dict(HQ=hq, H=h, G=g, G_PAD=g_pad, D=d, BLOCK_D=block_d)
    _split_attend_kernel[(b, h, s)](
        q, k_cmp, v_cmp, pos, o_part, lse_part, max_cmp, qk_scale, **common, BC=bj * r, R=r, KS=kernel_size,
        STRIDE=kernel_stride, BS=block_size, S=s, IEEE=ieee, WHILE_LOOP=while_loop, num_warps=4, num_stages=2)
    _split_select_kernel[(b, h, s)](
        q, k_cmp, pos, lse_part, keys_part, max_cmp, qk_scale, **common, BJ=bj, R=r, C=c, KS=kernel_size,
        STRIDE=kernel_stride, BS=block_size, S=s, S_PAD=s_pad, T_PAD=t_pad, INIT=init_blocks,
        LOCAL=local_blocks, IEEE=ieee, WHILE_LOOP=while_loop, num_warps=4, num_stages=2)
    _split_merge_kernel[(b, h)](o_part, lse_part, keys_part, o_cmp, idx, **common, S=s, S_PAD=s_pad, TOPK=topk,
                                T_PAD=t_pad, num_warps=4)
