"""Decode, kernel 1 split FlashDecoding style: when slots x KV heads leave SMs idle, each (slot, KV
head)'s summaries are split over S programs (decode_select.py picks S; S = 1 runs its fused kernel).

Split s of a slot whose token is at position t owns the selection blocks [j_lo, j_hi) of a partition
of blocks 0 .. t // BS into S chunks of ceil((t // BS + 1) / S) blocks (empty splits at the end), and
the summaries [j_lo * R, min(j_hi * R, nvis)) that start in them (R = BS / stride): split boundaries
sit on block boundaries, so every block's score is made in exactly one split.
  pass 1 (_split_summaries_kernel, grid (B, H, S)): compressed attention over the split's summaries
      in tiles of BJ blocks -> normalised partial o [G, D] and base-2 lse [G_PAD] (-inf where the
      split saw nothing); it also stores every visible summary's base-2 logit per query head,
      `logits` [B * H, G, MAX_CMP] (4 bytes per head against the 4 * D bytes of k, v read): the
      bandwidth-bound pass does no block arithmetic (mapping masses to blocks there cost ~30%);
  pass 2 (_split_select_kernel, grid (B, H, S)): the final lse from the S partial lse; a summary's
      weight is sum_g exp2(logit_g - lse_g) (its softmax mass summed over the group); block j's score
      is sum_u min(C, R - u) * w[j R + u] + sum_u max(0, u + C - R) * w[(j - 1) R + u] (u: a summary's
      slot in its block, C = kernel_size / stride; the second sum is what block j - 1's summaries spill
      into j, read from the logits again, also across a split boundary); its own top-T (packed keys,
      _pack_desc);
  merge (_split_merge_kernel, grid (B, H, G)): program (b, h, g) combines query head g's o_cmp by
      lse (the S partials in one load); program g = 0 also takes the top-T of the S sorted candidate
      sets in one tl.topk over all S * T_PAD keys (same order and -1 rule as the fused kernel).
The decode step can skip the merge: split_compressed_partials returns the two passes' buffers
(SelectPartials), and the split selected + window kernels take the top-T and merge o_cmp where they
read them (decode_attend_split.py; DECODE_LAUNCH.fold_merge).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from nsa_baseline.ops.decode_tiles import (DECODE_LAUNCH, _cache_slot, _finish, _load_q, _merge_rows, _online_apply,
                                           _scores, head_pad)
from nsa_baseline.ops.selection_kernel import _merge_packed, _pack_desc, _rank_packed, _store_sorted
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
def _summaries_tile(b_q, b_m, b_l, b_acc, p_k, p_v, p_logit, i0, i_hi, o_c, m_g, m_kd, qk_scale, stride_row,
                    IEEE: tl.constexpr):
    """Online-softmax step over summaries [i0, i0 + BC) below i_hi; their logits go to p_logit."""
    m_c = (i0 + o_c) < i_hi
    b_k = tl.load(p_k + i0 * stride_row, mask=m_c[:, None] & m_kd, other=0.)
    b_v = tl.load(p_v + i0 * stride_row, mask=m_c[:, None] & m_kd, other=0.)
    b_s = _scores(b_q, b_k, m_c, qk_scale, IEEE)
    tl.store(p_logit + i0, b_s, mask=m_g[:, None] & m_c[None, :])
    return _online_apply(b_s, b_m, b_l, b_acc, b_v, IEEE)


@triton.jit
def _split_summaries_kernel(
    q_ptr, k_ptr, v_ptr, slot_ptr, pos_ptr, o_part_ptr, lse_part_ptr, logit_ptr, MAX_CMP, qk_scale,
    stride_slot, stride_row, stride_head,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr, BJ: tl.constexpr, R: tl.constexpr, KS: tl.constexpr, STRIDE: tl.constexpr,
    BS: tl.constexpr, S: tl.constexpr, IEEE: tl.constexpr, WHILE_LOOP: tl.constexpr, SLOTS: tl.constexpr,
):
    BC: tl.constexpr = BJ * R
    i_b, i_h, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pos = tl.load(pos_ptr + i_b)
    nvis, j_lo, j_hi, i_hi = _split_range(pos, i_s, S, KS, STRIDE, BS, R)
    b_q = _load_q(q_ptr, i_b, i_h, HQ, G, G_PAD, D, BLOCK_D)
    o_g = tl.arange(0, G_PAD)
    o_d = tl.arange(0, BLOCK_D)
    o_c = tl.arange(0, BC)
    m_g = o_g < G
    base = _cache_slot(slot_ptr, i_b, SLOTS).to(tl.int64) * stride_slot + i_h * stride_head
    p_k = k_ptr + base + o_c.to(tl.int64)[:, None] * stride_row + o_d[None, :]  # [BC, BLOCK_D]
    p_v = v_ptr + base + o_c.to(tl.int64)[:, None] * stride_row + o_d[None, :]
    p_logit = logit_ptr + ((i_b * H + i_h) * G + o_g).to(tl.int64)[:, None] * MAX_CMP + o_c[None, :]
    m_kd = (o_d < D)[None, :]
    b_m = tl.full([G_PAD], float("-inf"), tl.float32)
    b_l = tl.zeros([G_PAD], tl.float32)
    b_acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    if WHILE_LOOP:  # the interpreter cannot range() over loaded bounds
        i0 = j_lo * R
        while i0 < i_hi:
            b_m, b_l, b_acc = _summaries_tile(b_q, b_m, b_l, b_acc, p_k, p_v, p_logit, i0, i_hi, o_c, m_g, m_kd,
                                              qk_scale, stride_row, IEEE)
            i0 += BC
    else:
        for i0 in range(j_lo * R, i_hi, BC):
            b_m, b_l, b_acc = _summaries_tile(b_q, b_m, b_l, b_acc, p_k, p_v, p_logit, i0, i_hi, o_c, m_g, m_kd,
                                              qk_scale, stride_row, IEEE)
    part = ((i_b * H + i_h) * S + i_s).to(tl.int64)
    p_o = o_part_ptr + (part * G + o_g)[:, None] * D + o_d[None, :]
    tl.store(p_o, _finish(b_l, b_acc), mask=m_g[:, None] & m_kd)
    b_lse = tl.where(b_l > 0, b_m + tl.log2(tl.where(b_l > 0, b_l, 1.)), float("-inf"))
    tl.store(lse_part_ptr + part * G_PAD + o_g, b_lse)


@triton.jit
def _lse_weights(lse_part_ptr, part0, S: tl.constexpr, S_PAD: tl.constexpr, G_PAD: tl.constexpr):
    """(m_ref [G_PAD], lse [G_PAD]): the largest partial lse (0 where none) and the combined base-2
    lse of the S splits (0 for rows that saw no summary: their mass is 0 anyway)."""
    o_p = tl.arange(0, S_PAD)
    o_g = tl.arange(0, G_PAD)
    b_ls = tl.load(lse_part_ptr + (part0 + o_p)[:, None] * G_PAD + o_g[None, :], mask=(o_p < S)[:, None],
                   other=float("-inf"))  # [S_PAD, G_PAD]
    b_mx = tl.max(b_ls, axis=0)
    m_ref = tl.where(b_mx == float("-inf"), 0., b_mx)
    b_l = tl.sum(tl.exp2(b_ls - m_ref[None, :]), axis=0)
    return m_ref, tl.where(b_l > 0, m_ref + tl.log2(tl.where(b_l > 0, b_l, 1.)), 0.)


@triton.jit
def _summary_weights(p_logit, i0, nvis, b_lse, m_g, BC: tl.constexpr):
    """[BC]: sum_g exp2(logit_g - lse_g) of summaries i0 .. i0 + BC - 1 (0 outside [0, nvis))."""
    o_i = i0 + tl.arange(0, BC)
    m_i = (o_i >= 0) & (o_i < nvis)
    b_s = tl.load(p_logit + o_i[None, :], mask=m_g[:, None] & m_i[None, :], other=float("-inf"))  # [G_PAD, BC]
    return tl.sum(tl.exp2(b_s - b_lse[:, None]), axis=0)


@triton.jit
def _split_select_kernel(
    pos_ptr, lse_part_ptr, logit_ptr, keys_part_ptr, MAX_CMP,
    H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BJ: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
    KS: tl.constexpr, STRIDE: tl.constexpr, BS: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr,
    T_PAD: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr, WHILE_LOOP: tl.constexpr,
):
    i_b, i_h, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pos = tl.load(pos_ptr + i_b)
    nvis, j_lo, j_hi, i_hi = _split_range(pos, i_s, S, KS, STRIDE, BS, R)
    o_g = tl.arange(0, G_PAD)
    m_g = o_g < G
    part0 = (i_b * H + i_h) * S
    _, b_lse = _lse_weights(lse_part_ptr, part0, S, S_PAD, G_PAD)
    p_logit = logit_ptr + ((i_b * H + i_h) * G + o_g).to(tl.int64)[:, None] * MAX_CMP
    cur_t = pos // BS + tl.zeros([1], tl.int32)
    in_t = cur_t >= 0
    keys = _pack_desc(tl.full([1, T_PAD], float("-inf"), tl.float32), tl.zeros([1, T_PAD], tl.int32) - 1)
    empty = _pack_desc(tl.full([1, BJ], float("-inf"), tl.float32), tl.zeros([1, BJ], tl.int32) - 1)
    if WHILE_LOOP:
        j0 = j_lo
        while j0 < j_hi:
            keys = _select_tile(keys, empty, p_logit, b_lse, m_g, j0, j_hi, nvis, cur_t, in_t, BJ, R, C, T_PAD,
                                INIT, LOCAL)
            j0 += BJ
    else:
        for j0 in range(j_lo, j_hi, BJ):
            keys = _select_tile(keys, empty, p_logit, b_lse, m_g, j0, j_hi, nvis, cur_t, in_t, BJ, R, C, T_PAD,
                                INIT, LOCAL)
    o_t = tl.arange(0, T_PAD)
    tl.store(keys_part_ptr + (part0 + i_s).to(tl.int64) * T_PAD + o_t[None, :], keys)


@triton.jit
def _select_tile(keys, empty, p_logit, b_lse, m_g, j0, j_hi, nvis, cur_t, in_t, BJ: tl.constexpr, R: tl.constexpr,
                 C: tl.constexpr, T_PAD: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr):
    """Scores of blocks [j0, j0 + BJ) below j_hi from the summaries' logits, merged into the sorted set."""
    BC: tl.constexpr = BJ * R
    u = tl.arange(0, BC) % R
    own = tl.minimum(C, R - u).to(tl.float32)
    spill = tl.maximum(u + C - R, 0).to(tl.float32)
    w_own = _summary_weights(p_logit, j0 * R, nvis, b_lse, m_g, BC)
    w_prev = _summary_weights(p_logit, j0 * R - R, nvis, b_lse, m_g, BC)  # blocks j0 - 1 .. j0 + BJ - 2
    b_sc = tl.sum(tl.reshape(w_own * own + w_prev * spill, (BJ, R)), axis=1)  # [BJ]
    o_b = j0 + tl.arange(0, BJ)
    cand = tl.where((o_b < j_hi)[None, :], _rank_packed(b_sc[None, :], o_b, cur_t, in_t, INIT, LOCAL), empty)
    return _merge_packed(keys, cand, BJ, T_PAD)


@triton.jit
def _split_merge_kernel(
    o_part_ptr, lse_part_ptr, keys_part_ptr, o_ptr, idx_ptr,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr, TOPK: tl.constexpr, T_PAD: tl.constexpr,
):
    i_b, i_h, i_g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_p = tl.arange(0, S_PAD)
    o_d = tl.arange(0, BLOCK_D)
    b_out = _merge_rows(o_part_ptr, lse_part_ptr, ((i_b * H + i_h) * S + o_p).to(tl.int64), o_p < S, i_g, G, G_PAD,
                        D, BLOCK_D)
    tl.store(o_ptr + (i_b * HQ + i_h * G + i_g).to(tl.int64) * D + o_d, b_out, mask=o_d < D)
    if i_g == 0:
        keys = _top_candidates(keys_part_ptr, ((i_b * H + i_h) * S).to(tl.int64), S, S_PAD, T_PAD)
        p_idx = idx_ptr + (i_b * H + i_h).to(tl.int64) * TOPK + tl.zeros([1], tl.int64)
        _store_sorted(keys, p_idx, tl.full([1], 1, tl.int1), TOPK, T_PAD)


@triton.jit
def _top_candidates(keys_part_ptr, row0, S: tl.constexpr, S_PAD: tl.constexpr, T_PAD: tl.constexpr):
    """[1, T_PAD] packed keys, descending: the top T_PAD of the S sorted candidate sets at rows row0 ..
    row0 + S - 1 of keys_part (one (slot, KV head)), in one load and one tl.topk (the splits own
    disjoint blocks: no duplicates); the fused kernel's order and -1 rule once written by _store_sorted."""
    o_k = tl.arange(0, S_PAD * T_PAD)
    m_k = o_k < S * T_PAD
    cand = tl.load(keys_part_ptr + row0 * T_PAD + o_k[None, :], mask=m_k[None, :], other=0)  # [1, S_PAD * T_PAD]
    none = _pack_desc(tl.full([1, S_PAD * T_PAD], float("-inf"), tl.float32),
                      tl.zeros([1, S_PAD * T_PAD], tl.int32) - 1)
    cand = tl.where(m_k[None, :], cand, none)
    if T_PAD == 1:
        keys = tl.max(cand, axis=1, keep_dims=True)
    else:
        keys = tl.topk(cand, T_PAD, dim=1)  # [1, T_PAD], descending
    return keys


class SelectPartials(NamedTuple):
    """The compressed select's split passes before their merge: the summaries' partial outputs
    (o_part [B * H * S, G, D], lse_part [B * H * S, G_PAD]) and each split's sorted top-T candidate keys
    (keys_part int64 [B * H * S, T_PAD]). The merge kernel turns them into o_cmp and block indices;
    the decode step can instead hand them to the split selected + window kernels, which merge them
    where they read them (decode_attend_split.py), one launch fewer."""

    o_part: torch.Tensor
    lse_part: torch.Tensor
    keys_part: torch.Tensor
    splits: int
    topk: int


def split_compressed_partials(q, k_cmp, v_cmp, pos, *, splits: int, max_cmp: int, qk_scale: float, g: int,
                              g_pad: int, block_d: int, bj: int, r: int, c: int, kernel_size: int,
                              kernel_stride: int, block_size: int, topk: int, init_blocks: int, local_blocks: int,
                              ieee: bool, while_loop: bool, slots=None, after_summaries=None) -> SelectPartials:
    """The summaries and select passes (from arguments decode_compressed_select has checked). k_cmp,
    v_cmp [B, max_cmp, H, D] may be any view with the same strides and a contiguous last dim (the
    summaries pass reads them by stride)."""
    b, hq, d = q.shape
    h = k_cmp.shape[2]
    s, s_pad, t_pad = splits, max(2, next_pow2(splits)), next_pow2(topk)
    o_part = new_output((b * h * s, g, d), torch.float32, q.device)
    lse_part = new_output((b * h * s, g_pad), torch.float32, q.device)
    logits = new_output((b * h, g, max_cmp), torch.float32, q.device)
    keys_part = new_output((b * h * s, t_pad), torch.int64, q.device)
    common = dict(H=h, G=g, G_PAD=g_pad)
    steps = dict(R=r, KS=kernel_size, STRIDE=kernel_stride, BS=block_size, S=s, WHILE_LOOP=while_loop)
    _split_summaries_kernel[(b, h, s)](
        q, k_cmp, v_cmp, pos if slots is None else slots, pos, o_part, lse_part, logits, max_cmp, qk_scale,
        k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2), HQ=hq,
        **common, D=d, BLOCK_D=block_d, BJ=bj, **steps, IEEE=ieee, SLOTS=slots is not None,
        num_warps=DECODE_LAUNCH.select_warps, num_stages=DECODE_LAUNCH.select_stages)
    if after_summaries is not None:
        after_summaries()
    _split_select_kernel[(b, h, s)](
        pos, lse_part, logits, keys_part, max_cmp, **common, BJ=bj, C=c, **steps, S_PAD=s_pad, T_PAD=t_pad,
        INIT=init_blocks, LOCAL=local_blocks, num_warps=4)
    return SelectPartials(o_part, lse_part, keys_part, s, topk)


def split_merge(parts: SelectPartials, b: int, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The merge kernel: (o_cmp float32 [B, HQ, D], block indices int32 [B, H, topk]) from the partials
    of B slots x H KV heads."""
    _, g, d = parts.o_part.shape
    s, device = parts.splits, parts.o_part.device
    o_cmp = new_output((b, h * g, d), torch.float32, device)
    idx = new_output((b, h, parts.topk), torch.int32, device)
    _split_merge_kernel[(b, h, g)](parts.o_part, parts.lse_part, parts.keys_part, o_cmp, idx, HQ=h * g, H=h, G=g,
                                   G_PAD=parts.lse_part.shape[1], D=d, BLOCK_D=head_pad(d), S=s,
                                   S_PAD=max(2, next_pow2(s)), TOPK=parts.topk, T_PAD=parts.keys_part.shape[1],
                                   num_warps=4)
    return o_cmp, idx


def split_compressed_select(q, k_cmp, v_cmp, pos, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The three split kernels: (o_cmp, block indices) as decode_compressed_select returns them, from
    arguments it has checked; kwargs: split_compressed_partials'."""
    return split_merge(split_compressed_partials(q, k_cmp, v_cmp, pos, **kwargs), q.shape[0], k_cmp.shape[2])
