"""Sliding-window and full causal attention in plain PyTorch, plus the masked softmax they share
with the compressed branch.

Loops over chunks of queries; each chunk reads only the key range its queries can see, so the score
tensor is [chunk, HQ, chunk + window] at most. Under autograd every chunk is checkpointed (recomputed
in backward), so training memory is bounded too. float64 in -> float64 maths, otherwise float32.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from nsa_baseline.checks import check_int, check_qkv
from nsa_baseline.utils.varlen import sequence_lengths, token_positions

# Elements of one chunk's score tensor ([chunk, HQ, keys]).
_SCORE_BUDGET = 1 << 26
_MAX_CHUNK = 1024


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float):
    r"""Softmax attention of a chunk of queries over a key range with an explicit mask.

    Args:
        q: [c, HQ, D]; k, v: [L, H, D] (query head hq uses kv head hq // G); visible: bool [c, L].
    Returns:
        o [c, HQ, D] and lse [c, HQ] (natural log), both in q.dtype. A row that sees no key gets
        o = 0, lse = -inf and a zero gradient (never NaN).
    """
    c, hq, d = q.shape
    h = k.shape[1]
    if k.shape[0] == 0:  # nothing to see (e.g. no summary yet): keep q in the graph for a zero gradient
        return q * 0, torch.full((c, hq), float("-inf"), dtype=q.dtype, device=q.device)
    qq = q.view(c, h, hq // h, d)
    s = torch.einsum("chgd,lhd->chgl", qq, k) * scale
    s = s.masked_fill(~visible[:, None, None, :], float("-inf"))
    m = s.amax(dim=-1, keepdim=True).detach()  # softmax is shift invariant: no gradient needed
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    o = torch.einsum("chgl,lhd->chgd", p, v) / torch.where(l > 0, l, torch.ones_like(l))
    return o.reshape(c, hq, d), (m + torch.log(l)).reshape(c, hq)


def attend_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float):
    """masked_attention, checkpointed when a gradient is needed: backward recomputes the chunk's scores
    instead of keeping [chunk, HQ, keys] activations alive for every chunk at once."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return checkpoint(masked_attention, q, k, v, visible, scale, use_reentrant=False)
    return masked_attention(q, k, v, visible, scale)


def _banded_attention(q, k, v, window: Optional[int], cu_seqlens, scale, return_lse):
    """Key s visible to query t iff same sequence, s <= t and (window is None or t - window < s)."""
    scale = check_qkv(q, k, v, cu_seqlens, scale, check_values=True)
    n, hq, _ = q.shape
    cu_seqlens = (torch.tensor([0, n], dtype=torch.int32, device=q.device) if cu_seqlens is None
                  else cu_seqlens.to(q.device))
    compute = compute_dtype(q.dtype)
    pos, _ = token_positions(cu_seqlens, n)
    start = torch.arange(n, device=q.device) - pos  # packed row of each token's sequence start
    max_len = int(sequence_lengths(cu_seqlens).max()) if n else 0
    reach = max_len if window is None else min(window, max_len)
    chunk = max(1, min(_MAX_CHUNK, _SCORE_BUDGET // (hq * (reach + _MAX_CHUNK))))
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    outs, lses = [], []
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        lo = int(start[c0]) if window is None else max(int(start[c0]), c0 - window + 1)
        keys = torch.arange(lo, c1, device=q.device)  # [L] packed rows this chunk may see
        rows = torch.arange(c0, c1, device=q.device)[:, None]
        visible = (keys[None, :] >= start[c0:c1, None]) & (keys[None, :] <= rows)
        if window is not None:
            visible &= keys[None, :] > rows - window
        o, lse = attend_chunk(qc[c0:c1], kc[lo:c1], vc[lo:c1], visible, scale)
        outs.append(o)
        lses.append(lse)
    o = torch.cat(outs).to(q.dtype)
    if not return_lse:
        return o
    return o, torch.cat(lses).float().t().contiguous()


def sliding_window_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    r"""Causal sliding-window attention: key s is visible to query t iff t - window_size < s <= t
    (positions inside the same sequence), so every query sees at most window_size keys, itself included.

    Args:
        q: [N, HQ, D]; k, v: [N, H, D]; HQ = G * H, query head hq uses kv head hq // G.
        window_size: positive int. cu_seqlens: int32 [B + 1] or None. scale: defaults to D ** -0.5.
    Returns:
        o [N, HQ, D] in q.dtype, and with return_lse the float32 lse [HQ, N].
    """
    check_int("window_size", window_size)
    return _banded_attention(q, k, v, window_size, cu_seqlens, scale, return_lse)


def full_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    r"""Full causal attention inside each sequence.

    Args:
        q: [N, HQ, D]; k, v: [N, H, D]; HQ = G * H. cu_seqlens: int32 [B + 1] or None.
        scale: defaults to D ** -0.5.
    Returns:
        o [N, HQ, D] in q.dtype, and with return_lse the float32 lse [HQ, N].
    """
    return _banded_attention(q, k, v, None, cu_seqlens, scale, return_lse)
