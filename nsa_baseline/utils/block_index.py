"""Inverted selection index: for every (KV head, key block), the query tokens that selected it.

CSR over rows r = h * nb_bound + gb, built on the device with no host synchronisation. Global block
ids need no prefix sum: block b of sequence s is gb = cu_seqlens[s] // BS + s + b, which is injective
and < nb_bound = N // BS + B + 1 (ids in the gaps are empty rows). Three launches: a Triton kernel keys
every valid pair by its row and counts rows (integer atomics: exact), a stable sort orders the pairs
(tokens stay ascending inside a row, so the layout is identical on every run), and a Triton kernel
scatters tokens and pair positions (no slot array: a pair's slot is where pair_pos points back at
it, and no kernel needs it). Buffers are sized by N * H * T, never by blocks x seqlen.
Shared by both families: the NSA dK/dV kernel and every FSA kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


# Rows (H * nb_bound) below which the pair keys are int16 (every row id and the sentinel fit): the
# radix sort then makes 2 passes over 8-bit digits instead of 4, with the same stable order (the H100
# profile at 16K x 64 heads spent 0.66 ms in the 4 passes of the int32 sort, 2% of the module's step).
INT16_KEYS_BELOW = 2**15 - 1


@dataclass
class BlockIndex:
    """Block -> query index of one selected-attention call (all fields on the device)."""

    nb_bound: int  # no-sync bound on the blocks of all sequences: N // BS + B + 1
    num_rows: int  # H * nb_bound
    row_offsets: torch.Tensor  # int32 [num_rows + 1] CSR pointers
    tokens: torch.Tensor  # int32 [N * H * T] packed query rows, ascending per CSR row
    pair_pos: torch.Tensor  # int32 [N, H, T] position of the pair in `tokens`, -1 if not a valid pair
    block_start: torch.Tensor  # int32 [nb_bound] first packed row of each global block
    block_end: torch.Tensor  # int32 [nb_bound] one past its last row (== start for absent blocks)

    @property
    def row_counts(self) -> torch.Tensor:
        return self.row_offsets[1:] - self.row_offsets[:-1]


@triton.jit
def _find_sequence(cu_seqlens, x, BS: tl.constexpr, B, SEARCH_STEPS: tl.constexpr, BY_BLOCK: tl.constexpr):
    """Largest s in [0, B) with key(s) <= x, key(s) = cu[s] // BS + s (BY_BLOCK) or cu[s] (tokens)."""
    lo = tl.zeros_like(x)
    hi = tl.zeros_like(x) + B
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        c = tl.load(cu_seqlens + mid)
        key = c // BS + mid if BY_BLOCK else c
        go_right = key <= x
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    return lo


@triton.jit
def _block_layout_kernel(cu_seqlens, block_start, block_end, NB_BOUND, B,
                         BS: tl.constexpr, SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr):
    gb = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = gb < NB_BOUND
    s = _find_sequence(cu_seqlens, gb, BS, B, SEARCH_STEPS, True)
    c0 = tl.load(cu_seqlens + s, mask=m, other=0)
    c1 = tl.load(cu_seqlens + s + 1, mask=m, other=0)
    start = c0 + (gb - (c0 // BS + s)) * BS
    exists = start < c1
    tl.store(block_start + gb, tl.where(exists, start, 0), mask=m)
    tl.store(block_end + gb, tl.where(exists, tl.minimum(start + BS, c1), 0), mask=m)


@triton.jit
def _pair_keys_kernel(block_indices, cu_seqlens, keys, counts, N, B, NB_BOUND, NUM_ROWS,
                      H: tl.constexpr, T: tl.constexpr, BS: tl.constexpr,
                      SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr, SKIP_LOCAL: tl.constexpr = 0):
    """keys[pair] = CSR row of a valid pair, NUM_ROWS (sentinel) otherwise; counts[row + 1] += 1.
    SKIP_LOCAL > 0: pairs of the SKIP_LOCAL blocks ending at the token's own block are not valid
    (another kernel serves them)."""
    f = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat pair id = (token * H + h) * T + slot
    m = f < N * H * T
    tok = f // (H * T)
    i_h = (f // T) % H
    s = _find_sequence(cu_seqlens, tok, BS, B, SEARCH_STEPS, False)
    c0 = tl.load(cu_seqlens + s, mask=m, other=0)
    c1 = tl.load(cu_seqlens + s + 1, mask=m, other=0)
    idx = tl.load(block_indices + f, mask=m, other=-1)
    valid = m & (idx >= 0) & (c0 + idx * BS <= tok) & (idx < (c1 - c0 + BS - 1) // BS)
    if SKIP_LOCAL > 0:
        valid = valid & (idx <= (tok - c0) // BS - SKIP_LOCAL)
    row = i_h * NB_BOUND + c0 // BS + s + idx
    key = tl.where(valid, row, NUM_ROWS)
    tl.store(keys + f, key, mask=m)
    tl.atomic_add(counts + key + 1, 1, mask=valid)


@triton.jit
def _scatter_pairs_kernel(sorted_keys, perm, tokens, pair_pos, TOTAL, NUM_ROWS,
                          H: tl.constexpr, T: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < TOTAL
    p = tl.load(perm + i, mask=m, other=0)
    valid = tl.load(sorted_keys + i, mask=m, other=NUM_ROWS) < NUM_ROWS
    tl.store(tokens + i, (p // (H * T)).to(tl.int32), mask=m)
    tl.store(pair_pos + p, tl.where(valid, i, -1).to(tl.int32), mask=m)


def block_id_bound(num_tokens: int, block_size: int, batch: int) -> int:
    """nb_bound: global block ids of all sequences lie below it (from shapes alone, no device read)."""
    return num_tokens // block_size + batch + 1


def build_block_index(
    block_indices: torch.Tensor, block_size: int, cu_seqlens: torch.Tensor, num_kv_heads: int,
    skip_local: int = 0,
) -> BlockIndex:
    r"""Invert block_indices [N, H, T] into a per-(KV head, block) list of query tokens.

    A pair (token, h, slot) is valid when its entry is >= 0, names a block of the token's own
    sequence, and that block starts at or before the token (blocks wholly in the future are dropped).
    Any index values are safe: invalid ones never reach a row. skip_local > 0 also drops the pairs of
    the skip_local blocks ending at the token's own block (the module serves NSA's local blocks with
    the block-local window kernels instead).
    """
    n, h, t_sel = block_indices.shape
    dev = block_indices.device
    batch = cu_seqlens.numel() - 1
    nb_bound = block_id_bound(n, block_size, batch)
    num_rows = h * nb_bound
    total = n * h * t_sel
    steps = max(1, batch.bit_length())
    block_indices = block_indices.contiguous()

    block_start = torch.empty(nb_bound, dtype=torch.int32, device=dev)
    block_end = torch.empty(nb_bound, dtype=torch.int32, device=dev)
    _block_layout_kernel[(triton.cdiv(nb_bound, 1024),)](
        cu_seqlens, block_start, block_end, nb_bound, batch, BS=block_size, SEARCH_STEPS=steps, BLOCK=1024)

    keys = torch.empty(total, dtype=torch.int16 if num_rows < INT16_KEYS_BELOW else torch.int32, device=dev)
    row_offsets = torch.zeros(num_rows + 1, dtype=torch.int32, device=dev)
    _pair_keys_kernel[(triton.cdiv(total, 1024),)](
        block_indices, cu_seqlens, keys, row_offsets, n, batch, nb_bound, num_rows,
        H=h, T=t_sel, BS=block_size, SEARCH_STEPS=steps, BLOCK=1024, SKIP_LOCAL=skip_local)
    row_offsets.cumsum_(0)  # counts at r + 1 -> CSR pointers

    sorted_keys, perm = torch.sort(keys, stable=True)  # flat order is token-major: tokens stay ascending
    tokens = torch.empty(total, dtype=torch.int32, device=dev)
    pair_pos = torch.empty(total, dtype=torch.int32, device=dev)
    _scatter_pairs_kernel[(triton.cdiv(total, 1024),)](
        sorted_keys, perm, tokens, pair_pos, total, num_rows, H=h, T=t_sel, BLOCK=1024)
    return BlockIndex(nb_bound, num_rows, row_offsets, tokens, pair_pos.view(n, h, t_sel),
                      block_start, block_end)
