"""Top-T block selection of a chunk of queries in plain PyTorch, shared by the reference and the
kernels' `select_blocks` (the fused Triton selection ranks candidates by the same rule)."""
from __future__ import annotations

import torch


def select_chunk(scores: torch.Tensor, pos: torch.Tensor, block_size: int, topk: int,
                 init_blocks: int, local_blocks: int) -> torch.Tensor:
    r"""Top-T selection for a chunk of queries.

    Rank: forced blocks (the first `init_blocks` and the `local_blocks` ending at the query's own
    block) +inf, then the other causal blocks by score (NaN and -inf lowest, +inf clamped finite),
    non-causal blocks never. Ranked in float32, float64 for float64 scores.

    Args:
        scores: [c, H, NB]; pos: int64 [c] positions of the queries inside their sequences.
    Returns:
        int32 [c, H, topk]: forced blocks first, then by decreasing score, then -1.
    """
    c, h, nb = scores.shape
    blocks = torch.arange(nb, device=scores.device)[None, :]
    cur = (pos // block_size)[:, None]  # [c, 1] the query's own block
    causal = blocks <= cur
    forced = causal & ((blocks < init_blocks) | (blocks > cur - local_blocks))
    rank = torch.float64 if scores.dtype == torch.float64 else torch.float32
    big = torch.finfo(rank).max
    key = torch.nan_to_num(scores.to(rank), nan=-big, posinf=big, neginf=-big)
    key.masked_fill_(forced[:, None, :], float("inf")).masked_fill_(~causal[:, None, :], float("-inf"))
    k = min(topk, nb)
    val, idx = key.topk(k, dim=-1)
    idx = torch.where(val > float("-inf"), idx, torch.full_like(idx, -1)).int()
    if k < topk:
        idx = torch.cat([idx, idx.new_full((c, h, topk - k), -1)], dim=-1)
    return idx
