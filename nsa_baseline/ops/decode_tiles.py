"""Tile helpers shared by the decode kernels (decode_select.py, decode_attend.py): the rows of a tile
are the G query heads of one KV head, padded to G_PAD >= 16 (tl.dot's smallest M); every key tile
loaded serves the whole group. Softmax statistics in base 2 (scale * log2e folded into qk_scale)."""
from __future__ import annotations

import triton
import triton.language as tl

from nsa_baseline.utils.triton_utils import next_pow2


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a [M, K] x b [K, N] -> fp32 [M, N]; exact fp32 products for fp32 inputs."""
    if IEEE:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _online_update(b_q, b_m, b_l, b_acc, b_k, b_v, m_cols, qk_scale, IEEE: tl.constexpr):
    """One online-softmax step of the rows b_q [G_PAD, BLOCK_D] over keys b_k, b_v [BN, BLOCK_D]
    (m_cols [BN]: which keys the rows see). Rows that saw nothing keep m = -inf, l = 0, acc = 0."""
    b_s = _dot(b_q, tl.trans(b_k), IEEE) * qk_scale  # [G_PAD, BN]
    b_s = tl.where(m_cols[None, :], b_s, float("-inf"))
    m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0., m_new)
    alpha = tl.exp2(b_m - m_ref)  # [G_PAD]
    b_p = tl.exp2(b_s - m_ref[:, None])  # [G_PAD, BN]
    b_l = b_l * alpha + tl.sum(b_p, axis=1)
    b_acc = b_acc * alpha[:, None] + _dot(b_p.to(b_v.dtype), b_v, IEEE)  # [G_PAD, BLOCK_D]
    return m_new, b_l, b_acc


@triton.jit
def _finish(b_l, b_acc):
    """o = acc / l; 0 for rows that saw no key."""
    return b_acc / tl.where(b_l > 0, b_l, 1.)[:, None]


def group_pad(g: int) -> int:
    """Rows of a decode tile: the group's G heads padded to a power of two >= 16."""
    return max(16, next_pow2(g))


def head_pad(d: int) -> int:
    return next_pow2(max(d, 16))
