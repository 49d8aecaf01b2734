"""Varlen helpers shared by every implementation: map packed tokens to (sequence, position).

All of them run on the device of `cu_seqlens` without a host synchronisation.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=64)
def single_sequence_cu_seqlens(num_tokens: int, device: torch.device) -> torch.Tensor:
    """int32 [0, N] on `device`, made once per (N, device): a fresh host->device copy per call would
    block the host until the GPU drains its queue, serialising kernel launches with execution."""
    return torch.tensor([0, num_tokens], dtype=torch.int32, device=device)


def token_sequence_ids(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """int64 [N]: the sequence each packed token belongs to (cu_seqlens[0] = 0, so the count of
    boundaries <= token, minus one). Searching the whole cu_seqlens, not the slice cu_seqlens[1:]:
    Inductor's searchsorted ignores a slice's offset (pytorch/pytorch#182343) and shifted every
    token one sequence, which sent compiled kernels reading keys outside their sequence."""
    tokens = torch.arange(num_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, tokens, right=True) - 1


def token_positions(cu_seqlens: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pos [N], seq_len [N]) int64: each token's position inside its sequence and that sequence's length."""
    seq = token_sequence_ids(cu_seqlens, num_tokens)
    starts = cu_seqlens.long()
    pos = torch.arange(num_tokens, device=cu_seqlens.device) - starts[seq]
    seq_len = starts[seq + 1] - starts[seq]
    return pos, seq_len


def sequence_lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    return (cu_seqlens[1:] - cu_seqlens[:-1]).long()


def host_to_device(values: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the device's queue: a copy from pageable memory is
    ordered behind every queued kernel (and the host waits for it); from pinned memory it is not."""
    device = torch.device(device)
    if device.type != "cuda" or values.device.type != "cpu":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def copy_from_host(dst: torch.Tensor, values: torch.Tensor) -> None:
    """dst.copy_(values) for a host tensor, as host_to_device does it (pinned, not waiting for the
    queue), without a temporary on the device."""
    if dst.is_cuda and values.device.type == "cpu":
        values = values.pin_memory()
    dst.copy_(values, non_blocking=dst.is_cuda)
