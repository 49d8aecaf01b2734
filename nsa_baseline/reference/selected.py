"""Selected attention in plain PyTorch: the oracle for every kernel of both families.

Gathers each token's selected key blocks ([chunk, H, T * BS, D]) and runs a masked softmax, a chunk
of tokens at a time so that memory stays bounded at any sequence length. Differentiable through
autograd; runs in float64 when q is float64, otherwise in float32.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from nsa_baseline.contract import check_selected_args
from nsa_baseline.utils.varlen import token_positions

# Elements of the gathered K (and V) per chunk; bounds the reference's memory (~1 GiB in fp32).
_GATHER_BUDGET = 1 << 27


def selected_key_positions(block_indices: torch.Tensor, block_size: int, pos: torch.Tensor):
    """Positions (inside the sequence) of every key a query may see, and which of them it sees.

    block_indices [c, H, T], pos [c] -> (key_pos [c, H, T * BS] int64, visible [c, H, T * BS] bool).
    A key is visible when its slot is not -1 and it is causal (key_pos <= pos).
    """
    idx = block_indices.long()
    offs = torch.arange(block_size, device=idx.device)
    key_pos = idx[..., None] * block_size + offs  # [c, H, T, BS]
    visible = (idx[..., None] >= 0) & (key_pos <= pos[:, None, None, None])
    return key_pos.flatten(2), visible.flatten(2)


def _attend_selected(qq, kc, vc, rows, heads, visible, scale):
    """One chunk: qq [c, H, G, D] against the gathered keys kc[rows, heads] [c, H, L, D] -> (o, lse)."""
    kk, vv = kc[rows, heads], vc[rows, heads]  # [c, H, L, D]
    s = torch.einsum("chgd,chld->chgl", qq, kk) * scale
    s = s.masked_fill(~visible[:, :, None, :], float("-inf"))
    m = s.amax(dim=-1, keepdim=True).detach()  # softmax is shift invariant: no gradient needed
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    o = torch.einsum("chgl,chld->chgd", p, vv) / torch.where(l > 0, l, torch.ones_like(l))
    return o, (m + torch.log(l)).squeeze(-1)


def selected_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Reference selected attention (see nsa_baseline.contract for the full contract).

    Args:
        q: [N, HQ, D]; k, v: [N, H, D]; block_indices: int32 [N, H, T] (-1 = empty slot).
        block_size: keys per block (any positive int here; kernels support a fixed set).
        cu_seqlens: int32 [B + 1] or None for one sequence. scale: defaults to D ** -0.5.
    Returns:
        o [N, HQ, D] in q.dtype, and with return_lse the float32 lse [HQ, N].
    """
    a = check_selected_args(q, k, v, block_indices, block_size, cu_seqlens, scale,
                            supported_block_sizes=tuple(range(1, 4097)))
    n, h, g, d, t_sel = a.num_tokens, a.num_kv_heads, a.group_size, a.head_dim, a.topk
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    pos, _ = token_positions(a.cu_seqlens, n)
    seq_start = torch.arange(n, device=q.device) - pos
    heads = torch.arange(h, device=q.device)[None, :, None]
    kc, vc = k.to(compute), v.to(compute)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))

    chunk = max(1, _GATHER_BUDGET // (h * t_sel * block_size * d))
    outs, lses = [], []
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        key_pos, visible = selected_key_positions(block_indices[c0:c1], block_size, pos[c0:c1])
        rows = (seq_start[c0:c1, None, None] + key_pos).clamp(0, n - 1)  # [c, H, L] packed rows
        qq = q[c0:c1].to(compute).view(c1 - c0, h, g, d)
        if grad:  # backward recomputes each chunk instead of keeping every chunk's gather alive
            o, lse = checkpoint(_attend_selected, qq, kc, vc, rows, heads, visible, a.scale, use_reentrant=False)
        else:
            o, lse = _attend_selected(qq, kc, vc, rows, heads, visible, a.scale)
        outs.append(o.reshape(c1 - c0, h * g, d))
        lses.append(lse.reshape(c1 - c0, h * g))
    o = torch.cat(outs).to(q.dtype)
    if not return_lse:
        return o
    return o, torch.cat(lses).float().t().contiguous()
