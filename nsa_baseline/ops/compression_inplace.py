"""The linear compression's GEMMs in Triton, reading the keys where they lie in x [N, H, D].

Summary i of head h covers the kernel_size keys from row start_i (start_i = first_block_i * stride,
or i * stride for one sequence):

    y[i, h] = sum_r x[start_i + r, h] @ W_r + pos_emb.flatten() @ W,    W_r = W[r * D:(r + 1) * D]
    dW_r   = sum_{i, h} x[start_i + r, h]^T dy[i, h]

The block path (compression_blocks.py) first copies x into per-head stride-blocks (a transposing
copy as large as x), runs one cuBLAS GEMM into fp32 [H, NB, C * D], sums its C slots with a shift and
transposes the result into [N_cmp, H, D]: four passes and an [N, H, D] copy that the backward keeps for
d weight. Here the forward is one kernel (grid: tiles of summaries x heads, fp32 accumulator, the
bias added and the result cast in its epilogue) and d weight another (grid: key offset r x splits of
the (summary, head) rows, fp32 partials summed in split order: deterministic); nothing as large as x
is written or kept. The keys' gradient is compression_grad_kernel.add_linear_window_grad.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from nsa_baseline.ops.compression_blocks import accumulation_dtype
from nsa_baseline.ops.decode_tiles import gpu_programs
from nsa_baseline.utils.triton_utils import is_interpreter, new_output, next_pow2


@triton.jit
def _summary_start(first, o_m, m_m, STRIDE: tl.constexpr, HAS_FIRST: tl.constexpr, FIRST_SCALE: tl.constexpr):
    """int64 first key row of summaries o_m: first[o_m] * FIRST_SCALE (packed sequences: first holds
    stride-blocks, FIRST_SCALE = STRIDE, or rows, 1) or o_m * STRIDE."""
    if HAS_FIRST:
        return tl.load(first + o_m, mask=m_m, other=0).to(tl.int64) * FIRST_SCALE
    return o_m.to(tl.int64) * STRIDE


@triton.jit
def _compress_linear_fwd_kernel(x, w, bias, first, out, N_CMP, H: tl.constexpr, D: tl.constexpr,
                                KS: tl.constexpr, STRIDE: tl.constexpr, HAS_FIRST: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                                FIRST_SCALE: tl.constexpr = 1):
    i_m, i_h = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < N_CMP
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    row0 = _summary_start(first, o_m, m_m, STRIDE, HAS_FIRST, FIRST_SCALE) * H + i_h  # x's row (token, head) of key 0
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for r in range(KS):
        b_x = tl.load(x + (row0 + r * H)[:, None] * D + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.)
        b_w = tl.load(w + (r * D + o_d)[:, None] * D + o_d[None, :], mask=m_d[:, None] & m_d[None, :], other=0.)
        acc += tl.dot(b_x, b_w, input_precision=PREC)
    acc += tl.load(bias + o_d, mask=m_d, other=0.)[None, :]
    p_out = out + (o_m.to(tl.int64) * H + i_h)[:, None] * D + o_d[None, :]
    tl.store(p_out, acc.to(out.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])


@triton.jit
def _dw_tile(acc, x, dy, first, r, tile, M, o_d, m_d, H: tl.constexpr, D: tl.constexpr, STRIDE: tl.constexpr,
             HAS_FIRST: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr, FIRST_SCALE: tl.constexpr):
    """acc += x[key r of the rows' summaries]^T dy over (summary, head) rows [tile * BLOCK_M, + BLOCK_M)."""
    o_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    row = (_summary_start(first, o_m // H, m_m, STRIDE, HAS_FIRST, FIRST_SCALE) + r) * H + o_m % H
    m = m_m[:, None] & m_d[None, :]
    b_x = tl.load(x + row[:, None] * D + o_d[None, :], mask=m, other=0.)  # [BLOCK_M, BLOCK_D]
    b_g = tl.load(dy + o_m.to(tl.int64)[:, None] * D + o_d[None, :], mask=m, other=0.)  # dy is contiguous
    return acc + tl.dot(tl.trans(b_x), b_g, input_precision=PREC)


@triton.jit
def _compress_linear_dw_kernel(x, dy, first, part, M, TILES, H: tl.constexpr, D: tl.constexpr,
                               KS: tl.constexpr, STRIDE: tl.constexpr, HAS_FIRST: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                               WHILE_LOOP: tl.constexpr, FIRST_SCALE: tl.constexpr = 1):
    r, i_p = tl.program_id(0), tl.program_id(1)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    acc = tl.zeros([BLOCK_D, BLOCK_D], tl.float32)
    if WHILE_LOOP:  # the interpreter cannot range() over an argument
        t = TILES * 0
        while t < TILES:
            acc = _dw_tile(acc, x, dy, first, r, i_p * TILES + t, M, o_d, m_d, H, D, STRIDE, HAS_FIRST, BLOCK_M, PREC,
                           FIRST_SCALE)
            t += 1
    else:
        for t in range(TILES):  # this split's (summary, head) rows, in order
            acc = _dw_tile(acc, x, dy, first, r, i_p * TILES + t, M, o_d, m_d, H, D, STRIDE, HAS_FIRST, BLOCK_M, PREC,
                           FIRST_SCALE)
    p_part = part + ((i_p * KS + r) * D + o_d).to(tl.int64)[:, None] * D + o_d[None, :]
    tl.store(p_part, acc, mask=m_d[:, None] & m_d[None, :])


def _prec(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _check(x: torch.Tensor, first: Optional[torch.Tensor], n_cmp: int, kernel_size: int, kernel_stride: int):
    if x.dim() != 3 or not x.is_contiguous():
        raise ValueError(f"argument `x` must be a contiguous [N, H, D] tensor, got shape {tuple(x.shape)}")
    if first is not None and (first.shape != (n_cmp,) or first.device != x.device):
        raise ValueError(f"argument `first` must be [N_cmp] = [{n_cmp}] on {x.device}, got "
                         f"{tuple(first.shape)} on {first.device}")
    if first is None and n_cmp and (n_cmp - 1) * kernel_stride + kernel_size > x.shape[0]:
        raise ValueError(f"{n_cmp} summaries of {kernel_size} keys at stride {kernel_stride} need "
                         f"{(n_cmp - 1) * kernel_stride + kernel_size} rows of `x`, it has {x.shape[0]}")


def compress_linear_fwd(x: torch.Tensor, weight: torch.Tensor, pos_emb: torch.Tensor, first: Optional[torch.Tensor],
                        n_cmp: int, kernel_size: int, kernel_stride: int, first_rows: bool = False) -> torch.Tensor:
    """x_cmp [n_cmp, H, D] in x.dtype: the linear map of each summary's keys (x read in place; fp32
    accumulation, pos_emb's share added in fp32). first: int64 [n_cmp] first stride-block of every
    summary (packed sequences; with first_rows, its first row: any layout), None for summary i at
    block i."""
    _check(x, first, n_cmp, kernel_size, kernel_stride)
    n, h, d = x.shape
    out = new_output((n_cmp, h, d), x.dtype, x.device)
    if n_cmp == 0:
        return out
    acc = accumulation_dtype(x.dtype)
    bias = (pos_emb.to(acc).flatten() @ weight.to(acc)).float().contiguous()  # [D]
    block_m = 16 if is_interpreter() else 128
    _compress_linear_fwd_kernel[(triton.cdiv(n_cmp, block_m), h)](
        x, weight.to(x.dtype).contiguous(), bias, first if first is not None else x, out, n_cmp, H=h, D=d,
        KS=kernel_size, STRIDE=kernel_stride, HAS_FIRST=first is not None, BLOCK_M=block_m,
        BLOCK_D=max(16, next_pow2(d)), PREC=_prec(x), FIRST_SCALE=1 if first_rows else kernel_stride,
        num_warps=8, num_stages=3)
    return out


def dw_splits(rows: int, kernel_size: int, device: torch.device, block_m: int) -> int:
    """Splits of the (summary, head) rows per key offset: about two programs per SM in all (3 in the
    interpreter, so that the tests sum several)."""
    programs = gpu_programs(device, 2) or 3 * kernel_size
    return max(1, min(triton.cdiv(rows, block_m), triton.cdiv(programs, kernel_size)))


def compress_linear_dweight(x: torch.Tensor, dy: torch.Tensor, first: Optional[torch.Tensor], kernel_size: int,
                            kernel_stride: int) -> torch.Tensor:
    """fp32 [kernel_size * D, D]: sum over summaries and heads of x[key r of the summary]^T dy (the
    weight's gradient without pos_emb's share). dy: [n_cmp, H, D] in x.dtype."""
    n_cmp = dy.shape[0]
    _check(x, first, n_cmp, kernel_size, kernel_stride)
    n, h, d = x.shape
    if dy.shape != (n_cmp, h, d) or dy.dtype != x.dtype:
        raise ValueError(f"argument `dy` must be [N_cmp, {h}, {d}] in {x.dtype}, got {tuple(dy.shape)} {dy.dtype}")
    rows = n_cmp * h
    if rows == 0:
        return torch.zeros(kernel_size * d, d, dtype=torch.float32, device=x.device)
    block_m = 16 if is_interpreter() else 64
    splits = dw_splits(rows, kernel_size, x.device, block_m)
    tiles = triton.cdiv(triton.cdiv(rows, block_m), splits)
    part = new_output((splits, kernel_size * d, d), torch.float32, x.device)
    _compress_linear_dw_kernel[(kernel_size, splits)](
        x, dy.contiguous(), first if first is not None else x, part, rows, tiles, H=h, D=d, KS=kernel_size,
        STRIDE=kernel_stride, HAS_FIRST=first is not None, BLOCK_M=block_m, BLOCK_D=max(16, next_pow2(d)),
        PREC=_prec(x), WHILE_LOOP=is_interpreter(), FIRST_SCALE=kernel_stride, num_warps=8, num_stages=3)
    return part.sum(0) if splits > 1 else part[0]
