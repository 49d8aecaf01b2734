"""delta = rowsum(o * do) (- dlse) of an attention backward, as one Triton pass.

Shared by the FSA backward (whose PyTorch version made fp32 copies of o and do: ~10 ms of elementwise
kernels at 64K tokens x 64 heads x 128 on an H100, results/module_profile) and any kernel family that
needs the softmax-backward row term.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from nsa_baseline.utils.triton_utils import next_pow2


@triton.jit
def _delta_kernel(o, do, dlse, delta, N, HQ, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                  HAS_DLSE: tl.constexpr):
    i_t, i_hq = tl.program_id(0), tl.program_id(1)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < N
    o_d = tl.arange(0, BLOCK_D)
    p = (o_t.to(tl.int64) * HQ + i_hq)[:, None] * D + o_d[None, :]
    m = m_t[:, None] & (o_d < D)[None, :]
    b_delta = tl.sum(tl.load(o + p, mask=m, other=0.).to(tl.float32) * tl.load(do + p, mask=m, other=0.).to(tl.float32), 1)
    p_t = i_hq.to(tl.int64) * N + o_t
    if HAS_DLSE:  # d lse / d s = p: a gradient on the lse shifts delta
        b_delta -= tl.load(dlse + p_t, mask=m_t, other=0.).to(tl.float32)
    tl.store(delta + p_t, b_delta, mask=m_t)


def softmax_bwd_delta(o: torch.Tensor, do: torch.Tensor, dlse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float32 [HQ, N]: sum_d o[n, hq, d] * do[n, hq, d] (minus dlse[hq, n]), for o, do [N, HQ, D]
    (contiguous, same shape) on a device the kernels serve."""
    n, hq, d = o.shape
    delta = torch.empty(hq, n, dtype=torch.float32, device=o.device)
    if n == 0 or hq == 0:
        return delta
    block_t = 32
    _delta_kernel[(triton.cdiv(n, block_t), hq)](
        o.contiguous(), do.contiguous(), dlse.contiguous() if dlse is not None else delta, delta, n, hq,
        D=d, BLOCK_D=max(16, next_pow2(d)), BLOCK_T=block_t, HAS_DLSE=dlse is not None, num_warps=4)
    return delta
