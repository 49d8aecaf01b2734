"""Top-n block selection of NSA in plain PyTorch, and the whole selection path from q and k.

`select_blocks_ref` turns block scores into block_indices (the contract's int32 [N, H, T]);
`select_blocks_from_compressed_ref` runs compressed softmax -> block scores -> top-n a chunk of
queries at a time, so it never holds the [N, H, NB] scores (64K tokens fit on one GPU);
`nsa_block_indices_ref` puts mean-pooled compression in front of it.
"""
from __future__ import annotations

from typing import Optional

import torch

from nsa_baseline.checks import check_block_mapping, check_compressed_args, check_cu_seqlens, check_selection
from nsa_baseline.reference.compressed import chunk_selection_scores, compressed_layout
from nsa_baseline.reference.compression import compress_kv
from nsa_baseline.reference.window import compute_dtype
from nsa_baseline.utils.topk import select_chunk
from nsa_baseline.utils.varlen import token_positions

_CHUNK = 4096


def select_blocks_ref(
    scores: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    block_size: int,
    topk: int,
    init_blocks: int = 1,
    local_blocks: int = 2,
) -> torch.Tensor:
    r"""Choose the T blocks every query attends to in the selected branch.

    For a query at position t the candidates are its causal blocks j <= t // BS. The first
    `init_blocks` blocks and the `local_blocks` blocks ending at its own block are always kept (they
    count within T); the other slots go to the highest-scoring remaining causal blocks. Slots are
    ordered: forced blocks first (in no particular order), then the rest by decreasing score, then
    -1 for every slot left empty when the query has fewer than T causal blocks. Entries are distinct.

    Args:
        scores: [N, H, NB] block scores (e.g. from selection_scores_ref); NaN ranks lowest.
        cu_seqlens: int32 [B + 1] or None for one sequence.
        block_size: BS. topk: T >= init_blocks + local_blocks.
    Returns:
        block_indices int32 [N, H, T], block ids counted from the start of the query's sequence.
    """
    check_selection(block_size, topk, init_blocks, local_blocks)
    if not isinstance(scores, torch.Tensor) or scores.dim() != 3 or scores.shape[0] < 1:
        raise ValueError(f"argument `scores` must be [N, H, NB], got {getattr(scores, 'shape', scores)!r}")
    n = scores.shape[0]
    check_cu_seqlens(cu_seqlens, n)
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, n], dtype=torch.int32, device=scores.device)
    pos, seq_len = token_positions(cu_seqlens.to(scores.device), n)
    need = int(((seq_len.max() + block_size - 1) // block_size))
    if scores.shape[2] < need:
        raise ValueError(f"argument `scores` must have NB >= ceil(max_seqlen / block_size) = {need} "
                         f"blocks, got {scores.shape[2]}")
    out = [select_chunk(scores[c0:c0 + _CHUNK], pos[c0:c0 + _CHUNK], block_size, topk, init_blocks, local_blocks)
           for c0 in range(0, n, _CHUNK)]
    return torch.cat(out)


@torch.no_grad()
def select_blocks_from_compressed_ref(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    cu_seqlens_cmp: Optional[torch.Tensor],
    kernel_size: int = 32,
    kernel_stride: int = 16,
    block_size: int = 64,
    topk: int = 16,
    init_blocks: int = 1,
    local_blocks: int = 2,
    scale: Optional[float] = None,
    lse: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""select_blocks_ref(selection_scores_ref(q, k_cmp, lse, ...), ...) fused per chunk of queries,
    so the [N, H, NB] scores never exist at once. No gradient.

    Args:
        q: [N, HQ, D]; k_cmp: [N_cmp, H, D] (any compression); cu_seqlens, cu_seqlens_cmp: int32
            [B + 1] (None for both = one sequence).
        kernel_size, kernel_stride, block_size, topk, init_blocks, local_blocks: as in NSA
            (stride | kernel_size, stride | BS, kernel_size <= BS, T >= init + local).
        scale: defaults to D ** -0.5. lse: float32 [HQ, N] of the compressed attention, or None to
            compute it here from the same logits.
    Returns:
        block_indices int32 [N, H, T] (slot order as in select_blocks_ref).
    """
    check_block_mapping(kernel_size, kernel_stride, block_size)
    check_selection(block_size, topk, init_blocks, local_blocks)
    cu_seqlens, cu_seqlens_cmp, scale = check_compressed_args(q, k_cmp, cu_seqlens, cu_seqlens_cmp,
                                                              kernel_size, kernel_stride, scale)
    n, hq, _ = q.shape
    if lse is not None and (not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (hq, n)):
        raise ValueError(f"argument `lse` must be [HQ={hq}, N={n}] or None, got {getattr(lse, 'shape', lse)!r}")
    layout = compressed_layout(cu_seqlens, cu_seqlens_cmp, n, kernel_size, kernel_stride)
    num_blocks = (layout.max_len + block_size - 1) // block_size
    compute = compute_dtype(q.dtype)
    qc, kc = q.to(compute), k_cmp.to(compute)
    lse_t = None if lse is None else lse.t()
    out = []
    for c0, c1, lo, hi in layout.chunks(hq):
        scores = chunk_selection_scores(qc, kc, None if lse is None else lse_t[c0:c1], layout, c0, c1, lo, hi,
                                        scale, kernel_size, kernel_stride, block_size, num_blocks)
        out.append(select_chunk(scores, layout.pos[c0:c1], block_size, topk, init_blocks, local_blocks))
    return torch.cat(out)


@torch.no_grad()
def nsa_block_indices_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor] = None,
    kernel_size: int = 32,
    kernel_stride: int = 16,
    block_size: int = 64,
    topk: int = 16,
    init_blocks: int = 1,
    local_blocks: int = 2,
    scale: Optional[float] = None,
) -> torch.Tensor:
    r"""block_indices from the NSA compression path with mean-pooled keys (what benchmarks use).

    k_cmp = compress_kv(k) (mean pooling), then select_blocks_from_compressed_ref: compressed
    softmax -> block scores -> top-n, a chunk of queries at a time. No gradient.

    Args:
        q: [N, HQ, D]; k: [N, H, D]; cu_seqlens: int32 [B + 1] or None.
        kernel_size, kernel_stride, block_size, topk, init_blocks, local_blocks: as in NSA
            (stride | kernel_size, stride | BS, kernel_size <= BS, T >= init + local).
        scale: defaults to D ** -0.5.
    Returns:
        block_indices int32 [N, H, T] (slot order as in select_blocks_ref).
    """
    check_block_mapping(kernel_size, kernel_stride, block_size)
    check_selection(block_size, topk, init_blocks, local_blocks)
    if not isinstance(k, torch.Tensor) or k.dim() != 3:
        raise ValueError(f"argument `k` must be [N, H, D], got {getattr(k, 'shape', k)!r}")
    if isinstance(q, torch.Tensor) and q.dim() == 3 and k.shape[0] != q.shape[0]:
        raise ValueError(f"argument `k` must have q's N={q.shape[0]} rows, got {k.shape[0]}")
    k_cmp, cu_cmp = compress_kv(k, cu_seqlens, kernel_size, kernel_stride)
    return select_blocks_from_compressed_ref(q, k_cmp, cu_seqlens, cu_cmp, kernel_size, kernel_stride,
                                             block_size, topk, init_blocks, local_blocks, scale)
