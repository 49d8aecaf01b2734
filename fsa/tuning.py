"""Launch parameters of the FSA kernels and the partial-buffer memory budget.

Defaults were set from register / shared-memory budgets and checked on the H100 with
experiments/gpu/fsa_bench.py (results/fsa_bench/); they have not been swept like the NSA tables.
Measured: splitting 128-key blocks into 64-key tiles in the backward took the (128, 8) backward at
64K from 7.8 to 3.7 ms (g=1) and from 27.1 to 13.4 ms (g=4): the [128, 128] fp32 dK/dV accumulators
had spilled.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import triton

from nsa_baseline.utils.triton_utils import is_interpreter

BUDGET_ENV = "FSA_BUFFER_BUDGET_GB"
DEFAULT_BUDGET_GB = 2.5


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int  # pair rows per tile
    chunk_tiles: int  # tiles per work item (a program loads its K/V block once for all of them)
    num_warps: int
    num_stages: int
    block_n: int = 32  # tokens per reduction program
    key_tile: int = 64  # backward: keys per program (dK/dV accumulators of KEY_TILE x D stay in registers)


def launch_config(head_dim: int, block_size: int, backward: bool) -> LaunchConfig:
    if is_interpreter():
        return LaunchConfig(block_m=16, chunk_tiles=2, num_warps=1, num_stages=1, block_n=16, key_tile=16)
    d_pad = triton.next_power_of_2(head_dim)
    big = d_pad * block_size >= 256 * 64  # K/V block + tiles would not fit shared memory at 64 rows
    if backward:
        key_tile = 64 if d_pad <= 128 else 32
        return LaunchConfig(block_m=64, chunk_tiles=16, num_warps=4, num_stages=2, key_tile=key_tile)
    return LaunchConfig(block_m=32 if big else 64, chunk_tiles=8, num_warps=4, num_stages=2)


def heads_per_pass(group_size: int, max_pairs: int, head_dim: int, elem_bytes: int) -> int:
    """Query heads of a group handled per pass so the [pairs x heads, D] partial buffer fits the budget."""
    budget = float(os.environ.get(BUDGET_ENV, DEFAULT_BUDGET_GB)) * 2**30
    per_head = max(1, max_pairs * head_dim * elem_bytes)
    return max(1, min(group_size, int(budget // per_head)))


class LaunchPlan(NamedTuple):
    """Sizes and launch choices shared by the FSA forward and backward host wrappers."""

    n: int
    hq: int
    h: int
    g: int
    d: int
    d_pad: int
    max_pairs: int  # N * H * T: the most (query, block) pairs a call can have
    heads_per_pass: int
    precision: str  # tl.dot input_precision: exact fp32 products for fp32 inputs
    cfg: LaunchConfig


def launch_plan(q, k, block_size: int, topk: int, backward: bool) -> LaunchPlan:
    import torch

    n, hq, d = q.shape
    h = k.shape[1]
    max_pairs = n * h * topk
    return LaunchPlan(n, hq, h, hq // h, d, max(16, triton.next_power_of_2(d)), max_pairs,
                      heads_per_pass(hq // h, max_pairs, d, q.element_size()),
                      "ieee" if q.dtype == torch.float32 else "tf32", launch_config(d, block_size, backward))
