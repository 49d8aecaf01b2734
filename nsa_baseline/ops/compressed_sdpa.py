"""Compressed attention of one sequence through PyTorch's fused attention kernels (cuDNN on Hopper,
FlashAttention-2 otherwise; CPU: its flash kernel), forward and backward, with the lse.

Query t sees summary i iff i * stride + kernel_size - 1 <= t. Writing t = a * stride + b (b = t mod
stride), that is i <= a - s_b with s_b = -floor((b - kernel_size + 1) / stride): the queries of one
residue b, renumbered a' = a - s_b, see summaries i <= a', which is plain causal attention (top-left,
as many queries as keys) over the summaries. The residues share the summaries, so they become stride
more query heads per KV head: one GQA call with query heads ordered (KV head, residue, group head),
L = ceil(N / stride) - min_b s_b + 1 rows each (the last row of every residue, and the rows past a
residue's end, are no query: q and do are zero there, so they add nothing to dK / dV and get dQ = 0).
Queries t < kernel_size - 1 see no summary: o = 0, lse = -inf, dq += 0.

Moving q, o, do and dq between [N, HQ, D] and the residue layout [1, H * stride * G, L, D] is one
row gather each (index_select with cached row indices). Timed against the Triton kernels by
experiments/gpu/module_vs_dense.py --compressed-sdpa; the module uses it when
fused_attention.COMPRESSED_SDPA_MIN_TOKENS says so.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

_LAYOUTS: dict[tuple, "ResidueLayout"] = {}


class ResidueLayout(NamedTuple):
    """Row maps (int32 while they fit, else int64: index_select takes both)."""

    heads: int  # H * stride * G query heads of the call
    length: int  # L rows per head (queries = keys)
    gather: torch.Tensor  # [heads * L]: row t * HQ + hq of q [N, HQ, D] for each call row (0 where none)
    empty: torch.Tensor  # int64 [k] (index_fill_'s index): call rows that are no query
    scatter: torch.Tensor  # [(N - kernel_size + 1) * HQ]: call row of q row (t, hq), t >= kernel_size - 1


def residue_layout(n: int, hq: int, g: int, kernel_size: int, stride: int, device) -> ResidueLayout:
    """The call's row maps for N tokens (cached: built once per shape, on the device)."""
    key = (n, hq, g, kernel_size, stride, str(device))
    hit = _LAYOUTS.get(key)
    if hit is not None:
        return hit
    h = hq // g
    shifts = [-((b - kernel_size + 1) // stride) for b in range(stride)]
    length = -(-n // stride) - min(shifts) + 1
    shift = torch.tensor(shifts, device=device)
    a = torch.arange(length, device=device)
    tok = (a[None, :] + shift[:, None]) * stride + torch.arange(stride, device=device)[:, None]  # [stride, L]
    tok = tok[None, :, None, :].expand(h, stride, g, length)  # call row (h, b, g, a')
    head = (torch.arange(h, device=device)[:, None] * g + torch.arange(g, device=device)[None, :])[:, None, :, None]
    is_query = tok < n
    gather = torch.where(is_query, tok * hq + head, 0).flatten()
    rows = torch.arange(gather.numel(), device=device)
    q_to_row = torch.full((n * hq,), -1, dtype=torch.int64, device=device)
    q_to_row[gather[is_query.flatten()]] = rows[is_query.flatten()]
    scatter = q_to_row[(kernel_size - 1) * hq:]
    if bool((scatter < 0).any()):  # every query that sees a summary has its row (once per shape)
        raise AssertionError("compressed_sdpa: residue layout misses a query")
    index = torch.int32 if gather.numel() < 2**31 else torch.int64
    layout = ResidueLayout(h * stride * g, length, gather.to(index),
                           (~is_query).flatten().nonzero().squeeze(1), scatter.to(index))
    if len(_LAYOUTS) >= 2:  # the maps are as long as q has rows: keep few
        _LAYOUTS.clear()
    _LAYOUTS[key] = layout
    return layout


def _rows(x: torch.Tensor, layout: ResidueLayout) -> torch.Tensor:
    """[N, HQ, D] -> the call's [1, heads, L, D], zero on rows that are no query."""
    d = x.shape[2]
    out = x.reshape(-1, d).index_select(0, layout.gather)
    out.index_fill_(0, layout.empty, 0)
    return out.view(1, layout.heads, layout.length, d)


def _keys(k_cmp: torch.Tensor, length: int) -> torch.Tensor:
    """[N_cmp, H, D] -> [1, H, L, D], zero keys past N_cmp (no query sees them)."""
    n_cmp, h, d = k_cmp.shape
    out = k_cmp.new_zeros(1, h, length, d)
    out[0, :, :n_cmp] = k_cmp.transpose(0, 1)
    return out


def _attend(q, k, v, scale: float):
    """(o, lse [1, heads, L] natural log, what the backward needs) of causal attention, GQA."""
    if q.is_cuda:
        for name in ("cudnn", "flash"):
            try:
                return _ATTEND[name](q, k, v, scale)
            except (RuntimeError, TypeError):  # this build or GPU lacks the backend for the shape: the next
                if name == "flash":
                    raise
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    return o, lse, ("cpu", lse.shape, lse.dtype)


def _attend_cudnn(q, k, v, scale):
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)
    o, lse, cum_q, cum_k, max_q, max_k, seed, offset = out[:8]
    return o, lse, ("cudnn", lse.shape, lse.dtype, cum_q, cum_k, max_q, max_k, seed, offset)


def _attend_flash(q, k, v, scale):
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
    o, lse, cum_q, cum_k, max_q, max_k, seed, offset = out[:8]
    return o, lse, ("flash", lse.shape, lse.dtype, cum_q, cum_k, max_q, max_k, seed, offset)


_ATTEND = {"cudnn": _attend_cudnn, "flash": _attend_flash}


def _attend_bwd(do, q, k, v, o, lse, aux, scale):
    """(dq, dk, dv) of _attend; lse [1, heads, L] float32 (given back in the backend's shape and dtype)."""
    lse = lse.view(aux[1]).to(aux[2])
    if aux[0] == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(do, q, k, v, o, lse, 0.0, True,
                                                                                    scale=scale)
    name, _, _, cum_q, cum_k, max_q, max_k, seed, offset = aux
    if name == "cudnn":
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            do, q, k, v, o, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, True, scale=scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        do, q, k, v, o, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset, scale=scale)


def sdpa_serves(q: torch.Tensor, varlen: bool, kernel_size: int, kernel_stride: int) -> bool:
    """One sequence, a head dim the fused kernels take, and a sequence long enough for a summary."""
    n, _, d = q.shape
    return not varlen and d % 8 == 0 and d <= 256 and n >= kernel_size and kernel_stride <= kernel_size


def compressed_sdpa_fwd(q, k_cmp, v_cmp, kernel_size: int, kernel_stride: int, scale: float):
    """(o [N, HQ, D] in q.dtype, lse float32 [HQ, N] natural log, aux) of one sequence (sdpa_serves);
    k_cmp, v_cmp [N_cmp, H, D] in q.dtype. aux (the backend and what its backward takes) goes to
    compressed_sdpa_bwd."""
    n, hq, d = q.shape
    layout = residue_layout(n, hq, hq // k_cmp.shape[1], kernel_size, kernel_stride, q.device)
    o_r, lse_r, aux = _attend(_rows(q, layout), _keys(k_cmp, layout.length), _keys(v_cmp, layout.length), scale)
    first = kernel_size - 1  # queries before it see no summary
    o = torch.empty_like(q)
    o[:first] = 0
    o.view(-1, d)[first * hq:] = o_r.reshape(-1, d).index_select(0, layout.scatter)
    lse = torch.empty(hq, n, dtype=torch.float32, device=q.device)
    lse[:, :first] = float("-inf")
    lse[:, first:] = lse_r.reshape(-1).float().index_select(0, layout.scatter).view(n - first, hq).t()
    return o, lse, aux


def compressed_sdpa_bwd(q, k_cmp, v_cmp, o, lse, do, aux: tuple, kernel_size: int, kernel_stride: int,
                        scale: float, dq: Optional[torch.Tensor] = None, accumulate: bool = False):
    """(dq, dk_cmp, dv_cmp) for upstream do [N, HQ, D] (the branch's o and lse as the forward gave
    them). dq: the buffer to write (None allocates); accumulate: add the branch's dq to what it holds."""
    n, hq, d = q.shape
    layout = residue_layout(n, hq, hq // k_cmp.shape[1], kernel_size, kernel_stride, q.device)
    rows = layout.gather.long()
    lse_r = lse.reshape(-1).index_select(0, rows % hq * n + rows // hq)  # element (hq, t) of row t * HQ + hq
    lse_r.index_fill_(0, layout.empty, 0.)  # rows that are no query: finite (q = do = 0 there)
    k_r, v_r = _keys(k_cmp, layout.length), _keys(v_cmp, layout.length)
    dq_r, dk_r, dv_r = _attend_bwd(_rows(do.contiguous(), layout), _rows(q, layout), k_r, v_r, _rows(o, layout),
                                   lse_r, aux, scale)
    first = kernel_size - 1
    part = dq_r.reshape(-1, d).index_select(0, layout.scatter)
    if dq is None:
        dq = torch.empty_like(q)
        accumulate = False
    if accumulate:
        dq.view(-1, d)[first * hq:] += part
    else:
        dq[:first] = 0
        dq.view(-1, d)[first * hq:] = part
    n_cmp = k_cmp.shape[0]
    dk, dv = (t[0, :, :n_cmp].transpose(0, 1).to(k_cmp.dtype).contiguous() for t in (dk_r, dv_r))
    return dq, dk, dv


class _CompressedSdpa(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, kernel_size, kernel_stride, scale):
        o, lse, aux = compressed_sdpa_fwd(q, k_cmp, v_cmp, kernel_size, kernel_stride, scale)
        ctx.save_for_backward(q, k_cmp, v_cmp, o, lse)
        ctx.args = (aux, kernel_size, kernel_stride, scale)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _):
        q, k_cmp, v_cmp, o, lse = ctx.saved_tensors
        aux, kernel_size, kernel_stride, scale = ctx.args
        dq, dk, dv = compressed_sdpa_bwd(q, k_cmp, v_cmp, o, lse, do, aux, kernel_size, kernel_stride, scale)
        return dq, dk, dv, None, None, None


def compressed_attention_sdpa(q, k_cmp, v_cmp, kernel_size: int = 32, kernel_stride: int = 16,
                              scale: Optional[float] = None):
    """(o [N, HQ, D], lse float32 [HQ, N]) of one sequence's compressed attention through the fused
    SDPA kernels; differentiable in q, k_cmp, v_cmp through o (lse is not). Same contract as
    compressed_attention_triton with cu_seqlens None."""
    if q.dim() != 3 or k_cmp.dim() != 3 or k_cmp.shape != v_cmp.shape or q.shape[2] != k_cmp.shape[2] \
            or q.shape[1] % k_cmp.shape[1]:
        raise ValueError(f"arguments `q` [N, HQ, D] and `k_cmp`, `v_cmp` [N_cmp, H, D] with H dividing HQ: got "
                         f"{tuple(q.shape)}, {tuple(k_cmp.shape)}, {tuple(v_cmp.shape)}")
    n_cmp = max(0, (q.shape[0] - kernel_size) // kernel_stride + 1)
    if k_cmp.shape[0] != n_cmp or not sdpa_serves(q, False, kernel_size, kernel_stride):
        raise ValueError(f"argument `k_cmp`: {q.shape[0]} tokens make {n_cmp} summaries of {kernel_size} at stride "
                         f"{kernel_stride} (at least one; D a multiple of 8, <= 256), got {tuple(k_cmp.shape)}")
    scale = q.shape[2] ** -0.5 if scale is None else scale
    k_cmp, v_cmp = k_cmp.to(q.dtype).contiguous(), v_cmp.to(q.dtype).contiguous()
    return _CompressedSdpa.apply(q.contiguous(), k_cmp, v_cmp, kernel_size, kernel_stride, scale)
