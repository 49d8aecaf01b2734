"""Vanilla NSA selected attention as torch.library custom ops, for torch.compile (fullgraph included).

As for FSA (fsa/compiled.py): eager calls keep the autograd.Function of ops/selected.py; under
torch.compile `nsa_baseline.selected_attention` routes here. The backward builds its inverted block
index itself, as the eager backward does.
"""
# No `from __future__ import annotations`: torch.library infers the op schemas from real annotations.
from typing import Optional

import torch
from torch import Tensor

from nsa_baseline.ops.selected_bwd import nsa_selected_bwd
from nsa_baseline.ops.selected_fwd import nsa_selected_fwd


@torch.library.custom_op("nsa_kernels::nsa_selected_fwd", mutates_args=())
def nsa_selected_fwd_op(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, cu_seqlens: Tensor,
                        token_pos: Tensor, block_size: int, scale: float) -> tuple[Tensor, Tensor]:
    """(o, lse); cu_seqlens is unused here but saved for the backward's block index."""
    return nsa_selected_fwd(q, k, v, block_indices, block_size, scale, token_pos)


@nsa_selected_fwd_op.register_fake
def _(q, k, v, block_indices, cu_seqlens, token_pos, block_size, scale):
    n, hq, _ = q.shape
    return torch.empty_like(q), q.new_empty(hq, n, dtype=torch.float32)


@torch.library.custom_op("nsa_kernels::nsa_selected_bwd", mutates_args=())
def nsa_selected_bwd_op(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor, dlse: Optional[Tensor],
                        block_indices: Tensor, cu_seqlens: Tensor, token_pos: Tensor, block_size: int,
                        scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return nsa_selected_bwd(q, k, v, o, lse, do.contiguous(), block_indices, block_size, scale, cu_seqlens,
                            token_pos, dlse=None if dlse is None else dlse.contiguous())


@nsa_selected_bwd_op.register_fake
def _(q, k, v, o, lse, do, dlse, block_indices, cu_seqlens, token_pos, block_size, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, block_indices, cu_seqlens, token_pos, block_size, scale = inputs
    ctx.save_for_backward(q, k, v, *output, block_indices, cu_seqlens, token_pos)
    ctx.block_size, ctx.scale = block_size, scale


def _backward(ctx, do, dlse):
    q, k, v, o, lse, block_indices, cu_seqlens, token_pos = ctx.saved_tensors
    dq, dk, dv = nsa_selected_bwd_op(q, k, v, o, lse, do, dlse, block_indices, cu_seqlens, token_pos,
                                     ctx.block_size, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


nsa_selected_fwd_op.register_autograd(_backward, setup_context=_setup_context)
