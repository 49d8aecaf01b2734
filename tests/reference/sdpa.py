"""Independent oracles for the reference tests: torch SDPA run one sequence at a time."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def seq_bounds(cu_seqlens: torch.Tensor):
    values = cu_seqlens.tolist()
    return list(zip(values[:-1], values[1:]))


def sdpa_packed(q, k, v, cu_seqlens, scale=None, window=None):
    """o [N, HQ, D]: causal (optionally sliding-window) attention of each sequence via torch SDPA."""
    g = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    for a, b in seq_bounds(cu_seqlens):
        if b == a:
            continue
        qq = q[a:b].transpose(0, 1)
        kk = k[a:b].repeat_interleave(g, dim=1).transpose(0, 1)
        vv = v[a:b].repeat_interleave(g, dim=1).transpose(0, 1)
        t = torch.arange(b - a)
        mask = t[None, :] <= t[:, None]
        if window is not None:
            mask &= t[None, :] > t[:, None] - window
        out[a:b] = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale).transpose(0, 1)
    return out


def cu(*lengths: int) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def qkv(n: int, hq: int, h: int, d: int, dtype=torch.float64, requires_grad=False):
    q = torch.randn(n, hq, d, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(n, h, d, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(n, h, d, dtype=dtype, requires_grad=requires_grad)
    return q, k, v
