"""FSA work schedule over the inverted block index (nsa_baseline.utils.block_index).

A CSR row (KV head h, key block b) owns count * GC "pair rows": one per (query token that chose the
block, query head of the group handled in this pass). A work item is a chunk of up to
BLOCK_M * CHUNK_TILES consecutive pair rows of one CSR row; a program finds its item by binary search
over the items' prefix sum. A pass covers the (contiguous) CSR rows of a range of KV heads, so the
partial buffers hold only that pass's pairs, at (pair position - the pass's first position). The grid
is sized by a bound, so nothing is read back to the host: programs past the real number of items exit
at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nsa_baseline.utils.block_index import BlockIndex


@dataclass
class WorkSchedule:
    row_offsets: torch.Tensor  # int32 view: CSR pointers of this pass's rows (absolute pair positions)
    num_rows: int
    item_offsets: torch.Tensor  # int32 [num_rows + 1] prefix sum of work items per CSR row
    grid_bound: int  # programs to launch (>= real number of items)
    search_steps: int  # binary-search iterations that locate an item's row


@triton.jit(do_not_specialize=("NUM_ROWS",), do_not_specialize_on_alignment=("row_offsets",))  # fsa/forward.py
def _items_per_row_kernel(row_offsets, items, NUM_ROWS, GC: tl.constexpr, ROWS_PER_ITEM: tl.constexpr,
                          BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = r < NUM_ROWS
    count = (tl.load(row_offsets + r + 1, mask=m, other=0) - tl.load(row_offsets + r, mask=m, other=0)) * GC
    tl.store(items + r + 1, (count + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM, mask=m)
    tl.store(items + r, 0, mask=r == 0)


def build_schedule(index: BlockIndex, h0: int, kv_heads: int, heads_per_pass: int, rows_per_item: int,
                   pass_pairs: int) -> WorkSchedule:
    """Split the pair rows (count * heads_per_pass) of the CSR rows of KV heads [h0, h0 + kv_heads)
    into items of `rows_per_item`. Those rows are contiguous; `row_offsets` is their view."""
    num_rows = kv_heads * index.nb_bound
    row_offsets = index.row_offsets[h0 * index.nb_bound:(h0 + kv_heads) * index.nb_bound + 1]
    item_offsets = torch.empty(num_rows + 1, dtype=torch.int32, device=row_offsets.device)
    _items_per_row_kernel[(triton.cdiv(num_rows, 1024),)](
        row_offsets, item_offsets, num_rows, GC=heads_per_pass, ROWS_PER_ITEM=rows_per_item, BLOCK=1024)
    item_offsets.cumsum_(0)
    grid_bound = triton.cdiv(pass_pairs * heads_per_pass, rows_per_item) + num_rows
    # Search steps for all KV heads' rows, not this pass's: a constexpr that changed with the pass split
    # would compile a new kernel variant when free memory moves the split (the extra steps are no-ops).
    return WorkSchedule(row_offsets, num_rows, item_offsets, grid_bound, max(1, index.num_rows.bit_length()))


@triton.jit
def locate_item(item_offsets, pid, NUM_ROWS, SEARCH_STEPS: tl.constexpr):
    """Row r with item_offsets[r] <= pid < item_offsets[r + 1] (empty rows are skipped)."""
    lo = 0
    hi = NUM_ROWS
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        go_right = tl.load(item_offsets + mid) <= pid
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    return lo


@triton.jit
def reduce_rows(N, H_OFF, G: tl.constexpr, G_OFF, GC: tl.constexpr, BLOCK_N: tl.constexpr):
    """What a per-query reduction program owns: grid (token tiles, KV heads x query heads of the pass).
    Returns (KV head, head of the group in the pass, query head, tokens [BLOCK_N], their mask)."""
    i_hc = tl.program_id(1)
    i_h = H_OFF + i_hc // GC
    i_j = i_hc % GC
    o_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return i_h, i_j, i_h * G + G_OFF + i_j, o_n, o_n < N


@triton.jit
def slot_rows(pair_pos, p_first, o_n, m_n, i_h, i_j, i_t, H: tl.constexpr, T: tl.constexpr, GC: tl.constexpr):
    """Partial-buffer rows [BLOCK_N] of slot i_t of the tokens o_n (p_first: the pass's first pair
    position), and which of them hold a valid pair."""
    pp = tl.load(pair_pos + (o_n * H + i_h) * T + i_t, mask=m_n, other=-1)
    return (pp - p_first).to(tl.int64) * GC + i_j, pp >= 0
