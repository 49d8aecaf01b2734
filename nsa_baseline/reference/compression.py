"""Key/value compression of NSA in plain PyTorch: one summary per kernel_size keys at kernel_stride.

Summary i of a sequence covers its keys [i * stride, i * stride + kernel_size). With a learnable
`weight` [kernel_size * D, D] and `pos_emb` [kernel_size, D] (shared by all heads) a summary is
flatten(block + pos_emb) @ weight; without them it is the mean of the block (parameter-free).
Gathers blocks a chunk of summaries at a time so memory stays bounded.
"""
from __future__ import annotations

from typing import Optional

import torch

from nsa_baseline.checks import check_compress_inputs
from nsa_baseline.utils.compressed_varlen import compressed_cu_seqlens
from nsa_baseline.utils.varlen import single_sequence_cu_seqlens, token_sequence_ids

# Elements of the gathered blocks per chunk ([chunk, kernel_size, H, D]).
_GATHER_BUDGET = 1 << 26


def summarize_blocks(blocks: torch.Tensor, weight: Optional[torch.Tensor] = None,
                     pos_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One summary per block: blocks [M, kernel_size, H, D] (compute dtype) -> [M, H, D], the mean over the
    block's keys, or flatten(block + pos_emb) @ weight (weight, pos_emb in the blocks' dtype)."""
    if weight is None:
        return blocks.mean(dim=1)
    m, ks, h, d = blocks.shape
    blocks = (blocks + pos_emb[None, :, None, :]).transpose(1, 2)  # [M, H, kernel_size, D]
    return blocks.reshape(m, h, ks * d) @ weight


def compress_kv(
    x: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor] = None,
    kernel_size: int = 32,
    kernel_stride: int = 16,
    weight: Optional[torch.Tensor] = None,
    pos_emb: Optional[torch.Tensor] = None,
):
    r"""Compress packed keys (or values) into overlapping block summaries.

    Args:
        x: [N, H, D] packed keys or values.
        cu_seqlens: int32 [B + 1], or None for one sequence.
        kernel_size, kernel_stride: summary length and step (stride <= kernel_size).
        weight: [kernel_size * D, D] learnable map of the flattened block (row k * D + d multiplies
            element d of the block's k-th key), or None for mean pooling.
        pos_emb: [kernel_size, D] intra-block position embedding added before the map (with weight).
    Returns:
        x_cmp [N_cmp, H, D] in x.dtype (packed summaries of every sequence) and
        cu_seqlens_cmp int32 [B + 1].
    """
    check_compress_inputs(x, cu_seqlens, kernel_size, kernel_stride, weight, pos_emb)
    n, h, d = x.shape
    cu_seqlens = single_sequence_cu_seqlens(n, x.device) if cu_seqlens is None else cu_seqlens.to(x.device)
    cu_cmp = compressed_cu_seqlens(cu_seqlens, kernel_size, kernel_stride)
    n_cmp = int(cu_cmp[-1])
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    if n_cmp == 0:
        return x.new_zeros(0, h, d), cu_cmp
    # Packed row of the first key of every summary.
    seq = token_sequence_ids(cu_cmp, n_cmp)
    local = torch.arange(n_cmp, device=x.device) - cu_cmp.long()[seq]
    first = cu_seqlens.long()[seq] + local * kernel_stride  # [N_cmp]
    offs = torch.arange(kernel_size, device=x.device)
    xc = x.to(compute)
    w, pe = (weight.to(compute), pos_emb.to(compute)) if weight is not None else (None, None)

    chunk = max(1, _GATHER_BUDGET // (kernel_size * h * d))
    outs = []
    for c0 in range(0, n_cmp, chunk):
        c1 = min(n_cmp, c0 + chunk)
        blocks = xc[first[c0:c1, None] + offs]  # [c, kernel_size, H, D]
        outs.append(summarize_blocks(blocks, w, pe))
    return torch.cat(outs).to(x.dtype), cu_cmp
