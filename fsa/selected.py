"""Public FSA selected attention: the autograd Function and the contract's entry point.

Same signature and results (to rounding) as nsa_baseline.selected_attention. The inverted index is
built once in the forward and saved for the backward.
"""
from __future__ import annotations

from typing import Optional

import torch

from fsa.backward import fsa_selected_bwd
from fsa.compiled import selected_attention_op
from fsa.forward import fsa_selected_fwd
from nsa_baseline.checks import require_kernel_device
from nsa_baseline.contract import (BLOCK_SIZES, KERNEL_DTYPES, check_block_indices, check_selected_args,
                                   index_checks_requested)
from nsa_baseline.utils.block_index import build_block_index


class FSASelectedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_indices, block_size, cu_seqlens, scale):
        index = build_block_index(block_indices, block_size, cu_seqlens, k.shape[1])
        topk = block_indices.shape[2]
        o, lse = fsa_selected_fwd(q, k, v, index, block_size, topk, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.index, ctx.block_size, ctx.topk, ctx.scale = index, block_size, topk, scale
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = fsa_selected_bwd(q, k, v, o, lse, do, ctx.index, ctx.block_size, ctx.topk, ctx.scale, dlse)
        return dq, dk, dv, None, None, None, None


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
    r"""Selected attention with the KV-block-outer (FSA) kernels.

    Args:
        q: [N, HQ, D] fp16/bf16 (fp32 for the CPU interpreter); k, v: [N, H, D], HQ = G * H, any G >= 1.
        block_indices: int32 [N, H, T], key-block ids from the start of the query's sequence, -1 = empty.
        block_size: BS in {16, 32, 64, 128}.
        cu_seqlens: int32 [B + 1] packed sequences (None: one sequence).
        scale: softmax scale, default D ** -0.5.
        return_lse: also return lse, float32 [HQ, N] (natural log, -inf for a row that sees no key).
        check_indices: validate index values (range, distinctness); default from NSA_CHECK_INDICES.
            Value checks (these and cu_seqlens') run in eager mode only, not under torch.compile.
    Returns:
        o [N, HQ, D] in q.dtype, or (o, lse).
    """
    a = check_selected_args(q, k, v, block_indices, block_size, cu_seqlens, scale,
                            supported_block_sizes=BLOCK_SIZES, supported_dtypes=KERNEL_DTYPES)
    require_kernel_device(q, "selected_attention: ")
    if torch.compiler.is_compiling():  # custom ops torch.compile traces through (fsa/compiled.py)
        o, lse = selected_attention_op(q.contiguous(), k.contiguous(), v.contiguous(), block_indices.contiguous(),
                                       block_size, a.cu_seqlens, a.scale)
        return (o, lse) if return_lse else o
    if index_checks_requested(check_indices):
        check_block_indices(block_indices, block_size, a.cu_seqlens)
    o, lse = FSASelectedAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(),
                                        block_indices.contiguous(), block_size, a.cu_seqlens, a.scale)
    return (o, lse) if return_lse else o
