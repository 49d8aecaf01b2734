"""Validation of a call with a cache, before anything is written: the cache is left exactly as it was
when any check fails.

`plan_call` checks the cache against the module, x, cu_seqlens and the room left in every slot, and
returns where each new token goes: its slot and its absolute position in that slot's sequence.
cu_seqlens is read on the host (one device->host copy per call; the fast decode step will not).
`plan_counts` builds the same plan from host counts alone (the swapped models' generation, where
every layer's attention shares one plan per step: nsa_baseline.models.generate).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from nsa_baseline.inference.cache import CacheConfig, NSACache
from nsa_baseline.utils.varlen import host_to_device


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


def plan_counts(counts: list[int], cache: NSACache, device, cu_seqlens: Optional[torch.Tensor] = None,
                arg: str = "cu_seqlens") -> CallPlan:
    """The plan of a call appending counts[b] new tokens to slot b, from host values only (no read of
    the device): ValueError naming `arg` when a slot would pass max_seqlen, before any write.
    cu_seqlens: the call's own tensor if it has one, else built from counts (None for one slot)."""
    if len(counts) != cache.batch_size or any(not isinstance(c, int) or c < 0 for c in counts):
        raise ValueError(f"argument `{arg}` must give {cache.batch_size} counts of new tokens >= 0, got {counts}")
    old = list(cache.host_lengths)
    over = [(b, a + c) for b, (a, c) in enumerate(zip(old, counts)) if a + c > cache.max_seqlen]
    if over:
        b, total = over[0]
        raise ValueError(f"argument `{arg}`: slot {b} would hold {total} tokens, past the cache's max_seqlen "
                         f"{cache.max_seqlen} ({old[b]} cached + {counts[b]} new)")
    _check_pages(cache, [a + c for a, c in zip(old, counts)], arg)
    host = torch.device("cpu")  # explicit: a `with torch.device("cuda")` block would move these
    n_new = torch.tensor(counts, dtype=torch.long, device=host)  # host: no device read
    seq = torch.repeat_interleave(torch.arange(len(counts), device=host), n_new)
    starts = n_new.cumsum(0) - n_new
    old_t = torch.tensor(old, dtype=torch.long, device=host)
    pos = torch.arange(int(n_new.sum()), device=host) - starts[seq] + old_t[seq]
    if cu_seqlens is None and cache.batch_size > 1:
        cu_seqlens = host_to_device(torch.cat([starts, n_new.sum().view(1)]).int(), device)
    seq_pos = host_to_device(torch.stack([seq, pos]), device)  # one copy for both
    return CallPlan(old, list(counts), seq_pos[0], seq_pos[1], cu_seqlens)


def plan_call(module, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor], cache: NSACache) -> CallPlan:
    """Check a call of `module(x, cu_seqlens, cache=cache)`; ValueError naming the argument, before any write."""
    _check_cache(module, cache)
    _check_x(module, x)
    counts = _counts(x, cu_seqlens, cache.batch_size)
    return plan_counts(counts, cache, x.device, cu_seqlens, "x" if cu_seqlens is None else "cu_seqlens")


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
    _check_pages(cache, [n + 1 for n in cache.host_lengths], "x")


def _check_pages(cache: NSACache, lengths: list[int], arg: str) -> None:
    """A paged cache must have the free pages the call's new lengths need (before any write)."""
    short = cache.pages_short(lengths)
    if short:
        raise ValueError(f"argument `{arg}`: the paged cache is out of pages, {short} more of {cache.page_size} "
                         f"rows needed for lengths {lengths} ({cache.free_pages} free; reset finished slots)")
