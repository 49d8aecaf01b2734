"""The NSA branches other than selected attention, and their gated sum, each on the GPU where its
kernel serves the call and through the PyTorch reference elsewhere (CPU without the interpreter,
float64, strides the selection kernel does not tile). This is where the fast paths (nsa_baseline.ops, which never import
the reference) meet their fallback; the module's "nsa", "fsa" and "auto" backends call these.
"""
from __future__ import annotations

from typing import Optional

import torch

from nsa_baseline import reference
from nsa_baseline.checks import check_block_mapping
from nsa_baseline.ops import selection, window
from nsa_baseline.ops.compressed import checked_compressed_args
from nsa_baseline.ops.compressed_sdpa import attend_routed, route_bounds_hold, routed_sequences
from nsa_baseline.ops.compressed_triton import compressed_attention_triton, compressed_triton_supported
from nsa_baseline.ops.compression import compress_kv
from nsa_baseline.ops.flex import use_flex
from nsa_baseline.ops.gated_sum import gated_sum as gated_sum_triton, gated_sum_supported
from nsa_baseline.ops.selection import select_blocks
from nsa_baseline.ops.window_triton import sliding_window_attention_triton, window_triton_supported

__all__ = ["compress_kv", "compressed_attention", "full_attention", "gated_sum", "nsa_block_indices",
           "select_blocks", "select_blocks_from_compressed", "selection_scores", "sliding_window_attention"]


def compressed_attention(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
                         cu_seqlens: Optional[torch.Tensor], cu_seqlens_cmp: Optional[torch.Tensor],
                         kernel_size: int = 32, kernel_stride: int = 16, scale: Optional[float] = None):
    """Our Triton kernels (nsa_baseline.ops.compressed_triton) where they serve the call (CUDA, or the
    interpreter for fp32 / fp16), else the reference. On the H100 they beat the FlexAttention path
    (nsa_baseline.ops.compressed) at 9 of 10 measured points and need no per-shape compile
    (results/compressed_bench/README.md). From fused_attention.COMPRESSED_SDPA_MIN_TOKENS tokens on,
    PyTorch's fused attention (ops/compressed_sdpa.py), as the module's fused path does."""
    if not compressed_triton_supported(q):
        return reference.compressed_attention_ref(q, k_cmp, v_cmp, cu_seqlens, cu_seqlens_cmp, kernel_size,
                                                  kernel_stride, scale)
    from nsa_baseline import fused_attention  # (it imports the ops this module wraps)

    limit = fused_attention.COMPRESSED_SDPA_MIN_TOKENS
    if route_bounds_hold(q.shape[0], q.shape[1], limit):  # (no host read of cu_seqlens outside the bounds)
        cu, cu_cmp, scale_ = checked_compressed_args(q, k_cmp, v_cmp, cu_seqlens, cu_seqlens_cmp, kernel_size,
                                                     kernel_stride, scale)
        seqs = routed_sequences(q, k_cmp, cu, cu_cmp, kernel_size, kernel_stride, limit)
        if seqs is not None:
            return attend_routed(q, k_cmp, v_cmp, kernel_size, kernel_stride, scale_, seqs)
    return compressed_attention_triton(q, k_cmp, v_cmp, cu_seqlens, cu_seqlens_cmp, kernel_size, kernel_stride,
                                       scale)


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: int,
                             cu_seqlens: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                             return_lse: bool = False):
    """Our Triton kernels (nsa_baseline.ops.window_triton) where they serve the call (CUDA, or the
    interpreter for fp32 / fp16), else FlexAttention on CUDA, else the reference. On the H200 at 64K
    they take 0.95x / 1.13x / 1.14x of Flex's fwd+bwd time at g = 1 / 4 / 16 (results/window_bench)
    and need no block-mask compile per sequence layout (Flex's varlen mask compiled for minutes on a
    cold machine)."""
    if window_triton_supported(q):
        fn = sliding_window_attention_triton
    else:
        fn = window.sliding_window_attention if use_flex(q) else reference.sliding_window_attention_ref
    return fn(q, k, v, window_size, cu_seqlens, scale, return_lse)


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                   scale: Optional[float] = None, return_lse: bool = False):
    """nsa_baseline.ops.full_attention on CUDA (fp16/bf16/fp32), else the reference."""
    fn = window.full_attention if use_flex(q) else reference.full_attention_ref
    return fn(q, k, v, cu_seqlens, scale, return_lse)


def _selection_kernel(q, kernel_size, kernel_stride, block_size) -> bool:
    check_block_mapping(kernel_size, kernel_stride, block_size)  # before the sizes decide the path
    return isinstance(q, torch.Tensor) and selection.selection_kernel_supported(q, kernel_size, kernel_stride,
                                                                                block_size)


def selection_scores(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                     cu_seqlens_cmp: Optional[torch.Tensor], kernel_size: int, kernel_stride: int,
                     block_size: int, scale: Optional[float] = None) -> torch.Tensor:
    """nsa_baseline.ops.selection_scores where its kernel serves the call, else the reference."""
    fast = _selection_kernel(q, kernel_size, kernel_stride, block_size)
    fn = selection.selection_scores if fast else reference.selection_scores_ref
    return fn(q, k_cmp, lse, cu_seqlens, cu_seqlens_cmp, kernel_size, kernel_stride, block_size, scale)


def select_blocks_from_compressed(q: torch.Tensor, k_cmp: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                                  cu_seqlens_cmp: Optional[torch.Tensor], kernel_size: int = 32,
                                  kernel_stride: int = 16, block_size: int = 64, topk: int = 16,
                                  init_blocks: int = 1, local_blocks: int = 2, scale: Optional[float] = None,
                                  lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """nsa_baseline.ops.select_blocks_from_compressed where its kernel serves the call, else the reference."""
    fast = _selection_kernel(q, kernel_size, kernel_stride, block_size)
    fn = selection.select_blocks_from_compressed if fast else reference.select_blocks_from_compressed_ref
    return fn(q, k_cmp, cu_seqlens, cu_seqlens_cmp, kernel_size, kernel_stride, block_size, topk, init_blocks,
              local_blocks, scale, lse)


def nsa_block_indices(q: torch.Tensor, k: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                      kernel_size: int = 32, kernel_stride: int = 16, block_size: int = 64, topk: int = 16,
                      init_blocks: int = 1, local_blocks: int = 2, scale: Optional[float] = None) -> torch.Tensor:
    """nsa_baseline.ops.nsa_block_indices where its kernel serves the call, else the reference."""
    fast = _selection_kernel(q, kernel_size, kernel_stride, block_size)
    fn = selection.nsa_block_indices if fast else reference.nsa_block_indices_ref
    return fn(q, k, cu_seqlens, kernel_size, kernel_stride, block_size, topk, init_blocks, local_blocks, scale)


def gated_sum(gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor) -> torch.Tensor:
    """nsa_baseline.ops.gated_sum where its kernels serve the call (CUDA, or the interpreter for fp32 /
    fp16), else the reference (the eager expression)."""
    fn = gated_sum_triton if gated_sum_supported(gates, o_cmp, o_slc, o_win) else reference.gated_sum_ref
    return fn(gates, o_cmp, o_slc, o_win)
