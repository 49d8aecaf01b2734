"""Decode, kernel 2 split FlashDecoding style: when slots x KV heads leave SMs idle, the keys of each
(slot, KV head) are split over S programs (decode_attend.py picks S; S = 1 runs its fused kernel).

The work of a (slot, KV head) is the T entries of block_indices (a selected block of BS keys, or
nothing for -1) and the NW window tiles of BN keys (keys max(0, t - W + 1) .. t). By default
(DECODE_LAUNCH.attend_shares = 1) split s takes entries [s * CS, (s + 1) * CS) and tiles
[s * CW, (s + 1) * CW) (CS = ceil(T / S), CW = ceil(NW / S): constexpr trip counts, no branch on a
loaded index, so the loads pipeline); with attend_shares = 0 the T + NW items form one list and split
s owns items [s * C, (s + 1) * C) (C = ceil((T + NW) / S)). Either way a split may hold keys of both
branches:
  split (_split_keys_kernel, grid (B, H, S)): per branch (0 selected, 1 window) the normalised
      partial o [G, D] and its base-2 lse [G_PAD] (-inf where the split saw no key of the branch);
  combine (_split_combine_kernel, grid (B, HQ)): per query head the LSE merge of each branch's S
      partials, then NSA's gated sum g0 * o_cmp + g1 * o_slc + g2 * o_win in the output dtype, and
      (advance) lengths[b] = pos + 1, the decode step's last write.
Partials: o_part float32 [B * H * S * 2, G, D], lse_part float32 [B * H * S * 2, G_PAD], row
((b * H + h) * S + s) * 2 + branch. The split kernel can also run one branch (BRANCH 1 selected, 2
window) into the same buffers: the decode step launches the window branch beside kernel 1 (it needs
no selection; DECODE_LAUNCH.window_stream) and the selected branch after it, then one combine.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from nsa_baseline.ops.decode_tiles import (DECODE_LAUNCH, _advance, _cache_slot, _finish, _keys_tile, _load_q,
                                           _page_rows, _slot_row0)
from nsa_baseline.utils.triton_utils import new_output, next_pow2


@triton.jit
def _store_partial(o_part_ptr, lse_part_ptr, part, b_m, b_l, b_acc, G: tl.constexpr, G_PAD: tl.constexpr,
                   D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row `part` of the partials: acc / l and the base-2 lse (-inf for rows that saw no key)."""
    o_g = tl.arange(0, G_PAD)
    o_d = tl.arange(0, BLOCK_D)
    p_o = o_part_ptr + (part * G + o_g)[:, None] * D + o_d[None, :]
    tl.store(p_o, _finish(b_l, b_acc), mask=(o_g < G)[:, None] & (o_d < D)[None, :])
    b_lse = tl.where(b_l > 0, b_m + tl.log2(tl.where(b_l > 0, b_l, 1.)), float("-inf"))
    tl.store(lse_part_ptr + part * G_PAD + o_g, b_lse)


@triton.jit
def _split_keys_kernel(
    q_ptr, k_ptr, v_ptr, tbl_ptr, slot_ptr, pos_ptr, idx_ptr, o_part_ptr, lse_part_ptr, MAX_SEQLEN, MAX_PAGES, qk_scale,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr, BS: tl.constexpr, TOPK: tl.constexpr, WINDOW: tl.constexpr, BN: tl.constexpr,
    S: tl.constexpr, C: tl.constexpr, SHARES: tl.constexpr, CS: tl.constexpr, CW: tl.constexpr,
    IEEE: tl.constexpr, PAGE: tl.constexpr, SLOTS: tl.constexpr, BRANCH: tl.constexpr = 0,
):
    """BRANCH 0: both branches (SHARES or the item list); 1: the selected entries only; 2: the window
    tiles only (1 and 2 with SHARES; each stores its own partial rows only)."""
    NW: tl.constexpr = (WINDOW + BN - 1) // BN
    i_b, i_h, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pos = tl.load(pos_ptr + i_b)
    b_q = _load_q(q_ptr, i_b, i_h, HQ, G, G_PAD, D, BLOCK_D)
    m_d = tl.arange(0, BLOCK_D) < D
    i_r = _cache_slot(slot_ptr, i_b, SLOTS)  # the cache slot this token reads
    base = (_slot_row0(i_r, MAX_SEQLEN, PAGE) * H + i_h) * D
    p_k = k_ptr + base + tl.arange(0, BLOCK_D)[None, :]
    p_v = v_ptr + base + tl.arange(0, BLOCK_D)[None, :]
    p_idx = idx_ptr + (i_b * H + i_h).to(tl.int64) * TOPK
    lo = tl.maximum(pos - WINDOW + 1, 0)
    o_s = tl.arange(0, BS)
    o_n = tl.arange(0, BN)
    s_m = tl.full([G_PAD], float("-inf"), tl.float32)
    s_l = tl.zeros([G_PAD], tl.float32)
    s_acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    w_m = tl.full([G_PAD], float("-inf"), tl.float32)
    w_l = tl.zeros([G_PAD], tl.float32)
    w_acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    if SHARES:  # split s: selected entries [s * CS, (s + 1) * CS) and window tiles [s * CW, (s + 1) * CW)
        if BRANCH != 2:
            for i in range(CS):  # no branch on loaded values: the loads pipeline
                item = i_s * CS + i
                blk = tl.load(p_idx + item, mask=item < TOPK, other=-1)
                rows = blk * BS + o_s
                m_rows = (rows <= pos) & (blk >= 0)
                rows = _page_rows(tbl_ptr, i_r, rows, m_rows, MAX_PAGES, PAGE)
                s_m, s_l, s_acc = _keys_tile(b_q, s_m, s_l, s_acc, p_k, p_v, rows, m_rows, m_d, qk_scale, H * D,
                                             IEEE)
        if BRANCH != 1:
            for i in range(CW):
                tile = i_s * CW + i
                rows = lo + tile * BN + o_n
                m_rows = (rows <= pos) & (tile < NW)
                rows = _page_rows(tbl_ptr, i_r, rows, m_rows, MAX_PAGES, PAGE)
                w_m, w_l, w_acc = _keys_tile(b_q, w_m, w_l, w_acc, p_k, p_v, rows, m_rows, m_d, qk_scale, H * D,
                                             IEEE)
    else:
        for i in range(C):
            item = i_s * C + i
            if item < TOPK:  # a selected block (skipped when -1), keys <= pos
                blk = tl.load(p_idx + item)
                if blk >= 0:
                    rows = blk * BS + o_s
                    m_rows = rows <= pos
                    rows = _page_rows(tbl_ptr, i_r, rows, m_rows, MAX_PAGES, PAGE)
                    s_m, s_l, s_acc = _keys_tile(b_q, s_m, s_l, s_acc, p_k, p_v, rows, m_rows, m_d, qk_scale,
                                                 H * D, IEEE)
            elif item < TOPK + NW:  # window tile item - T
                rows = lo + (item - TOPK) * BN + o_n
                m_rows = rows <= pos
                rows = _page_rows(tbl_ptr, i_r, rows, m_rows, MAX_PAGES, PAGE)
                w_m, w_l, w_acc = _keys_tile(b_q, w_m, w_l, w_acc, p_k, p_v, rows, m_rows, m_d, qk_scale,
                                             H * D, IEEE)
    part = ((i_b * H + i_h) * S + i_s).to(tl.int64) * 2
    if BRANCH != 2:
        _store_partial(o_part_ptr, lse_part_ptr, part, s_m, s_l, s_acc, G, G_PAD, D, BLOCK_D)
    if BRANCH != 1:
        _store_partial(o_part_ptr, lse_part_ptr, part + 1, w_m, w_l, w_acc, G, G_PAD, D, BLOCK_D)


@triton.jit
def _merge_branch(o_part_ptr, lse_part_ptr, part0, branch, g, S: tl.constexpr, S_PAD: tl.constexpr,
                  G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_D]: query head g's output of one branch from its S partials (0 if no split saw a key)."""
    o_p = tl.arange(0, S_PAD)
    o_d = tl.arange(0, BLOCK_D)
    m_p = o_p < S
    parts = (part0 + o_p).to(tl.int64) * 2 + branch
    b_ls = tl.load(lse_part_ptr + parts * G_PAD + g, mask=m_p, other=float("-inf"))  # [S_PAD]
    b_mx = tl.max(b_ls, axis=0)
    m_ref = tl.where(b_mx == float("-inf"), 0., b_mx)
    b_w = tl.where(b_ls > float("-inf"), tl.exp2(b_ls - m_ref), 0.)
    b_o = tl.load(o_part_ptr + (parts * G + g)[:, None] * D + o_d[None, :], mask=m_p[:, None] & (o_d < D)[None, :],
                  other=0.)  # [S_PAD, BLOCK_D]
    w_sum = tl.sum(b_w, axis=0)
    return tl.sum(b_w[:, None] * b_o, axis=0) / tl.where(w_sum > 0, w_sum, 1.)


@triton.jit
def _split_combine_kernel(
    o_part_ptr, lse_part_ptr, pos_ptr, o_cmp_ptr, gates_ptr, out_ptr, len_ptr,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr, ADVANCE: tl.constexpr,
):
    i_b, i_q = tl.program_id(0), tl.program_id(1)
    pos = tl.load(pos_ptr + i_b)
    _advance(len_ptr, i_b, i_q, pos, ADVANCE)
    i_h, g = i_q // G, i_q % G
    part0 = (i_b * H + i_h) * S
    o_slc = _merge_branch(o_part_ptr, lse_part_ptr, part0, 0, g, S, S_PAD, G, G_PAD, D, BLOCK_D)
    o_win = _merge_branch(o_part_ptr, lse_part_ptr, part0, 1, g, S, S_PAD, G, G_PAD, D, BLOCK_D)
    row = (i_b * HQ + i_q).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    g0 = tl.load(gates_ptr + row * 3).to(tl.float32)
    g1 = tl.load(gates_ptr + row * 3 + 1).to(tl.float32)
    g2 = tl.load(gates_ptr + row * 3 + 2).to(tl.float32)
    b_cmp = tl.load(o_cmp_ptr + row * D + o_d, mask=m_d, other=0.)
    b_o = g0 * b_cmp + g1 * o_slc + g2 * o_win
    tl.store(out_ptr + row * D + o_d, b_o.to(out_ptr.dtype.element_ty), mask=m_d)


def split_items(topk: int, window_tiles: int, splits: int) -> tuple[int, int]:
    """(S, C): C = ceil(items / splits) items per split and the S = ceil(items / C) splits that hold
    any (no split is empty by construction)."""
    items = topk + window_tiles
    c = -(-items // max(1, min(splits, items)))
    return -(-items // c), c


class SplitPlan(NamedTuple):
    """How the split kernel shares a (slot, KV head)'s work: S programs, C items each (item list) or
    CS selected entries and CW window tiles each (shares)."""

    s: int
    c: int
    shares: bool
    cs: int
    cw: int


def split_plan(topk: int, window_tiles: int, splits: int, shares: bool) -> SplitPlan:
    s, c = split_items(topk, window_tiles, splits)
    if shares:  # every split takes ceil(T / S) selected entries and ceil(NW / S) window tiles
        s = max(1, min(splits, max(topk, window_tiles)))
    return SplitPlan(s, c, shares, -(-topk // s), -(-window_tiles // s))


def split_partials(b: int, h: int, g: int, g_pad: int, d: int, plan: SplitPlan, device):
    """(o_part, lse_part): the split kernel's partial buffers for both branches."""
    return (new_output((b * h * plan.s * 2, g, d), torch.float32, device),
            new_output((b * h * plan.s * 2, g_pad), torch.float32, device))


def split_keys(q, k, v, pos, idx, parts, plan: SplitPlan, *, branch: int, g: int, g_pad: int, block_d: int,
               block_size: int, window_size: int, window_tile: int, qk_scale: float, ieee: bool, layout: tuple,
               slots=None):
    """Launch the split kernel for `branch` (0 both, 1 selected, 2 window; 1 and 2 need plan.shares)
    into `parts` (split_partials)."""
    b, hq, _ = q.shape
    max_seqlen, h = k.shape[1], k.shape[2]
    _split_keys_kernel[(b, h, plan.s)](
        q, k, v, layout[0], pos if slots is None else slots, pos, idx, parts[0], parts[1], max_seqlen, layout[1],
        qk_scale, HQ=hq, H=h, G=g, G_PAD=g_pad, D=q.shape[2], BLOCK_D=block_d, BS=block_size,
        TOPK=idx.shape[2], WINDOW=window_size, BN=window_tile, S=plan.s, C=plan.c, SHARES=plan.shares, CS=plan.cs,
        CW=plan.cw, IEEE=ieee, PAGE=layout[2], SLOTS=slots is not None, BRANCH=branch,
        num_warps=DECODE_LAUNCH.attend_warps, num_stages=DECODE_LAUNCH.attend_stages)


def split_combine(parts, plan: SplitPlan, pos, o_cmp, gates, out, advance, *, h: int, g: int, g_pad: int,
                  block_d: int):
    """The combine kernel: both branches' partials merged, gated with o_cmp into out; advance."""
    b, hq, d = out.shape
    _split_combine_kernel[(b, hq)](
        parts[0], parts[1], pos, o_cmp, gates, out, pos if advance is None else advance, HQ=hq, H=h, G=g,
        G_PAD=g_pad, D=d, BLOCK_D=block_d, S=plan.s, S_PAD=next_pow2(plan.s), ADVANCE=advance is not None,
        num_warps=4)


def split_selected_window(q, k, v, pos, idx, o_cmp, gates, out, advance, *, splits: int, g: int, g_pad: int,
                          block_d: int, block_size: int, window_size: int, window_tile: int, qk_scale: float,
                          ieee: bool, layout: tuple, slots=None):
    """Run the split and combine kernels; fills out [B, HQ, D] (decode_selected_window's output,
    already allocated) from arguments it has checked. splits > 1 (normalised by split_items); layout:
    decode_tiles.cache_layout's (table, MAX_PAGES, PAGE)."""
    b, h = q.shape[0], k.shape[2]
    nw = -(-window_size // window_tile)
    plan = split_plan(idx.shape[2], nw, splits, bool(DECODE_LAUNCH.attend_shares))
    parts = split_partials(b, h, g, g_pad, q.shape[2], plan, q.device)
    split_keys(q, k, v, pos, idx, parts, plan, branch=0, g=g, g_pad=g_pad, block_d=block_d, block_size=block_size,
               window_size=window_size, window_tile=window_tile, qk_scale=qk_scale, ieee=ieee, layout=layout,
               slots=slots)
    split_combine(parts, plan, pos, o_cmp, gates, out, advance, h=h, g=g, g_pad=g_pad, block_d=block_d)
