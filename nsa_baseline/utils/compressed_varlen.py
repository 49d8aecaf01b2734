"""Varlen helpers for the compressed keys: how many summaries each sequence has and where they lie.

A sequence of length L has n_cmp = max(0, (L - kernel_size) // kernel_stride + 1) summaries; summary
i covers keys [i * stride, i * stride + kernel_size). Summaries are packed like tokens, with their own
cu_seqlens_cmp. Everything runs on the device of `cu_seqlens` without a host synchronisation.
"""
from __future__ import annotations

import torch

from nsa_baseline.utils.varlen import sequence_lengths, token_sequence_ids


def num_compressed(length: torch.Tensor, kernel_size: int, kernel_stride: int) -> torch.Tensor:
    """int64, same shape as `length`: summaries whose whole kernel fits in `length` keys."""
    length = length.long()
    return torch.where(length >= kernel_size, (length - kernel_size) // kernel_stride + 1,
                       torch.zeros_like(length))


def compressed_cu_seqlens(cu_seqlens: torch.Tensor, kernel_size: int, kernel_stride: int) -> torch.Tensor:
    """int32 [B + 1]: cu_seqlens of the packed summaries of every sequence."""
    n_cmp = num_compressed(sequence_lengths(cu_seqlens), kernel_size, kernel_stride)
    zero = torch.zeros(1, dtype=torch.long, device=cu_seqlens.device)
    return torch.cat([zero, n_cmp.cumsum(0)]).to(torch.int32)


def token_compressed_offsets(cu_seqlens: torch.Tensor, cu_seqlens_cmp: torch.Tensor,
                             num_tokens: int) -> torch.Tensor:
    """int64 [N]: for every packed token, the packed index of its sequence's first summary."""
    seq = token_sequence_ids(cu_seqlens, num_tokens)
    return cu_seqlens_cmp.long()[seq]


def visible_compressed(pos: torch.Tensor, kernel_size: int, kernel_stride: int) -> torch.Tensor:
    """int64 [N]: how many summaries the query at position `pos` sees (summary i is visible when
    i * stride + kernel_size - 1 <= pos); they are the first ones of its sequence."""
    return num_compressed(pos + 1, kernel_size, kernel_stride)
