"""Fresh random inputs of a point (never zeros) and their block indices (indices=nsa: the NSA
compression path on these q, k; indices=random: uniformly random causal blocks), cached across the
jobs of one process (kernels swept as separate jobs reuse the same inputs)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from experiments.points import Point
from experiments.schema import SelectionConfig

_cache: dict = {}


@dataclass
class Inputs:
    q: torch.Tensor  # [N, HQ, D]
    k: torch.Tensor  # [N, H, D]
    v: torch.Tensor  # [N, H, D]
    cu_seqlens: torch.Tensor  # int32 [B + 1], equal-length sequences
    block_indices: torch.Tensor  # int32 [N, H, T]
    gates: Optional[torch.Tensor] = None  # [N, HQ, 3] branch gates in (0, 1) (scope=module)


def block_indices_for(point: Point, sel: SelectionConfig, q, k, cu_seqlens, generator) -> torch.Tensor:
    if point.indices == "random":
        from nsa_baseline.utils.indices import random_causal_block_indices

        return random_causal_block_indices(point.num_tokens, point.kv_heads, point.topk, point.block_size,
                                           cu_seqlens=cu_seqlens, init_blocks=sel.init_blocks,
                                           local_blocks=sel.local_blocks, device=q.device, generator=generator)
    # imported here, like the random indices above: kernels load only when a point is measured
    from nsa_baseline.branches import nsa_block_indices  # Triton selection where it serves, else the reference

    with torch.no_grad():
        idx = nsa_block_indices(
            q, k, cu_seqlens=None if point.batch == 1 else cu_seqlens, kernel_size=sel.kernel_size,
            kernel_stride=sel.kernel_stride, block_size=point.block_size, topk=point.topk,
            init_blocks=sel.init_blocks, local_blocks=sel.local_blocks)
    return idx.to(torch.int32).contiguous()


def make_inputs(point: Point, sel: SelectionConfig, device: torch.device, seed: int) -> Inputs:
    key = (point, repr(sel), str(device), seed)
    if key in _cache:
        return _cache[key]
    _cache.clear()  # one point at a time: large inputs must not pile up
    dtype = getattr(torch, point.dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    n, hq, h, d = point.num_tokens, point.q_heads, point.kv_heads, point.head_dim

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=torch.float32, generator=gen).to(dtype)

    q, k, v = randn(n, hq, d), randn(n, h, d), randn(n, h, d)
    cu = torch.arange(0, n + 1, point.seqlen, device=device, dtype=torch.int32)
    idx = block_indices_for(point, sel, q, k, cu, gen)
    gates = torch.sigmoid(randn(n, hq, 3)) if point.scope == "module" else None
    _cache[key] = Inputs(q, k, v, cu, idx, gates)
    return _cache[key]
