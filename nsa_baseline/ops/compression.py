"""Key/value compression of NSA on any device: one summary per kernel_size keys at kernel_stride.

One gather of every summary's keys through a precomputed row index ([N_cmp, kernel_size] packed
rows, cached per cu_seqlens), then a mean or one matmul with the learnable weight. Pure PyTorch and
differentiable w.r.t. x, weight and pos_emb (the gather's backward is an index_add).
The index and cu_seqlens_cmp are built on the device; the output size N_cmp needs one host read of
cu_seqlens_cmp per cu_seqlens tensor (cached, so repeated calls with the same tensor sync once).
"""
from __future__ import annotations

from typing import Optional

import torch

from nsa_baseline.checks import check_compress_inputs
from nsa_baseline.utils.compressed_varlen import compressed_cu_seqlens
from nsa_baseline.utils.varlen import single_sequence_cu_seqlens, token_sequence_ids

# (id, data_ptr, version, N, kernel_size, stride, device) -> (cu_seqlens_cmp, first row of every summary)
_LAYOUT_CACHE: dict[tuple, tuple] = {}
# Summaries gathered at once: bounds the [chunk, kernel_size, H, D] gather (~1 GiB in bf16 at H*D=512).
_GATHER_BUDGET = 1 << 29


def _layout_key(cu_seqlens: Optional[torch.Tensor], *extra) -> tuple:
    if cu_seqlens is None:
        return (None,) + extra
    return (id(cu_seqlens), cu_seqlens.data_ptr(), cu_seqlens._version, cu_seqlens.numel()) + extra


def compressed_layout(cu_seqlens: Optional[torch.Tensor], num_tokens: int, kernel_size: int,
                      kernel_stride: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cu_seqlens_cmp int32 [B + 1], first int64 [N_cmp]): the packed summaries' cu_seqlens and the
    packed row of each summary's first key. Cached per cu_seqlens tensor (identity + version)."""
    key = _layout_key(cu_seqlens, num_tokens, kernel_size, kernel_stride, str(device))
    hit = _LAYOUT_CACHE.get(key)
    if hit is not None:
        return hit[1], hit[2]
    keep = cu_seqlens  # held by the cache entry so that its id is not reused while cached
    if cu_seqlens is None:
        cu_seqlens = single_sequence_cu_seqlens(num_tokens, torch.device(device))
    cu_seqlens = cu_seqlens.to(device)
    cu_cmp = compressed_cu_seqlens(cu_seqlens, kernel_size, kernel_stride)
    n_cmp = int(cu_cmp[-1])  # the one host read: the output's size
    seq = token_sequence_ids(cu_cmp, n_cmp)
    local = torch.arange(n_cmp, device=device) - cu_cmp.long()[seq]
    first = cu_seqlens.long()[seq] + local * kernel_stride  # [N_cmp]
    if len(_LAYOUT_CACHE) > 64:
        _LAYOUT_CACHE.clear()
    _LAYOUT_CACHE[key] = (keep, cu_cmp, first)
    return cu_cmp, first


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
    n, h, d = x.shape
    cu_cmp, first = compressed_layout(cu_seqlens, n, kernel_size, kernel_stride, x.device)
    n_cmp = first.numel()
    if n_cmp == 0:
        return x.new_zeros(0, h, d) + 0 * x.sum(), cu_cmp  # keeps x in the graph (zero gradient)
    chunk = max(1, _GATHER_BUDGET // (kernel_size * h * d))
    offs = torch.arange(kernel_size, device=x.device)
    outs = []
    for c0 in range(0, n_cmp, chunk):
        c1 = min(n_cmp, c0 + chunk)
        rows = (first[c0:c1, None] + offs).flatten()  # [c * kernel_size]
        outs.append(compress_blocks(x.index_select(0, rows).view(c1 - c0, kernel_size, h, d), weight, pos_emb))
    x_cmp = outs[0] if len(outs) == 1 else torch.cat(outs)
    return x_cmp, cu_cmp


def compress_blocks(blocks: torch.Tensor, weight: Optional[torch.Tensor] = None,
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
