"""Triton kernels of NSA's compressed-branch attention (queries over their sequence's summaries).

Rows of a tile are (token, query head of one KV group) pairs, token-major and never padded:
row f of KV head h is token f // G, query head h * G + f % G, so one K/V summary tile serves the
whole group. Query row r sees the packed summaries [lo_r, hi_r): lo_r = first summary of its
sequence, hi_r - lo_r = visible_compressed(position). A tile loops only over the union of its rows'
bands; the part every row sees runs without the mask.

Forward / dQ: 1-D grid of (row tile of BLOCK_M rows, KV head), head fastest and the last row tiles
(causal: the most summaries) first; each program loops over summary tiles of BLOCK_N (online softmax
in base 2, scale * log2e folded). dK/dV: 1-D grid of (summary tile of BLOCK_N, KV head), the first
summary tiles (seen by the most rows) first; each program loops over the row tiles that can see its
summaries (FlashAttention-2 order, no atomics: deterministic). Preprocess: delta = rowsum(o * do)
- dlse (the gradient through lse) and the base-2 lse with -inf -> +inf (p = 0 for empty rows).
"""
from __future__ import annotations

import triton
import triton.language as tl


_LN2 = tl.constexpr(0.6931471805599453)
_INT_MAX = tl.constexpr(2147483647)


@triton.jit
def _rows(r0, r_end, i_h, tok_seq, cu, cu_cmp,
          HQ, G: tl.constexpr, KS: tl.constexpr, STRIDE: tl.constexpr,
          BLOCK_M: tl.constexpr, VARLEN: tl.constexpr):
    """Rows [r0, r0 + BLOCK_M) of KV head i_h (valid below r_end): (row mask, token, query head,
    band [lo, hi) of visible packed summaries; empty for invalid rows)."""
    o_r = r0 + tl.arange(0, BLOCK_M)
    m_r = o_r < r_end
    tok = o_r // G
    i_hq = i_h * G + o_r % G
    if VARLEN:
        seq = tl.load(tok_seq + tok, mask=m_r, other=0)
        pos = tok - tl.load(cu + seq, mask=m_r, other=0)
        lo = tl.load(cu_cmp + seq, mask=m_r, other=0)
    else:
        pos = tok
        lo = tok * 0
    nvis = tl.where(pos >= KS - 1, (pos - (KS - 1)) // STRIDE + 1, 0)
    hi = tl.where(m_r, lo + nvis, lo)
    return m_r, tok, i_hq, lo, hi


@triton.jit
def _load_summaries(k, v, c0, c_end, p_d, m_d, H, D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """(o_c, b_k, b_v): ids [BLOCK_N] and K, V [BLOCK_N, BLOCK_D] of summaries [c0, c0 + BLOCK_N) of
    one KV head (MASK: zeros from c_end on)."""
    o_c = c0 + tl.arange(0, BLOCK_N)
    p_c = o_c.to(tl.int64)[:, None] * (H * D) + p_d[None, :]
    m_c = m_d[None, :]
    if MASK:
        m_c = m_c & (o_c < c_end)[:, None]
    b_k = tl.load(k + p_c, mask=m_c, other=0.)
    b_v = tl.load(v + p_c, mask=m_c, other=0.)
    return o_c, b_k, b_v


@triton.jit
def _fwd_step(b_q, acc, b_m, b_l, k, v, c0, c_end, lo, hi, p_d, m_d, qk_scale,
              H, D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
              MASK: tl.constexpr):
    """Online softmax of the rows over summaries [c0, c0 + BLOCK_N) (MASK: per-row bands)."""
    o_c, b_k, b_v = _load_summaries(k, v, c0, c_end, p_d, m_d, H, D, BLOCK_N, MASK)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
    if MASK:
        vis = (o_c[None, :] >= lo[:, None]) & (o_c[None, :] < hi[:, None])
        b_s = tl.where(vis, b_s, float("-inf"))
        m_new = tl.maximum(b_m, tl.max(b_s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0., m_new)  # rows that saw nothing yet
    else:
        m_new = tl.maximum(b_m, tl.max(b_s, 1))
        m_ref = m_new
    alpha = tl.exp2(b_m - m_ref)  # [BLOCK_M]
    b_p = tl.exp2(b_s - m_ref[:, None])  # [BLOCK_M, BLOCK_N]
    b_l = b_l * alpha + tl.sum(b_p, 1)
    acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)  # [BLOCK_M, BLOCK_D]
    return acc, m_new, b_l


@triton.jit
def _tile_bands(m_r, lo, hi, BLOCK_N: tl.constexpr):
    """(c_lo, c_mid, c_hi): summaries [c_lo, c_mid) are visible to every valid row of the tile
    (whole BLOCK_N tiles, one sequence only), [c_mid, c_hi) need the per-row mask."""
    lo_min = tl.min(tl.where(m_r, lo, _INT_MAX), 0)
    lo_max = tl.max(tl.where(m_r, lo, 0), 0)
    hi_min = tl.min(tl.where(m_r, hi, _INT_MAX), 0)
    hi_max = tl.max(tl.where(m_r, hi, 0), 0)
    n_full = tl.where(lo_min == lo_max, tl.maximum(hi_min - lo_min, 0) // BLOCK_N, 0)
    return lo_min, lo_min + n_full * BLOCK_N, hi_max


@triton.jit
def compressed_fwd_kernel(
    q, k, v, o, lse, tok_seq, cu, cu_cmp, N, qk_scale,
    HQ, H, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    KS: tl.constexpr, STRIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, PREC: tl.constexpr, WHILE_LOOP: tl.constexpr,
):
    # one axis, KV head fastest: the last (causal: longest) row tiles of every head first
    i_h = tl.program_id(0) % H
    i_m = tl.num_programs(0) // H - 1 - tl.program_id(0) // H
    m_r, tok, i_hq, lo, hi = _rows(i_m * BLOCK_M, N * G, i_h, tok_seq, cu, cu_cmp, HQ, G, KS, STRIDE,
                                   BLOCK_M, VARLEN)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    p_q = (tok.to(tl.int64) * HQ + i_hq)[:, None] * D + o_d[None, :]  # [BLOCK_M, BLOCK_D]
    m_q = m_r[:, None] & m_d[None, :]
    b_q = tl.load(q + p_q, mask=m_q, other=0.)
    p_d = i_h * D + o_d
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    c_lo, c_mid, c_hi = _tile_bands(m_r, lo, hi, BLOCK_N)
    if WHILE_LOOP:  # the interpreter cannot range() over computed bounds
        c0 = c_lo
        while c0 < c_mid:
            acc, b_m, b_l = _fwd_step(b_q, acc, b_m, b_l, k, v, c0, c_hi, lo, hi, p_d, m_d, qk_scale,
                                      H, D, BLOCK_N, PREC, False)
            c0 += BLOCK_N
        while c0 < c_hi:
            acc, b_m, b_l = _fwd_step(b_q, acc, b_m, b_l, k, v, c0, c_hi, lo, hi, p_d, m_d, qk_scale,
                                      H, D, BLOCK_N, PREC, True)
            c0 += BLOCK_N
    else:
        for c0 in range(c_lo, c_mid, BLOCK_N):
            acc, b_m, b_l = _fwd_step(b_q, acc, b_m, b_l, k, v, c0, c_hi, lo, hi, p_d, m_d, qk_scale,
                                      H, D, BLOCK_N, PREC, False)
        for c0 in range(c_mid, c_hi, BLOCK_N):
            acc, b_m, b_l = _fwd_step(b_q, acc, b_m, b_l, k, v, c0, c_hi, lo, hi, p_d, m_d, qk_scale,
                                      H, D, BLOCK_N, PREC, True)
    seen = b_l > 0
    b_l_safe = tl.where(seen, b_l, 1.)
    b_o = acc / b_l_safe[:, None]  # rows that see nothing: acc = 0 -> o = 0
    tl.store(o + p_q, b_o.to(o.dtype.element_ty), mask=m_q)
    b_lse = tl.where(seen, (b_m + tl.log2(b_l_safe)) * _LN2, float("-inf"))
    tl.store(lse + i_hq.to(tl.int64) * N + tok, b_lse, mask=m_r)


@triton.jit
def _dkdv_step(b_k, b_v, dk, dv, q, do, lse2, delta, r0, r_end, i_h, o_c, tok_seq, cu, cu_cmp, N,
               o_d, m_d, qk_scale, HQ, G: tl.constexpr, D: tl.constexpr,
               KS: tl.constexpr, STRIDE: tl.constexpr, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr,
               PREC: tl.constexpr, MASK: tl.constexpr):
    """dK/dV of the program's summaries from rows [r0, r0 + BLOCK_M), in transposed form."""
    m_r, tok, i_hq, lo, hi = _rows(r0, r_end, i_h, tok_seq, cu, cu_cmp, HQ, G, KS, STRIDE, BLOCK_M,
                                   VARLEN)
    p_q = (tok.to(tl.int64) * HQ + i_hq)[:, None] * D + o_d[None, :]
    m_q = m_r[:, None] & m_d[None, :]
    b_q = tl.load(q + p_q, mask=m_q, other=0.)  # [BLOCK_M, BLOCK_D]
    b_do = tl.load(do + p_q, mask=m_q, other=0.)  # [BLOCK_M, BLOCK_D]
    p_t = i_hq.to(tl.int64) * N + tok
    b_lse = tl.load(lse2 + p_t, mask=m_r, other=float("inf"))  # invalid rows: p = 0
    b_delta = tl.load(delta + p_t, mask=m_r, other=0.)
    b_pt = tl.exp2(tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * qk_scale - b_lse[None, :])  # [BLOCK_N, BLOCK_M]
    if MASK:
        vis = (o_c[:, None] >= lo[None, :]) & (o_c[:, None] < hi[None, :])
        b_pt = tl.where(vis, b_pt, 0.)
    dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PREC)  # [BLOCK_N, BLOCK_D]
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)  # [BLOCK_N, BLOCK_M]
    b_dst = b_pt * (b_dpt - b_delta[None, :])
    dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PREC)  # [BLOCK_N, BLOCK_D]
    return dk, dv


@triton.jit
def compressed_bwd_dkdv_kernel(
    q, k, v, do, lse2, delta, dk, dv, tok_seq, cmp_seq, cu, cu_cmp, N, N_CMP, qk_scale, scale,
    HQ, H, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    KS: tl.constexpr, STRIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, PREC: tl.constexpr, WHILE_LOOP: tl.constexpr, SPLITS: tl.constexpr,
):
    """SPLITS == 1: dk, dv in the inputs' dtype. SPLITS > 1 (few KV heads: too few programs to fill
    the GPU): program_id(1) takes one of SPLITS equal shares of the tile's rows and writes its fp32
    partial dk, dv at [program_id(1)] of [SPLITS, N_CMP, H, D] buffers (summed by the caller)."""
    i_h = tl.program_id(0) % H  # KV head fastest: the first (causal: most seen) summary tiles first
    i_c = tl.program_id(0) // H
    c_first = i_c * BLOCK_N
    c_last = tl.minimum(c_first + BLOCK_N, N_CMP) - 1
    o_c = c_first + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    p_kv = o_c.to(tl.int64)[:, None] * (H * D) + i_h * D + o_d[None, :]
    m_kv = (o_c < N_CMP)[:, None] & m_d[None, :]
    b_k = tl.load(k + p_kv, mask=m_kv, other=0.)  # [BLOCK_N, BLOCK_D]
    b_v = tl.load(v + p_kv, mask=m_kv, other=0.)
    # query tokens that see any summary of the tile: [t_lo, t_hi); from t_full on they see all of them
    if VARLEN:
        s_first = tl.load(cmp_seq + c_first)
        s_last = tl.load(cmp_seq + c_last)
        t_lo = tl.load(cu + s_first) + (c_first - tl.load(cu_cmp + s_first)) * STRIDE + KS - 1
        t_hi = tl.load(cu + s_last + 1)
        t_full = tl.load(cu + s_last) + (c_last - tl.load(cu_cmp + s_last)) * STRIDE + KS - 1
        t_full = tl.where(s_first == s_last, t_full, t_hi)
    else:
        t_lo = c_first * STRIDE + KS - 1
        t_hi = N
        t_full = c_last * STRIDE + KS - 1
    r_lo = t_lo * G
    r_hi = t_hi * G
    r_full = tl.minimum(t_full * G, r_hi)
    r_mid = r_lo + tl.cdiv(r_full - r_lo, BLOCK_M) * BLOCK_M
    if SPLITS > 1:  # this program's share [r_a, r_b) of [r_lo, r_hi), BLOCK_M-aligned from r_lo
        share = tl.cdiv(tl.cdiv(tl.maximum(r_hi - r_lo, 0), BLOCK_M), SPLITS) * BLOCK_M
        r_a = r_lo + tl.program_id(1) * share
        r_b = tl.minimum(r_a + share, r_hi)
    else:
        r_a = r_lo
        r_b = r_hi
    r_m = tl.minimum(r_mid, r_b)  # masked steps [r_a, r_m), unmasked [max(r_a, r_mid), r_b)
    r_u = tl.maximum(r_a, r_mid)
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if WHILE_LOOP:
        r0 = r_a
        while r0 < r_m:
            b_dk, b_dv = _dkdv_step(b_k, b_v, b_dk, b_dv, q, do, lse2, delta, r0, r_hi, i_h, o_c, tok_seq, cu, cu_cmp,
                                N, o_d, m_d, qk_scale, HQ, G, D, KS, STRIDE, BLOCK_M, VARLEN, PREC, True)
            r0 += BLOCK_M
        r0 = r_u
        while r0 < r_b:
            b_dk, b_dv = _dkdv_step(b_k, b_v, b_dk, b_dv, q, do, lse2, delta, r0, r_hi, i_h, o_c, tok_seq, cu, cu_cmp,
                                N, o_d, m_d, qk_scale, HQ, G, D, KS, STRIDE, BLOCK_M, VARLEN, PREC, False)
            r0 += BLOCK_M
    else:
        for r0 in range(r_a, r_m, BLOCK_M):
            b_dk, b_dv = _dkdv_step(b_k, b_v, b_dk, b_dv, q, do, lse2, delta, r0, r_hi, i_h, o_c, tok_seq, cu, cu_cmp,
                                N, o_d, m_d, qk_scale, HQ, G, D, KS, STRIDE, BLOCK_M, VARLEN, PREC, True)
        for r0 in range(r_u, r_b, BLOCK_M):
            b_dk, b_dv = _dkdv_step(b_k, b_v, b_dk, b_dv, q, do, lse2, delta, r0, r_hi, i_h, o_c, tok_seq, cu, cu_cmp,
                                N, o_d, m_d, qk_scale, HQ, G, D, KS, STRIDE, BLOCK_M, VARLEN, PREC, False)
    if SPLITS > 1:
        p_kv += tl.program_id(1).to(tl.int64) * N_CMP * H * D
    tl.store(dk + p_kv, (b_dk * scale).to(dk.dtype.element_ty), mask=m_kv)
    tl.store(dv + p_kv, b_dv.to(dv.dtype.element_ty), mask=m_kv)


@triton.jit
def _dq_step(b_q, b_do, b_lse, b_delta, dq, k, v, c0, c_end, lo, hi, p_d, m_d, qk_scale,
             H, D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
             MASK: tl.constexpr):
    """dQ of the rows from summaries [c0, c0 + BLOCK_N)."""
    o_c, b_k, b_v = _load_summaries(k, v, c0, c_end, p_d, m_d, H, D, BLOCK_N, MASK)
    b_p = tl.exp2(tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale - b_lse[:, None])  # [BLOCK_M, BLOCK_N]
    if MASK:
        vis = (o_c[None, :] >= lo[:, None]) & (o_c[None, :] < hi[:, None])
        b_p = tl.where(vis, b_p, 0.)
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)  # [BLOCK_M, BLOCK_N]
    b_ds = b_p * (b_dp - b_delta[:, None])
    dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)  # [BLOCK_M, BLOCK_D]
    return dq


@triton.jit
def compressed_bwd_dq_kernel(
    q, k, v, do, lse2, delta, dq, tok_seq, cu, cu_cmp, N, qk_scale, scale,
    HQ, H, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    KS: tl.constexpr, STRIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, PREC: tl.constexpr, WHILE_LOOP: tl.constexpr, ACCUMULATE: tl.constexpr = False,
):
    """1-D grid of (row tile, KV head); dq [N, HQ, D]. ACCUMULATE: add to what dq holds (fp32 sum)
    instead of overwriting it (the module's fused backward sums its branches' dq this way)."""
    i_h = tl.program_id(0) % H  # as the forward: longest row tiles first
    i_m = tl.num_programs(0) // H - 1 - tl.program_id(0) // H
    m_r, tok, i_hq, lo, hi = _rows(i_m * BLOCK_M, N * G, i_h, tok_seq, cu, cu_cmp, HQ, G, KS, STRIDE,
                                   BLOCK_M, VARLEN)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    p_q = (tok.to(tl.int64) * HQ + i_hq)[:, None] * D + o_d[None, :]
    m_q = m_r[:, None] & m_d[None, :]
    b_q = tl.load(q + p_q, mask=m_q, other=0.)  # [BLOCK_M, BLOCK_D]
    b_do = tl.load(do + p_q, mask=m_q, other=0.)
    p_t = i_hq.to(tl.int64) * N + tok
    b_lse = tl.load(lse2 + p_t, mask=m_r, other=float("inf"))
    b_delta = tl.load(delta + p_t, mask=m_r, other=0.)
    p_d = i_h * D + o_d
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    c_lo, c_mid, c_hi = _tile_bands(m_r, lo, hi, BLOCK_N)
    if WHILE_LOOP:
        c0 = c_lo
        while c0 < c_mid:
            b_dq = _dq_step(b_q, b_do, b_lse, b_delta, b_dq, k, v, c0, c_hi, lo, hi, p_d, m_d, qk_scale,
                          H, D, BLOCK_N, PREC, False)
            c0 += BLOCK_N
        while c0 < c_hi:
            b_dq = _dq_step(b_q, b_do, b_lse, b_delta, b_dq, k, v, c0, c_hi, lo, hi, p_d, m_d, qk_scale,
                          H, D, BLOCK_N, PREC, True)
            c0 += BLOCK_N
    else:
        for c0 in range(c_lo, c_mid, BLOCK_N):
            b_dq = _dq_step(b_q, b_do, b_lse, b_delta, b_dq, k, v, c0, c_hi, lo, hi, p_d, m_d, qk_scale,
                          H, D, BLOCK_N, PREC, False)
        for c0 in range(c_mid, c_hi, BLOCK_N):
            b_dq = _dq_step(b_q, b_do, b_lse, b_delta, b_dq, k, v, c0, c_hi, lo, hi, p_d, m_d, qk_scale,
                          H, D, BLOCK_N, PREC, True)
    b_dq = b_dq * scale
    if ACCUMULATE:
        b_dq += tl.load(dq + p_q, mask=m_q, other=0.).to(tl.float32)
    tl.store(dq + p_q, b_dq.to(dq.dtype.element_ty), mask=m_q)
