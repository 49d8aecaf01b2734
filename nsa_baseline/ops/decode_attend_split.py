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
Given the compressed select's SelectPartials instead of block indices and o_cmp (decode step,
DECODE_LAUNCH.fold_merge), every split program takes the top T of the select pass's candidate sets
itself (CANDS) and the combine merges the compressed partials (CMP_S): the merge kernel is not launched.
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

from nsa_baseline.ops.decode_split import SelectPartials, _top_candidates
from nsa_baseline.ops.decode_tiles import (DECODE_LAUNCH, _advance, _cache_slot, _finish, _keys_tile, _load_q,
                                           _merge_rows, _page_rows, _slot_row0)
from nsa_baseline.ops.selection_kernel import _key_ids
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
    CANDS: tl.constexpr = 0, CANDS_PAD: tl.constexpr = 2, T_PAD: tl.constexpr = 1,
):
    """BRANCH 0: both branches (SHARES or the item list); 1: the selected entries only; 2: the window
    tiles only (1 and 2 with SHARES; each stores its own partial rows only). CANDS = 0: idx_ptr holds
    block_indices int32 [B, H, TOPK]; CANDS = S > 0: it holds the compressed select's S sorted candidate
    sets per (slot, KV head) (SelectPartials.keys_part, int64 [B * H * S, T_PAD]) and every program
    takes their top TOPK itself (what the merge kernel would have written)."""
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
    o_t = tl.arange(0, T_PAD)
    if CANDS > 0:
        ids = _key_ids(_top_candidates(idx_ptr, ((i_b * H + i_h) * CANDS).to(tl.int64), CANDS, CANDS_PAD, T_PAD))
    else:
        ids = tl.zeros([1, T_PAD], tl.int32)
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
                blk = _entry(p_idx, ids, o_t, item, TOPK, CANDS)
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
                blk = _entry(p_idx, ids, o_t, item, TOPK, CANDS)
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
def _entry(p_idx, ids, o_t, item, TOPK: tl.constexpr, CANDS: tl.constexpr):
    """Entry `item` of the (slot, KV head)'s block indices: loaded (CANDS = 0) or picked from `ids`
    [1, T_PAD] (the candidates' top, in _store_sorted's order); -1 from TOPK on."""
    if CANDS > 0:
        blk = tl.sum(tl.sum(tl.where(o_t[None, :] == item, ids, 0), axis=1), axis=0)
        blk = tl.where(item < TOPK, blk, -1)
    else:
        blk = tl.load(p_idx + item, mask=item < TOPK, other=-1)
    return blk


@triton.jit
def _split_combine_kernel(
    o_part_ptr, lse_part_ptr, pos_ptr, o_cmp_ptr, cmp_lse_ptr, gates_ptr, out_ptr, len_ptr,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr, ADVANCE: tl.constexpr,
    CMP_S: tl.constexpr = 0, CMP_S_PAD: tl.constexpr = 2,
):
    """CMP_S = 0: o_cmp_ptr is the compressed branch's output float32 [B, HQ, D] (cmp_lse_ptr unused);
    CMP_S > 0: o_cmp_ptr, cmp_lse_ptr are the compressed select's CMP_S split partials
    (SelectPartials.o_part, .lse_part), merged here."""
    i_b, i_q = tl.program_id(0), tl.program_id(1)
    pos = tl.load(pos_ptr + i_b)
    _advance(len_ptr, i_b, i_q, pos, ADVANCE)
    i_h, g = i_q // G, i_q % G
    o_p = tl.arange(0, S_PAD)
    parts = ((i_b * H + i_h) * S + o_p).to(tl.int64) * 2  # row of split p's selected partial; + 1: window
    o_slc = _merge_rows(o_part_ptr, lse_part_ptr, parts, o_p < S, g, G, G_PAD, D, BLOCK_D)
    o_win = _merge_rows(o_part_ptr, lse_part_ptr, parts + 1, o_p < S, g, G, G_PAD, D, BLOCK_D)
    row = (i_b * HQ + i_q).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    g0 = tl.load(gates_ptr + row * 3).to(tl.float32)
    g1 = tl.load(gates_ptr + row * 3 + 1).to(tl.float32)
    g2 = tl.load(gates_ptr + row * 3 + 2).to(tl.float32)
    if CMP_S > 0:
        o_c = tl.arange(0, CMP_S_PAD)
        b_cmp = _merge_rows(o_cmp_ptr, cmp_lse_ptr, ((i_b * H + i_h) * CMP_S + o_c).to(tl.int64), o_c < CMP_S, g,
                            G, G_PAD, D, BLOCK_D)
    else:
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
    into `parts` (split_partials). idx: block_indices [B, H, T], or the compressed select's
    SelectPartials (each program takes the top T of its candidate sets)."""
    b, hq, _ = q.shape
    max_seqlen, h = k.shape[1], k.shape[2]
    if isinstance(idx, SelectPartials):
        topk, cands = idx.topk, dict(CANDS=idx.splits, CANDS_PAD=max(2, next_pow2(idx.splits)),
                                     T_PAD=idx.keys_part.shape[1])
        idx = idx.keys_part
    else:
        topk, cands = idx.shape[2], {}
    _split_keys_kernel[(b, h, plan.s)](
        q, k, v, layout[0], pos if slots is None else slots, pos, idx, parts[0], parts[1], max_seqlen, layout[1],
        qk_scale, HQ=hq, H=h, G=g, G_PAD=g_pad, D=q.shape[2], BLOCK_D=block_d, BS=block_size,
        TOPK=topk, WINDOW=window_size, BN=window_tile, S=plan.s, C=plan.c, SHARES=plan.shares, CS=plan.cs,
        CW=plan.cw, IEEE=ieee, PAGE=layout[2], SLOTS=slots is not None, BRANCH=branch, **cands,
        num_warps=DECODE_LAUNCH.attend_warps, num_stages=DECODE_LAUNCH.attend_stages)


def split_combine(parts, plan: SplitPlan, pos, o_cmp, gates, out, advance, *, h: int, g: int, g_pad: int,
                  block_d: int):
    """The combine kernel: both branches' partials merged, gated with the compressed branch into out;
    advance. o_cmp: float32 [B, HQ, D], or the compressed select's SelectPartials (merged here)."""
    b, hq, d = out.shape
    if isinstance(o_cmp, SelectPartials):
        cmp = dict(CMP_S=o_cmp.splits, CMP_S_PAD=max(2, next_pow2(o_cmp.splits)))
        o_cmp, cmp_lse = o_cmp.o_part, o_cmp.lse_part
    else:
        cmp, cmp_lse = {}, o_cmp
    _split_combine_kernel[(b, hq)](
        parts[0], parts[1], pos, o_cmp, cmp_lse, gates, out, pos if advance is None else advance, HQ=hq, H=h, G=g,
        G_PAD=g_pad, D=d, BLOCK_D=block_d, S=plan.s, S_PAD=next_pow2(plan.s), ADVANCE=advance is not None, **cmp,
        num_warps=4)


def split_selected_window(q, k, v, pos, idx, o_cmp, gates, out, advance, *, splits: int, g: int, g_pad: int,
                          block_d: int, block_size: int, window_size: int, window_tile: int, qk_scale: float,
                          ieee: bool, layout: tuple, slots=None):
    """Run the split and combine kernels; fills out [B, HQ, D] (decode_selected_window's output,
    already allocated) from arguments it has checked. splits > 1 (normalised by split_items); layout:
    decode_tiles.cache_layout's (table, MAX_PAGES, PAGE); idx and o_cmp: block_indices and the
    compressed output, or both the compressed select's SelectPartials."""
    b, h = q.shape[0], k.shape[2]
    nw = -(-window_size // window_tile)
    topk = idx.topk if isinstance(idx, SelectPartials) else idx.shape[2]
    plan = split_plan(topk, nw, splits, bool(DECODE_LAUNCH.attend_shares))
    parts = split_partials(b, h, g, g_pad, q.shape[2], plan, q.device)
    split_keys(q, k, v, pos, idx, parts, plan, branch=0, g=g, g_pad=g_pad, block_d=block_d, block_size=block_size,
               window_size=window_size, window_tile=window_tile, qk_scale=qk_scale, ieee=ieee, layout=layout,
               slots=slots)
    split_combine(parts, plan, pos, o_cmp, gates, out, advance, h=h, g=g, g_pad=g_pad, block_d=block_d)
