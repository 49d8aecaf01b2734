"""Triton kernels of sliding-window attention (nsa_baseline.ops.window_triton): key s is visible to
query t iff lo(t) <= s <= t, lo(t) = max(start of t's sequence, t - W + 1), all in packed rows.
BLOCK_LOCAL = BS > 0 makes the window block-aligned instead (NSA's local blocks, served here rather
than by the selected-attention kernels): lo(t) = start + max(0, (t - start) // BS - W + 1) * BS, W
blocks ending at t's own block.

Forward and dQ: grid (row tile of BLOCK_M, KV head), rows = (token, query head of the KV group)
pairs, so the G heads of a KV head share every K/V tile; each program loops over the key tiles of
BLOCK_N inside its rows' band (lo is non-decreasing in t, so the band of a tile is [lo(first row),
last row]). dK/dV: grid (key tile of BLOCK_N, KV head), looping over the row tiles that see its keys
(FlashAttention-2 order, no atomics: deterministic). Row tiles are the fast grid axis: neighbours
share K/V in L2. Tiles wholly inside the band skip the mask; softmax in base 2 (scale * log2e).
"""
from __future__ import annotations

import triton
import triton.language as tl

_LN2 = tl.constexpr(0.6931471805599453)
_INT_MAX = tl.constexpr(2147483647)


@triton.jit
def _rows(r0, r_end, i_h, tok_start, W, G: tl.constexpr, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr,
          BLOCK_LOCAL: tl.constexpr = 0):
    """Rows [r0, r0 + BLOCK_M) of KV head i_h, valid below r_end: (row mask, token, query head, lo)."""
    o_r = r0 + tl.arange(0, BLOCK_M)
    m_r = o_r < r_end
    tok = o_r // G
    i_hq = i_h * G + o_r % G
    if VARLEN:
        start = tl.load(tok_start + tok, mask=m_r, other=0)
    else:
        start = tl.zeros_like(tok)
    if BLOCK_LOCAL > 0:
        lo = start + tl.maximum((tok - start) // BLOCK_LOCAL - W + 1, 0) * BLOCK_LOCAL
    else:
        lo = tl.maximum(tok - W + 1, start)
    return m_r, tok, i_hq, lo


@triton.jit
def _reach(c, start, W, BLOCK_LOCAL: tl.constexpr):
    """One past the last token (before its sequence's end) that sees key c of a sequence at `start`."""
    if BLOCK_LOCAL > 0:
        return start + ((c - start) // BLOCK_LOCAL + W) * BLOCK_LOCAL
    else:
        return c + W


@triton.jit
def _key_bands(m_r, tok, lo, BLOCK_N: tl.constexpr):
    """(c_lo, c_full, c_mid, c_hi) of a row tile: its keys are [c_lo, c_hi); key tiles from c_lo on
    need the mask until c_full, run unmasked below c_mid, and need it again up to c_hi."""
    lo_min = tl.min(tl.where(m_r, lo, _INT_MAX), 0)
    lo_max = tl.max(tl.where(m_r, lo, 0), 0)
    hi_min = tl.min(tl.where(m_r, tok + 1, _INT_MAX), 0)
    hi_max = tl.max(tl.where(m_r, tok + 1, 0), 0)
    # first tile boundary (counted from lo_min) at or after lo_max; whole tiles from there below hi_min
    c_full = lo_min + tl.cdiv(lo_max - lo_min, BLOCK_N) * BLOCK_N
    c_mid = c_full + tl.maximum(hi_min - c_full, 0) // BLOCK_N * BLOCK_N
    # clamped: a window narrower than the tile's span has no unmasked tile (c_full = c_mid = c_hi)
    return lo_min, tl.minimum(c_full, hi_max), tl.minimum(c_mid, hi_max), hi_max


@triton.jit
def _load_kv(k, v, c0, c_end, p_d, m_d, H, D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """(o_c, b_k, b_v): key ids [BLOCK_N] and K, V [BLOCK_N, BLOCK_D] of one KV head (MASK: zeros
    from c_end on)."""
    o_c = c0 + tl.arange(0, BLOCK_N)
    p_c = o_c.to(tl.int64)[:, None] * (H * D) + p_d[None, :]
    m_c = m_d[None, :]
    if MASK:
        m_c = m_c & (o_c < c_end)[:, None]
    b_k = tl.load(k + p_c, mask=m_c, other=0.)
    b_v = tl.load(v + p_c, mask=m_c, other=0.)
    return o_c, b_k, b_v


@triton.jit
def _fwd_step(b_q, acc, b_m, b_l, k, v, c0, c_end, tok, lo, p_d, m_d, qk_scale,
              H, D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, MASK: tl.constexpr):
    """Online softmax of the rows over keys [c0, c0 + BLOCK_N) (MASK: per-row bands)."""
    o_c, b_k, b_v = _load_kv(k, v, c0, c_end, p_d, m_d, H, D, BLOCK_N, MASK)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
    if MASK:
        vis = (o_c[None, :] >= lo[:, None]) & (o_c[None, :] <= tok[:, None])
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
def window_fwd_kernel(
    q, k, v, o, lse, tok_start, N, W, qk_scale,
    HQ, H, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, PREC: tl.constexpr, WHILE_LOOP: tl.constexpr, BLOCK_LOCAL: tl.constexpr = 0,
):
    i_m, i_h = tl.program_id(0), tl.program_id(1)
    m_r, tok, i_hq, lo = _rows(i_m * BLOCK_M, N * G, i_h, tok_start, W, G, BLOCK_M, VARLEN, BLOCK_LOCAL)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    p_q = (tok.to(tl.int64) * HQ + i_hq)[:, None] * D + o_d[None, :]  # [BLOCK_M, BLOCK_D]
    m_q = m_r[:, None] & m_d[None, :]
    b_q = tl.load(q + p_q, mask=m_q, other=0.)
    p_d = i_h * D + o_d
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    c_lo, c_full, c_mid, c_hi = _key_bands(m_r, tok, lo, BLOCK_N)
    if WHILE_LOOP:  # the interpreter cannot range() over computed bounds
        c0 = c_lo
        while c0 < c_full:
            acc, b_m, b_l = _fwd_step(b_q, acc, b_m, b_l, k, v, c0, c_hi, tok, lo, p_d, m_d, qk_scale,
                                      H, D, BLOCK_N, PREC, True)
            c0 += BLOCK_N
        while c0 < c_mid:
            acc, b_m, b_l = _fwd_step(b_q, acc, b_m, b_l, k, v, c0, c_hi, tok, lo, p_d, m_d, qk_scale,
                                      H, D, BLOCK_N, PREC, False)
            c0 += BLOCK_N
        while c0 < c_hi:
            acc, b_m, b_l = _fwd_step(b_q, acc, b_m, b_l, k, v, c0, c_hi, tok, lo, p_d, m_d, qk_scale,
                                      H, D, BLOCK_N, PREC, True)
            c0 += BLOCK_N
    else:
        for c0 in range(c_lo, c_full, BLOCK_N):
            acc, b_m, b_l = _fwd_step(b_q, acc, b_m, b_l, k, v, c0, c_hi, tok, lo, p_d, m_d, qk_scale,
                                      H, D, BLOCK_N, PREC, True)
        for c0 in range(c_full, c_mid, BLOCK_N):
            acc, b_m, b_l = _fwd_step(b_q, acc, b_m, b_l, k, v, c0, c_hi, tok, lo, p_d, m_d, qk_scale,
                                      H, D, BLOCK_N, PREC, False)
        for c0 in range(c_mid, c_hi, BLOCK_N):
            acc, b_m, b_l = _fwd_step(b_q, acc, b_m, b_l, k, v, c0, c_hi, tok, lo, p_d, m_d, qk_scale,
                                      H, D, BLOCK_N, PREC, True)
    # every valid row sees at least itself: b_l > 0 there (padding rows are not stored)
    b_l_safe = tl.where(b_l > 0, b_l, 1.)
    tl.store(o + p_q, (acc / b_l_safe[:, None]).to(o.dtype.element_ty), mask=m_q)
    tl.store(lse + i_hq.to(tl.int64) * N + tok, (b_m + tl.log2(b_l_safe)) * _LN2, mask=m_r)


@triton.jit
def _dkdv_step(b_k, b_v, dk, dv, q, do, lse2, delta, r0, r_end, i_h, o_c, tok_start, N, W,
               o_d, m_d, qk_scale, HQ, G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
               VARLEN: tl.constexpr, PREC: tl.constexpr, MASK: tl.constexpr, BLOCK_LOCAL: tl.constexpr):
    """dK/dV of the program's keys from rows [r0, r0 + BLOCK_M), in transposed form."""
    m_r, tok, i_hq, lo = _rows(r0, r_end, i_h, tok_start, W, G, BLOCK_M, VARLEN, BLOCK_LOCAL)
    p_q = (tok.to(tl.int64) * HQ + i_hq)[:, None] * D + o_d[None, :]
    m_q = m_r[:, None] & m_d[None, :]
    b_q = tl.load(q + p_q, mask=m_q, other=0.)  # [BLOCK_M, BLOCK_D]
    b_do = tl.load(do + p_q, mask=m_q, other=0.)  # [BLOCK_M, BLOCK_D]
    p_t = i_hq.to(tl.int64) * N + tok
    b_lse = tl.load(lse2 + p_t, mask=m_r, other=float("inf"))  # padding rows: p = 0
    b_delta = tl.load(delta + p_t, mask=m_r, other=0.)
    b_pt = tl.exp2(tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * qk_scale - b_lse[None, :])  # [BLOCK_N, BLOCK_M]
    if MASK:
        vis = (o_c[:, None] >= lo[None, :]) & (o_c[:, None] <= tok[None, :])
        b_pt = tl.where(vis, b_pt, 0.)
    dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PREC)  # [BLOCK_N, BLOCK_D]
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)  # [BLOCK_N, BLOCK_M]
    b_dst = b_pt * (b_dpt - b_delta[None, :])
    dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PREC)  # [BLOCK_N, BLOCK_D]
    return dk, dv


@triton.jit
def window_bwd_dkdv_kernel(
    q, k, v, do, lse2, delta, dk, dv, tok_start, tok_end, N, W, qk_scale, scale,
    HQ, H, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, PREC: tl.constexpr, WHILE_LOOP: tl.constexpr, ACCUMULATE: tl.constexpr = False,
    BLOCK_LOCAL: tl.constexpr = 0,
):
    """Grid (key tile, KV head); dk, dv [N, H, D]. ACCUMULATE: add to what dk / dv hold (fp32 sum)
    instead of overwriting them (the module's fused backward sums its branches this way)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    c_first = i_c * BLOCK_N
    c_last = tl.minimum(c_first + BLOCK_N, N) - 1
    o_c = c_first + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    p_kv = o_c.to(tl.int64)[:, None] * (H * D) + i_h * D + o_d[None, :]
    m_kv = (o_c < N)[:, None] & m_d[None, :]
    b_k = tl.load(k + p_kv, mask=m_kv, other=0.)  # [BLOCK_N, BLOCK_D]
    b_v = tl.load(v + p_kv, mask=m_kv, other=0.)
    # key s is seen by tokens [s, min(reach(s), end of s's sequence)) (reach: s + W, or the end of the
    # W-th block from s's in block-local mode): the tile's keys by [t_lo, t_hi); tokens [c_last, t_full)
    # see all of them (none when the tile spans two sequences)
    if VARLEN:
        end_first = tl.load(tok_end + c_first)
        end_last = tl.load(tok_end + c_last)
        t_hi = tl.minimum(_reach(c_last, tl.load(tok_start + c_last), W, BLOCK_LOCAL), end_last)
        t_full = tl.where(end_first == end_last,
                          tl.minimum(_reach(c_first, tl.load(tok_start + c_first), W, BLOCK_LOCAL), end_first), c_last)
    else:
        t_hi = tl.minimum(_reach(c_last, 0, W, BLOCK_LOCAL), N)
        t_full = tl.minimum(_reach(c_first, 0, W, BLOCK_LOCAL), N)
    # row tiles from r_lo: masked until the first one that starts at a token >= c_last (r_full),
    # then unmasked while they end at or below t_full * G (r_mid), then masked again up to r_hi
    r_lo = c_first * G
    r_hi = t_hi * G
    r_full = r_lo + tl.cdiv(tl.minimum(c_last * G, r_hi) - r_lo, BLOCK_M) * BLOCK_M
    r_mid = r_full + tl.maximum(t_full * G - r_full, 0) // BLOCK_M * BLOCK_M
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if WHILE_LOOP:
        r0 = r_lo
        while r0 < r_full:
            b_dk, b_dv = _dkdv_step(b_k, b_v, b_dk, b_dv, q, do, lse2, delta, r0, r_hi, i_h, o_c, tok_start, N, W,
                                    o_d, m_d, qk_scale, HQ, G, D, BLOCK_M, VARLEN, PREC, True, BLOCK_LOCAL)
            r0 += BLOCK_M
        while r0 < r_mid:
            b_dk, b_dv = _dkdv_step(b_k, b_v, b_dk, b_dv, q, do, lse2, delta, r0, r_hi, i_h, o_c, tok_start, N, W,
                                    o_d, m_d, qk_scale, HQ, G, D, BLOCK_M, VARLEN, PREC, False, BLOCK_LOCAL)
            r0 += BLOCK_M
        while r0 < r_hi:
            b_dk, b_dv = _dkdv_step(b_k, b_v, b_dk, b_dv, q, do, lse2, delta, r0, r_hi, i_h, o_c, tok_start, N, W,
                                    o_d, m_d, qk_scale, HQ, G, D, BLOCK_M, VARLEN, PREC, True, BLOCK_LOCAL)
            r0 += BLOCK_M
    else:
        for r0 in range(r_lo, r_full, BLOCK_M):
            b_dk, b_dv = _dkdv_step(b_k, b_v, b_dk, b_dv, q, do, lse2, delta, r0, r_hi, i_h, o_c, tok_start, N, W,
                                    o_d, m_d, qk_scale, HQ, G, D, BLOCK_M, VARLEN, PREC, True, BLOCK_LOCAL)
        for r0 in range(r_full, r_mid, BLOCK_M):
            b_dk, b_dv = _dkdv_step(b_k, b_v, b_dk, b_dv, q, do, lse2, delta, r0, r_hi, i_h, o_c, tok_start, N, W,
                                    o_d, m_d, qk_scale, HQ, G, D, BLOCK_M, VARLEN, PREC, False, BLOCK_LOCAL)
        for r0 in range(r_mid, r_hi, BLOCK_M):
            b_dk, b_dv = _dkdv_step(b_k, b_v, b_dk, b_dv, q, do, lse2, delta, r0, r_hi, i_h, o_c, tok_start, N, W,
                                    o_d, m_d, qk_scale, HQ, G, D, BLOCK_M, VARLEN, PREC, True, BLOCK_LOCAL)
    b_dk = b_dk * scale
    if ACCUMULATE:
        b_dk += tl.load(dk + p_kv, mask=m_kv, other=0.).to(tl.float32)
        b_dv += tl.load(dv + p_kv, mask=m_kv, other=0.).to(tl.float32)
    tl.store(dk + p_kv, b_dk.to(dk.dtype.element_ty), mask=m_kv)
    tl.store(dv + p_kv, b_dv.to(dv.dtype.element_ty), mask=m_kv)


@triton.jit
def _dq_step(b_q, b_do, b_lse, b_delta, dq, k, v, c0, c_end, tok, lo, p_d, m_d, qk_scale,
             H, D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, MASK: tl.constexpr):
    """dQ of the rows from keys [c0, c0 + BLOCK_N)."""
    o_c, b_k, b_v = _load_kv(k, v, c0, c_end, p_d, m_d, H, D, BLOCK_N, MASK)
    b_p = tl.exp2(tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale - b_lse[:, None])  # [BLOCK_M, BLOCK_N]
    if MASK:
        vis = (o_c[None, :] >= lo[:, None]) & (o_c[None, :] <= tok[:, None])
        b_p = tl.where(vis, b_p, 0.)
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)  # [BLOCK_M, BLOCK_N]
    b_ds = b_p * (b_dp - b_delta[:, None])
    dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)  # [BLOCK_M, BLOCK_D]
    return dq


@triton.jit
def window_bwd_dq_kernel(
    q, k, v, do, lse2, delta, dq, tok_start, N, W, qk_scale, scale,
    HQ, H, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, PREC: tl.constexpr, WHILE_LOOP: tl.constexpr, ACCUMULATE: tl.constexpr = False,
    BLOCK_LOCAL: tl.constexpr = 0,
):
    """Grid (row tile, KV head); dq [N, HQ, D]. ACCUMULATE: add to what dq holds (fp32 sum)."""
    i_m, i_h = tl.program_id(0), tl.program_id(1)
    m_r, tok, i_hq, lo = _rows(i_m * BLOCK_M, N * G, i_h, tok_start, W, G, BLOCK_M, VARLEN, BLOCK_LOCAL)
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
    c_lo, c_full, c_mid, c_hi = _key_bands(m_r, tok, lo, BLOCK_N)
    if WHILE_LOOP:
        c0 = c_lo
        while c0 < c_full:
            b_dq = _dq_step(b_q, b_do, b_lse, b_delta, b_dq, k, v, c0, c_hi, tok, lo, p_d, m_d, qk_scale,
                            H, D, BLOCK_N, PREC, True)
            c0 += BLOCK_N
        while c0 < c_mid:
            b_dq = _dq_step(b_q, b_do, b_lse, b_delta, b_dq, k, v, c0, c_hi, tok, lo, p_d, m_d, qk_scale,
                            H, D, BLOCK_N, PREC, False)
            c0 += BLOCK_N
        while c0 < c_hi:
            b_dq = _dq_step(b_q, b_do, b_lse, b_delta, b_dq, k, v, c0, c_hi, tok, lo, p_d, m_d, qk_scale,
                            H, D, BLOCK_N, PREC, True)
            c0 += BLOCK_N
    else:
        for c0 in range(c_lo, c_full, BLOCK_N):
            b_dq = _dq_step(b_q, b_do, b_lse, b_delta, b_dq, k, v, c0, c_hi, tok, lo, p_d, m_d, qk_scale,
                            H, D, BLOCK_N, PREC, True)
        for c0 in range(c_full, c_mid, BLOCK_N):
            b_dq = _dq_step(b_q, b_do, b_lse, b_delta, b_dq, k, v, c0, c_hi, tok, lo, p_d, m_d, qk_scale,
                            H, D, BLOCK_N, PREC, False)
        for c0 in range(c_mid, c_hi, BLOCK_N):
            b_dq = _dq_step(b_q, b_do, b_lse, b_delta, b_dq, k, v, c0, c_hi, tok, lo, p_d, m_d, qk_scale,
                            H, D, BLOCK_N, PREC, True)
    b_dq = b_dq * scale
    if ACCUMULATE:
        b_dq += tl.load(dq + p_q, mask=m_q, other=0.).to(tl.float32)
    tl.store(dq + p_q, b_dq.to(dq.dtype.element_ty), mask=m_q)
