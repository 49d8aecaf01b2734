"""Synthetic block_indices for tests and benchmarks (the NSA selection path lives in reference/)."""
from __future__ import annotations

from typing import Optional

import torch

from nsa_baseline.utils.varlen import token_positions


def random_causal_block_indices(
    num_tokens: int,
    num_kv_heads: int,
    topk: int,
    block_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    init_blocks: int = 1,
    local_blocks: int = 2,
    device="cpu",
    generator: Optional[torch.Generator] = None,
    chunk: int = 8192,
) -> torch.Tensor:
    """int32 [N, H, T]: uniformly random distinct causal blocks per (token, kv head), with the first
    `init_blocks` and the `local_blocks` ending at the token's own block always kept; -1 where the
    token has fewer than T causal blocks. Slots are in random order (kernels must not assume sorted)."""
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, num_tokens], dtype=torch.int32, device=device)
    pos, _ = token_positions(cu_seqlens.to(device), num_tokens)
    max_blocks = (num_tokens + block_size - 1) // block_size
    out = torch.empty(num_tokens, num_kv_heads, topk, dtype=torch.int32, device=device)
    blocks = torch.arange(max_blocks, device=device)
    for c0 in range(0, num_tokens, chunk):
        c1 = min(num_tokens, c0 + chunk)
        cur = (pos[c0:c1] // block_size)[:, None]  # [c, 1]
        score = torch.rand(c1 - c0, num_kv_heads, max_blocks, device=device, generator=generator)
        forced = (blocks < init_blocks) | ((blocks <= cur) & (blocks > cur - local_blocks))
        score = torch.where(forced[:, None, :], score + 2.0, score)
        score = score.masked_fill((blocks > cur)[:, None, :], -1.0)
        k = min(topk, max_blocks)
        val, idx = score.topk(k, dim=-1)
        idx = torch.where(val >= 0, idx, torch.full_like(idx, -1))
        perm = torch.rand(c1 - c0, num_kv_heads, k, device=device, generator=generator).argsort(-1)
        out[c0:c1, :, :k] = idx.gather(-1, perm).int()
        out[c0:c1, :, k:] = -1
    return out
