"""Decode, kernel 0: append the new token of every slot to the cache, in one launch.

Grid (B,): program b reads the slot's length n (the new token's position), writes it to `pos` (what
the attention kernels of the step read), moves the length to n + 1, stores the new k, v [H, D] at row
n, and when the token completes a summary ((n + 1 - kernel_size) a non-negative multiple of the
stride) compresses keys and values [n + 1 - kernel_size, n] of all H heads into summary
(n + 1 - kernel_size) / stride: mean, or linear (sum_j (x_j + pos_emb_j) @ W[j * D:(j + 1) * D], the
H heads as the rows of one tl.dot per j, so W is read once per slot). Replaces the step's gathers,
masked torch.where summary update, index_put and lengths += 1 (about 30 launches) and reads nothing
back on the host. The new token's row comes from registers, not from the store just made.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_baseline.checks import fail
from nsa_baseline.ops.decode_tiles import _dot, group_pad, head_pad
from nsa_baseline.utils.triton_utils import new_output


@triton.jit
def _summary(src_ptr, dst_ptr, w_ptr, pe_ptr, b_new, i_b, pos, start, idx, MAX_SEQLEN, MAX_CMP,
             H: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, KS: tl.constexpr,
             LINEAR: tl.constexpr, IEEE: tl.constexpr):
    o_h = tl.arange(0, H_PAD)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    m_hd = (o_h < H)[:, None] & m_d[None, :]
    acc = tl.zeros([H_PAD, BLOCK_D], tl.float32)
    for j in range(KS):
        row = start + j
        off = ((i_b.to(tl.int64) * MAX_SEQLEN + row) * H + o_h)[:, None] * D + o_d[None, :]
        x = tl.load(src_ptr + off, mask=m_hd & (row < pos), other=0.)
        x = tl.where(row == pos, b_new, x)  # the new token: not read back from the store
        if LINEAR:
            pe = tl.load(pe_ptr + j * D + o_d, mask=m_d, other=0.).to(tl.float32)
            x = (x.to(tl.float32) + pe[None, :]).to(b_new.dtype)  # rounded like compress_spans' add
            w = tl.load(w_ptr + (j * D + o_d)[:, None] * D + o_d[None, :], mask=m_d[:, None] & m_d[None, :],
                        other=0.)  # [BLOCK_D, BLOCK_D]
            acc += _dot(x, w, IEEE)
        else:
            acc += x.to(tl.float32)
    if not LINEAR:
        acc = acc / KS
    off = ((i_b.to(tl.int64) * MAX_CMP + idx) * H + o_h)[:, None] * D + o_d[None, :]
    tl.store(dst_ptr + off, acc.to(dst_ptr.dtype.element_ty), mask=m_hd)


@triton.jit
def _append_kernel(
    k_new_ptr, v_new_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, len_ptr, pos_ptr, wk_ptr, wv_ptr, pek_ptr, pev_ptr,
    MAX_SEQLEN, MAX_CMP, H: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    KS: tl.constexpr, STRIDE: tl.constexpr, LINEAR: tl.constexpr, IEEE: tl.constexpr,
):
    i_b = tl.program_id(0)
    pos = tl.load(len_ptr + i_b)
    tl.store(pos_ptr + i_b, pos)
    tl.store(len_ptr + i_b, pos + 1)
    o_h = tl.arange(0, H_PAD)
    o_d = tl.arange(0, BLOCK_D)
    m_hd = (o_h < H)[:, None] & (o_d < D)[None, :]
    off_new = (i_b * H + o_h).to(tl.int64)[:, None] * D + o_d[None, :]
    b_k = tl.load(k_new_ptr + off_new, mask=m_hd, other=0.)
    b_v = tl.load(v_new_ptr + off_new, mask=m_hd, other=0.)
    ok = (pos >= 0) & (pos < MAX_SEQLEN)  # a full slot writes nothing (the host checks refuse it first)
    off = ((i_b.to(tl.int64) * MAX_SEQLEN + pos) * H + o_h)[:, None] * D + o_d[None, :]
    tl.store(k_ptr + off, b_k, mask=m_hd & ok)
    tl.store(v_ptr + off, b_v, mask=m_hd & ok)
    start = pos + 1 - KS
    idx = start // STRIDE
    if ok & (start >= 0) & (start % STRIDE == 0) & (idx < MAX_CMP):
        _summary(k_ptr, kc_ptr, wk_ptr, pek_ptr, b_k, i_b, pos, start, idx, MAX_SEQLEN, MAX_CMP,
                 H, H_PAD, D, BLOCK_D, KS, LINEAR, IEEE)
        _summary(v_ptr, vc_ptr, wv_ptr, pev_ptr, b_v, i_b, pos, start, idx, MAX_SEQLEN, MAX_CMP,
                 H, H_PAD, D, BLOCK_D, KS, LINEAR, IEEE)


def _check_weights(name, w, pe, ks, d, dtype, device):
    if w is None and pe is None:
        return
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (ks * d, d) or w.device != device:
        fail(f"{name}_weight", f"must be [kernel_size * D, D] = [{ks * d}, {d}] on {device}, got "
             f"{tuple(getattr(w, 'shape', ()))}")
    if not isinstance(pe, torch.Tensor) or tuple(pe.shape) != (ks, d) or pe.device != device:
        fail(f"{name}_pos", f"must be [kernel_size, D] = [{ks}, {d}] on {device}, got {tuple(getattr(pe, 'shape', ()))}")


def decode_append(k_new: torch.Tensor, v_new: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cmp: torch.Tensor,
                  v_cmp: torch.Tensor, lengths: torch.Tensor, kernel_size: int, kernel_stride: int,
                  k_weight=None, k_pos=None, v_weight=None, v_pos=None) -> torch.Tensor:
    r"""Append one token per slot: k_new, v_new [B, H, D] into the cache k, v [B, max_seqlen, H, D] at
    row lengths[b], the summary it completes into k_cmp, v_cmp [B, max_cmp, H, D] (mean pooling, or
    linear with k_weight / v_weight [kernel_size * D, D] and k_pos / v_pos [kernel_size, D]), lengths
    (int32 [B], in place) += 1. Returns the positions written, int32 [B] (the lengths before)."""
    for name, t in (("k", k), ("v", v), ("k_cmp", k_cmp), ("v_cmp", v_cmp)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_contiguous():
            fail(name, f"must be a contiguous [B, rows, H, D] tensor, got {tuple(getattr(t, 'shape', ()))}")
    b, max_seqlen, h, d = k.shape
    for name, t in (("v", v), ("k_cmp", k_cmp), ("v_cmp", v_cmp), ("k_new", k_new), ("v_new", v_new)):
        want = (b, t.shape[1] if name in ("k_cmp", "v_cmp") else max_seqlen, h, d) if t.dim() == 4 else (b, h, d)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want or t.dtype != k.dtype or t.device != k.device:
            fail(name, f"must be {k.dtype} {list(want)} on {k.device}, got {getattr(t, 'dtype', type(t).__name__)} "
                 f"{tuple(getattr(t, 'shape', ()))}")
    if v_cmp.shape != k_cmp.shape:
        fail("v_cmp", f"must be k_cmp's shape {tuple(k_cmp.shape)}, got {tuple(v_cmp.shape)}")
    if not isinstance(lengths, torch.Tensor) or lengths.dtype != torch.int32 or tuple(lengths.shape) != (b,) \
            or lengths.device != k.device:
        fail("lengths", f"must be int32 [B={b}] on {k.device}")
    if not isinstance(kernel_size, int) or not isinstance(kernel_stride, int) or not 1 <= kernel_stride <= kernel_size:
        fail("kernel_stride", f"must be an int in [1, kernel_size], got {kernel_stride!r} (kernel_size {kernel_size!r})")
    _check_weights("k", k_weight, k_pos, kernel_size, d, k.dtype, k.device)
    _check_weights("v", v_weight, v_pos, kernel_size, d, k.dtype, k.device)
    linear = k_weight is not None
    if linear != (v_weight is not None):
        fail("v_weight", "must be given exactly when k_weight is (linear compression)")
    pos = new_output((b,), torch.int32, k.device)
    max_cmp = k_cmp.shape[1]
    if max_cmp == 0:  # no summary fits: keep valid pointers, the summary branch never runs
        k_cmp = v_cmp = k.new_zeros(b, 1, h, d)
    w = (k_weight.to(k.dtype).contiguous(), v_weight.to(k.dtype).contiguous(), k_pos.to(k.dtype).contiguous(),
         v_pos.to(k.dtype).contiguous()) if linear else (k, v, k, v)
    _append_kernel[(b,)](
        k_new.contiguous(), v_new.contiguous(), k, v, k_cmp, v_cmp, lengths, pos, *w, max_seqlen, max_cmp,
        H=h, H_PAD=group_pad(h), D=d, BLOCK_D=head_pad(d), KS=kernel_size, STRIDE=kernel_stride, LINEAR=linear,
        IEEE=k.dtype == torch.float32, num_warps=4,
    )
    return pos
