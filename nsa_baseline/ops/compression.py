"""Key/value compression of NSA on any device: one summary per kernel_size keys at kernel_stride.

Two paths, pure PyTorch and differentiable w.r.t. x, weight and pos_emb:
- block path (kernel_stride divides kernel_size into C <= kernel_stride blocks, as in NSA's 32/16):
  summaries as sums over stride-blocks read once, one GEMM (compression_blocks.py);
- gather path (any other stride, or C > stride, where the block path's [H, NB, C, D] products would
  outgrow x): every summary's kernel_size keys gathered, then a mean or one matmul; the gather reads
  each key kernel_size / stride times and its backward is an index_add.
Layouts are built on the device; the output size N_cmp needs one host read per cu_seqlens tensor
(cached, so repeated calls with the same tensor sync once; compression_layout.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from nsa_baseline.checks import check_compress_inputs
from nsa_baseline.ops.compression_blocks import compress_blocks
from nsa_baseline.ops.compression_layout import block_layout, gather_layout

# Summaries gathered at once on the gather path: bounds the [chunk, kernel_size, H, D] gather (~1 GiB
# in bf16 at H*D=512).
_GATHER_BUDGET = 1 << 29


def compress_kv(
    x: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor] = None,
    kernel_size: int = 32,
    kernel_stride: int = 16,
    weight: Optional[torch.Tensor] = None,
    pos_emb: Optional[torch.Tensor] = None,
):
    r"""Compress packed keys (or values) into overlapping block summaries (same maths as
    `nsa_baseline.reference.compress_kv`; runs on any device, differentiable).

    Args:
        x: [N, H, D] packed keys or values.
        cu_seqlens: int32 [B + 1], or None for one sequence.
        kernel_size, kernel_stride: summary length and step (stride <= kernel_size).
        weight: [kernel_size * D, D] (row k * D + d multiplies element d of the block's k-th key),
            or None for mean pooling.
        pos_emb: [kernel_size, D] intra-block position embedding added before the map (with weight).
    Returns:
        x_cmp [N_cmp, H, D] in x.dtype and cu_seqlens_cmp int32 [B + 1]. Summary i of a sequence
        covers its keys [i * stride, i * stride + kernel_size).
    """
    check_compress_inputs(x, cu_seqlens, kernel_size, kernel_stride, weight, pos_emb)
    from nsa_baseline.ops import compression_grad  # (it builds on this module)

    if compression_grad.in_place_compress_serves(x, weight):  # the module's fused path's kernels
        return compression_grad.InPlaceLinearCompress.apply(x, weight, pos_emb, cu_seqlens, kernel_size,
                                                           kernel_stride)
    n, h, d = x.shape
    if uses_block_path(kernel_size, kernel_stride) and (not x.is_cuda or n * h >= BLOCK_PATH_MIN_CUDA_ROWS):
        layout = block_layout(cu_seqlens, n, kernel_size, kernel_stride, x.device)
        if layout.num_cmp == 0:
            return _no_summaries(x), layout.cu_cmp
        return compress_blocks(x, layout, kernel_size, kernel_stride, weight, pos_emb), layout.cu_cmp
    return compress_gather(x, cu_seqlens, kernel_size, kernel_stride, weight, pos_emb)


# Below this many (token, KV head) rows the gather path is faster on the GPU. NVIDIA H200, bf16,
# D = 128, 32/16 (results/compression_bench): 16K x 4 heads: gather 1.24 ms fwd+bwd, blocks 2.64;
# 64K x 4: 2.81 / 2.39; 16K x 64: 10.3 / 2.62; 64K x 64: 44.0 / 9.72.
BLOCK_PATH_MIN_CUDA_ROWS = 1 << 18


def uses_block_path(kernel_size: int, kernel_stride: int) -> bool:
    """Whether compress_kv takes the block path: stride divides kernel_size in C <= stride blocks."""
    return kernel_size % kernel_stride == 0 and kernel_size // kernel_stride <= kernel_stride


def _no_summaries(x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros(0, *x.shape[1:]) + 0 * x.sum()  # keeps x in the graph (zero gradient)


def compress_gather(x, cu_seqlens, kernel_size, kernel_stride, weight=None, pos_emb=None):
    """compress_kv's gather path (any stride; inputs already checked): the summaries' keys gathered a
    chunk at a time, then a mean or a matmul with pos_emb added to the gathered keys."""
    n, h, d = x.shape
    cu_cmp, first = gather_layout(cu_seqlens, n, kernel_size, kernel_stride, x.device)
    n_cmp = first.numel()
    if n_cmp == 0:
        return _no_summaries(x), cu_cmp
    chunk = max(1, _GATHER_BUDGET // (kernel_size * h * d))
    offs = torch.arange(kernel_size, device=x.device)
    outs = []
    for c0 in range(0, n_cmp, chunk):
        c1 = min(n_cmp, c0 + chunk)
        rows = (first[c0:c1, None] + offs).flatten()  # [c * kernel_size]
        outs.append(compress_spans(x.index_select(0, rows).view(c1 - c0, kernel_size, h, d), weight, pos_emb))
    x_cmp = outs[0] if len(outs) == 1 else torch.cat(outs)
    return x_cmp, cu_cmp


def compress_spans(blocks: torch.Tensor, weight: Optional[torch.Tensor] = None,
                   pos_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""One summary per gathered span: blocks [c, kernel_size, H, D] -> [c, H, D] in blocks.dtype
    (compress_kv's maths; the decode step compresses the spans it completes with it too)."""
    c, ks, h, d = blocks.shape
    # Low precision inputs are reduced in fp32 (mean) or multiplied on tensor cores with fp32
    # accumulation (weight); fp64 stays fp64.
    if weight is None:
        acc = torch.float64 if blocks.dtype == torch.float64 else torch.float32
        return blocks.sum(dim=1, dtype=acc).div_(ks).to(blocks.dtype)
    blocks = (blocks + pos_emb.to(blocks.dtype)[None, :, None, :]).transpose(1, 2)  # [c, H, ks, D]
    return blocks.reshape(c, h, ks * d) @ weight.to(blocks.dtype)
