"""Validation of a call with a cache, before anything is written: the cache is left exactly as it was
when any check fails.

`plan_call` checks the cache against the module, x, cu_seqlens and the room left in every slot, and
returns where each new token goes: its slot and its absolute position in that slot's sequence.
cu_seqlens is read on the host (one device->host copy per call; the fast decode step will not).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from nsa_baseline.inference.cache import CacheConfig, NSACache
from nsa_baseline.utils.varlen import token_sequence_ids


@dataclass
class CallPlan:
    """Where the new tokens of one call go."""

    old: list[int]  # tokens held per slot before the call
    counts: list[int]  # new tokens per slot
    seq: torch.Tensor  # int64 [N] slot of every new token (x's device)
    pos: torch.Tensor  # int64 [N] its absolute position in that slot's sequence
    cu_seqlens: Optional[torch.Tensor]  # int32 [B + 1] of the new tokens on x's device (None: one slot)

    @property
    def new(self) -> list[int]:
        return [a + c for a, c in zip(self.old, self.counts)]

    @property
    def has_history(self) -> bool:
        return any(self.old)


def _check_cache(module, cache) -> None:
    if not isinstance(cache, NSACache):
        raise ValueError(f"argument `cache` must be an NSACache from module.new_cache(...), got {type(cache).__name__}")
    diff = cache.config.mismatch(CacheConfig.of(module))
    if diff:
        raise ValueError(f"argument `cache` was made for another module shape: {diff}")
    w = module.q_proj.weight
    if cache.dtype != w.dtype:
        raise ValueError(f"argument `cache` holds {cache.dtype}, the module runs in {w.dtype}")
    if cache.device != w.device:
        raise ValueError(f"argument `cache` is on {cache.device}, the module on {w.device}")


def _check_x(module, x) -> None:
    w = module.q_proj.weight
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != module.hidden_size:
        raise ValueError(f"argument `x` must be [N, hidden_size={module.hidden_size}] (new tokens), got "
                         f"{tuple(getattr(x, 'shape', ()))}")
    if x.dtype != w.dtype:
        raise ValueError(f"argument `x` dtype must match the parameters ({w.dtype}), got {x.dtype}")
    if x.device != w.device:
        raise ValueError(f"argument `x` must be on the parameters' device {w.device}, got {x.device}")


def _counts(x: torch.Tensor, cu_seqlens: Optional[torch.Tensor], batch_size: int) -> list[int]:
    """New tokens per slot, from cu_seqlens (checked: int32 [batch_size + 1] on x's device, 0 .. N,
    non-decreasing)."""
    n = x.shape[0]
    if cu_seqlens is None:
        if batch_size != 1:
            raise ValueError(f"argument `cu_seqlens` may be None only for a cache of batch_size 1, this one has "
                             f"{batch_size} slots: pass int32 [{batch_size + 1}] counts of new tokens")
        return [n]
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 \
            or cu_seqlens.numel() != batch_size + 1:
        raise ValueError(f"argument `cu_seqlens` must be an int32 tensor [batch_size + 1 = {batch_size + 1}], got "
                         f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)} of shape "
                         f"{tuple(getattr(cu_seqlens, 'shape', ()))}")
    if cu_seqlens.device != x.device:
        raise ValueError(f"argument `cu_seqlens` must be on x's device {x.device}, got {cu_seqlens.device}")
    values = cu_seqlens.tolist()
    if values[0] != 0 or values[-1] != n:
        raise ValueError(f"argument `cu_seqlens` must run from 0 to N = {n} new tokens, got {values[0]} .. {values[-1]}")
    counts = [b - a for a, b in zip(values, values[1:])]
    if min(counts) < 0:
        raise ValueError(f"argument `cu_seqlens` must be non-decreasing (no negative counts), got counts {counts}")
    return counts


def plan_call(module, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor], cache: NSACache) -> CallPlan:
    """Check a call of `module(x, cu_seqlens, cache=cache)`; ValueError naming the argument, before any write."""
    _check_cache(module, cache)
    _check_x(module, x)
    counts = _counts(x, cu_seqlens, cache.batch_size)
    old = list(cache.host_lengths)
    over = [(b, a + c) for b, (a, c) in enumerate(zip(old, counts)) if a + c > cache.max_seqlen]
    if over:
        b, total = over[0]
        raise ValueError(f"argument `{'x' if cu_seqlens is None else 'cu_seqlens'}`: slot {b} would hold {total} "
                         f"tokens, past the cache's max_seqlen {cache.max_seqlen} ({old[b]} cached + {counts[b]} new)")
    n = x.shape[0]
    if cu_seqlens is None:
        seq = torch.zeros(n, dtype=torch.long, device=x.device)
        pos = torch.arange(n, device=x.device) + old[0]
    else:
        seq = token_sequence_ids(cu_seqlens, n)
        pos = torch.arange(n, device=x.device) - cu_seqlens.long()[seq] + cache.lengths.long()[seq]
    return CallPlan(old, counts, seq, pos, cu_seqlens)


def check_decode_call(module, x: torch.Tensor, cache: NSACache) -> None:
    """Check a decode step (one new token per slot, x [batch_size, hidden_size]) on the host mirror of
    the lengths only; ValueError naming the argument, before any write."""
    _check_cache(module, cache)
    _check_x(module, x)
    if x.shape[0] != cache.batch_size:
        raise ValueError(f"argument `x` must hold one new token per slot: [{cache.batch_size}, "
                         f"{module.hidden_size}], got {tuple(x.shape)}")
    full = [b for b, n in enumerate(cache.host_lengths) if n >= cache.max_seqlen]
    if full:
        raise ValueError(f"argument `x`: slot {full[0]} already holds max_seqlen = {cache.max_seqlen} tokens")
