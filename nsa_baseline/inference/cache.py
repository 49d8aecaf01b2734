"""The NSA key/value cache: per sequence slot the keys/values after RoPE, their compressed summaries
and the lengths, preallocated for `max_seqlen` tokens.

Layout (contiguous, so that a decode kernel can read it directly):
    k, v          [B, max_seqlen, H, D]   keys after RoPE / values, slot b holds sequence b
    k_cmp, v_cmp  [B, max_cmp, H, D]      summary i of slot b covers keys [i * stride, i * stride + kernel_size)
    lengths       int32 [B] on the cache's device: tokens held per slot
Everything a slot holds is derived from its length: rows at or past it are never read as history, so
a call that fails half-way leaves the slot consistent (the length moves last). The lengths are also
mirrored on the host (`host_lengths`) because the PyTorch path validates and sizes each call there.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from nsa_baseline.checks import check_int


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

    def __init__(self, config: CacheConfig, batch_size: int, max_seqlen: int, device, dtype: torch.dtype):
        check_int("batch_size", batch_size)
        check_int("max_seqlen", max_seqlen)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"argument `dtype` must be a floating torch.dtype, got {dtype!r}")
        self.config = config
        self.batch_size, self.max_seqlen = batch_size, max_seqlen
        self.max_cmp = self.num_summaries(max_seqlen)
        h, d = config.num_kv_heads, config.head_dim
        # Zeros, not empty: rows past a slot's length are gathered (then masked) by the PyTorch path,
        # and 0 * NaN garbage would poison the masked softmax.
        self.k = torch.zeros(batch_size, max_seqlen, h, d, device=device, dtype=dtype)
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
        return {"k": self.k, "v": self.v, "k_cmp": self.k_cmp, "v_cmp": self.v_cmp, "lengths": self.lengths}

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
        for t in (self.k, self.v, self.k_cmp, self.v_cmp):
            t[slot].zero_()
        self.lengths[slot] = 0
        self._host_lengths[slot] = 0

    def set_lengths(self, lengths: list[int]) -> None:
        """Commit new lengths (host mirror and device tensor): the last write of a call."""
        self._host_lengths = list(lengths)
        self.lengths.copy_(torch.tensor(lengths, dtype=torch.int32), non_blocking=False)

    def advance_host(self, steps: int = 1) -> None:
        """`steps` decode steps appended one token each to every slot: the host mirror moves by `steps`
        (the device lengths were moved by the steps themselves; nothing is read back). -1 takes back a
        step whose device part was undone or never ran (graph capture records the kernels, runs none)."""
        self._host_lengths = [n + steps for n in self._host_lengths]

    def __repr__(self) -> str:
        return (f"NSACache(batch_size={self.batch_size}, max_seqlen={self.max_seqlen}, max_cmp={self.max_cmp}, "
                f"H={self.config.num_kv_heads}, D={self.config.head_dim}, dtype={self.dtype}, device={self.device}, "
                f"nbytes={self.nbytes})")
