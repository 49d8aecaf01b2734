"""The NSA key/value cache: per sequence slot the keys/values after RoPE, their compressed summaries
and the lengths, preallocated for `max_seqlen` tokens.

Layout (contiguous, so that a decode kernel can read it directly):
    k, v          [B, max_seqlen, H, D]   keys after RoPE / values, slot b holds sequence b
    k_cmp, v_cmp  [B, max_cmp, H, D]      summary i of slot b covers keys [i * stride, i * stride + kernel_size)
    lengths       int32 [B] on the cache's device: tokens held per slot
Everything a slot holds is derived from its length: rows at or past it are never read as history, so
a call that fails half-way leaves the slot consistent (the length moves last). The lengths are also
mirrored on the host (`host_lengths`) because the PyTorch path validates and sizes each call there.

Paged (page_size P, the layout serving engines use): k, v are a pool [num_pages, P, H, D] shared by the
slots, and `block_table` int32 [B, ceil(max_seqlen / P)] (device) names the page of each slot's P-row
span (-1: none yet). Row r of slot b is row r % P of page block_table[b, r // P]. Pages are claimed
from a host free list as slots grow (claim_pages, before a call's first write; the checks before it
refuse a call the free pages cannot hold) and given back by reset(slot). P is a multiple of the
block size, so a selected block never straddles pages. The summaries stay per slot (1 / stride of
the keys).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from nsa_baseline.checks import check_int
from nsa_baseline.utils.varlen import copy_from_host


@dataclass(frozen=True)
class CacheConfig:
    """What the cached tensors depend on besides the weights: a cache only serves a module with the
    same values."""

    num_kv_heads: int
    head_dim: int
    kernel_size: int
    kernel_stride: int
    rope_theta: float
    compression: str

    @classmethod
    def of(cls, module) -> "CacheConfig":
        return cls(module.num_kv_heads, module.head_dim, module.kernel_size, module.kernel_stride,
                   float(module.rope_theta), module.compression)

    def mismatch(self, other: "CacheConfig") -> str:
        """'' when equal, else which fields differ (for the error message)."""
        return ", ".join(f"{f.name}={getattr(self, f.name)!r} (module: {getattr(other, f.name)!r})"
                         for f in fields(self) if getattr(self, f.name) != getattr(other, f.name))


class NSACache:
    r"""Preallocated KV cache of NativeSparseAttention for `batch_size` sequence slots.

    Made by `module.new_cache(batch_size, max_seqlen, device=None, dtype=None)` and passed to
    `module(x, cu_seqlens, cache=cache)`, which appends each slot's new tokens. Holds keys and values
    of the one layer it was made for; the module's weights are not recorded (a cache filled by one
    module and read by another of the same shape gives that other module's outputs over stale keys).
    """

    def __init__(self, config: CacheConfig, batch_size: int, max_seqlen: int, device, dtype: torch.dtype,
                 page_size: Optional[int] = None, num_pages: Optional[int] = None, block_size: int = 1):
        check_int("batch_size", batch_size)
        check_int("max_seqlen", max_seqlen)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"argument `dtype` must be a floating torch.dtype, got {dtype!r}")
        self.config = config
        self.batch_size, self.max_seqlen = batch_size, max_seqlen
        self.max_cmp = self.num_summaries(max_seqlen)
        h, d = config.num_kv_heads, config.head_dim
        self.page_size, self.block_table = page_size, None
        rows = (batch_size, max_seqlen)
        if page_size is not None:
            check_int("page_size", page_size)
            if page_size % block_size:
                raise ValueError(f"argument `page_size` must be a multiple of the block size {block_size}, got "
                                 f"{page_size}")
            pages_per_slot = -(-max_seqlen // page_size)
            num_pages = batch_size * pages_per_slot if num_pages is None else num_pages
            check_int("num_pages", num_pages)
            rows = (num_pages, page_size)
            self.block_table = torch.full((batch_size, pages_per_slot), -1, dtype=torch.int32, device=device)
            self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out the lowest page first
            self._pages: list[list[int]] = [[] for _ in range(batch_size)]
        elif num_pages is not None:
            raise ValueError("argument `num_pages` needs `page_size` (a paged cache)")
        # Zeros, not empty: rows past a slot's length are gathered (then masked) by the PyTorch path,
        # and 0 * NaN garbage would poison the masked softmax.
        self.k = torch.zeros(*rows, h, d, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.k_cmp = torch.zeros(batch_size, self.max_cmp, h, d, device=device, dtype=dtype)
        self.v_cmp = torch.zeros_like(self.k_cmp)
        self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self._host_lengths = [0] * batch_size

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def host_lengths(self) -> tuple[int, ...]:
        """The lengths as host ints (kept in step with `lengths`, never read back from the device)."""
        return tuple(self._host_lengths)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the cache holds, by name."""
        out = {"k": self.k, "v": self.v, "k_cmp": self.k_cmp, "v_cmp": self.v_cmp, "lengths": self.lengths}
        if self.block_table is not None:
            out["block_table"] = self.block_table
        return out

    # -- pages (paged caches; every method is a no-op or the identity for a contiguous one) --

    def pages_short(self, lengths: list[int]) -> int:
        """Pages missing from the free list for slot b to hold lengths[b] tokens (0: they fit)."""
        if self.page_size is None:
            return 0
        need = sum(max(0, -(-n // self.page_size) - len(p)) for n, p in zip(lengths, self._pages))
        return max(0, need - len(self._free))

    def claim_pages(self, lengths: list[int]) -> None:
        """Give every slot b the pages for lengths[b] tokens (before a call's first write). Moves the
        block table to the device only when a page was added, so a call whose pages are all there
        (a replayed CUDA graph step, claimed before) does no copy."""
        if self.page_size is None:
            return
        short = self.pages_short(lengths)
        if short:
            raise ValueError(f"argument `cache` is out of pages: {short} more of {self.page_size} rows needed "
                             f"({len(self._free)} free)")
        added = False
        for n, pages in zip(lengths, self._pages):
            while len(pages) < -(-n // self.page_size):
                pages.append(self._free.pop())
                added = True
        if added:
            table = [p + [-1] * (self.block_table.shape[1] - len(p)) for p in self._pages]
            copy_from_host(self.block_table, torch.tensor(table, dtype=torch.int32, device="cpu"))

    def claim_step(self) -> None:
        """claim_pages for a decode step: every slot's next row (before the step's writes; outside a
        CUDA graph, which cannot capture the table's copy)."""
        self.claim_pages([n + 1 for n in self._host_lengths])

    @property
    def free_pages(self) -> int:
        return len(self._free) if self.page_size is not None else 0

    def rows(self, slot: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Index of slot's row pos (int64 tensors of one shape) in k / v: (slot, pos) itself, or for a
        paged cache (page, row in page) from the block table (positions clamped into the slot;
        a span without a page reads page 0: callers mask rows past the lengths)."""
        if self.page_size is None:
            return slot, pos
        pos = pos.clamp(0, self.max_seqlen - 1)
        page = self.block_table.long()[slot, pos // self.page_size].clamp_min(0)
        return page, pos % self.page_size

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (the device memory it takes)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def num_summaries(self, length: int) -> int:
        """Summaries held by a slot of `length` tokens (as utils.compressed_varlen.num_compressed)."""
        ks, st = self.config.kernel_size, self.config.kernel_stride
        return 0 if length < ks else (length - ks) // st + 1

    def reset(self, slot: int) -> None:
        """Empty slot `slot` for a new sequence (zeroes its rows; other slots are untouched)."""
        if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < self.batch_size:
            raise ValueError(f"argument `slot` must be an int in [0, {self.batch_size}), got {slot!r}")
        if self.page_size is None:
            self.k[slot].zero_()
            self.v[slot].zero_()
        else:  # its pages go back to the free list (their rows are rewritten before any read)
            self._free.extend(reversed(self._pages[slot]))
            self._pages[slot] = []
            self.block_table[slot] = -1
        self.k_cmp[slot].zero_()
        self.v_cmp[slot].zero_()
        self.lengths[slot] = 0
        self._host_lengths[slot] = 0

    def set_lengths(self, lengths: list[int]) -> None:
        """Commit new lengths (host mirror and device tensor): the last write of a call."""
        self._host_lengths = list(lengths)
        copy_from_host(self.lengths, torch.tensor(lengths, dtype=torch.int32, device="cpu"))

    def advance_host(self, steps: int = 1) -> None:
        """`steps` decode steps appended one token each to every slot: the host mirror moves by `steps`
        (the device lengths were moved by the steps themselves; nothing is read back). -1 takes back a
        step whose device part was undone or never ran (graph capture records the kernels, runs none)."""
        self._host_lengths = [n + steps for n in self._host_lengths]

    def __repr__(self) -> str:
        paged = "" if self.page_size is None else f"page_size={self.page_size}, num_pages={self.k.shape[0]}, "
        return (f"NSACache(batch_size={self.batch_size}, max_seqlen={self.max_seqlen}, max_cmp={self.max_cmp}, {paged}"
                f"H={self.config.num_kv_heads}, D={self.config.head_dim}, dtype={self.dtype}, device={self.device}, "
                f"nbytes={self.nbytes})")
