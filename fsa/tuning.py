"""Launch parameters of the FSA kernels and the partial-buffer memory budget.

Defaults were set from register / shared-memory budgets and checked on the H100 with
experiments/gpu/fsa_bench.py (results/fsa_bench/); experiments/gpu/fsa_tune.py sweeps them
(launch_config_override runs the kernels with any config; results/fsa_tune/ moved the d <= 128
forward to 64 rows and 3 stages on the H100, kept for GPUs with Hopper's shared memory per block).
The backward splits 128-key blocks into 64-key tiles: [128, 128] fp32 dK/dV accumulators spill
(the measurement is in results/fsa_tune/README.md).

The partial buffers (forward: o and lse per pair row; backward: dQ per pair row and key tile, dK/dV of
busy blocks per work item) are sized for one pass, and a call runs as many passes as the budget
(FSA_BUFFER_BUDGET_GB; default a quarter of the free device memory, at least 2.5 GiB) needs, see
pass_split. At 128K with 64 KV heads a single pass needed a 34 GiB dQ buffer: out of memory on an
80 GB GPU. Splitting query heads of a group costs more than splitting KV heads (each query-head pass
re-reads K/V and re-accumulates dK/dV): measured on the H100 in results/pass_budget/.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

import triton

from nsa_baseline.utils.triton_utils import is_interpreter

BUDGET_ENV = "FSA_BUFFER_BUDGET_GB"
DEFAULT_BUDGET_GB = 2.5  # the least default budget
FREE_MEMORY_SHARE = 0.25  # default budget: this share of the free device memory, if larger
HOPPER_SHARED_MEM = 227 * 1024  # bytes of shared memory one program may use on H100 / H200 / H20


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int  # pair rows per tile
    chunk_tiles: int  # tiles per work item (a program loads its K/V block once for all of them)
    num_warps: int
    num_stages: int
    block_n: int = 32  # tokens per reduction program
    key_tile: int = 64  # backward: keys per program (dK/dV accumulators of KEY_TILE x D stay in registers)
    reduce_key_rows: int = 16  # backward: keys per program of the busy-block dK/dV reduction (<= block size)

    def __post_init__(self):
        for name, least in (("block_m", 16), ("key_tile", 16), ("block_n", 1), ("reduce_key_rows", 1)):
            val = getattr(self, name)  # tl.dot tiles need >= 16 rows; every tl.arange a power of two
            if val < least or val & (val - 1):
                raise ValueError(f"LaunchConfig.{name} must be a power of two >= {least}, got {val}")
        for name in ("chunk_tiles", "num_warps", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"LaunchConfig.{name} must be >= 1, got {getattr(self, name)}")


_overrides: dict[bool, LaunchConfig] = {}  # backward? -> config, set by launch_config_override


@contextlib.contextmanager
def launch_config_override(fwd: Optional[LaunchConfig] = None, bwd: Optional[LaunchConfig] = None):
    """Run the FSA kernels with these launch configs inside the block (tuning sweeps, knob tests)."""
    saved = dict(_overrides)
    _overrides.update({k: v for k, v in ((False, fwd), (True, bwd)) if v is not None})
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def launch_config(head_dim: int, block_size: int, backward: bool, device=None) -> LaunchConfig:
    if backward in _overrides:
        return _overrides[backward]
    if is_interpreter():
        return LaunchConfig(block_m=16, chunk_tiles=2, num_warps=1, num_stages=1, block_n=16, key_tile=16,
                            reduce_key_rows=8)
    return gpu_launch_config(head_dim, block_size, backward, device_shared_mem(device))


def device_shared_mem(device=None) -> int:
    """Shared memory one program may use on `device` (Triton's device properties), cached per device;
    Hopper's when it cannot be read (no CUDA device: the cost model)."""
    import torch

    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        return HOPPER_SHARED_MEM
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _shared_mem:
        props = triton.runtime.driver.active.utils.get_device_properties(index)
        _shared_mem[index] = int(props.get("max_shared_mem", HOPPER_SHARED_MEM))
    return _shared_mem[index]


_shared_mem: dict[int, int] = {}  # device index -> bytes


def gpu_launch_config(head_dim: int, block_size: int, backward: bool,
                      shared_mem: int = HOPPER_SHARED_MEM) -> LaunchConfig:
    """The defaults on a GPU with `shared_mem` bytes per program (also what the cost model sizes FSA's
    buffers with, on any machine)."""
    d_pad = triton.next_power_of_2(head_dim)
    if backward:
        key_tile = 64 if d_pad <= 128 else 32
        return LaunchConfig(block_m=64, chunk_tiles=16, num_warps=4, num_stages=2, key_tile=key_tile)
    if d_pad <= 128 and shared_mem >= HOPPER_SHARED_MEM:
        # Swept on the H100 (results/fsa_tune/README.md): 64 query rows with 3 stages fit shared memory
        # and were the fastest.
        return LaunchConfig(block_m=64, chunk_tiles=8, num_warps=4, num_stages=3)
    # Less shared memory (A100: 163 KiB) or d > 128, not swept: the earlier estimate, 64 rows only
    # while the K/V block and the tiles surely fit.
    big = d_pad * block_size >= 256 * 64
    return LaunchConfig(block_m=32 if big else 64, chunk_tiles=8, num_warps=4, num_stages=2)


def buffer_budget_bytes(device=None) -> float:
    """FSA_BUFFER_BUDGET_GB if set, else a quarter of the device's free memory (at least 2.5 GiB); while
    a CUDA graph is being captured, the budget of the last call outside capture (capture-safe)."""
    if BUDGET_ENV in os.environ:
        return float(os.environ[BUDGET_ENV]) * 2**30
    import torch

    if device is None or device.type != "cuda":
        return budget_for_free(0)  # no device memory to share
    index = device.index if device.index is not None else torch.cuda.current_device()
    if torch.cuda.is_current_stream_capturing():  # CUDA graph capture: no device queries, the last budget
        return _last_budget.get(index, budget_for_free(0))
    _last_budget[index] = budget_for_free(torch.cuda.mem_get_info(index)[0])
    return _last_budget[index]


def budget_for_free(free_bytes: float) -> float:
    """The default budget with `free_bytes` of device memory free: a quarter of it, at least 2.5 GiB."""
    return max(DEFAULT_BUDGET_GB * 2**30, FREE_MEMORY_SHARE * free_bytes)


def padded_head_dim(d: int) -> int:
    """D rounded up to the power of two >= 16 that the kernels' tiles use."""
    return max(16, triton.next_power_of_2(d))


_last_budget: dict[int, float] = {}  # device index -> budget of the last call outside graph capture


def pass_bytes(n: int, topk: int, kv_heads: int, heads: int, d: int, d_pad: int, elem_bytes: int,
               block_size: int, cfg: LaunchConfig, backward: bool) -> int:
    """Partial-buffer bytes of one pass over `kv_heads` KV heads x `heads` query heads of each group."""
    pairs = n * kv_heads * topk * heads  # pair rows: (query token, query head, selected block)
    if not backward:
        return pairs * (d * elem_bytes + 4)  # normalised o partial + its log-sum-exp
    num_sub = block_size // min(block_size, cfg.key_tile)
    blocks = (n // block_size + 2) * kv_heads  # CSR rows of the pass (one sequence; an estimate)
    items = triton.cdiv(pairs, cfg.block_m * cfg.chunk_tiles) + blocks
    return pairs * num_sub * d * elem_bytes + items * 2 * block_size * d_pad * 4  # dQ + busy-block dK/dV


def pass_split(h: int, g: int, bytes_of, budget: float) -> tuple[int, int]:
    """(KV heads, query heads of a group) per pass. Whole groups over as many KV heads as fit (every
    block's dK/dV then comes from one pass, and results do not depend on the split); else all KV
    heads with as many query heads as fit; else as many KV heads as fit with one query head."""
    def most(limit, fits):
        return max(c for c in range(1, limit + 1) if c == 1 or fits(c))

    if bytes_of(1, g) <= budget:
        return most(h, lambda c: bytes_of(c, g) <= budget), g
    if bytes_of(h, 1) <= budget:
        return h, most(g, lambda c: bytes_of(h, c) <= budget)
    return most(h, lambda c: bytes_of(c, 1) <= budget), 1


class LaunchPlan(NamedTuple):
    """Sizes and launch choices shared by the FSA forward and backward host wrappers."""

    n: int
    hq: int
    h: int
    g: int
    d: int
    d_pad: int
    kv_heads_per_pass: int
    heads_per_pass: int
    pass_pairs: int  # N * kv_heads_per_pass * T: the most (query, block) pairs of one pass, per query head
    precision: str  # tl.dot input_precision: exact fp32 products for fp32 inputs
    cfg: LaunchConfig

    def passes(self):
        """(first KV head, KV heads, first query head of the group, query heads) of every pass."""
        for h0 in range(0, self.h, self.kv_heads_per_pass):
            for g0 in range(0, self.g, self.heads_per_pass):
                yield h0, min(self.kv_heads_per_pass, self.h - h0), g0, min(self.heads_per_pass, self.g - g0)


def launch_plan(q, k, block_size: int, topk: int, backward: bool) -> LaunchPlan:
    import torch

    n, hq, d = q.shape
    h = k.shape[1]
    g = hq // h
    d_pad = padded_head_dim(d)
    cfg = launch_config(d, block_size, backward, q.device)
    hp, gc = pass_split(h, g, lambda kv_heads, heads: pass_bytes(
        n, topk, kv_heads, heads, d, d_pad, q.element_size(), block_size, cfg, backward),
        buffer_budget_bytes(q.device))
    return LaunchPlan(n, hq, h, g, d, d_pad, hp, gc, n * hp * topk,
                      "ieee" if q.dtype == torch.float32 else "tf32", cfg)
