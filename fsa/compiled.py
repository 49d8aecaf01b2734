"""FSA selected attention as torch.library custom ops, for torch.compile (fullgraph included).

Eager calls keep the plain autograd.Function of fsa/selected.py (a custom op adds dispatcher cost on
every call, which matters where FSA is host-bound). Under torch.compile, `fsa.selected_attention`
routes here: the forward op returns the inverted block index beside (o, lse) so the backward op
reuses it, and the fake implementations give every output's shape from the input shapes alone
(nb_bound = N // BS + B + 1 needs no values), so compiled graphs trace through without breaks.
"""
# No `from __future__ import annotations`: torch.library infers the op schemas from real annotations.
from typing import Optional

import torch
from torch import Tensor

from fsa.backward import fsa_selected_bwd
from fsa.forward import fsa_selected_fwd
from nsa_baseline.utils.block_index import BlockIndex, block_id_bound, build_block_index

INDEX_FIELDS = ("row_offsets", "tokens", "pair_pos", "block_start", "block_end")


def _index_of(row_offsets, tokens, pair_pos, block_start, block_end) -> BlockIndex:
    return BlockIndex(block_start.shape[0], row_offsets.shape[0] - 1, row_offsets, tokens, pair_pos,
                      block_start, block_end)


@torch.library.custom_op("nsa_kernels::fsa_selected_fwd", mutates_args=())
def fsa_selected_fwd_op(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, cu_seqlens: Tensor,
                     block_size: int, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(o, lse, *the block index's tensors) of one FSA forward."""
    index = build_block_index(block_indices, block_size, cu_seqlens, k.shape[1])
    o, lse = fsa_selected_fwd(q, k, v, index, block_size, block_indices.shape[2], scale)
    return (o, lse, *(getattr(index, f) for f in INDEX_FIELDS))


@fsa_selected_fwd_op.register_fake
def _(q, k, v, block_indices, cu_seqlens, block_size, scale):
    n, hq, d = q.shape
    h, t_sel = k.shape[1], block_indices.shape[2]
    nb = block_id_bound(n, block_size, cu_seqlens.shape[0] - 1)
    i32 = dict(dtype=torch.int32, device=q.device)
    return (q.new_empty(n, hq, d), q.new_empty(hq, n, dtype=torch.float32), q.new_empty(h * nb + 1, **i32),
            q.new_empty(n * h * t_sel, **i32), q.new_empty(n, h, t_sel, **i32), q.new_empty(nb, **i32),
            q.new_empty(nb, **i32))


@torch.library.custom_op("nsa_kernels::fsa_selected_bwd", mutates_args=())
def fsa_selected_bwd_op(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor, dlse: Optional[Tensor],
                     row_offsets: Tensor, tokens: Tensor, pair_pos: Tensor, block_start: Tensor, block_end: Tensor,
                     block_size: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    index = _index_of(row_offsets, tokens, pair_pos, block_start, block_end)
    return fsa_selected_bwd(q, k, v, o, lse, do.contiguous(), index, block_size, pair_pos.shape[2], scale, dlse)


@fsa_selected_bwd_op.register_fake
def _(q, k, v, o, lse, do, dlse, row_offsets, tokens, pair_pos, block_start, block_end, block_size, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, _, _, block_size, scale = inputs
    o, lse, *index = output
    ctx.save_for_backward(q, k, v, o, lse, *index)
    ctx.block_size, ctx.scale = block_size, scale
    ctx.mark_non_differentiable(*index)


def _backward(ctx, do, dlse, *_index_grads):
    q, k, v, o, lse, *index = ctx.saved_tensors
    dq, dk, dv = fsa_selected_bwd_op(q, k, v, o, lse, do, dlse, *index, ctx.block_size, ctx.scale)
    return dq, dk, dv, None, None, None, None


fsa_selected_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def selected_attention_op(q, k, v, block_indices, block_size: int, cu_seqlens: Tensor, scale: float):
    """(o, lse) through the custom ops (inputs already checked and contiguous)."""
    o, lse, *_ = fsa_selected_fwd_op(q, k, v, block_indices, cu_seqlens, block_size, scale)
    return o, lse
