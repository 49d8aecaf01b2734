"""compress_kv's forward and an explicit backward that ADDS dx into a given buffer, for the module's
fused backward (nsa_baseline.fused_attention): there the keys' gradient already holds the window and
selected branches' share, and the compressed branch's share is added by the op that scatters the
summaries' gradient back to the keys (an in-place add or index_add) instead of being written to a
new tensor that autograd then adds (two more passes over [N, H, D]).

Same paths and maths as nsa_baseline.ops.compression (block path: one GEMM of the stride-blocks;
gather path: gathered spans), so the forward is the same as compress_kv's; the backward is written
out by hand (no autograd) from what the forward keeps (`CompressState`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from nsa_baseline.checks import check_compress_inputs
from nsa_baseline.contract import kernels_serve
from nsa_baseline.ops.compression import BLOCK_PATH_MIN_CUDA_ROWS, compress_gather, uses_block_path
from nsa_baseline.ops.compression_grad_kernel import add_linear_block_grad, add_linear_window_grad
from nsa_baseline.ops.compression_inplace import compress_linear_dweight, compress_linear_fwd
from nsa_baseline.ops.compression_blocks import (accumulation_dtype, key_blocks, linear_windows, mean_windows,
                                                 pick_summaries, stacked_weight)
from nsa_baseline.ops.compression_layout import BlockLayout, block_layout, gather_layout
from nsa_baseline.ops.compression import _GATHER_BUDGET


# The keys' share of the linear compression's gradient through one Triton pass that adds into dx
# (ops/compression_grad_kernel.py) instead of a GEMM output as large as dx and a strided add: 1.7-1.8x
# faster on the H100 at 16K / 64K tokens (2.48 -> 1.40 ms at 64K x 64 heads; results/compression_bench).
# Off runs the PyTorch path (also the one for gathered blocks, varlen or CPU); the bench times both.
FUSED_BLOCK_GRAD = True

# The linear compression's GEMMs on x where it lies (ops/compression_inplace.py; block path on x's own
# grid, kernels serving x): the forward skips the transposing copy of x into stride-blocks and the
# GEMM output's shifted sum and transpose (one kernel writes x_cmp), keeps no copy of x for d weight
# (saving [N, H, D] per compressed tensor until the backward), and the backward adds the keys' share
# from the windows' gradient without building dz. On the gather path (fewer rows on CUDA, or strides
# the block path does not serve) the same forward kernel replaces the gathered spans ([N_cmp,
# kernel_size, H, D]) and their matmul; the gather backward is unchanged (it keeps no state). On the
# H100 (63122c6, results/compression_bench/README.md): the compression's fwd+bwd 1.3-3.4x faster at
# 16K / 64K, 1.06 -> 0.06 GiB kept per tensor at 64K x 64 heads; the module at 64K g=1 197.9 -> 193.5 ms,
# 16K g=1 31.8 -> 30.8. Off: the GEMM path (compression_bench --in-place times both).
IN_PLACE_LINEAR = True


class CompressState(NamedTuple):
    """What compress_into_backward needs of one compress_kv_forward call."""

    layout: Optional[BlockLayout]  # block path; None = gather path
    blocks: Optional[torch.Tensor]  # block path, linear: X_blk [H, NB, stride * D] (the GEMM's input)
    num_cmp: int
    in_place: bool = False  # block path, linear, through ops/compression_inplace.py (no X_blk kept)


def compress_kv_forward(x, cu_seqlens, kernel_size: int, kernel_stride: int, weight=None, pos_emb=None,
                        keep_blocks: bool = True):
    """(x_cmp [N_cmp, H, D], cu_seqlens_cmp, CompressState): compress_kv's result, run without autograd.
    keep_blocks: keep the block path's GEMM input for d weight (False: the weights need no gradient)."""
    check_compress_inputs(x, cu_seqlens, kernel_size, kernel_stride, weight, pos_emb)
    n, h, d = x.shape
    with torch.no_grad():
        if uses_block_path(kernel_size, kernel_stride) and (not x.is_cuda or n * h >= BLOCK_PATH_MIN_CUDA_ROWS):
            layout = block_layout(cu_seqlens, n, kernel_size, kernel_stride, x.device)
            if layout.num_cmp == 0:
                return x.new_zeros(0, h, d), layout.cu_cmp, CompressState(layout, None, 0)
            acc = accumulation_dtype(x.dtype)
            if weight is None:
                return (pick_summaries(mean_windows(x, layout, kernel_size, kernel_stride, acc), layout, x.dtype),
                        layout.cu_cmp, CompressState(layout, None, layout.num_cmp))
            if in_place_compress_serves(x, weight) and layout.rows is None:
                x_cmp = compress_linear_fwd(x.contiguous(), weight, pos_emb, layout.first_block, layout.num_cmp,
                                            kernel_size, kernel_stride)
                return x_cmp, layout.cu_cmp, CompressState(layout, None, layout.num_cmp, in_place=True)
            blocks = key_blocks(x, layout, kernel_stride)
            y = linear_windows(blocks, weight, pos_emb, kernel_size, kernel_stride, acc)
            state = CompressState(layout, blocks if keep_blocks else None, layout.num_cmp)
            return pick_summaries(y, layout, x.dtype), layout.cu_cmp, state
        if in_place_compress_serves(x, weight):  # the gather backward keeps no state
            cu_cmp, first = gather_layout(cu_seqlens, n, kernel_size, kernel_stride, x.device)
            x_cmp = compress_linear_fwd(x.contiguous(), weight, pos_emb, first, first.numel(), kernel_size,
                                        kernel_stride, first_rows=True)
            return x_cmp, cu_cmp, CompressState(None, None, x_cmp.shape[0])
        x_cmp, cu_cmp = compress_gather(x, cu_seqlens, kernel_size, kernel_stride, weight, pos_emb)
        return x_cmp, cu_cmp, CompressState(None, None, x_cmp.shape[0])


def compress_into_backward(dx_cmp, dx, x, cu_seqlens, kernel_size: int, kernel_stride: int, state: CompressState,
                           weight=None, pos_emb=None, need_weights: bool = True):
    """Adds compress_kv's gradient w.r.t. x for the upstream dx_cmp [N_cmp, H, D] into dx [N, H, D]
    (contiguous, x's dtype); returns (d weight, d pos_emb), None for mean pooling or without
    need_weights (their GEMM and reductions are then skipped)."""
    weight_grads = weight is not None and need_weights
    if state.num_cmp == 0:  # no summary: the weights are not used (None, as compress_kv's autograd)
        return None, None
    if state.layout is not None:
        return _blocks_backward(dx_cmp, dx, x, state, kernel_size, kernel_stride, weight, pos_emb, weight_grads)
    return _gather_backward(dx_cmp, dx, x, cu_seqlens, kernel_size, kernel_stride, weight, pos_emb, weight_grads)


def _window_grad(dx_cmp, layout: BlockLayout, num_windows: int, dtype) -> torch.Tensor:
    """d y [H, windows, D]: the summaries' gradient at their windows, zero elsewhere; a view of dx_cmp
    where every window is a summary (one sequence), else a new buffer in `dtype`."""
    dy = dx_cmp.transpose(0, 1)  # [H, N_cmp, D]
    if layout.first_block is None and layout.num_cmp == num_windows:
        return dy
    dwin = dx_cmp.new_zeros(dy.shape[0], num_windows, dy.shape[2], dtype=dtype)
    if layout.first_block is None:
        dwin[:, : layout.num_cmp] = dy
    else:
        dwin.index_copy_(1, layout.first_block, dy.to(dtype))  # distinct windows: no atomics
    return dwin


def _add_block_grad(dx, dblocks, layout: BlockLayout, stride: int) -> None:
    """dx[row of block b, key s] += dblocks [H, NB, stride, D] (broadcast over s when its size is 1)."""
    h, nb = dblocks.shape[0], dblocks.shape[1]
    d = dx.shape[2]
    if layout.rows is None:  # blocks on x's own grid: one strided add
        dx[: nb * stride].view(nb, stride, h, d).add_(dblocks.permute(1, 2, 0, 3))
    else:  # gathered blocks: each row once, so index_add_ adds without collisions
        src = dblocks.to(dx.dtype).expand(h, nb, stride, d).reshape(h, nb * stride, d).transpose(0, 1)
        dx.index_add_(0, layout.rows, src)


def _blocks_backward(dx_cmp, dx, x, state: CompressState, kernel_size, stride, weight, pos_emb, weight_grads):
    layout = state.layout
    h, d = dx.shape[1], dx.shape[2]
    nb, c_blocks = layout.num_blocks, kernel_size // stride
    m = nb - c_blocks + 1
    acc = accumulation_dtype(dx.dtype)
    if weight is None:  # d sums[:, b] = sum_c d y[:, b - c] / kernel_size
        dwin = _window_grad(dx_cmp, layout, m, acc)  # [H, m, D]
        dsums = torch.empty(h, nb, d, dtype=acc, device=dx.device)
        dsums[:, :m] = dwin
        dsums[:, m:] = 0
        for c in range(1, c_blocks):
            dsums[:, c: c + m] += dwin
        dsums /= kernel_size
        _add_block_grad(dx, dsums.unsqueeze(2), layout, stride)
        return None, None
    dwin = _window_grad(dx_cmp, layout, m, dx.dtype)  # the GEMM's dtype, as autograd's
    if state.in_place:
        return _in_place_backward(dx_cmp, dwin, dx, x, layout, kernel_size, stride, weight, pos_emb, weight_grads)
    dz = dx.new_empty(h, nb, c_blocks, d)  # slot c: d y shifted down by c blocks, zeros around
    for c in range(c_blocks):
        dz[:, c: c + m, c] = dwin
        dz[:, :c, c] = 0
        dz[:, c + m:, c] = 0
    dz = dz.view(h, nb, c_blocks * d)
    w_cat = stacked_weight(weight, stride, dx.dtype)  # [stride * D, C * D]
    if FUSED_BLOCK_GRAD and layout.rows is None and kernels_serve(dx):
        add_linear_block_grad(dx, dz, w_cat, stride)
    else:
        _add_block_grad(dx, (dz @ w_cat.t()).view(h, nb, stride, d), layout, stride)
    if not weight_grads:
        return None, None
    dw_cat = state.blocks.reshape(h * nb, stride * d).t() @ dz.reshape(h * nb, c_blocks * d)
    dweight = dw_cat.view(stride * d, c_blocks, d).permute(1, 0, 2).reshape(kernel_size * d, d).to(acc)
    return _with_bias_grads(dweight, dx_cmp, weight, pos_emb, kernel_size, acc)


def _with_bias_grads(dweight, dx_cmp, weight, pos_emb, kernel_size: int, acc):
    """(d weight, d pos_emb) from the keys' part of d weight (in `acc`): pos_emb's share pos @ W is a
    bias every summary gets, so both take the summaries' summed gradient."""
    dbias = dx_cmp.sum((0, 1), dtype=acc)  # [D]: every summary's gradient reaches the bias
    dweight += pos_emb.to(acc).flatten()[:, None] * dbias[None, :]
    dpos = (weight.to(acc) @ dbias).view(kernel_size, weight.shape[1])
    return dweight.to(weight.dtype), dpos.to(pos_emb.dtype)


def _in_place_backward(dx_cmp, dwin, dx, x, layout: BlockLayout, kernel_size, stride, weight, pos_emb, weight_grads):
    """IN_PLACE_LINEAR's backward: the keys' share added from dwin, d weight from x where it lies."""
    w_cat = stacked_weight(weight, stride, dx.dtype)  # [stride * D, C * D]
    add_linear_window_grad(dx, dwin, w_cat, stride, layout.num_blocks)
    if not weight_grads:
        return None, None
    acc = accumulation_dtype(dx.dtype)
    dweight = compress_linear_dweight(x.contiguous(), dx_cmp.to(x.dtype), layout.first_block, kernel_size, stride)
    return _with_bias_grads(dweight.to(acc), dx_cmp, weight, pos_emb, kernel_size, acc)


def _gather_backward(dx_cmp, dx, x, cu_seqlens, kernel_size, stride, weight, pos_emb, weight_grads):
    """The gather path's gradient, a chunk of summaries at a time as in the forward: index_add_ of the
    spans' gradient, in passes of non-overlapping spans so that it is deterministic (autograd's
    index_select backward, the per-branch path's, adds overlapping spans with colliding atomics)."""
    n, h, d = x.shape
    _, first = gather_layout(cu_seqlens, n, kernel_size, stride, x.device)
    n_cmp = first.numel()
    acc = accumulation_dtype(x.dtype)
    chunk = max(1, _GATHER_BUDGET // (kernel_size * h * d))
    spacing = -(-kernel_size // stride)
    offs = torch.arange(kernel_size, device=x.device)
    dweight = torch.zeros(weight.shape, dtype=acc, device=x.device) if weight_grads else None
    dpos = torch.zeros(kernel_size, d, dtype=acc, device=x.device) if weight_grads else None
    for c0 in range(0, n_cmp, chunk):
        c1 = min(n_cmp, c0 + chunk)
        rows = (first[c0:c1, None] + offs).flatten()  # [c * kernel_size]
        dy = dx_cmp[c0:c1]  # [c, H, D]
        if weight is None:
            dspan = (dy.to(acc) / kernel_size).to(x.dtype)[:, None].expand(c1 - c0, kernel_size, h, d)
        else:
            dspan = (dy.reshape(-1, d) @ weight.to(x.dtype).t()).view(c1 - c0, h, kernel_size, d).transpose(1, 2)
            if weight_grads:  # the spans' map input is recomputed (autograd would have kept it)
                spans = x.index_select(0, rows).view(c1 - c0, kernel_size, h, d) + pos_emb.to(x.dtype)[None, :, None, :]
                a = spans.transpose(1, 2).reshape((c1 - c0) * h, kernel_size * d)
                dweight += (a.t() @ dy.reshape(-1, d)).to(acc)
                dpos += dspan.sum((0, 2), dtype=acc)
        # Summaries r = ceil(kernel_size / stride) apart never share a key, so each of these r adds
        # writes every row at most once: no colliding atomics, the same bits on every run.
        rows_c, dspan_c = rows.view(c1 - c0, kernel_size), dspan.reshape(c1 - c0, kernel_size, h, d)
        for phase in range(min(spacing, c1 - c0)):
            dx.index_add_(0, rows_c[phase::spacing].flatten(), dspan_c[phase::spacing].reshape(-1, h, d))
    if not weight_grads:
        return None, None
    return dweight.to(weight.dtype), dpos.to(pos_emb.dtype)


class InPlaceLinearCompress(torch.autograd.Function):
    """compress_kv with weights while IN_PLACE_LINEAR is on and the kernels serve x: the module's fused
    path's forward (compress_kv_forward) and backward (compress_into_backward into a zero dx), so the
    per-branch path (fused_backward=False) computes the same summaries, bit for bit."""

    @staticmethod
    def forward(ctx, x, weight, pos_emb, cu_seqlens, kernel_size: int, kernel_stride: int):
        need_w = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        x_cmp, cu_cmp, state = compress_kv_forward(x, cu_seqlens, kernel_size, kernel_stride, weight, pos_emb,
                                                   keep_blocks=need_w)
        ctx.mark_non_differentiable(cu_cmp)
        ctx.save_for_backward(x, weight, pos_emb, cu_seqlens)
        ctx.args = (kernel_size, kernel_stride, state)
        return x_cmp, cu_cmp

    @staticmethod
    def backward(ctx, dx_cmp, _dcu):
        x, weight, pos_emb, cu_seqlens = ctx.saved_tensors
        kernel_size, kernel_stride, state = ctx.args
        dx = torch.zeros_like(x, memory_format=torch.contiguous_format)
        need_w = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dw, dpos = compress_into_backward(dx_cmp.contiguous(), dx, x, cu_seqlens, kernel_size, kernel_stride,
                                          state, weight, pos_emb, need_weights=need_w)
        return dx, dw, dpos, None, None, None


def in_place_compress_serves(x, weight) -> bool:
    """Whether compress_kv runs through InPlaceLinearCompress (IN_PLACE_LINEAR, weights, kernels on x)."""
    return IN_PLACE_LINEAR and weight is not None and kernels_serve(x)
