"""compress_kv's block path, for kernel_stride dividing kernel_size (C = kernel_size / stride blocks
per summary): summary i is the concatenation of stride-blocks i .. i + C - 1, so

    linear: y_i = sum_c X_blk[i + c] @ W_c + pos_emb.flatten() @ W     (W_c: rows c*stride*D.. of W)
    mean:   y_i = sum_c (sum of block i + c) / kernel_size

with X_blk [H, NB, stride * D] the keys of every block flattened per head. The C products come from
one GEMM X_blk @ [W_0 | ... | W_{C-1}] -> Z [H, NB, C, D] (C / stride the size of x) and a shifted
sum of Z's C slots; the linear map of pos_emb is one bias vector. x is read once, by one transposing
copy (sequences starting at multiples of stride) or one row gather (others); no row is read twice,
so the backward writes dx once, with no atomics.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from nsa_baseline.ops.compression_layout import BlockLayout


class _KeyBlocks(torch.autograd.Function):
    """x [N, H, D] -> X_blk [H, NB, stride, D] (contiguous): each head's stride-blocks."""

    @staticmethod
    def forward(ctx, x, layout: BlockLayout, stride: int):
        n, h, d = x.shape
        nb = layout.num_blocks
        ctx.layout, ctx.n = layout, n
        if layout.rows is None:
            return x[: nb * stride].view(nb, stride, h, d).permute(2, 0, 1, 3).contiguous()
        return x.transpose(0, 1).index_select(1, layout.rows).view(h, nb, stride, d)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        h, nb, stride, d = g.shape
        layout = ctx.layout
        dx = g.new_empty(ctx.n, h, d)  # every row written once: by a block or as a zero
        if layout.rows is None:
            dx[: nb * stride].view(nb, stride, h, d).copy_(g.permute(1, 2, 0, 3))
            dx[nb * stride:].zero_()
        else:
            dx.index_copy_(0, layout.rows, g.reshape(h, nb * stride, d).transpose(0, 1))
            dx.index_fill_(0, layout.unused_rows, 0)
        return dx, None, None


class _WindowSum(torch.autograd.Function):
    """z [H, NB, S, D] -> y [H, NB - C + 1, D] in `acc`: y[:, j] = sum_c z[:, j + c, c] (S = C, one
    slot per position in the window) or sum_c z[:, j + c, 0] (S = 1, block sums shared by all)."""

    @staticmethod
    def forward(ctx, z, c_blocks: int, acc: torch.dtype):
        h, nb, slots, d = z.shape
        m = nb - c_blocks + 1
        ctx.c_blocks, ctx.shape, ctx.dtype = c_blocks, z.shape, z.dtype
        y = z[:, :m, 0].to(acc, copy=True)
        for c in range(1, c_blocks):
            y += z[:, c: c + m, c if slots > 1 else 0]
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        h, nb, slots, d = ctx.shape
        m = dy.shape[1]
        if slots == 1:
            dz = dy.new_zeros(h, nb, 1, d)
            for c in range(ctx.c_blocks):
                dz[:, c: c + m, 0] += dy
            return dz.to(ctx.dtype), None, None
        dz = dy.new_empty(ctx.shape, dtype=ctx.dtype)  # slot c: dy shifted down by c, zeros around
        for c in range(ctx.c_blocks):
            dz[:, c: c + m, c] = dy
            dz[:, :c, c] = 0
            dz[:, c + m:, c] = 0
        return dz, None, None


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the path's sums: fp32, fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def key_blocks(x: torch.Tensor, layout: BlockLayout, kernel_stride: int) -> torch.Tensor:
    """X_blk [H, NB, stride * D]: every head's stride-blocks flattened (differentiable)."""
    h, d = x.shape[1], x.shape[2]
    return _KeyBlocks.apply(x, layout, kernel_stride).view(h, layout.num_blocks, kernel_stride * d)


def stacked_weight(weight: torch.Tensor, kernel_stride: int, dtype: torch.dtype) -> torch.Tensor:
    """[stride * D, C * D]: column block c is W_c, the rows of W for the keys of the window's block c."""
    d = weight.shape[1]
    c_blocks = weight.shape[0] // (kernel_stride * d)
    return weight.to(dtype).reshape(c_blocks, kernel_stride * d, d).permute(1, 0, 2).reshape(
        kernel_stride * d, c_blocks * d)


class _WideGemm(torch.autograd.Function):
    """a [M, K] @ b [K, N] of bf16 / fp16 CUDA inputs with the fp32 accumulator written out (cuBLAS,
    torch.mm's out_dtype): a summary sums C such products, and rounding each to bf16 before that sum
    made the block path's summaries ~1.5x less accurate than the gather path's one rounding, enough to
    flip ~2% of the block selections against the fp32 reference (experiments/gpu/module_error_probe.py).
    The backward is the bf16 GEMM's (the gradient in the inputs' dtype)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return torch.mm(a, b, out_dtype=torch.float32)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        g = g.to(a.dtype)
        return (g @ b.t() if ctx.needs_input_grad[0] else None), (a.t() @ g if ctx.needs_input_grad[1] else None)


def wide_gemm_supported(x: torch.Tensor) -> bool:
    """Whether _WideGemm serves x: bf16 / fp16 on CUDA (torch.mm's out_dtype has no CPU kernel)."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def _windows_gemm(blocks: torch.Tensor, w_cat: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """X_blk [H, NB, stride * D] @ w_cat [stride * D, C * D] in `acc`: fp32 accumulators written out on
    CUDA, else the product of the inputs in `acc` (CPU: the reference's precision)."""
    h, nb, k = blocks.shape
    if wide_gemm_supported(blocks):
        return _WideGemm.apply(blocks.reshape(h * nb, k), w_cat).view(h, nb, -1)
    return blocks.to(acc) @ w_cat.to(acc)


def linear_windows(blocks: torch.Tensor, weight, pos_emb, kernel_size: int, kernel_stride: int,
                   acc: torch.dtype) -> torch.Tensor:
    """y [H, windows, D] in `acc` of the linear map, from X_blk [H, NB, stride * D]."""
    h, nb = blocks.shape[0], blocks.shape[1]
    c_blocks, d = kernel_size // kernel_stride, weight.shape[1]
    z = _windows_gemm(blocks, stacked_weight(weight, kernel_stride, blocks.dtype), acc).view(h, nb, c_blocks, d)
    bias = pos_emb.to(acc).flatten() @ weight.to(acc)  # [D]: pos_emb's share of every summary
    return _WindowSum.apply(z, c_blocks, acc) + bias


def mean_windows(x: torch.Tensor, layout: BlockLayout, kernel_size: int, kernel_stride: int,
                 acc: torch.dtype) -> torch.Tensor:
    """y [H, windows, D] in `acc` of mean pooling."""
    n, h, d = x.shape
    nb, c_blocks = layout.num_blocks, kernel_size // kernel_stride
    if layout.rows is None:  # block sums straight from x, no copy
        head = x if nb * kernel_stride == n else x[: nb * kernel_stride]
        sums = head.view(nb, kernel_stride, h, d).sum(1, dtype=acc).permute(1, 0, 2)  # [H, NB, D]
    else:
        sums = _KeyBlocks.apply(x, layout, kernel_stride).sum(2, dtype=acc)
    return _WindowSum.apply(sums.unsqueeze(2), c_blocks, acc) / kernel_size


def pick_summaries(y: torch.Tensor, layout: BlockLayout, dtype: torch.dtype) -> torch.Tensor:
    """x_cmp [N_cmp, H, D] in `dtype` from the windows y [H, windows, D]: window j starts at block j;
    summaries pick theirs (a sequence's windows past its end, or across two sequences, are dropped)."""
    y = y[:, : layout.num_cmp] if layout.first_block is None else y.index_select(1, layout.first_block)
    out = y.new_empty(y.shape[1], y.shape[0], y.shape[2], dtype=dtype)
    out.transpose(0, 1).copy_(y)  # cast and transpose in one pass (autograd: one CopyBackwards)
    return out


def compress_blocks(x: torch.Tensor, layout: BlockLayout, kernel_size: int, kernel_stride: int,
                    weight=None, pos_emb=None) -> torch.Tensor:
    """x_cmp [N_cmp, H, D] in x.dtype (layout.num_cmp > 0): the block path of compress_kv. Sums run in
    fp32 (fp64 for fp64 inputs); the GEMM takes x's dtype with the GEMM's own fp32 accumulation."""
    acc = accumulation_dtype(x.dtype)
    if weight is None:
        y = mean_windows(x, layout, kernel_size, kernel_stride, acc)
    else:
        y = linear_windows(key_blocks(x, layout, kernel_stride), weight, pos_emb, kernel_size, kernel_stride, acc)
    return pick_summaries(y, layout, x.dtype)
