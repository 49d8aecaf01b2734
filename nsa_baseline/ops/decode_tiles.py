"""Tile helpers shared by the decode kernels (decode_select.py, decode_attend.py and their splits):
the rows of a tile are the G query heads of one KV head, padded to G_PAD >= 16 (tl.dot's smallest M);
every key tile loaded serves the whole group. Softmax statistics in base 2 (scale * log2e folded into
qk_scale). Also the split rules' SM count (gpu_programs) and the launch settings (DECODE_LAUNCH)."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from nsa_baseline.checks import fail
from nsa_baseline.utils.triton_utils import is_interpreter, next_pow2


@dataclasses.dataclass
class DecodeLaunch:
    """Launch settings of the decode kernels: programs per SM that each split rule aims for, warps and
    pipeline stages, and tile sizes. Read at every launch; the defaults come from
    experiments/gpu/decode_tune.py (results/decode_tune/). Change them only through decode_launch()."""
    select_programs_per_sm: int = 8  # decode_compressed_select's splits (decode_splits)
    # ... once batch x KV heads alone cover the SMs: more splits only add partials to merge (H100,
    # results/decode_tune/h100_7849e1f.csv: B=32 64K select 0.2415 ms with 8, 0.2359 with 2)
    select_programs_per_sm_full: int = 2
    select_warps: int = 4
    select_stages: int = 2
    summaries_per_tile: int = 128  # BJ * R summaries per tile of the compressed pass
    attend_programs_per_sm: int = 2  # decode_selected_window's splits (attend_splits)
    attend_warps: int = 4
    # 3: the split selected + window kernel 16.7 us vs 18.0 with 2 (B=8 64K, H100 profiler;
    # results/decode_tune/split_scan_h100_e7b9c71.csv)
    attend_stages: int = 3
    window_tile: int = 64  # keys per window tile
    attend_shares: int = 1  # split attend: 1 = each split a share of both branches, 0 = a run of items
    append_programs_per_sm: int = 1  # decode_append's column tiles (append_tiles)
    # 1: the decode step runs kernel 2's window branch on a side stream once kernel 1's summary pass is
    # done, beside kernel 1's select and merge (latency-bound), and the selected branch after them
    # (inference/decode.py); 0: one selected + window launch after kernel 1. Off: no gain on the H100
    # (B=8 64K graph16 0.0978 -> 0.0984 ms; results/decode_bench/README.md); kept for experiments.
    window_stream: int = 0
    # 1: the decode step skips the compressed select's merge kernel when both kernels split: the split
    # selected + window kernel takes the top T of the select pass's candidates and the combine merges
    # the compressed partials (decode_selected_window with SelectPartials); 0: merge kernel first
    fold_merge: int = 1


DECODE_LAUNCH = DecodeLaunch()


@contextlib.contextmanager
def decode_launch(**settings):
    """Temporarily override DECODE_LAUNCH fields (tuning, tests); a CUDA graph captured inside keeps
    the splits it was captured with."""
    unknown = set(settings) - {f.name for f in dataclasses.fields(DecodeLaunch)}
    if unknown:
        raise ValueError(f"decode_launch: unknown settings {sorted(unknown)}")
    for name, value in settings.items():  # all checked before any is set
        low = 0 if name in ("attend_shares", "window_stream", "fold_merge") else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"decode_launch: `{name}` must be an int >= {low}, got {value!r}")
    old = dataclasses.asdict(DECODE_LAUNCH)
    for name, value in settings.items():
        setattr(DECODE_LAUNCH, name, value)
    try:
        yield DECODE_LAUNCH
    finally:
        for name, value in old.items():
            setattr(DECODE_LAUNCH, name, value)


def cache_layout(block_table, k: torch.Tensor, batch: Optional[int]) -> tuple[torch.Tensor, int, int]:
    """(table pointer, MAX_PAGES, PAGE) of the decode kernels: a contiguous cache (block_table None, k
    [B, max_seqlen, H, D]; PAGE = 0, the pointer unused) or a paged one (k the pool [num_pages, P, H, D],
    block_table int32 [B, pages per slot] on k's device; PAGE = P). batch None: any B (with slots=)."""
    if block_table is None:
        return k, 0, 0
    if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2 \
            or batch not in (None, block_table.shape[0]) or block_table.device != k.device \
            or not block_table.is_contiguous():
        fail("block_table", f"must be None or contiguous int32 [B={batch}, pages per slot] on {k.device}, got "
                            f"{getattr(block_table, 'dtype', type(block_table).__name__)} "
                            f"{tuple(getattr(block_table, 'shape', ()))}")
    return block_table, block_table.shape[1], k.shape[1]


def check_slots(slots, n: int, device) -> None:
    """slots= of the decode kernels: None (query row b reads cache slot b) or int32 [n] on `device`,
    the cache slot each query row reads (rows of one slot may repeat: chunked prefill)."""
    if slots is not None and (not isinstance(slots, torch.Tensor) or slots.dtype != torch.int32
                              or tuple(slots.shape) != (n,) or slots.device != torch.device(device)
                              or not slots.is_contiguous()):
        fail("slots", f"must be None or contiguous int32 [{n}] on {device}, got "
                      f"{getattr(slots, 'dtype', type(slots).__name__)} {tuple(getattr(slots, 'shape', ()))}")


@triton.jit
def _cache_slot(slot_ptr, i_b, SLOTS: tl.constexpr):
    """The cache slot query row i_b reads: slots[i_b] with a slot map (SLOTS), else i_b itself."""
    i_r = i_b
    if SLOTS:  # no early return: one exit for the compiler whichever branch the constexpr keeps
        i_r = tl.load(slot_ptr + i_b)
    return i_r


@triton.jit
def _slot_row0(i_r, MAX_SEQLEN, PAGE: tl.constexpr):
    """Row of k / v (int64) where slot i_r's rows start: i_r * MAX_SEQLEN in a contiguous cache (PAGE =
    0), 0 in a paged one, whose _page_rows place every row. Kernels fold it into their base pointer."""
    if PAGE == 0:
        r0 = i_r.to(tl.int64) * MAX_SEQLEN
    else:
        r0 = i_r.to(tl.int64) * 0
    return r0


@triton.jit
def _page_rows(tbl_ptr, i_r, rows, mask, MAX_PAGES, PAGE: tl.constexpr):
    """Rows `rows` of slot i_r counted from _slot_row0: themselves in a contiguous cache, page * PAGE +
    rows % PAGE from the block table in a paged one (rows outside `mask` read no table entry; their
    result is not used)."""
    if PAGE == 0:
        out = rows
    else:
        page = tl.load(tbl_ptr + i_r.to(tl.int64) * MAX_PAGES + rows // PAGE, mask=mask, other=0)
        out = page.to(tl.int64) * PAGE + rows % PAGE
    return out


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a [M, K] x b [K, N] -> fp32 [M, N]; exact fp32 products for fp32 inputs."""
    if IEEE:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _scores(b_q, b_k, m_cols, qk_scale, IEEE: tl.constexpr):
    """Base-2 logits of the rows b_q [G_PAD, BLOCK_D] over keys b_k [BN, BLOCK_D]; -inf where m_cols
    [BN] is False."""
    b_s = _dot(b_q, tl.trans(b_k), IEEE) * qk_scale  # [G_PAD, BN]
    return tl.where(m_cols[None, :], b_s, float("-inf"))


@triton.jit
def _online_apply(b_s, b_m, b_l, b_acc, b_v, IEEE: tl.constexpr):
    """One online-softmax step from the logits b_s [G_PAD, BN] (_scores) over values b_v [BN, BLOCK_D]:
    (m, l, acc). Rows that saw nothing keep m = -inf, l = 0, acc = 0."""
    m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0., m_new)
    alpha = tl.exp2(b_m - m_ref)  # [G_PAD]
    b_p = tl.exp2(b_s - m_ref[:, None])  # [G_PAD, BN]
    b_l = b_l * alpha + tl.sum(b_p, axis=1)
    b_acc = b_acc * alpha[:, None] + _dot(b_p.to(b_v.dtype), b_v, IEEE)  # [G_PAD, BLOCK_D]
    return m_new, b_l, b_acc


@triton.jit
def _online_update(b_q, b_m, b_l, b_acc, b_k, b_v, m_cols, qk_scale, IEEE: tl.constexpr):
    """One online-softmax step of the rows b_q [G_PAD, BLOCK_D] over keys b_k, b_v [BN, BLOCK_D]
    (m_cols [BN]: which keys the rows see): (m, l, acc)."""
    return _online_apply(_scores(b_q, b_k, m_cols, qk_scale, IEEE), b_m, b_l, b_acc, b_v, IEEE)


@triton.jit
def _keys_tile(b_q, b_m, b_l, b_acc, p_k, p_v, rows, m_rows, m_d, qk_scale, HD: tl.constexpr,
               IEEE: tl.constexpr):
    """Online-softmax step over the cache rows `rows` [BN] of one (slot, head) (m_rows: visible)."""
    off = rows.to(tl.int64)[:, None] * HD
    b_k = tl.load(p_k + off, mask=m_rows[:, None] & m_d[None, :], other=0.)  # [BN, BLOCK_D]
    b_v = tl.load(p_v + off, mask=m_rows[:, None] & m_d[None, :], other=0.)
    return _online_update(b_q, b_m, b_l, b_acc, b_k, b_v, m_rows, qk_scale, IEEE)


@triton.jit
def _advance(len_ptr, i_b, i_first, pos, ADVANCE: tl.constexpr):
    """lengths[b] = pos + 1 from one program of the slot: the step's last write (decode_append leaves
    the lengths to the step's last kernel; nothing in this grid reads them)."""
    if ADVANCE:
        if i_first == 0:
            tl.store(len_ptr + i_b, pos + 1)


@triton.jit
def _load_q(q_ptr, i_b, i_h, HQ: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
            BLOCK_D: tl.constexpr):
    """The G query heads of KV head i_h of slot i_b: [G_PAD, BLOCK_D], padding rows / columns 0."""
    o_g = tl.arange(0, G_PAD)
    o_d = tl.arange(0, BLOCK_D)
    p_q = q_ptr + (i_b * HQ + i_h * G + o_g).to(tl.int64)[:, None] * D + o_d[None, :]
    return tl.load(p_q, mask=(o_g < G)[:, None] & (o_d < D)[None, :], other=0.)


@triton.jit
def _attend_summaries(b_q, p_k, p_v, lo, hi, qk_scale, H: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr,
                      BLOCK_D: tl.constexpr, BC: tl.constexpr, IEEE: tl.constexpr, WHILE_LOOP: tl.constexpr):
    """Online softmax of the rows b_q over summaries [lo, hi) in tiles of BC (p_k, p_v: [BC, BLOCK_D]
    pointers of summary 0). Returns (m, l, acc); rows that saw nothing keep m = -inf, l = 0, acc = 0."""
    m_d = tl.arange(0, BLOCK_D) < D
    b_m = tl.full([G_PAD], float("-inf"), tl.float32)
    b_l = tl.zeros([G_PAD], tl.float32)
    b_acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    if WHILE_LOOP:  # the interpreter cannot range() over loaded bounds
        i0 = lo
        while i0 < hi:
            m_c = (i0 + tl.arange(0, BC)) < hi
            b_k = tl.load(p_k + i0 * (H * D), mask=m_c[:, None] & m_d[None, :], other=0.)
            b_v = tl.load(p_v + i0 * (H * D), mask=m_c[:, None] & m_d[None, :], other=0.)
            b_m, b_l, b_acc = _online_update(b_q, b_m, b_l, b_acc, b_k, b_v, m_c, qk_scale, IEEE)
            i0 += BC
    else:
        for i0 in range(lo, hi, BC):
            m_c = (i0 + tl.arange(0, BC)) < hi
            b_k = tl.load(p_k + i0 * (H * D), mask=m_c[:, None] & m_d[None, :], other=0.)
            b_v = tl.load(p_v + i0 * (H * D), mask=m_c[:, None] & m_d[None, :], other=0.)
            b_m, b_l, b_acc = _online_update(b_q, b_m, b_l, b_acc, b_k, b_v, m_c, qk_scale, IEEE)
    return b_m, b_l, b_acc


@triton.jit
def _merge_rows(o_part_ptr, lse_part_ptr, rows, m_p, g, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """[BLOCK_D]: query head g's output from the partial rows `rows` [S_PAD] (int64; m_p: which are
    real) of o_part [rows, G, D] / lse_part [rows, G_PAD] (base 2), merged by lse; 0 if none saw a key."""
    o_d = tl.arange(0, BLOCK_D)
    b_ls = tl.load(lse_part_ptr + rows * G_PAD + g, mask=m_p, other=float("-inf"))  # [S_PAD]
    b_mx = tl.max(b_ls, axis=0)
    b_w = tl.where(b_ls > float("-inf"), tl.exp2(b_ls - tl.where(b_mx == float("-inf"), 0., b_mx)), 0.)
    b_o = tl.load(o_part_ptr + (rows * G + g)[:, None] * D + o_d[None, :], mask=m_p[:, None] & (o_d < D)[None, :],
                  other=0.)  # [S_PAD, BLOCK_D]
    w_sum = tl.sum(b_w, axis=0)
    return tl.sum(b_w[:, None] * b_o, axis=0) / tl.where(w_sum > 0, w_sum, 1.)


@triton.jit
def _finish(b_l, b_acc):
    """o = acc / l; 0 for rows that saw no key."""
    return b_acc / tl.where(b_l > 0, b_l, 1.)[:, None]


def group_pad(g: int) -> int:
    """Rows of a decode tile: the group's G heads padded to a power of two >= 16."""
    return max(16, next_pow2(g))


def head_pad(d: int) -> int:
    return next_pow2(max(d, 16))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def gpu_programs(device: torch.device, per_sm: int) -> int:
    """About per_sm programs per SM of `device`; 0 off CUDA and in the interpreter (where the split
    rules keep one program per unit of work)."""
    if device.type != "cuda" or is_interpreter():
        return 0
    return per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
