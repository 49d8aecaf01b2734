"""Compressed-branch attention of NSA (queries over their sequence's summaries), forward and backward.

CUDA: compiled FlexAttention over q [1, HQ, N, D] and the packed summaries [1, H, N_cmp, D] with a
cached block mask; query q sees the packed summaries [lo[q], hi[q]) = the first
`visible_compressed(pos)` summaries of its own sequence (analytic bounds for one sequence).
Other devices and float64: nsa_baseline.branches falls back to the reference;
`compressed_attention_flex` runs eager FlexAttention on CPU (forward only) so that tests check the
mask there too.
"""
from __future__ import annotations

from typing import Optional

import torch

from nsa_baseline.checks import check_compressed_args, check_scale
from nsa_baseline.ops.flex import band_mask_mod, cached_block_mask, flex_attention_packed, require_flex, tensor_key
from nsa_baseline.utils.compressed_varlen import token_compressed_offsets, visible_compressed
from nsa_baseline.utils.varlen import token_positions

_ARGS_CACHE: dict[tuple, tuple] = {}


def checked_compressed_args(q, k_cmp, v_cmp, cu_seqlens, cu_seqlens_cmp, kernel_size, kernel_stride, scale):
    """check_compressed_args (which reads cu_seqlens on the host), once per cu_seqlens tensor."""
    key = (tensor_key(cu_seqlens), tensor_key(cu_seqlens_cmp), tuple(q.shape), tuple(k_cmp.shape),
           tuple(v_cmp.shape) if v_cmp is not None else None, kernel_size, kernel_stride, str(q.device))
    hit = _ARGS_CACHE.get(key)
    if hit is not None:  # same shapes and the same (unmodified) cu_seqlens tensors: checked before
        return hit[1], hit[2], check_scale(scale, q.shape[2])
    cu, cu_cmp, scale = check_compressed_args(q, k_cmp, cu_seqlens, cu_seqlens_cmp, kernel_size,
                                              kernel_stride, scale, v_cmp)
    if len(_ARGS_CACHE) > 64:
        _ARGS_CACHE.clear()
    _ARGS_CACHE[key] = ((cu_seqlens, cu_seqlens_cmp), cu, cu_cmp)  # holds the tensors: ids stay unique
    return cu, cu_cmp, scale


def compressed_block_mask(n: int, n_cmp: int, cu_seqlens: Optional[torch.Tensor], cu: torch.Tensor,
                          cu_cmp: torch.Tensor, kernel_size: int, kernel_stride: int, device):
    """Block mask of the compressed causal rule (+ same sequence), cached per cu_seqlens tensor."""
    key = ("cmp", n, n_cmp, kernel_size, kernel_stride, tensor_key(cu_seqlens), str(device))

    def build():
        if cu.numel() == 2:
            # summary i visible to query t iff i * stride + kernel_size - 1 <= t
            def mask_mod(b, h, q_idx, kv_idx):
                return kv_idx * kernel_stride + (kernel_size - 1) <= q_idx
            return mask_mod, n, n_cmp
        pos, _ = token_positions(cu, n)
        lo = token_compressed_offsets(cu, cu_cmp, n)
        hi = lo + visible_compressed(pos, kernel_size, kernel_stride)
        return band_mask_mod(lo.int(), hi.int()), n, n_cmp

    return cached_block_mask(key, build, device, keep=cu_seqlens)


def compressed_attention_flex(q, k_cmp, v_cmp, cu_seqlens, cu_seqlens_cmp, kernel_size=32,
                               kernel_stride=16, scale=None):
    """The FlexAttention path on any device (CPU: eager, forward only)."""
    cu, cu_cmp, scale = checked_compressed_args(q, k_cmp, v_cmp, cu_seqlens, cu_seqlens_cmp, kernel_size,
                                                kernel_stride, scale)
    n, hq, d = q.shape
    n_cmp = k_cmp.shape[0]
    if n_cmp == 0:  # no sequence is long enough for a summary: nothing is visible
        lse = torch.full((hq, n), float("-inf"), dtype=torch.float32, device=q.device)
        return q * 0 + 0 * (k_cmp.sum() + v_cmp.sum()), lse
    mask = compressed_block_mask(n, n_cmp, cu_seqlens, cu, cu_cmp, kernel_size, kernel_stride, q.device)
    return flex_attention_packed(q, k_cmp, v_cmp, mask, scale, return_lse=True)


def compressed_attention(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    cu_seqlens_cmp: Optional[torch.Tensor],
    kernel_size: int = 32,
    kernel_stride: int = 16,
    scale: Optional[float] = None,
):
    r"""Causal attention of every query over its sequence's compressed keys. Differentiable w.r.t.
    q, k_cmp and v_cmp.

    CUDA (fp16/bf16/fp32): compiled FlexAttention with a cached block mask (no host sync after the
    first call with a given cu_seqlens tensor).

    Args:
        q: [N, HQ, D]; k_cmp, v_cmp: [N_cmp, H, D] from compress_kv; HQ = G * H and query head hq
            uses kv head hq // G.
        cu_seqlens: int32 [B + 1] of the tokens; cu_seqlens_cmp: int32 [B + 1] of the summaries
            (None for both = one sequence). kernel_size, kernel_stride: as given to compress_kv.
        scale: defaults to D ** -0.5.
    Returns:
        o [N, HQ, D] in q.dtype and lse float32 [HQ, N] (natural log). Summary i is visible to the
        query at position t iff i * stride + kernel_size - 1 <= t; a query that sees none gets o = 0,
        lse = -inf and a zero gradient.
    """
    require_flex(q, "nsa_baseline.branches.compressed_attention")
    return compressed_attention_flex(q, k_cmp, v_cmp, cu_seqlens, cu_seqlens_cmp, kernel_size,
                                      kernel_stride, scale)
