"""Where compress_kv's summaries read their keys, built on the device once per cu_seqlens tensor.

The output size N_cmp has to be known on the host, so each layout costs one host read when it is
built and none afterwards: layouts are cached per (cu_seqlens identity + version, N, kernel, stride,
device). Two layouts, one per path of compress_kv:
- gather_layout: the packed row of every summary's first key (the row-gather path, any stride).
- block_layout: the stride-blocks the summaries are made of (the block path, stride | kernel_size).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from nsa_baseline.utils.compressed_varlen import compressed_cu_seqlens, num_compressed
from nsa_baseline.utils.varlen import sequence_lengths, single_sequence_cu_seqlens, token_sequence_ids

# key -> (cu_seqlens held so that its id is not reused while cached, layout)
_CACHE: dict[tuple, tuple] = {}


def _cached(cu_seqlens: Optional[torch.Tensor], key: tuple, build):
    if cu_seqlens is not None:
        key = (id(cu_seqlens), cu_seqlens.data_ptr(), cu_seqlens._version, cu_seqlens.numel()) + key
    hit = _CACHE.get(key)
    if hit is not None:
        return hit[1]
    layout = build()
    if len(_CACHE) > 64:
        _CACHE.clear()
    _CACHE[key] = (cu_seqlens, layout)
    return layout


def _device_cu_seqlens(cu_seqlens: Optional[torch.Tensor], num_tokens: int, device) -> torch.Tensor:
    if cu_seqlens is None:
        return single_sequence_cu_seqlens(num_tokens, torch.device(device))
    return cu_seqlens.to(device)


def ragged_arange(starts: torch.Tensor, counts: torch.Tensor, total: int) -> torch.Tensor:
    """int64 [total]: starts[b], starts[b] + 1, ..., starts[b] + counts[b] - 1 for every segment b in
    order (total = counts.sum(), known on the host)."""
    cu = torch.cat([counts.new_zeros(1), counts.long().cumsum(0)])
    seq = token_sequence_ids(cu, total)
    return starts.long()[seq] + torch.arange(total, device=counts.device) - cu[seq]


def gather_layout(cu_seqlens: Optional[torch.Tensor], num_tokens: int, kernel_size: int,
                  kernel_stride: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cu_seqlens_cmp int32 [B + 1], first int64 [N_cmp]): the packed summaries' cu_seqlens and the
    packed row of each summary's first key."""
    def build():
        cu = _device_cu_seqlens(cu_seqlens, num_tokens, device)
        cu_cmp = compressed_cu_seqlens(cu, kernel_size, kernel_stride)
        n_cmp = int(cu_cmp[-1])  # the one host read: the output's size
        seq = token_sequence_ids(cu_cmp, n_cmp)
        local = torch.arange(n_cmp, device=cu.device) - cu_cmp.long()[seq]
        return cu_cmp, cu.long()[seq] + local * kernel_stride

    return _cached(cu_seqlens, ("gather", num_tokens, kernel_size, kernel_stride, str(device)), build)


@dataclass(frozen=True)
class BlockLayout:
    """The stride-blocks (stride consecutive keys of one sequence) that compress_kv's summaries read:
    summary i of a sequence is the sequence's blocks i .. i + C - 1 (C = kernel_size / stride)."""
    cu_cmp: torch.Tensor  # int32 [B + 1], cu_seqlens of the packed summaries
    num_cmp: int  # N_cmp
    num_blocks: int  # NB; window j (blocks j .. j + C - 1) exists for j < NB - C + 1
    # int64 [NB * stride]: packed row of every block key, block by block. None when every sequence
    # starts at a multiple of stride: the blocks are then x's first NB * stride rows as they lie.
    rows: Optional[torch.Tensor]
    unused_rows: Optional[torch.Tensor]  # int64 [N - NB * stride]: rows no block reads (with rows)
    first_block: Optional[torch.Tensor]  # int64 [N_cmp]: each summary's first block; None = arange


def block_layout(cu_seqlens: Optional[torch.Tensor], num_tokens: int, kernel_size: int, kernel_stride: int,
                 device) -> BlockLayout:
    """The BlockLayout of packed sequences; needs kernel_stride to divide kernel_size."""
    if kernel_size % kernel_stride:
        raise ValueError(f"argument `kernel_stride` ({kernel_stride}) must divide kernel_size ({kernel_size}) "
                         "for the block layout")
    key = ("blocks", num_tokens, kernel_size, kernel_stride, str(device))
    return _cached(cu_seqlens, key, lambda: _build_block_layout(cu_seqlens, num_tokens, kernel_size,
                                                                 kernel_stride, device))


def _build_block_layout(cu_seqlens, num_tokens, kernel_size, stride, device) -> BlockLayout:
    cu = _device_cu_seqlens(cu_seqlens, num_tokens, device)
    starts, lengths = cu[:-1].long(), sequence_lengths(cu)
    cu_cmp = compressed_cu_seqlens(cu, kernel_size, stride)
    n_cmp_seq = num_compressed(lengths, kernel_size, stride)
    if cu_seqlens is None:  # one sequence: everything is known on the host
        n_cmp = max(0, (num_tokens - kernel_size) // stride + 1) if num_tokens >= kernel_size else 0
        return BlockLayout(cu_cmp, n_cmp, num_tokens // stride, None, None, None)
    # A sequence with summaries reads all of its whole blocks; one without reads none.
    blocks_seq = torch.where(n_cmp_seq > 0, lengths // stride, torch.zeros_like(lengths))
    aligned = ((starts % stride == 0) | (n_cmp_seq == 0)).all()  # only sequences with summaries count
    n_cmp, used_blocks, aligned = torch.stack([cu_cmp[-1].long(), blocks_seq.sum(), aligned.long()]).tolist()
    if aligned:  # blocks on x's own grid of stride rows; sequence b's first block is start_b / stride
        first = None if cu.numel() == 2 else ragged_arange(starts // stride, n_cmp_seq, n_cmp)
        return BlockLayout(cu_cmp, n_cmp, num_tokens // stride, None, None, first)
    # Else the used blocks are gathered, sequence after sequence (each row at most once).
    blocks_cu = torch.cat([blocks_seq.new_zeros(1), blocks_seq.cumsum(0)])
    rows = ragged_arange(starts, blocks_seq * stride, used_blocks * stride)
    # the rest of every sequence, and any rows after cu_seqlens[-1]
    tail = num_tokens - cu[-1:].long()
    unused = ragged_arange(torch.cat([starts + blocks_seq * stride, cu[-1:].long()]),
                           torch.cat([lengths - blocks_seq * stride, tail]), num_tokens - used_blocks * stride)
    first = ragged_arange(blocks_cu[:-1], n_cmp_seq, n_cmp)
    return BlockLayout(cu_cmp, n_cmp, used_blocks, rows, unused, first)
