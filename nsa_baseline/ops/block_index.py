"""Inverted selection index: for every (KV head, key block), the query tokens that selected it.

CSR over rows r = h * nb_bound + global_block, built on the device with no host synchronisation:
valid pairs are keyed by their row, counted (scatter_add), prefix-summed, and placed by a stable
sort, so the tokens inside a row are ascending and the layout is identical on every run.
Buffers are sized by N * H * T (the most pairs a call can have), never by blocks x seqlen.
Used by the NSA dK/dV kernel and by every FSA kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nsa_baseline.utils.varlen import token_positions


@dataclass
class BlockIndex:
    """Block -> query index of one selected-attention call (all fields on the device)."""

    nb_bound: int  # no-sync bound on the blocks of all sequences: N // BS + B + 1
    num_rows: int  # H * nb_bound
    row_offsets: torch.Tensor  # int32 [num_rows + 1] CSR pointers
    tokens: torch.Tensor  # int32 [N * H * T] packed query rows, ascending per CSR row
    slots: torch.Tensor  # int32 [N * H * T] slot of the pair in block_indices[token, h]
    pair_pos: torch.Tensor  # int32 [N, H, T] position of the pair in `tokens`, -1 if not a valid pair
    block_start: torch.Tensor  # int32 [nb_bound] first packed row of each global block
    block_end: torch.Tensor  # int32 [nb_bound] one past its last row (== start for absent blocks)

    @property
    def row_counts(self) -> torch.Tensor:
        return self.row_offsets[1:] - self.row_offsets[:-1]


def block_layout(cu_seqlens: torch.Tensor, num_tokens: int, block_size: int):
    """Global block numbering over packed sequences (no host sync).

    Returns (nb_bound, block_base [B] int64 first global block of each sequence,
    block_start [nb_bound] int32, block_end [nb_bound] int32).
    """
    batch = cu_seqlens.numel() - 1
    nb_bound = num_tokens // block_size + batch + 1
    starts = cu_seqlens[:-1].long()
    lens = cu_seqlens[1:].long() - starts
    nblocks = (lens + block_size - 1) // block_size
    block_base = torch.cumsum(nblocks, 0) - nblocks  # exclusive prefix sum
    gb = torch.arange(nb_bound, device=cu_seqlens.device)
    seq = torch.searchsorted(block_base + nblocks, gb, right=True).clamp_max(batch - 1)
    local = gb - block_base[seq]
    exists = local < nblocks[seq]
    start = starts[seq] + local * block_size
    end = torch.minimum(start + block_size, starts[seq] + lens[seq])
    start = torch.where(exists, start, torch.zeros_like(start))
    end = torch.where(exists, end, start)
    return nb_bound, block_base, start.int(), end.int()


def build_block_index(
    block_indices: torch.Tensor, block_size: int, cu_seqlens: torch.Tensor, num_kv_heads: int
) -> BlockIndex:
    r"""Invert block_indices [N, H, T] into a per-(KV head, block) list of query tokens.

    A pair (token, h, slot) is valid when its entry is >= 0, names a block of the token's own
    sequence, and that block starts at or before the token (blocks wholly in the future are dropped).
    """
    n, h, t_sel = block_indices.shape
    dev = block_indices.device
    pos, seq_len = token_positions(cu_seqlens, n)
    seq = torch.searchsorted(cu_seqlens[1:].contiguous(), torch.arange(n, device=dev, dtype=cu_seqlens.dtype),
                             right=True)
    nb_bound, block_base, block_start, block_end = block_layout(cu_seqlens, n, block_size)
    num_rows = h * nb_bound

    idx = block_indices.long()
    nblocks = (seq_len + block_size - 1) // block_size
    valid = (idx >= 0) & (idx * block_size <= pos[:, None, None]) & (idx < nblocks[:, None, None])
    row = torch.arange(h, device=dev)[None, :, None] * nb_bound + block_base[seq][:, None, None] + idx
    key = torch.where(valid, row, torch.full_like(row, num_rows)).flatten()  # invalid -> sentinel row

    counts = torch.zeros(num_rows + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, key, torch.ones_like(key))
    row_offsets = torch.zeros(num_rows + 1, dtype=torch.int64, device=dev)
    torch.cumsum(counts[:num_rows], 0, out=row_offsets[1:])

    _, perm = torch.sort(key.int(), stable=True)  # flat order is token-major: tokens stay ascending
    tokens = (perm // (h * t_sel)).int()
    slots = (perm % t_sel).int()
    pair_pos = torch.empty(n * h * t_sel, dtype=torch.int32, device=dev)
    pair_pos[perm] = torch.arange(n * h * t_sel, dtype=torch.int32, device=dev)
    pair_pos = torch.where(valid.flatten(), pair_pos, torch.full_like(pair_pos, -1)).view(n, h, t_sel)
    return BlockIndex(nb_bound, num_rows, row_offsets.int(), tokens, slots, pair_pos, block_start, block_end)
