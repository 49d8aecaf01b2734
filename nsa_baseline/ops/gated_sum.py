"""NSA's gated three-branch sum o = g_0 * o_cmp + g_1 * o_slc + g_2 * o_win in Triton, forward and
backward, one pass each over [N, HQ, D] (eager PyTorch makes 5 passes forward and more backward).

Grid: one program per tile of BLOCK_R (token, head) rows; the D columns of a row in one tile padded
to a power of two (D is a constexpr: for a power-of-two D the column mask folds away). Backward: one program per row tile
too, reading do and the branch outputs once and writing the four gradients. Row offsets are 64-bit;
row indices 32-bit (N * HQ < 2^31).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from nsa_baseline.checks import check_gated_sum_args, fail, require_kernel_device
from nsa_baseline.contract import KERNEL_DTYPES, kernels_serve
from nsa_baseline.utils.triton_utils import is_interpreter, new_output, next_pow2

MAX_HEAD_DIM = 1024  # one row's D in one tile (larger D would need a loop over D chunks)


@triton.jit
def _row_offsets(o_r, HQ, stride_n, stride_h):
    """int64 [BLOCK_R]: offset of row r = (token r // HQ, head r % HQ) for a tensor's two strides."""
    o_r = o_r.to(tl.int64)
    return (o_r // HQ) * stride_n + (o_r % HQ) * stride_h


@triton.jit
def gated_sum_fwd_kernel(g_ptr, o0_ptr, o1_ptr, o2_ptr, out_ptr,
                         stride_gn, stride_gh, stride_gb,
                         stride_0n, stride_0h, stride_0d, stride_1n, stride_1h, stride_1d,
                         stride_2n, stride_2h, stride_2d,
                         R, HQ, D: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    i_r = tl.program_id(0)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] rows = token * HQ + head
    o_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    m_r = o_r < R
    m = m_r[:, None] & (o_d < D)[None, :]  # [BLOCK_R, BLOCK_D]
    p_g = g_ptr + _row_offsets(o_r, HQ, stride_gn, stride_gh)  # [BLOCK_R]
    b_g0 = tl.load(p_g, mask=m_r, other=0.).to(tl.float32)
    b_g1 = tl.load(p_g + stride_gb, mask=m_r, other=0.).to(tl.float32)
    b_g2 = tl.load(p_g + 2 * stride_gb, mask=m_r, other=0.).to(tl.float32)
    p_0 = o0_ptr + _row_offsets(o_r, HQ, stride_0n, stride_0h)[:, None] + o_d[None, :] * stride_0d
    p_1 = o1_ptr + _row_offsets(o_r, HQ, stride_1n, stride_1h)[:, None] + o_d[None, :] * stride_1d
    p_2 = o2_ptr + _row_offsets(o_r, HQ, stride_2n, stride_2h)[:, None] + o_d[None, :] * stride_2d
    b_o = b_g0[:, None] * tl.load(p_0, mask=m, other=0.).to(tl.float32)  # [BLOCK_R, BLOCK_D]
    b_o += b_g1[:, None] * tl.load(p_1, mask=m, other=0.).to(tl.float32)
    b_o += b_g2[:, None] * tl.load(p_2, mask=m, other=0.).to(tl.float32)
    p_out = out_ptr + o_r.to(tl.int64)[:, None] * D + o_d[None, :]  # out is contiguous
    tl.store(p_out, b_o.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _branch_bwd(b_do, p_g, o_ptr, do_ptr, dg_ptr, delta_ptr, o_r, o_d, m_r, m, HQ, N, D: tl.constexpr,
                stride_n, stride_h, stride_d,
                NEED_DO: tl.constexpr, NEED_DG: tl.constexpr, NEED_DELTA: tl.constexpr):
    """One branch: d o_b = g_b * do (contiguous), d g_b = sum_D do * o_b (fp32, contiguous [R, 3]) and
    the branch backward's delta = sum_D o_b * d o_b = g_b * d g_b (fp32 [HQ, N], head-major)."""
    if NEED_DO or NEED_DELTA:
        b_g = tl.load(p_g, mask=m_r, other=0.).to(tl.float32)  # [BLOCK_R]
    if NEED_DO:
        p_do = do_ptr + o_r.to(tl.int64)[:, None] * D + o_d[None, :]
        tl.store(p_do, (b_g[:, None] * b_do).to(do_ptr.dtype.element_ty), mask=m)
    if NEED_DG or NEED_DELTA:
        p_o = o_ptr + _row_offsets(o_r, HQ, stride_n, stride_h)[:, None] + o_d[None, :] * stride_d
        b_o = tl.load(p_o, mask=m, other=0.).to(tl.float32)  # [BLOCK_R, BLOCK_D]
        b_dg = tl.sum(b_do * b_o, axis=1)  # [BLOCK_R]
        if NEED_DG:
            tl.store(dg_ptr + o_r.to(tl.int64) * 3, b_dg.to(dg_ptr.dtype.element_ty), mask=m_r)
        if NEED_DELTA:  # row r = token * HQ + head -> delta[head, token]
            o_r64 = o_r.to(tl.int64)
            tl.store(delta_ptr + (o_r64 % HQ) * N + o_r64 // HQ, b_g * b_dg, mask=m_r)


@triton.jit
def gated_sum_bwd_kernel(do_ptr, g_ptr, o0_ptr, o1_ptr, o2_ptr, dg_ptr, do0_ptr, do1_ptr, do2_ptr, delta_ptr,
                         stride_don, stride_doh, stride_dod, stride_gn, stride_gh, stride_gb,
                         stride_0n, stride_0h, stride_0d, stride_1n, stride_1h, stride_1d,
                         stride_2n, stride_2h, stride_2d,
                         R, HQ, D: tl.constexpr,
                         NEED_DO0: tl.constexpr, NEED_DO1: tl.constexpr, NEED_DO2: tl.constexpr,
                         NEED_DG: tl.constexpr, NEED_DELTA: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    i_r = tl.program_id(0)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    o_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    m_r = o_r < R
    m = m_r[:, None] & (o_d < D)[None, :]  # [BLOCK_R, BLOCK_D]
    N = R // HQ
    p_do = do_ptr + _row_offsets(o_r, HQ, stride_don, stride_doh)[:, None] + o_d[None, :] * stride_dod
    b_do = tl.load(p_do, mask=m, other=0.).to(tl.float32)  # [BLOCK_R, BLOCK_D]
    p_g = g_ptr + _row_offsets(o_r, HQ, stride_gn, stride_gh)  # [BLOCK_R]
    # deltas: [3, HQ, N] (a branch's delta where its d o is written too)
    _branch_bwd(b_do, p_g, o0_ptr, do0_ptr, dg_ptr, delta_ptr, o_r, o_d, m_r, m, HQ, N, D,
                stride_0n, stride_0h, stride_0d, NEED_DO0, NEED_DG, NEED_DELTA and NEED_DO0)
    _branch_bwd(b_do, p_g + stride_gb, o1_ptr, do1_ptr, dg_ptr + 1, delta_ptr + R, o_r, o_d, m_r, m, HQ, N, D,
                stride_1n, stride_1h, stride_1d, NEED_DO1, NEED_DG, NEED_DELTA and NEED_DO1)
    _branch_bwd(b_do, p_g + 2 * stride_gb, o2_ptr, do2_ptr, dg_ptr + 2, delta_ptr + 2 * R, o_r, o_d, m_r, m, HQ,
                N, D, stride_2n, stride_2h, stride_2d, NEED_DO2, NEED_DG, NEED_DELTA and NEED_DO2)


class LaunchConfig(NamedTuple):
    tile: int  # elements per program: BLOCK_R = tile // BLOCK_D rows (at least 1)
    num_warps: int


# H100 guesses for a memory-bound stream (fp32 registers: fwd holds one accumulator, bwd do and one
# branch at a time); experiments/gpu/gated_sum_bench.py times alternatives.
FWD_CONFIG = LaunchConfig(4096, 4)
BWD_CONFIG = LaunchConfig(4096, 8)
# The interpreter runs numpy per program: few programs keep the CPU tests quick (16 rows at D <= 128).
INTERPRETER_CONFIG = LaunchConfig(2048, 1)


def _blocks(d: int, cfg: LaunchConfig) -> tuple[int, int]:
    block_d = next_pow2(d)
    return max(1, cfg.tile // block_d), block_d


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def gated_sum_fwd(gates: torch.Tensor, outs: tuple[torch.Tensor, ...], cfg: Optional[LaunchConfig] = None) -> torch.Tensor:
    """o [N, HQ, D] contiguous, in the promoted dtype of gates and the three branch outputs."""
    cfg = cfg or (INTERPRETER_CONFIG if is_interpreter() else FWD_CONFIG)
    n, hq, d = outs[0].shape
    dtype = torch.promote_types(gates.dtype, torch.promote_types(outs[0].dtype,
                                                                 torch.promote_types(outs[1].dtype, outs[2].dtype)))
    out = new_output((n, hq, d), dtype, outs[0].device)
    rows = n * hq
    if rows == 0 or d == 0:
        return out
    block_r, block_d = _blocks(d, cfg)
    gated_sum_fwd_kernel[(triton.cdiv(rows, block_r),)](
        gates, *outs, out, *_strides(gates), *(s for o in outs for s in _strides(o)), rows, hq, d,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=cfg.num_warps)
    return out


def gated_sum_bwd(do: torch.Tensor, gates, outs: tuple, need: tuple[bool, bool, bool, bool],
                  dtypes: tuple[torch.dtype, ...], cfg: Optional[LaunchConfig] = None, deltas: bool = False):
    """(d gates, d o_cmp, d o_slc, d o_win) in `dtypes` (those of the inputs), contiguous, None where
    `need` is False. `gates` may be None when no branch gradient is needed, `outs[b]` when d gates is not.
    deltas: also return float32 [3, HQ, N], branch b's softmax-backward delta = rowsum(o_b * d o_b) =
    g_b * d g_b, from the same pass (the branch backwards then skip their own pass over o_b and d o_b);
    rows of a branch whose d o is not needed are left unwritten."""
    cfg = cfg or (INTERPRETER_CONFIG if is_interpreter() else BWD_CONFIG)
    n, hq, d = do.shape
    shapes = ((n, hq, 3),) + ((n, hq, d),) * 3
    grads = [new_output(shape, dtype, do.device) if nd else None for nd, shape, dtype in zip(need, shapes, dtypes)]
    delta = new_output((3, hq, n), torch.float32, do.device) if deltas else None
    rows = n * hq
    if rows == 0 or d == 0 or not any(need):
        return tuple(grads) + ((delta,) if deltas else ())
    block_r, block_d = _blocks(d, cfg)
    g_arg = gates if gates is not None else do  # do stands in for what a constexpr flag leaves unused
    o_args = [o if o is not None else do for o in outs]
    gated_sum_bwd_kernel[(triton.cdiv(rows, block_r),)](
        do, g_arg, *o_args, *(g if g is not None else do for g in grads), delta if deltas else do,
        *_strides(do), *_strides(g_arg), *(s for o in o_args for s in _strides(o)), rows, hq, d,
        NEED_DO0=need[1], NEED_DO1=need[2], NEED_DO2=need[3], NEED_DG=need[0], NEED_DELTA=deltas,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=cfg.num_warps)
    return tuple(grads) + ((delta,) if deltas else ())


class GatedSumFunction(torch.autograd.Function):
    """Saves gates only when a branch needs its gradient and the branch outputs only when the gates do."""

    @staticmethod
    def forward(ctx, gates, o_cmp, o_slc, o_win):
        outs = (o_cmp, o_slc, o_win)
        o = gated_sum_fwd(gates, outs)
        need_dg, need_do = ctx.needs_input_grad[0], any(ctx.needs_input_grad[1:])
        ctx.save_for_backward(gates if need_do else None, *(t if need_dg else None for t in outs))
        ctx.dtypes = (gates.dtype, *(t.dtype for t in outs))
        return o

    @staticmethod
    @once_differentiable  # the kernels' gradients are not themselves differentiable: say so, not zero
    def backward(ctx, do):
        gates, *outs = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad)
        return gated_sum_bwd(do, gates, tuple(outs), need, ctx.dtypes)


def gated_sum_supported(gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor) -> bool:
    """Whether the Triton kernels serve this call (shapes aside): CUDA, or the interpreter for fp32 / fp16
    (bf16 only on CUDA), every input of KERNEL_DTYPES, D <= MAX_HEAD_DIM."""
    return kernels_serve(o_cmp, gates, o_slc, o_win) and o_cmp.dim() == 3 and o_cmp.shape[2] <= MAX_HEAD_DIM


def gated_sum(gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor) -> torch.Tensor:
    r"""NSA's gated sum of the branch outputs, fused: one read of each input and one write forward, one
    read of do and of each saved input and one write of each gradient backward.

    Args:
        gates: [N, HQ, 3] gates of the compressed, selected and window branches.
        o_cmp, o_slc, o_win: [N, HQ, D] branch outputs (D <= 1024).
        Any strides (do's too, e.g. the stride-0 gradient of a .sum()): the kernels read every tensor
        through its (token, head, D) strides, so nothing is copied; the only cost of a layout other
        than unit-stride D is bandwidth (rows read uncoalesced), none of memory or an extra pass.
    Returns:
        o [N, HQ, D], contiguous, in torch's promoted dtype of the four inputs, as the eager expression
        `g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win` (bf16 branches with fp32
        gates give fp32; the module's gates come in the parameter dtype, usually the branches'). Maths
        in fp32. Gradients, for the inputs that require them only: d o_b = g_b * do in o_b's dtype,
        d gates = sum_D do * o_b accumulated in fp32, in gates' dtype.
    """
    check_gated_sum_args(gates, o_cmp, o_slc, o_win)
    for name, t in (("o_cmp", o_cmp), ("o_slc", o_slc), ("o_win", o_win), ("gates", gates)):
        if t.dtype not in KERNEL_DTYPES:
            fail(name, f"must be one of {[str(x) for x in KERNEL_DTYPES]} for the Triton kernels, got {t.dtype}; "
                 "nsa_baseline.branches.gated_sum falls back to the reference")
    require_kernel_device(o_cmp, arg="o_cmp")
    if o_cmp.shape[2] > MAX_HEAD_DIM:
        fail("o_cmp", f"head dim D must be <= {MAX_HEAD_DIM} for the Triton kernels, got {o_cmp.shape[2]}")
    return GatedSumFunction.apply(gates, o_cmp, o_slc, o_win)
