"""Decode, kernel 2: selected and sliding-window attention of the one new token of every slot, and
NSA's gated sum of the three branches, in one kernel.

Grid (B, H): one program per (slot, KV head); the tile's rows are the G query heads of the group
(decode_tiles.py), so each selected block and window key is read once per group. Selected: the T
blocks of block_indices (-1 skipped), keys <= the token's position; window: keys
max(0, t - W + 1) .. t in a fixed number of tiles (no data-dependent trip count); each branch has its
own softmax. out = g0 * o_cmp + g1 * o_slc + g2 * o_win, written in the output dtype. Reads the cache
in place: k, v [B, max_seqlen, H, D], or a paged cache's pools [num_pages, P, H, D] through its block
table (decode_tiles._page_rows: one table read per key tile); with slots= query row b reads cache slot
slots[b] (chunked prefill: many queries of one slot). With advance (the cache's lengths) program (b, 0)
also sets lengths[b] = pos + 1: the decode step's last kernel moves the lengths (decode_append cannot).
When slots x KV heads leave SMs idle, the keys of a (slot, KV head) are split over S programs and
merged by a combine kernel instead (decode_attend_split.py, FlashDecoding style; S from attend_splits).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from nsa_baseline.checks import fail
from nsa_baseline.contract import BLOCK_SIZES
from nsa_baseline.ops.decode_attend_split import (SplitPlan, split_combine, split_items, split_keys, split_partials,
                                                   split_plan, split_selected_window)
from nsa_baseline.ops.decode_split import SelectPartials, split_merge
from nsa_baseline.ops.decode_tiles import (DECODE_LAUNCH, _advance, _cache_slot, _finish, _keys_tile, _page_rows,
                                           _slot_row0, cache_layout, check_slots, gpu_programs, group_pad, head_pad)
from nsa_baseline.utils.triton_utils import LOG2E, new_output

def window_tile(window_size: int) -> int:
    """Keys per window tile: DECODE_LAUNCH.window_tile, or the window rounded up to a power of two if
    shorter."""
    return min(triton.next_power_of_2(DECODE_LAUNCH.window_tile), triton.next_power_of_2(window_size))


def attend_splits(batch: int, heads: int, topk: int, window_size: int, device: torch.device) -> int:
    """Programs per (slot, KV head) for decode_selected_window: enough for about
    DECODE_LAUNCH.attend_programs_per_sm per SM, at most one per item (a selected block or a window
    tile; decode_attend_split.py); 1 off CUDA (the interpreter) and once batch x heads alone cover
    the SMs (H100, B=32 x 8 heads: one program 84.3 us, 2 splits 87.3-91.1 with the combine;
    results/decode_tune/split_scan_h100_136471c.csv). Static for a cache (CUDA graphs)."""
    programs = gpu_programs(device, DECODE_LAUNCH.attend_programs_per_sm)
    if not programs or batch * heads >= gpu_programs(device, 1):
        return 1
    want = -(-programs // max(1, batch * heads))
    return split_items(topk, -(-window_size // window_tile(window_size)), want)[0]


@triton.jit
def _decode_attend_kernel(
    q_ptr, k_ptr, v_ptr, tbl_ptr, slot_ptr, pos_ptr, idx_ptr, o_cmp_ptr, gates_ptr, out_ptr, len_ptr, MAX_SEQLEN,
    MAX_PAGES, qk_scale, HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr, BS: tl.constexpr, TOPK: tl.constexpr, WINDOW: tl.constexpr,
    BN: tl.constexpr, ADVANCE: tl.constexpr, IEEE: tl.constexpr, PAGE: tl.constexpr, SLOTS: tl.constexpr,
):
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    pos = tl.load(pos_ptr + i_b)
    _advance(len_ptr, i_b, i_h, pos, ADVANCE)
    o_g = tl.arange(0, G_PAD)
    o_d = tl.arange(0, BLOCK_D)
    m_g = o_g < G
    m_d = o_d < D
    m_gd = m_g[:, None] & m_d[None, :]
    rows_q = (i_b * HQ + i_h * G + o_g).to(tl.int64)  # [G_PAD] query rows
    b_q = tl.load(q_ptr + rows_q[:, None] * D + o_d[None, :], mask=m_gd, other=0.)  # [G_PAD, BLOCK_D]
    i_r = _cache_slot(slot_ptr, i_b, SLOTS)  # the cache slot this token reads
    base = (_slot_row0(i_r, MAX_SEQLEN, PAGE) * H + i_h) * D
    p_k = k_ptr + base + o_d[None, :]
    p_v = v_ptr + base + o_d[None, :]

    # selected: the T chosen blocks, keys <= pos
    o_s = tl.arange(0, BS)
    b_m = tl.full([G_PAD], float("-inf"), tl.float32)
    b_l = tl.zeros([G_PAD], tl.float32)
    b_acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    p_idx = idx_ptr + (i_b * H + i_h).to(tl.int64) * TOPK
    for t in range(TOPK):  # no branch on the loaded index (a -1 slot is a masked tile): loads pipeline
        blk = tl.load(p_idx + t)
        rows = blk * BS + o_s
        m_rows = (rows <= pos) & (blk >= 0)
        rows = _page_rows(tbl_ptr, i_r, rows, m_rows, MAX_PAGES, PAGE)
        b_m, b_l, b_acc = _keys_tile(b_q, b_m, b_l, b_acc, p_k, p_v, rows, m_rows, m_d, qk_scale, H * D, IEEE)
    o_slc = _finish(b_l, b_acc)

    # window: keys max(0, pos - WINDOW + 1) .. pos
    lo = tl.maximum(pos - WINDOW + 1, 0)
    o_n = tl.arange(0, BN)
    b_m = tl.full([G_PAD], float("-inf"), tl.float32)
    b_l = tl.zeros([G_PAD], tl.float32)
    b_acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    NW: tl.constexpr = (WINDOW + BN - 1) // BN
    for i in range(NW):
        rows = lo + i * BN + o_n
        m_rows = rows <= pos
        rows = _page_rows(tbl_ptr, i_r, rows, m_rows, MAX_PAGES, PAGE)
        b_m, b_l, b_acc = _keys_tile(b_q, b_m, b_l, b_acc, p_k, p_v, rows, m_rows, m_d, qk_scale, H * D, IEEE)
    o_win = _finish(b_l, b_acc)

    # gated sum with the compressed branch (float32 from kernel 1)
    p_g = gates_ptr + rows_q * 3
    g0 = tl.load(p_g, mask=m_g, other=0.).to(tl.float32)
    g1 = tl.load(p_g + 1, mask=m_g, other=0.).to(tl.float32)
    g2 = tl.load(p_g + 2, mask=m_g, other=0.).to(tl.float32)
    b_cmp = tl.load(o_cmp_ptr + rows_q[:, None] * D + o_d[None, :], mask=m_gd, other=0.)
    b_o = g0[:, None] * b_cmp + g1[:, None] * o_slc + g2[:, None] * o_win
    tl.store(out_ptr + rows_q[:, None] * D + o_d[None, :], b_o.to(out_ptr.dtype.element_ty), mask=m_gd)


def _check(q, k, v, pos, block_indices, o_cmp, gates, block_size, window_size, advance, paged, slots):
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        fail("q", f"must be [B, HQ, D], got {tuple(getattr(q, 'shape', ()))}")
    b, hq, d = q.shape
    check_slots(slots, b, q.device)
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[3] != d or not t.is_contiguous() \
                or (not paged and slots is None and t.shape[0] != b) or (paged and t.shape[1] % block_size):
            want = f"[num_pages, page_size (a multiple of {block_size}), H, D={d}]" if paged else \
                f"[B={b}, max_seqlen, H, D={d}]"
            fail(name, f"must be contiguous {want}, got {tuple(getattr(t, 'shape', ()))}")
        if t.dtype != q.dtype or t.device != q.device:
            fail(name, f"must match q ({q.dtype} on {q.device}), got {t.dtype} on {t.device}")
    h = k.shape[2]
    if v.shape != k.shape or hq % h:
        fail("v", f"must be k's shape {tuple(k.shape)} with HQ={hq} a multiple of its H")
    merged = not isinstance(block_indices, SelectPartials)
    if not merged:
        _check_partials(block_indices, o_cmp, b, h, hq // h, d, q.device)
    for name, t, shape, dtype in (("pos", pos, (b,), torch.int32), ("gates", gates, (b, hq, 3), q.dtype)) \
            + ((("o_cmp", o_cmp, (b, hq, d), torch.float32),) if merged else ()):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype \
                or t.device != q.device or not t.is_contiguous():
            fail(name, f"must be contiguous {dtype} {list(shape)} on {q.device}, got "
                 f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if merged and (not isinstance(block_indices, torch.Tensor) or block_indices.dtype != torch.int32
                   or block_indices.dim() != 3 or block_indices.shape[:2] != (b, h)
                   or not block_indices.is_contiguous()):
        fail("block_indices", f"must be contiguous int32 [B={b}, H={h}, T], got "
             f"{getattr(block_indices, 'dtype', '')} {tuple(getattr(block_indices, 'shape', ()))}")
    if block_size not in BLOCK_SIZES:
        fail("block_size", f"must be one of {BLOCK_SIZES}, got {block_size!r}")
    if not isinstance(window_size, int) or window_size < 1:
        fail("window_size", f"must be an int >= 1, got {window_size!r}")
    if advance is not None and (not isinstance(advance, torch.Tensor) or advance.dtype != torch.int32
                                or tuple(advance.shape) != (b,) or advance.device != q.device
                                or not advance.is_contiguous()):
        fail("advance", f"must be None or contiguous int32 [B={b}] on {q.device} (the cache's lengths)")
    if advance is not None and advance.data_ptr() == pos.data_ptr():
        fail("advance", "must not be `pos` itself: the kernels read pos while they move the lengths")


def _check_partials(parts, o_cmp, b: int, h: int, g: int, d: int, device) -> None:
    """block_indices given as the compressed select's SelectPartials (o_cmp then None): its buffers
    must be this call's (B, H, G, D) on q's device."""
    rows = b * h * parts.splits
    if o_cmp is not None or parts.keys_part.shape[0] != rows or tuple(parts.o_part.shape) != (rows, g, d) \
            or parts.lse_part.shape[0] != rows or parts.keys_part.device != device:
        fail("block_indices", f"given as SelectPartials (decode_compressed_select(unmerged=True)), needs o_cmp=None "
             f"and partials of B={b} x H={h} x splits rows, G={g}, D={d} on {device}")


class WindowPartials(NamedTuple):
    """Kernel 2's window branch run ahead (decode_window_partials): the split partial buffers (the
    selected branch fills the rest), the plan that wrote them, and the stream they were written on
    (None: the current one), which decode_selected_window waits for before its combine."""

    parts: tuple
    plan: SplitPlan
    stream: object


def _attend_shapes(q, k, window_size: int) -> dict:
    b, hq, d = q.shape
    g = hq // k.shape[2]
    return dict(g=g, g_pad=group_pad(g), block_d=head_pad(d), window_size=window_size,
                window_tile=window_tile(window_size), ieee=q.dtype == torch.float32)


def decode_window_partials(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, topk: int,
                           block_size: int, window_size: int, scale: float,
                           block_table: torch.Tensor | None = None, stream=None) -> WindowPartials:
    r"""The window branch of decode_selected_window alone, launched ahead of the selection it does not
    need: its split partials, written on `stream` (a torch.cuda.Stream, made to wait for the current
    stream's work queued so far, the cache's writes included; None: the current stream). Buffers are
    allocated on the current stream before the launch. Pass the result as
    decode_selected_window(..., window_partials=) with the same q, cache, pos and sizes (checked there);
    one slot per query (no slots=)."""
    b, hq, d = q.shape
    h = k.shape[2]
    shapes = _attend_shapes(q, k, window_size)
    splits = attend_splits(b, h, topk, window_size, q.device)
    plan = split_plan(topk, -(-window_size // shapes["window_tile"]), max(splits, 1), True)
    parts = split_partials(b, h, shapes["g"], shapes["g_pad"], d, plan, q.device)
    layout = cache_layout(block_table, k, b)
    idx = pos.view(b, 1, 1).expand(b, h, topk)  # never read (branch 2): a valid pointer of the right rank
    if stream is not None:  # after the buffers' writes (poisoning) and whatever the caller queued before
        stream.wait_stream(torch.cuda.current_stream(q.device))
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        split_keys(q.contiguous(), k, v, pos, idx, parts, plan, branch=2, block_size=block_size,
                   qk_scale=scale * LOG2E, layout=layout, **shapes)
    return WindowPartials(parts, plan, stream)


def decode_selected_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                           block_indices: torch.Tensor, o_cmp: torch.Tensor, gates: torch.Tensor,
                           block_size: int, window_size: int, scale: float,
                           advance: torch.Tensor | None = None, splits: int | None = None,
                           block_table: torch.Tensor | None = None, slots: torch.Tensor | None = None,
                           window_partials: WindowPartials | None = None) -> torch.Tensor:
    r"""Selected + window attention of one new token per slot, gated with the compressed branch.

    Args:
        q: [B, HQ, D] (after RoPE); k, v: [B, max_seqlen, H, D] the cache (holding the new tokens);
        pos: int32 [B] each new token's position; block_indices: int32 [B, H, T] (-1 = empty), or the
            compressed select's SelectPartials (decode_compressed_select(unmerged=True), o_cmp None): the
            split kernels then take the top T and the compressed output from them themselves (one
            launch fewer; other paths merge them first);
        o_cmp: float32 [B, HQ, D] the compressed branch; gates: [B, HQ, 3] in q.dtype;
        advance: the cache's lengths, int32 [B]: set to pos + 1 by the kernel (the decode step's
            last write; decode_append(advance=False) leaves them), or None;
        splits: programs per (slot, KV head) (None: attend_splits' rule; tests force > 1 anywhere);
        block_table: a paged cache's int32 [B, pages per slot] (k, v are then its pools
            [num_pages, page_size, H, D]), or None (contiguous);
        slots: int32 [B], the cache slot each query reads, or None (slot b): several queries may read
            one slot at different positions (chunked prefill through these kernels);
        window_partials: the window branch already run (decode_window_partials): only the selected
            branch is launched, then one combine after its stream (splits and slots must be None).
    Returns:
        [B, HQ, D] in q.dtype: g0 * o_cmp + g1 * o_slc + g2 * o_win.
    """
    _check(q, k, v, pos, block_indices, o_cmp, gates, block_size, window_size, advance, block_table is not None,
           slots)
    layout = cache_layout(block_table, k, q.shape[0] if slots is None else None)
    slot_map = pos if slots is None else slots  # pos: a valid pointer the kernels never read as slots
    if splits is not None and (not isinstance(splits, int) or isinstance(splits, bool) or splits < 1):
        fail("splits", f"must be None or an int >= 1, got {splits!r}")
    b, hq, d = q.shape
    max_seqlen, h = k.shape[1], k.shape[2]
    shapes = _attend_shapes(q, k, window_size)
    g, g_pad, block_d = shapes["g"], shapes["g_pad"], shapes["block_d"]
    out = new_output((b, hq, d), q.dtype, q.device)
    if isinstance(block_indices, SelectPartials):
        if splits is None and window_partials is None:
            splits = attend_splits(b, h, block_indices.topk, window_size, q.device)
        if window_partials is not None or splits == 1:  # paths that read merged indices
            o_cmp, block_indices = split_merge(block_indices, b, h)
        else:
            o_cmp = block_indices
    if window_partials is not None:
        plan = window_partials.plan
        if splits is not None or slots is not None or not plan.shares \
                or window_partials.parts[1].shape[0] != b * h * plan.s * 2:
            fail("window_partials", "must come from decode_window_partials with this call's q and cache, "
                 "without splits= or slots=")
        split_keys(q.contiguous(), k, v, pos, block_indices, window_partials.parts, plan, branch=1,
                   block_size=block_size, qk_scale=scale * LOG2E, layout=layout, **shapes)
        if window_partials.stream is not None:
            torch.cuda.current_stream(q.device).wait_stream(window_partials.stream)
        split_combine(window_partials.parts, plan, pos, o_cmp, gates, out, advance, h=h, g=g, g_pad=g_pad,
                      block_d=block_d)
        return out
    if splits is None:
        splits = attend_splits(b, h, block_indices.shape[2], window_size, q.device)
    if splits > 1:
        split_selected_window(q.contiguous(), k, v, pos, block_indices, o_cmp, gates, out, advance, splits=splits,
                              block_size=block_size, qk_scale=scale * LOG2E, layout=layout, slots=slots, **shapes)
        return out
    _decode_attend_kernel[(b, h)](
        q.contiguous(), k, v, layout[0], slot_map, pos, block_indices, o_cmp, gates, out,
        pos if advance is None else advance,
        max_seqlen, layout[1], scale * LOG2E,
        HQ=hq, H=h, G=g, G_PAD=g_pad, D=d, BLOCK_D=block_d, BS=block_size, TOPK=block_indices.shape[2],
        WINDOW=window_size, BN=shapes["window_tile"], ADVANCE=advance is not None,
        IEEE=shapes["ieee"], PAGE=layout[2], SLOTS=slots is not None,
        num_warps=DECODE_LAUNCH.attend_warps, num_stages=DECODE_LAUNCH.attend_stages,
    )
    return out
