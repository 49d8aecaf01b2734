"""The keys' share of the linear compression's gradient, added into dx in one Triton pass: for the
block path's grid (blocks of `stride` rows on x's own rows), row s of block b gets

    dx[b * stride + s, h] += dz[h, b] @ W_s^T,   W_s = w_cat[s * D:(s + 1) * D]  ([D, C * D])

(w_cat = compression_blocks.stacked_weight). The PyTorch path materialises dz @ w_cat^T ([H, NB, stride
* D], as large as dx) and adds it through a permuted view (most likely the two 1.86 ms elementwise
kernels of the 64K tokens x 64 KV heads H100 profile, results/module_profile; not yet confirmed).
Here a program holds dz's rows of BLOCK_B blocks of one head, multiplies them by each W_s in turn and
adds the product into dx's rows in its epilogue: dz is read once, dx read and written once, nothing
else reaches memory. Each dx row has one writer (no atomics; deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_baseline.utils.triton_utils import is_interpreter, next_pow2


@triton.jit
def _add_block_grad_kernel(dz, w_cat, dx, NB, M, stride_wh, stride_wm, H: tl.constexpr, D: tl.constexpr,
                           CD: tl.constexpr, STRIDE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_CD: tl.constexpr, PREC: tl.constexpr, WINDOWS: tl.constexpr = False):
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)  # blocks
    m_b = o_b < NB
    o_k = tl.arange(0, BLOCK_CD)
    o_d = tl.arange(0, BLOCK_D)
    m_k, m_d = o_k < CD, o_d < D
    if WINDOWS:  # dz[h, b, c * D + e] = dwin[h, b - c, e] (0 outside the M windows), read from dwin
        win = o_b[:, None] - (o_k // D)[None, :]
        p_a = dz + i_h.to(tl.int64) * stride_wh + win.to(tl.int64) * stride_wm + (o_k % D)[None, :]
        m_a = m_b[:, None] & m_k[None, :] & (win >= 0) & (win < M)
    else:
        p_a = dz + (i_h * NB + o_b).to(tl.int64)[:, None] * CD + o_k[None, :]
        m_a = m_b[:, None] & m_k[None, :]
    b_a = tl.load(p_a, mask=m_a, other=0.)  # [BLOCK_B, BLOCK_CD]
    for s in tl.static_range(STRIDE):
        # W_s^T as [BLOCK_CD, BLOCK_D]: element (k, e) = w_cat[s * D + e, k]
        p_w = w_cat + (s * D + o_d)[None, :] * CD + o_k[:, None]
        b_w = tl.load(p_w, mask=m_k[:, None] & m_d[None, :], other=0.)
        b_acc = tl.dot(b_a, b_w, input_precision=PREC)  # [BLOCK_B, BLOCK_D] fp32
        rows = o_b.to(tl.int64) * STRIDE + s
        p_x = dx + (rows * H + i_h)[:, None] * D + o_d[None, :]
        m_x = m_b[:, None] & m_d[None, :]
        b_x = tl.load(p_x, mask=m_x, other=0.).to(tl.float32)
        tl.store(p_x, (b_x + b_acc).to(dx.dtype.element_ty), mask=m_x)


def add_linear_block_grad(dx: torch.Tensor, dz: torch.Tensor, w_cat: torch.Tensor, stride: int) -> None:
    """dx[: NB * stride] ([N, H, D], contiguous) += the rows of dz [H, NB, C * D] times w_cat^T
    ([stride * D, C * D]), block b's row s getting dz[:, b] @ w_cat[s * D:(s + 1) * D]^T."""
    h, nb, cd = dz.shape
    d = dx.shape[2]
    if nb == 0:
        return
    dz, w_cat = dz.contiguous(), w_cat.to(dz.dtype).contiguous()
    _launch(dz, w_cat, dx, nb, 0, (0, 0), cd, stride, False)


def add_linear_window_grad(dx: torch.Tensor, dwin: torch.Tensor, w_cat: torch.Tensor, stride: int, num_blocks: int) -> None:
    """add_linear_block_grad with dz made on the fly from the windows' gradient dwin [H, M, D] (any
    strides but the last; window j = blocks j .. j + C - 1): dz[:, b, c] = dwin[:, b - c], zero where
    b - c is no window. Saves building dz ([H, NB, C * D], C strided copies)."""
    h, m, d = dwin.shape
    cd = w_cat.shape[1]
    if num_blocks == 0:
        return
    if dwin.stride(2) != 1:
        dwin = dwin.contiguous()
    _launch(dwin, w_cat.to(dwin.dtype).contiguous(), dx, num_blocks, m, (dwin.stride(0), dwin.stride(1)), cd, stride,
            True)


def _launch(a, w_cat, dx, nb: int, m: int, strides, cd: int, stride: int, windows: bool) -> None:
    h, d = dx.shape[1], dx.shape[2]
    block_b = 16 if is_interpreter() else 64
    _add_block_grad_kernel[(triton.cdiv(nb, block_b), h)](
        a, w_cat, dx, nb, m, *strides, H=h, D=d, CD=cd, STRIDE=stride, BLOCK_B=block_b,
        BLOCK_D=max(16, next_pow2(d)), BLOCK_CD=max(16, next_pow2(cd)),
        PREC="ieee" if a.dtype == torch.float32 else "tf32", WINDOWS=windows,
        num_warps=4 if is_interpreter() else 8, num_stages=1)
