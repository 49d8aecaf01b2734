"""The row terms of a softmax-attention backward, in one Triton pass over o and do:
delta = rowsum(o * do) - dlse, and optionally lse2 = lse * log2(e) (+inf where lse = -inf) for kernels
that keep base-2 statistics.

Shared by the compressed-attention and window backwards (delta and lse2) and the FSA backward (delta;
its PyTorch version made fp32 copies of o and do: ~10 ms of elementwise kernels at 64K tokens x 64
heads x 128 on an H100, results/module_profile).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from nsa_baseline.utils.triton_utils import LOG2E, next_pow2

_LOG2E = tl.constexpr(LOG2E)


@triton.jit
def _row_terms_kernel(o, do, dlse, lse, delta, lse2, N, HQ, D: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_T: tl.constexpr, HAS_DLSE: tl.constexpr, WITH_LSE2: tl.constexpr):
    i_t, i_hq = tl.program_id(0), tl.program_id(1)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < N
    o_d = tl.arange(0, BLOCK_D)
    p = (o_t.to(tl.int64) * HQ + i_hq)[:, None] * D + o_d[None, :]
    m = m_t[:, None] & (o_d < D)[None, :]
    b_o = tl.load(o + p, mask=m, other=0.).to(tl.float32)  # [BLOCK_T, BLOCK_D]
    b_do = tl.load(do + p, mask=m, other=0.).to(tl.float32)
    b_delta = tl.sum(b_o * b_do, 1)  # [BLOCK_T]
    p_t = i_hq.to(tl.int64) * N + o_t
    if HAS_DLSE:  # d lse / d s = p: a gradient on the lse shifts delta
        b_delta -= tl.load(dlse + p_t, mask=m_t, other=0.).to(tl.float32)
    tl.store(delta + p_t, b_delta, mask=m_t)
    if WITH_LSE2:
        b_lse = tl.load(lse + p_t, mask=m_t, other=0.)
        tl.store(lse2 + p_t, tl.where(b_lse == float("-inf"), float("inf"), b_lse * _LOG2E), mask=m_t)


def _row_terms(o, do, dlse, lse):
    n, hq, d = o.shape
    delta = torch.empty(hq, n, dtype=torch.float32, device=o.device)
    lse2 = torch.empty_like(delta) if lse is not None else None
    if n == 0 or hq == 0:
        return delta, lse2
    block_t = 32
    _row_terms_kernel[(triton.cdiv(n, block_t), hq)](
        o.contiguous(), do.contiguous(), dlse.contiguous() if dlse is not None else delta,
        lse.contiguous() if lse is not None else delta, delta, lse2 if lse2 is not None else delta, n, hq,
        D=d, BLOCK_D=max(16, next_pow2(d)), BLOCK_T=block_t, HAS_DLSE=dlse is not None,
        WITH_LSE2=lse is not None, num_warps=4)
    return delta, lse2


def softmax_bwd_delta(o: torch.Tensor, do: torch.Tensor, dlse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float32 [HQ, N]: sum_d o[n, hq, d] * do[n, hq, d] (minus dlse[hq, n]), for o, do [N, HQ, D]
    on a device the kernels serve."""
    return _row_terms(o, do, dlse, None)[0]


def softmax_bwd_preprocess(o: torch.Tensor, do: torch.Tensor, lse: torch.Tensor,
                           dlse: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse2, delta) float32 [HQ, N]: lse [HQ, N] (natural log) * log2(e), +inf where lse = -inf (rows
    that see no key: exp2(s - lse2) = 0), and softmax_bwd_delta(o, do, dlse)."""
    delta, lse2 = _row_terms(o, do, dlse, lse)
    return lse2, delta


def lse_base2(lse: torch.Tensor) -> torch.Tensor:
    """lse2 of softmax_bwd_preprocess alone, for a backward whose delta came from elsewhere (the
    module's gated-sum backward): lse * log2(e), +inf where lse = -inf."""
    return torch.where(lse == float("-inf"), float("inf"), lse * LOG2E)
