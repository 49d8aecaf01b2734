"""Decode, kernel 1: compressed attention of the one new token of every slot, with its block selection.

Grid (B, H): one program per (slot, KV head); the tile's rows are the G query heads of the group
(decode_tiles.py). Pass 1 over the slot's visible summaries: online softmax -> o_cmp [G, D] and lse.
Pass 2 over the same summaries: p = exp(s - lse) summed over the G heads, mapped to selection blocks
and merged into the running top-T set by the fused selection kernel's helpers (one token per tile:
same mapping, same rank, forced blocks first, -1 for empty slots). When slots x KV heads leave SMs
idle, the summaries of a (slot, KV head) are split over S programs instead (decode_split.py,
FlashDecoding style; S from decode_splits). Reads the cache in place:
k_cmp, v_cmp [B, max_cmp, H, D]; summary i of slot b is visible to the token at position t iff
i * stride + kernel_size - 1 <= t.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_baseline.checks import fail
from nsa_baseline.ops.decode_split import split_compressed_partials, split_merge
from nsa_baseline.ops.decode_tiles import (DECODE_LAUNCH, _attend_summaries, _cache_slot, _finish, _load_q, check_slots,
                                           gpu_programs, group_pad, head_pad)
from nsa_baseline.ops.selection_kernel import _merge_bitonic, _pack_desc, _scores_tile, _store_sorted
from nsa_baseline.utils.triton_utils import LOG2E, is_interpreter, new_output, next_pow2

MAX_SPLITS = 64


def decode_splits(batch: int, heads: int, max_cmp: int, device: torch.device) -> int:
    """Programs per (slot, KV head) for decode_compressed_select: enough for about
    DECODE_LAUNCH.select_programs_per_sm per SM (select_programs_per_sm_full once batch x heads alone
    cover the SMs), rounded down to a power of two, at most one per tile of summaries of a full cache
    (and MAX_SPLITS); 1 off CUDA (the interpreter). Static for a cache (CUDA graphs).

    Why a power of two: two summary programs fit an SM (255 registers), and on the H100 (132 SMs) 16
    splits x 64 (slot, KV head) pairs = 1024 programs end just under 4 waves of 264 where 17 (1088)
    start a fifth: B=8 64K summaries + select + merge 63.1 us with 16, 65.9 with 17; 128K 115.6 vs
    121.4 (results/decode_tune/split_scan_h100_e7b9c71.csv)."""
    sms = gpu_programs(device, 1)
    if not sms:
        return 1
    full = batch * heads >= sms
    programs = sms * (DECODE_LAUNCH.select_programs_per_sm_full if full else DECODE_LAUNCH.select_programs_per_sm)
    want = -(-programs // max(1, batch * heads))
    want = 1 << (want.bit_length() - 1)
    return max(1, min(want, -(-max_cmp // DECODE_LAUNCH.summaries_per_tile), MAX_SPLITS))


@triton.jit
def _decode_select_kernel(
    q_ptr, k_ptr, v_ptr, slot_ptr, pos_ptr, o_ptr, idx_ptr, MAX_CMP, qk_scale,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr, BJ: tl.constexpr, R: tl.constexpr, C: tl.constexpr, KS: tl.constexpr,
    STRIDE: tl.constexpr, BS: tl.constexpr, TOPK: tl.constexpr, T_PAD: tl.constexpr,
    INIT: tl.constexpr, LOCAL: tl.constexpr, IEEE: tl.constexpr, WHILE_LOOP: tl.constexpr, SLOTS: tl.constexpr,
):
    BC: tl.constexpr = BJ * R
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    pos = tl.load(pos_ptr + i_b)  # the new token's position (= tokens held before it)
    nvis = tl.where(pos >= KS - 1, (pos - (KS - 1)) // STRIDE + 1, 0)
    o_g = tl.arange(0, G_PAD)
    o_d = tl.arange(0, BLOCK_D)
    m_g = o_g < G
    m_d = o_d < D
    b_q = _load_q(q_ptr, i_b, i_h, HQ, G, G_PAD, D, BLOCK_D)  # [G_PAD, BLOCK_D]
    base = (_cache_slot(slot_ptr, i_b, SLOTS).to(tl.int64) * MAX_CMP * H + i_h) * D
    p_k = k_ptr + base + tl.arange(0, BC).to(tl.int64)[:, None] * (H * D) + o_d[None, :]  # [BC, BLOCK_D]
    p_v = v_ptr + base + tl.arange(0, BC).to(tl.int64)[:, None] * (H * D) + o_d[None, :]

    # pass 1: compressed attention over summaries [0, nvis)
    b_m, b_l, b_acc = _attend_summaries(b_q, p_k, p_v, 0, nvis, qk_scale, H, D, G_PAD, BLOCK_D, BC, IEEE, WHILE_LOOP)
    p_o = o_ptr + (i_b * HQ + i_h * G + o_g).to(tl.int64)[:, None] * D + o_d[None, :]
    tl.store(p_o, _finish(b_l, b_acc), mask=m_g[:, None] & m_d[None, :])
    # base-2 lse; rows with no summary get 0 (their p is masked to 0 anyway)
    b_lse = tl.where(b_l > 0, b_m + tl.log2(tl.where(b_l > 0, b_l, 1.)), 0.)

    # pass 2: block scores of blocks [0, cur] merged into the running top-T set (one row: this token)
    cur = pos // BS
    cur_t = cur + tl.zeros([1], tl.int32)
    in_t = cur_t >= 0
    nvis_m = nvis + tl.zeros([G_PAD], tl.int32)
    keys = _pack_desc(tl.full([1, T_PAD], float("-inf"), tl.float32), tl.zeros([1, T_PAD], tl.int32) - 1)
    carry = tl.zeros([1], tl.float32)  # mass a tile's last block spills into the next tile's first
    if WHILE_LOOP:
        j0 = cur * 0
        while j0 <= cur:
            b_sc, carry = _scores_tile(b_q, b_lse, carry, p_k, j0, nvis, nvis_m, m_g, qk_scale,
                                       H, D, BLOCK_D, 1, G_PAD, BJ, R, C, IEEE)
            keys = _merge_bitonic(keys, b_sc, j0, cur_t, in_t, INIT, LOCAL, BJ, T_PAD)
            j0 += BJ
    else:
        for j0 in range(0, cur + 1, BJ):
            b_sc, carry = _scores_tile(b_q, b_lse, carry, p_k, j0, nvis, nvis_m, m_g, qk_scale,
                                       H, D, BLOCK_D, 1, G_PAD, BJ, R, C, IEEE)
            keys = _merge_bitonic(keys, b_sc, j0, cur_t, in_t, INIT, LOCAL, BJ, T_PAD)
    p_idx = idx_ptr + (i_b * H + i_h).to(tl.int64) * TOPK + tl.zeros([1], tl.int64)
    _store_sorted(keys, p_idx, in_t, TOPK, T_PAD)


def _check(q, k_cmp, v_cmp, pos, kernel_size, kernel_stride, block_size, topk, slots):
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        fail("q", f"must be [B, HQ, D], got {tuple(getattr(q, 'shape', ()))}")
    b, hq, d = q.shape
    check_slots(slots, b, q.device)
    for name, t in (("k_cmp", k_cmp), ("v_cmp", v_cmp)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or (slots is None and t.shape[0] != b) \
                or t.shape[3] != d or not t.is_contiguous():
            fail(name, f"must be contiguous [B={b}, max_cmp, H, D={d}], got {tuple(getattr(t, 'shape', ()))}")
        if t.dtype != q.dtype or t.device != q.device:
            fail(name, f"must match q ({q.dtype} on {q.device}), got {t.dtype} on {t.device}")
    if v_cmp.shape != k_cmp.shape or hq % k_cmp.shape[2]:
        fail("v_cmp", f"must be k_cmp's shape {tuple(k_cmp.shape)} with HQ={hq} a multiple of its H")
    if not isinstance(pos, torch.Tensor) or pos.dtype != torch.int32 or tuple(pos.shape) != (b,) \
            or pos.device != q.device:
        fail("pos", f"must be int32 [B={b}] on {q.device}, got {getattr(pos, 'dtype', type(pos))} "
             f"{tuple(getattr(pos, 'shape', ()))}")
    r, c = block_size // kernel_stride, kernel_size // kernel_stride
    if block_size % kernel_stride or kernel_size % kernel_stride or c > r or r != next_pow2(r):
        fail("block_size", f"({block_size}) / kernel_stride ({kernel_stride}) must be a power of two >= "
             f"kernel_size / kernel_stride ({kernel_size} / {kernel_stride})")
    if not isinstance(topk, int) or topk < 1:
        fail("topk", f"must be an int >= 1, got {topk!r}")


def decode_compressed_select(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, pos: torch.Tensor,
                             kernel_size: int, kernel_stride: int, block_size: int, topk: int,
                             init_blocks: int, local_blocks: int, scale: float, splits: int | None = None,
                             slots: torch.Tensor | None = None, after_summaries=None, unmerged: bool = False):
    r"""Compressed attention and top-T block selection of one new token per slot.

    Args:
        q: [B, HQ, D] the new tokens' queries (after RoPE); k_cmp, v_cmp: [B, max_cmp, H, D] the
            cache's summaries (already holding any summary the new token completes);
        pos: int32 [B] each new token's position (the slot's length before it);
        splits: programs per (slot, KV head) (None: decode_splits' rule; tests force > 1 anywhere);
        slots: int32 [B], the cache slot (row of k_cmp, v_cmp) each query reads, or None (its own row
            b); several queries may read one slot at different positions (chunked prefill);
        after_summaries: called (no arguments) once the pass over the summaries is launched, before the
            selection's own kernels (the decode step starts independent work on a side stream there);
        unmerged: when the summaries are split (S > 1), skip the merge kernel and return (None,
            SelectPartials) for decode_selected_window, which merges them itself.
    Returns:
        o_cmp float32 [B, HQ, D] (0 for a token that sees no summary) and block_indices int32 [B, H, T]:
        forced blocks (the first init_blocks, the local_blocks ending at the token's block) first,
        then by decreasing score, -1 for empty slots.
    """
    _check(q, k_cmp, v_cmp, pos, kernel_size, kernel_stride, block_size, topk, slots)
    if splits is not None and (not isinstance(splits, int) or isinstance(splits, bool) or splits < 1):
        fail("splits", f"must be None or an int >= 1, got {splits!r}")
    b, hq, d = q.shape
    max_cmp, h = k_cmp.shape[1], k_cmp.shape[2]
    g = hq // h
    r, c = block_size // kernel_stride, kernel_size // kernel_stride
    t_pad = next_pow2(topk)
    bj = max(t_pad, next_pow2(DECODE_LAUNCH.summaries_per_tile) // r, 1)  # the bitonic merge needs a full tile
    if max_cmp == 0:  # a cache too short for any summary: keep valid pointers, nothing is visible
        k_cmp = v_cmp = q.new_zeros(k_cmp.shape[0], 1, h, d)
        max_cmp = 1
    slot_map = pos if slots is None else slots  # pos: a valid pointer the kernels never read as slots
    if splits is None:
        splits = decode_splits(b, h, k_cmp.shape[1], q.device)
    if splits > 1:
        parts = split_compressed_partials(
            q.contiguous(), k_cmp, v_cmp, pos, splits=splits, max_cmp=max_cmp, qk_scale=scale * LOG2E, g=g,
            g_pad=group_pad(g), block_d=head_pad(d), bj=bj, r=r, c=c, kernel_size=kernel_size,
            kernel_stride=kernel_stride, block_size=block_size, topk=topk, init_blocks=init_blocks,
            local_blocks=local_blocks, ieee=q.dtype == torch.float32, while_loop=is_interpreter(), slots=slots,
            after_summaries=after_summaries)
        return (None, parts) if unmerged else split_merge(parts, b, h)
    o_cmp = new_output((b, hq, d), torch.float32, q.device)
    idx = new_output((b, h, topk), torch.int32, q.device)
    _decode_select_kernel[(b, h)](
        q.contiguous(), k_cmp, v_cmp, slot_map, pos, o_cmp, idx, max_cmp, scale * LOG2E,
        HQ=hq, H=h, G=g, G_PAD=group_pad(g), D=d, BLOCK_D=head_pad(d), BJ=bj, R=r, C=c, KS=kernel_size,
        STRIDE=kernel_stride, BS=block_size, TOPK=topk, T_PAD=t_pad, INIT=init_blocks, LOCAL=local_blocks,
        IEEE=q.dtype == torch.float32, WHILE_LOOP=is_interpreter(), SLOTS=slots is not None,
        num_warps=DECODE_LAUNCH.select_warps,
        num_stages=DECODE_LAUNCH.select_stages,
    )
    if after_summaries is not None:
        after_summaries()
    return o_cmp, idx
