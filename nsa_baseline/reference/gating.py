"""NSA's gated sum of the three branch outputs, as the eager PyTorch expression (the oracle of
nsa_baseline.ops.gated_sum)."""
from __future__ import annotations

import torch

from nsa_baseline.checks import check_gated_sum_args


def gated_sum_ref(gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor) -> torch.Tensor:
    r"""o = g_0 * o_cmp + g_1 * o_slc + g_2 * o_win per (token, head) row.

    Args:
        gates: [N, HQ, 3] (compressed, selected, window); o_cmp, o_slc, o_win: [N, HQ, D].
    Returns:
        o [N, HQ, D] in torch's promoted dtype of the four inputs (bf16 branches with fp32 gates give
        fp32), each product and sum rounded to that dtype as eager PyTorch does. Differentiable.
    """
    check_gated_sum_args(gates, o_cmp, o_slc, o_win)
    return gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_win  # [N, HQ, D]
