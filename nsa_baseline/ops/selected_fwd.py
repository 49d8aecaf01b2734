"""Vanilla NSA selected-attention forward (query-outer), as in NSA §3.4 / FSA §2.
Grid (N, H): one program per (query token, KV head) loads the token's G query heads as one
[G_PAD, D_PAD] tile and walks the token's T selected key blocks with an online softmax.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_baseline.ops.tuning import FWD_CONFIGS, query_outer_config
from nsa_baseline.utils.triton_utils import LOG2E, new_output, next_pow2


@triton.jit
def pair_valid(idx, last_block):
    # A slot is used when it holds a block of the sequence that is not wholly in the future.
    # Comparing block numbers (not idx * BS) cannot overflow whatever the index holds.
    return (idx >= 0) & (idx <= last_block)


@triton.jit
def load_kv_block(k, v, bos, pos, idx, valid, i_h, H: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                  D_PAD: tl.constexpr):
    """K, V [BS, D_PAD] of key block `idx` of the sequence starting at packed row `bos`, and the
    mask [BS] of the keys the query at position `pos` sees (none for an unused slot)."""
    o_c = tl.arange(0, BS)
    o_d = tl.arange(0, D_PAD)
    o_key = tl.where(valid, idx, 0) * BS + o_c  # [BS] key positions inside the sequence
    m_key = (o_key <= pos) & valid  # causal inside the block
    m_kd = m_key[:, None] & (o_d < D)[None, :]
    p_kv = ((bos + o_key).to(tl.int64)[:, None] * H + i_h) * D + o_d[None, :]
    b_k = tl.load(k + p_kv, mask=m_kd, other=0.)  # [BS, D_PAD]
    b_v = tl.load(v + p_kv, mask=m_kd, other=0.)  # [BS, D_PAD]
    return b_k, b_v, m_key


@triton.jit
def _fwd_block(b_q, b_acc, b_m, b_l, k, v, bos, pos, idx, valid, i_h,
               H: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, D_PAD: tl.constexpr,
               scale_log2, IEEE: tl.constexpr):
    """Online-softmax update of (acc, m, l) with key block `idx` of the token's sequence."""
    b_k, b_v, m_key = load_kv_block(k, v, bos, pos, idx, valid, i_h, H, D, BS, D_PAD)
    if IEEE:
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")  # [G_PAD, BS]
    else:
        b_s = tl.dot(b_q, tl.trans(b_k))
    b_s = tl.where(m_key[None, :], b_s * scale_log2, float("-inf"))
    b_mn = tl.maximum(b_m, tl.max(b_s, 1))  # [G_PAD]
    b_mu = tl.where(b_mn == float("-inf"), 0., b_mn)  # a row with nothing seen yet stays exact
    b_alpha = tl.exp2(b_m - b_mu)
    b_p = tl.exp2(b_s - b_mu[:, None])  # [G_PAD, BS]
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    if IEEE:
        b_pv = tl.dot(b_p.to(b_v.dtype), b_v, input_precision="ieee")
    else:
        b_pv = tl.dot(b_p.to(b_v.dtype), b_v)
    b_acc = b_acc * b_alpha[:, None] + b_pv  # [G_PAD, D_PAD]
    return b_acc, b_mn, b_l


@triton.jit
def nsa_selected_fwd_kernel(
    q, k, v, o, lse, block_indices, token_pos, N, scale_log2,
    H: tl.constexpr, G: tl.constexpr, T: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    G_PAD: tl.constexpr, D_PAD: tl.constexpr, SKIP_UNUSED: tl.constexpr, IEEE: tl.constexpr,
):
    tl.static_assert(G_PAD >= 16 and G_PAD >= G)
    i_n, i_h = tl.program_id(0), tl.program_id(1)
    i_n64 = i_n.to(tl.int64)
    pos = tl.load(token_pos + i_n)  # position of the token inside its sequence
    bos = i_n - pos  # packed row where the sequence begins
    last_block = pos // BS

    o_g = tl.arange(0, G_PAD)
    o_d = tl.arange(0, D_PAD)
    m_gd = (o_g < G)[:, None] & (o_d < D)[None, :]
    p_q = (i_n64 * (H * G) + i_h * G + o_g[:, None]) * D + o_d[None, :]
    b_q = tl.load(q + p_q, mask=m_gd, other=0.)  # [G_PAD, D_PAD]

    b_m = tl.full([G_PAD], float("-inf"), tl.float32)
    b_l = tl.zeros([G_PAD], tl.float32)
    b_acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    p_idx = block_indices + (i_n64 * H + i_h) * T
    for t in range(T):
        idx = tl.load(p_idx + t)
        valid = pair_valid(idx, last_block)
        if SKIP_UNUSED:  # branch around unused slots (saves the work, may stop load pipelining)
            if valid:
                b_acc, b_m, b_l = _fwd_block(b_q, b_acc, b_m, b_l, k, v, bos, pos, idx, valid, i_h,
                                             H, D, BS, D_PAD, scale_log2, IEEE)
        else:  # unused slots load nothing (all-false masks) but still run the dots
            b_acc, b_m, b_l = _fwd_block(b_q, b_acc, b_m, b_l, k, v, bos, pos, idx, valid, i_h,
                                         H, D, BS, D_PAD, scale_log2, IEEE)

    seen = b_l > 0
    b_o = b_acc / tl.where(seen, b_l, 1.)[:, None]  # rows that saw nothing keep acc = 0
    tl.store(o + p_q, b_o.to(o.dtype.element_ty), mask=m_gd)
    b_lse = tl.where(seen, (b_m + tl.log2(tl.where(seen, b_l, 1.))) * 0.6931471805599453, float("-inf"))
    tl.store(lse + (i_h * G + o_g).to(tl.int64) * N + i_n, b_lse, mask=o_g < G)


def nsa_selected_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    scale: float,
    token_pos: torch.Tensor,
    num_warps: int | None = None,
    num_stages: int | None = None,
    skip_unused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """o [N, HQ, D] (q.dtype) and lse float32 [HQ, N] for contiguous q [N, HQ, D], k/v [N, H, D],
    block_indices int32 [N, H, T] and token_pos int32 [N] (each token's position in its sequence).
    Knobs (None = FWD_CONFIGS): num_warps, num_stages, skip_unused (branch around unused slots, or
    run them with all-false masks so that the loop body stays straight for the load pipeliner)."""
    n, hq, d = q.shape
    h, t_sel = k.shape[1], block_indices.shape[2]
    g = hq // h
    d_pad = max(16, next_pow2(d))
    warps, stages, skip = query_outer_config(FWD_CONFIGS, d_pad, block_size, num_warps, num_stages, skip_unused)
    o = new_output((n, hq, d), q.dtype, q.device)
    lse = new_output((hq, n), torch.float32, q.device)
    nsa_selected_fwd_kernel[(n, h)](
        q, k, v, o, lse, block_indices, token_pos, n, scale * LOG2E,
        H=h, G=g, T=t_sel, D=d, BS=block_size, G_PAD=max(16, next_pow2(g)), D_PAD=d_pad,
        SKIP_UNUSED=skip, IEEE=q.dtype == torch.float32,
        num_warps=warps, num_stages=stages,
    )
    return o, lse
