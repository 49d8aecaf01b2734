"""Block selection of NSA on the GPU: the entry points around the fused Triton kernel
(nsa_baseline.ops.selection_kernel) and top-T over given scores (`select_blocks`: torch.topk a chunk
of rows at a time, nsa_baseline.utils.topk's rule).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from nsa_baseline.checks import check_block_mapping, check_cu_seqlens, check_selection, fail
from nsa_baseline.contract import kernels_serve
from nsa_baseline.ops.compressed import checked_compressed_args
from nsa_baseline.ops.compression import compress_kv
from nsa_baseline.ops.flex import tensor_key
from nsa_baseline.ops.selection_kernel import selection_scores_fwd
from nsa_baseline.utils.topk import select_chunk
from nsa_baseline.utils.triton_utils import next_pow2
from nsa_baseline.utils.varlen import (sequence_lengths, single_sequence_cu_seqlens, token_positions,
                                      token_sequence_ids)

# fp32 elements of one chunk's [rows, H, NB] scores inside select_blocks (256 MiB).
SCORE_BUDGET = 1 << 26
_MAXLEN_CACHE: dict[tuple, tuple] = {}


def max_seqlen(cu_seqlens: Optional[torch.Tensor], n: int) -> int:
    """Longest sequence (one host read per cu_seqlens tensor, cached)."""
    if cu_seqlens is None or cu_seqlens.numel() == 2:
        return n
    key = tensor_key(cu_seqlens)
    hit = _MAXLEN_CACHE.get(key)
    if hit is None:
        if len(_MAXLEN_CACHE) > 64:
            _MAXLEN_CACHE.clear()
        hit = (cu_seqlens, int(sequence_lengths(cu_seqlens).max()))
        _MAXLEN_CACHE[key] = hit
    return hit[1]


def selection_kernel_supported(q: torch.Tensor, kernel_size: int, kernel_stride: int, block_size: int) -> bool:
    """Whether the Triton selection kernel serves this call: CUDA, or the interpreter for fp32 / fp16
    (its bf16 tl.dot is broken); BS / stride a power of two and kernel_size <= BS."""
    r, c = block_size // kernel_stride, kernel_size // kernel_stride
    pow2 = r == next_pow2(r)
    return kernels_serve(q) and pow2 and c <= r


def require_selection_kernel(q: torch.Tensor, kernel_size: int, kernel_stride: int, block_size: int,
                             fallback: str) -> None:
    if not selection_kernel_supported(q, kernel_size, kernel_stride, block_size):
        fail("q", f"({q.dtype} on {q.device}, kernel {kernel_size}/{kernel_stride}, block_size {block_size}) is "
             "not served by the Triton selection kernel (CUDA or the interpreter for fp32/fp16, block_size / "
             f"kernel_stride a power of two); {fallback} falls back to the reference")


@torch.no_grad()
def selection_scores(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    cu_seqlens_cmp: Optional[torch.Tensor],
    kernel_size: int,
    kernel_stride: int,
    block_size: int,
    scale: Optional[float] = None,
) -> torch.Tensor:
    r"""Importance of every selection block for every query, from the compressed softmax (NSA eq. 9):
    p_cmp = exp(q . k_cmp * scale - lse) on the visible summaries, mapped to blocks by
    p_slc[j] = sum_{m < BS/stride} sum_{n < kernel_size/stride} p_cmp[(BS/stride) * j + m - n] and
    summed over the G query heads of each kv head. No gradient.

    CUDA (and the Triton interpreter for fp32/fp16): one Triton kernel, never materialising
    [N, N_cmp] (BS / stride must be a power of two); nsa_baseline.branches falls back to the
    reference elsewhere.

    Args:
        q: [N, HQ, D]; k_cmp: [N_cmp, H, D]; lse: float32 [HQ, N] from compressed_attention.
        cu_seqlens, cu_seqlens_cmp: int32 [B + 1] (None for both = one sequence).
        kernel_size, kernel_stride, block_size: stride | kernel_size, stride | BS, kernel_size <= BS.
        scale: defaults to D ** -0.5.
    Returns:
        scores float32 [N, H, NB], NB = ceil(max_seqlen / BS): -inf past the end of the query's
        sequence, 0 for blocks after its own block.
    """
    check_block_mapping(kernel_size, kernel_stride, block_size)
    require_selection_kernel(q, kernel_size, kernel_stride, block_size, "nsa_baseline.branches.selection_scores")
    cu, cu_cmp, scale = checked_compressed_args(q, k_cmp, None, cu_seqlens, cu_seqlens_cmp, kernel_size,
                                                kernel_stride, scale)
    n, hq, _ = q.shape
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (hq, n):
        raise ValueError(f"argument `lse` must be [HQ={hq}, N={n}], got {getattr(lse, 'shape', lse)!r}")
    num_blocks = triton.cdiv(max_seqlen(cu_seqlens, n), block_size)
    tok_seq = token_sequence_ids(cu, n).int()
    return selection_scores_fwd(q, k_cmp, lse.float().contiguous(), cu, cu_cmp, tok_seq, 0, n, num_blocks,
                                scale, kernel_size, kernel_stride, block_size)


@torch.no_grad()
def select_blocks(
    scores: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    block_size: int,
    topk: int,
    init_blocks: int = 1,
    local_blocks: int = 2,
) -> torch.Tensor:
    r"""Choose the T blocks every query attends to (same set per row as `select_blocks_ref`).

    Candidates of the query at position t are its causal blocks j <= t // BS; the first
    `init_blocks` and the `local_blocks` ending at its own block are always kept (within T), the
    other slots get the highest-scoring causal blocks, -1 fills what is left. Slots: forced first,
    then by decreasing score. torch.topk on any device (ranked in float32 unless the scores are
    float64), a chunk of rows at a time, no host sync (NB is not checked against cu_seqlens).

    Args:
        scores: [N, H, NB] float block scores. cu_seqlens: int32 [B + 1] or None.
        block_size: BS. topk: T >= init_blocks + local_blocks.
    Returns:
        block_indices int32 [N, H, T], block ids counted from the start of the query's sequence.
    """
    check_selection(block_size, topk, init_blocks, local_blocks)
    if not isinstance(scores, torch.Tensor) or scores.dim() != 3 or scores.shape[0] < 1:
        raise ValueError(f"argument `scores` must be [N, H, NB], got {getattr(scores, 'shape', scores)!r}")
    n, h, nb = scores.shape
    check_cu_seqlens(cu_seqlens)  # no value check here: it would cost a host sync
    if cu_seqlens is None:
        cu_seqlens = single_sequence_cu_seqlens(n, scores.device)
    pos, _ = token_positions(cu_seqlens.to(scores.device), n)
    chunk = max(1, SCORE_BUDGET // max(1, h * nb))
    out = torch.empty(n, h, topk, dtype=torch.int32, device=scores.device)
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        out[c0:c1] = select_chunk(scores[c0:c1], pos[c0:c1], block_size, topk, init_blocks, local_blocks)
    return out


@torch.no_grad()
def select_blocks_from_compressed(
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
    r"""select_blocks(selection_scores(q, k_cmp, lse, ...), ...) in one kernel: each row's top-T set is
    kept while its block scores are made, so no scores reach memory. No gradient.
    CUDA / interpreter (fp32, fp16): the Triton scores kernel in top-T mode (computing the lse
    in-kernel when lse is None); nsa_baseline.branches falls back to the reference elsewhere.

    Args:
        q: [N, HQ, D]; k_cmp: [N_cmp, H, D] (any compression); cu_seqlens, cu_seqlens_cmp: int32
            [B + 1] (None for both = one sequence).
        kernel_size, kernel_stride, block_size, topk, init_blocks, local_blocks: as in NSA
            (stride | kernel_size, stride | BS, kernel_size <= BS, T >= init + local).
        scale: defaults to D ** -0.5. lse: float32 [HQ, N] of the compressed attention, or None to
            compute it from the same logits.
    Returns:
        block_indices int32 [N, H, T] (slot order as in select_blocks).
    """
    check_block_mapping(kernel_size, kernel_stride, block_size)
    check_selection(block_size, topk, init_blocks, local_blocks)
    require_selection_kernel(q, kernel_size, kernel_stride, block_size,
                             "nsa_baseline.branches.select_blocks_from_compressed")
    cu, cu_cmp, scale = checked_compressed_args(q, k_cmp, None, cu_seqlens, cu_seqlens_cmp, kernel_size,
                                                kernel_stride, scale)
    n, hq, _ = q.shape
    if lse is not None:
        if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (hq, n):
            raise ValueError(f"argument `lse` must be [HQ={hq}, N={n}] or None, got {getattr(lse, 'shape', lse)!r}")
        lse = lse.detach().float().contiguous()
    num_blocks = triton.cdiv(max_seqlen(cu_seqlens, n), block_size)
    tok_seq = token_sequence_ids(cu, n).int()
    return selection_scores_fwd(q, k_cmp, lse, cu, cu_cmp, tok_seq, 0, n, num_blocks, scale, kernel_size,
                                kernel_stride, block_size, topk=topk, init_blocks=init_blocks,
                                local_blocks=local_blocks)


@torch.no_grad()
def nsa_block_indices(
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
    r"""block_indices from the NSA compression path with mean-pooled keys (what benchmarks use):
    compress_kv(k) -> select_blocks_from_compressed(lse=None), i.e. compressed lse, selection
    scores and top-T in one Triton kernel. No gradient. CUDA / interpreter (fp32, fp16);
    nsa_baseline.branches falls back to the reference elsewhere.

    Args:
        q: [N, HQ, D]; k: [N, H, D]; cu_seqlens: int32 [B + 1] or None.
        kernel_size, kernel_stride, block_size, topk, init_blocks, local_blocks: as in NSA.
        scale: defaults to D ** -0.5.
    Returns:
        block_indices int32 [N, H, T] (slot order as in select_blocks).
    """
    check_block_mapping(kernel_size, kernel_stride, block_size)
    check_selection(block_size, topk, init_blocks, local_blocks)
    require_selection_kernel(q, kernel_size, kernel_stride, block_size, "nsa_baseline.branches.nsa_block_indices")
    if not isinstance(k, torch.Tensor) or k.dim() != 3 or k.shape[0] != q.shape[0]:
        raise ValueError(f"argument `k` must be [N={q.shape[0]}, H, D], got {getattr(k, 'shape', k)!r}")
    k_cmp, cu_cmp = compress_kv(k, cu_seqlens, kernel_size, kernel_stride)
    return select_blocks_from_compressed(q, k_cmp, cu_seqlens, cu_cmp, kernel_size, kernel_stride, block_size,
                                         topk, init_blocks, local_blocks, scale)
