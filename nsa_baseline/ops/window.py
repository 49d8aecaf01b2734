"""Sliding-window and full causal attention through PyTorch's fused attention kernels (CUDA), forward
and backward: the dense baseline, and the window branch's fallback where our Triton kernels
(nsa_baseline.ops.window_triton, what the module runs) do not serve a call.

`torch.compile(flex_attention)` with a band block mask built once per (lengths, cu_seqlens tensor,
window) and cached (nsa_baseline.ops.flex), GQA through enable_gqa; full causal attention over one
sequence without lse goes to `scaled_dot_product_attention(is_causal=True, enable_gqa=True)` instead.
Other devices and float64: nsa_baseline.branches falls back to the reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from nsa_baseline.checks import check_int, check_qkv
from nsa_baseline.ops.flex import band_mask_mod, cached_block_mask, flex_attention_packed, require_flex, tensor_key
from nsa_baseline.utils.varlen import token_positions


def band_block_mask(n: int, cu_seqlens: Optional[torch.Tensor], window: Optional[int], device):
    """Causal (window=None) or sliding-window block mask over n packed tokens, cached."""
    key = ("band", n, window, tensor_key(cu_seqlens), str(device))

    def build():
        if cu_seqlens is None or cu_seqlens.numel() == 2:
            if window is None:
                return (lambda b, h, q_idx, kv_idx: kv_idx <= q_idx), n, n
            return (lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) & (q_idx - kv_idx < window)), n, n
        cu = cu_seqlens.to(device)
        pos, _ = token_positions(cu, n)
        rows = torch.arange(n, device=device)
        lo = rows - pos if window is None else torch.maximum(rows - pos, rows - window + 1)
        return band_mask_mod(lo.int(), (rows + 1).int()), n, n

    return cached_block_mask(key, build, device, keep=cu_seqlens)


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    r"""Causal sliding-window attention: key s is visible to query t iff t - window_size < s <= t
    inside the same sequence (NSA's window branch). Differentiable w.r.t. q, k, v.

    CUDA (fp16/bf16/fp32): compiled FlexAttention with a cached sliding-window block mask.

    Args:
        q: [N, HQ, D]; k, v: [N, H, D]; HQ = G * H, query head hq uses kv head hq // G.
        window_size: positive int. cu_seqlens: int32 [B + 1] or None. scale: defaults to D ** -0.5.
    Returns:
        o [N, HQ, D] in q.dtype, and with return_lse the float32 lse [HQ, N] (natural log).
    """
    require_flex(q, "nsa_baseline.branches.sliding_window_attention")
    check_int("window_size", window_size)
    scale = check_qkv(q, k, v, cu_seqlens, scale)
    mask = band_block_mask(q.shape[0], cu_seqlens, window_size, q.device)
    return flex_attention_packed(q, k, v, mask, scale, return_lse)


def full_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    r"""Full causal attention inside each sequence (the dense baseline). Differentiable.

    CUDA: one sequence without lse -> `scaled_dot_product_attention(is_causal=True, enable_gqa=True)`
    (FlashAttention; fp32 with G > 1 excepted); packed sequences or return_lse -> compiled
    FlexAttention with a cached causal document mask.

    Args:
        q: [N, HQ, D]; k, v: [N, H, D]; HQ = G * H. cu_seqlens: int32 [B + 1] or None.
        scale: defaults to D ** -0.5.
    Returns:
        o [N, HQ, D] in q.dtype, and with return_lse the float32 lse [HQ, N] (natural log).
    """
    require_flex(q, "nsa_baseline.branches.full_attention")
    scale = check_qkv(q, k, v, cu_seqlens, scale)
    single = cu_seqlens is None or cu_seqlens.numel() == 2
    # enable_gqa is honoured by the flash backend only (fp16/bf16, D <= 256); anything else would
    # fall to the O(N^2)-memory math backend, so it goes through FlexAttention instead.
    gqa = q.shape[1] != k.shape[1]
    flash_ok = q.dtype in (torch.float16, torch.bfloat16) and q.shape[2] <= 256 and \
        torch.backends.cuda.flash_sdp_enabled()
    if single and not return_lse and (flash_ok or not gqa):
        qf, kf, vf = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, scale=scale, enable_gqa=gqa)
        return o[0].transpose(0, 1).contiguous()
    mask = band_block_mask(q.shape[0], cu_seqlens, None, q.device)
    return flex_attention_packed(q, k, v, mask, scale, return_lse)
