"""NSA's attention for new queries at any offset against the cache, in PyTorch (the path every backend
takes while a sequence has history; fast decode kernels come later).

Vectorised over all new tokens of all slots, in chunks of queries that bound memory. Each branch
gathers, per (query, KV head), the cached rows it may see ([c, H, L, D]) and masks the rest:
    compressed  summaries 0 .. L of the query's slot, summary i visible iff i * stride + kernel_size - 1 <= t
    selected    the T blocks chosen from the compressed softmax (reference mapping and top-T rule)
    window      keys t - window_size < s <= t
Query at absolute position t sees exactly what it would in the module's forward over the whole
sequence; maths in float64 for float64 inputs, else float32.
"""
from __future__ import annotations

from typing import Callable

import torch

from nsa_baseline.inference.cache import NSACache
from nsa_baseline.reference.compressed import summaries_to_blocks
from nsa_baseline.reference.selected import selected_key_positions
from nsa_baseline.reference.window import compute_dtype
from nsa_baseline.utils.compressed_varlen import visible_compressed
from nsa_baseline.utils.topk import select_chunk

# Elements of one chunk's gathered keys ([c, H, L, D]) and scores ([c, HQ, L]).
_GATHER_BUDGET = 1 << 25


def gathered_attention(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, slot: torch.Tensor,
                       key_pos: torch.Tensor, visible: torch.Tensor, scale: float):
    r"""Softmax attention of each query over rows of its own cache slot.

    Args:
        q: [c, HQ, D] (compute dtype); k_rows, v_rows: [B, M, H, D] cached rows; slot: int64 [c];
        key_pos: int64 [c, H, L] rows to read (any value: clamped into [0, M)); visible: bool [c, H, L].
    Returns:
        o [c, HQ, D], lse [c, H, G] and the probabilities p [c, H, G, L] (0 where not visible); a row
        that sees nothing gets o = 0, lse = -inf.
    """
    c, hq, d = q.shape
    h, L = k_rows.shape[2], key_pos.shape[-1]
    if k_rows.shape[1] == 0:  # a cache too short for any summary: nothing to see
        return torch.zeros_like(q), q.new_full((c, h, hq // h), float("-inf")), q.new_zeros(c, h, hq // h, L)
    rows = key_pos.clamp(0, k_rows.shape[1] - 1)
    heads = torch.arange(h, device=q.device)[None, :, None]
    kk = k_rows[slot[:, None, None], rows, heads].to(q.dtype)  # [c, H, L, D]
    vv = v_rows[slot[:, None, None], rows, heads].to(q.dtype)
    s = torch.einsum("chgd,chld->chgl", q.view(c, h, hq // h, d), kk) * scale
    s = s.masked_fill(~visible[:, :, None, :], float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(l > 0, l, torch.ones_like(l))
    o = torch.einsum("chgl,chld->chgd", p, vv).reshape(c, hq, d)
    return o, (m + torch.log(l)).squeeze(-1), p


def _keys(cache: NSACache, slot: torch.Tensor, key_pos: torch.Tensor):
    """gathered_attention's (k_rows, v_rows, slot, key_pos) over the cache's keys: as given for a
    contiguous cache, the pool's rows (one "slot") for a paged one."""
    if cache.page_size is None:
        return cache.k, cache.v, slot, key_pos
    page, row = cache.rows(slot[:, None, None].expand_as(key_pos), key_pos)
    pool_rows = (cache.k.flatten(0, 1)[None], cache.v.flatten(0, 1)[None])  # [1, num_pages * P, H, D]
    return *pool_rows, torch.zeros_like(slot), page * cache.page_size + row


def _chunk_size(num_q_heads: int, h: int, d: int, reach: int) -> int:
    per_query = max(1, reach) * (h * d + num_q_heads)
    return max(1, _GATHER_BUDGET // per_query)


def cached_attention(module, cache: NSACache, q: torch.Tensor, gates: torch.Tensor, slot: torch.Tensor,
                     pos: torch.Tensor, gated_sum: Callable) -> torch.Tensor:
    r"""NSA attention of new queries against their slots' cached keys (already holding these tokens).

    Args:
        module: the NativeSparseAttention (sizes only). cache: its NSACache, written up to every new token.
        q: [N, HQ, D] after RoPE; gates: [N, HQ, 3]; slot, pos: int64 [N] slot and absolute position.
        gated_sum: the backend's gated sum of the three branches.
    Returns:
        o [N, HQ, D] in q.dtype, before the output projection.
    """
    n, hq, d = q.shape
    h = module.num_kv_heads
    ks, st, bs = module.kernel_size, module.kernel_stride, module.block_size
    scale = d ** -0.5
    qc = q.to(compute_dtype(q.dtype))
    max_pos = int(pos.max())
    reach = max(cache.num_summaries(max_pos + 1), module.topk * bs, min(module.window_size, max_pos + 1))
    chunk = _chunk_size(hq, h, d, reach)
    outs = []
    for c0 in range(0, n, chunk):
        b, t, qq = slot[c0:c0 + chunk], pos[c0:c0 + chunk], qc[c0:c0 + chunk]
        c = t.numel()
        t_max = int(t.max())
        # Compressed: the first n_vis summaries of the slot.
        n_vis = visible_compressed(t, ks, st)  # [c]
        width = max(1, cache.num_summaries(t_max + 1))
        cmp_pos = torch.arange(width, device=q.device).expand(c, h, width)
        cmp_vis = cmp_pos < n_vis[:, None, None]
        o_cmp, _, p = gathered_attention(qq, cache.k_cmp, cache.v_cmp, b, cmp_pos, cmp_vis, scale)
        # Selection: the group's probabilities summed over its heads, mapped to blocks as the reference does.
        num_blocks = t_max // bs + 1
        scores = summaries_to_blocks(p.sum(dim=2), ks, st, bs, num_blocks).float()  # [c, H, NB]
        idx = select_chunk(scores, t, bs, module.topk, module.init_blocks, module.local_blocks)
        slc_pos, slc_vis = selected_key_positions(idx, bs, t)  # [c, H, T * BS]
        o_slc, _, _ = gathered_attention(qq, *_keys(cache, b, slc_pos), slc_vis, scale)
        # Window: keys max(0, t - W + 1) .. t.
        w = min(module.window_size, t_max + 1)
        win_pos = (t[:, None] - w + 1 + torch.arange(w, device=q.device)).unsqueeze(1).expand(c, h, w)
        o_win, _, _ = gathered_attention(qq, *_keys(cache, b, win_pos), win_pos >= 0, scale)
        outs.append(gated_sum(gates[c0:c0 + chunk], o_cmp.to(q.dtype), o_slc.to(q.dtype), o_win.to(q.dtype)))
    return torch.cat(outs)
