"""Public vanilla-NSA selected attention: argument checks, autograd Function, Triton kernels
(forward: nsa_baseline.ops.selected_fwd; backward: nsa_baseline.ops.selected_bwd)."""
from __future__ import annotations

from typing import Optional

import torch

from nsa_baseline.checks import require_kernel_device
from nsa_baseline.contract import (BLOCK_SIZES, KERNEL_DTYPES, check_block_indices, check_selected_args,
                                   index_checks_requested)
from nsa_baseline.ops.compiled import nsa_selected_fwd_op
from nsa_baseline.ops.selected_bwd import nsa_selected_bwd
from nsa_baseline.ops.selected_fwd import nsa_selected_fwd
from nsa_baseline.utils.varlen import token_positions


class NSASelectedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_indices, block_size, cu_seqlens, scale, token_pos):
        o, lse = nsa_selected_fwd(q, k, v, block_indices, block_size, scale, token_pos)
        ctx.save_for_backward(q, k, v, o, lse, block_indices, cu_seqlens, token_pos)
        ctx.block_size, ctx.scale = block_size, scale
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, block_indices, cu_seqlens, token_pos = ctx.saved_tensors
        do = torch.zeros_like(o) if do is None else do.contiguous()
        dlse = None if dlse is None else dlse.contiguous()
        dq, dk, dv = nsa_selected_bwd(q, k, v, o, lse, do, block_indices, ctx.block_size, ctx.scale,
                                      cu_seqlens, token_pos, dlse=dlse)
        return dq, dk, dv, None, None, None, None, None


def selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    check_indices: Optional[bool] = None,
):
    r"""Selected attention with the vanilla NSA (query-outer) Triton kernels.

    Args:
        q: [N, HQ, D] fp16 / bf16 / fp32, packed sequences; HQ = G * H for any G >= 1.
        k, v: [N, H, D], same dtype as q. D in {64, 96, 128, 192, 256} (any D works; others padded).
        block_indices: int32 [N, H, T]: key blocks counted from the start of the query's own
            sequence, -1 for an empty slot; shared by the G query heads of a KV head. Slots that
            are out of range or wholly in the future are skipped.
        block_size: keys per block, one of 16, 32, 64, 128.
        cu_seqlens: int32 [B + 1] sequence boundaries, or None for one sequence.
        scale: softmax scale, default D ** -0.5.
        return_lse: also return lse.
        check_indices: validate block_indices values (a device sync); None follows NSA_CHECK_INDICES.
            Value checks run in eager mode only, not under torch.compile.
    Returns:
        o [N, HQ, D] in q.dtype, and with return_lse the float32 lse [HQ, N] (natural log; a row
        that sees no key has o = 0 and lse = -inf). Differentiable in q, k, v (and through lse).
    """
    a = check_selected_args(q, k, v, block_indices, block_size, cu_seqlens, scale,
                            supported_block_sizes=BLOCK_SIZES, supported_dtypes=KERNEL_DTYPES)
    require_kernel_device(q, "selected_attention: ")
    pos, _ = token_positions(a.cu_seqlens, a.num_tokens)
    if torch.compiler.is_compiling():  # custom ops torch.compile traces through (ops/compiled.py)
        o, lse = nsa_selected_fwd_op(q.contiguous(), k.contiguous(), v.contiguous(), block_indices.contiguous(),
                                     a.cu_seqlens, pos.int(), block_size, a.scale)
        return (o, lse) if return_lse else o
    if index_checks_requested(check_indices):
        check_block_indices(block_indices, block_size, a.cu_seqlens)
    o, lse = NSASelectedAttention.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), block_indices.contiguous(), block_size,
        a.cu_seqlens, a.scale, pos.int(),
    )
    return (o, lse) if return_lse else o
