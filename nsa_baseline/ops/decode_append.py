"""Decode, kernel 0: append the new token of every slot to the cache, in one launch.

Grid (B, NC, 2): program (b, c, kv) owns column tile c (BN of the D columns) of slot b's keys (kv = 0)
or values (kv = 1). Every program reads the slot's length n (the new token's position; program
(b, 0, 0) also writes it to `pos`, what the attention kernels of the step read) and stores its
columns of the new row n; when the token completes a summary ((n + 1 - kernel_size) a non-negative
multiple of the stride) it computes its columns of summary (n + 1 - kernel_size) / stride over rows
[n + 1 - kernel_size, n]: mean, or linear (sum_j (x_j + pos_emb_j) @ W[j * D:(j + 1) * D, cols], J
kernel positions per tl.dot (K = J * D), the H heads as its rows). So the 2 x kernel_size x D x D
weights of a summary are read by 2 * NC programs, not by one per slot (NC from append_tiles: enough
programs for the GPU at small B). The new token's row comes from k_new / v_new, never from the store
just made (another program's, in any order).

The lengths are NOT moved by the kernel: every program of a slot reads lengths[b], and programs run
in any order, so an increment made by one could be read by another. The step's last kernel moves
them instead (decode_selected_window(advance=lengths) writes pos + 1; decode.py); a standalone call
(advance=True) adds 1 after the launch. Reads nothing back on the host (CUDA-graph capturable).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_baseline.checks import fail
from nsa_baseline.ops.decode_tiles import (DECODE_LAUNCH, _dot, _page_rows, _slot_row0, cache_layout, gpu_programs,
                                           group_pad, head_pad)
from nsa_baseline.utils.triton_utils import new_output, next_pow2

MIN_COLUMN_TILE = 16  # tl.dot's smallest N
# K of one summary tl.dot: J = DOT_K / D kernel positions whose loads are in flight together (D = 128,
# BN = 16: 64 KB of shared memory, no register spills on sm_90)
DOT_K = 1024
DOT_TILE = 16384  # elements of the larger tl.dot operand (x [H_PAD, K] or W [K, BN]): 32 KiB in 16-bit
MEAN_TILE = 4096  # elements of one mean-pooling load [J, H_PAD, BN]


@triton.jit
def _linear_part(src_ptr, new_ptr, w_ptr, pe_ptr, tbl_ptr, i_b, pos, start, o_n, MAX_SEQLEN, MAX_PAGES,
                 H: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BN: tl.constexpr,
                 KS: tl.constexpr, J: tl.constexpr, IEEE: tl.constexpr, PAGE: tl.constexpr):
    """Columns o_n [BN] of sum_j (x_j + pe_j) @ W[j * D:(j + 1) * D] over rows start + j, j < KS (row
    pos from new_ptr): fp32 [H_PAD, BN]. Row h of x holds J positions side by side (K = J * BLOCK_D)."""
    o_h = tl.arange(0, H_PAD)
    o_k = tl.arange(0, J * BLOCK_D)
    dd = o_k % BLOCK_D
    m_h = o_h < H
    m_n = o_n < D
    p_new = new_ptr + (i_b * H + o_h).to(tl.int64)[:, None] * D + dd[None, :]
    acc = tl.zeros([H_PAD, BN], tl.float32)
    for j0 in range(0, KS, J):
        jj = j0 + o_k // BLOCK_D  # [J * BLOCK_D]: the kernel position of each K column
        m_k = (jj < KS) & (dd < D)
        row = start + jj
        m_x = m_h[:, None] & m_k[None, :]
        r = _slot_row0(i_b, MAX_SEQLEN, PAGE) + _page_rows(tbl_ptr, i_b, row, m_k & (row < pos), MAX_PAGES, PAGE)
        off = (r[None, :] * H + o_h[:, None]) * D + dd[None, :]
        x = tl.load(src_ptr + off, mask=m_x & (row < pos)[None, :], other=0.)
        x_new = tl.load(p_new, mask=m_x & (row == pos)[None, :], other=0.)
        x = tl.where((row == pos)[None, :], x_new, x)  # the new token: not read back from the store
        pe = tl.load(pe_ptr + jj * D + dd, mask=m_k, other=0.).to(tl.float32)
        x = (x.to(tl.float32) + pe[None, :]).to(new_ptr.dtype.element_ty)  # rounded like compress_spans' add
        w = tl.load(w_ptr + (jj * D + dd).to(tl.int64)[:, None] * D + o_n[None, :],
                    mask=m_k[:, None] & m_n[None, :], other=0.)  # [J * BLOCK_D, BN]
        acc += _dot(x, w, IEEE)
    return acc


@triton.jit
def _mean_part(src_ptr, b_new, tbl_ptr, i_b, pos, start, o_n, MAX_SEQLEN, MAX_PAGES, H: tl.constexpr,
               H_PAD: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, KS: tl.constexpr, J: tl.constexpr,
               PAGE: tl.constexpr):
    """Columns o_n [BN] of the mean of rows start + j, j < KS (row pos is b_new [H_PAD, BN]), J rows
    per load: fp32 [H_PAD, BN]."""
    o_h = tl.arange(0, H_PAD)
    o_j = tl.arange(0, J)
    m_hn = (o_h < H)[:, None] & (o_n < D)[None, :]
    acc = tl.zeros([H_PAD, BN], tl.float32)
    for j0 in range(0, KS, J):
        row = start + j0 + o_j  # [J]
        m_r = ((j0 + o_j) < KS) & (row < pos)
        r = _slot_row0(i_b, MAX_SEQLEN, PAGE) + _page_rows(tbl_ptr, i_b, row, m_r, MAX_PAGES, PAGE)
        off = (r[:, None, None] * H + o_h[None, :, None]) * D + o_n[None, None, :]
        x = tl.load(src_ptr + off, mask=m_r[:, None, None] & m_hn[None, :, :], other=0.)  # [J, H_PAD, BN]
        x = tl.where((row == pos)[:, None, None], b_new[None, :, :], x)
        acc += tl.sum(x.to(tl.float32), axis=0)
    return acc / KS


@triton.jit
def _append_columns(new_ptr, src_ptr, dst_ptr, w_ptr, pe_ptr, tbl_ptr, i_b, i_c, pos, MAX_SEQLEN, MAX_CMP, MAX_PAGES,
                    H: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                    BN: tl.constexpr, KS: tl.constexpr, J: tl.constexpr, STRIDE: tl.constexpr,
                    LINEAR: tl.constexpr, IEEE: tl.constexpr, PAGE: tl.constexpr):
    """Column tile i_c of one of k / v: the new row at pos, and of the summary it completes (if any)."""
    o_h = tl.arange(0, H_PAD)
    o_n = i_c * BN + tl.arange(0, BN)
    m_hn = (o_h < H)[:, None] & (o_n < D)[None, :]
    b_new = tl.load(new_ptr + (i_b * H + o_h).to(tl.int64)[:, None] * D + o_n[None, :], mask=m_hn, other=0.)
    ok = (pos >= 0) & (pos < MAX_SEQLEN)  # a full slot writes nothing (the host checks refuse it first)
    row = _slot_row0(i_b, MAX_SEQLEN, PAGE) + _page_rows(tbl_ptr, i_b, pos, ok, MAX_PAGES, PAGE)
    off = (row * H + o_h)[:, None] * D + o_n[None, :]
    tl.store(src_ptr + off, b_new, mask=m_hn & ok)
    start = pos + 1 - KS
    idx = start // STRIDE
    if ok & (start >= 0) & (start % STRIDE == 0) & (idx < MAX_CMP):
        if LINEAR:
            acc = _linear_part(src_ptr, new_ptr, w_ptr, pe_ptr, tbl_ptr, i_b, pos, start, o_n, MAX_SEQLEN, MAX_PAGES,
                               H, H_PAD, D, BLOCK_D, BN, KS, J, IEEE, PAGE)
        else:
            acc = _mean_part(src_ptr, b_new, tbl_ptr, i_b, pos, start, o_n, MAX_SEQLEN, MAX_PAGES, H, H_PAD, D, BN,
                             KS, J, PAGE)
        off = ((i_b.to(tl.int64) * MAX_CMP + idx) * H + o_h)[:, None] * D + o_n[None, :]
        tl.store(dst_ptr + off, acc.to(dst_ptr.dtype.element_ty), mask=m_hn)


@triton.jit
def _append_kernel(
    k_new_ptr, v_new_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, len_ptr, pos_ptr, wk_ptr, wv_ptr, pek_ptr, pev_ptr, tbl_ptr,
    MAX_SEQLEN, MAX_CMP, MAX_PAGES, H: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BN: tl.constexpr, KS: tl.constexpr, J: tl.constexpr, STRIDE: tl.constexpr, LINEAR: tl.constexpr,
    IEEE: tl.constexpr, PAGE: tl.constexpr,
):
    i_b, i_c, i_kv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pos = tl.load(len_ptr + i_b)  # read by every program: nothing in this grid writes lengths
    if (i_c == 0) & (i_kv == 0):
        tl.store(pos_ptr + i_b, pos)
    if i_kv == 0:
        _append_columns(k_new_ptr, k_ptr, kc_ptr, wk_ptr, pek_ptr, tbl_ptr, i_b, i_c, pos, MAX_SEQLEN, MAX_CMP,
                        MAX_PAGES, H, H_PAD, D, BLOCK_D, BN, KS, J, STRIDE, LINEAR, IEEE, PAGE)
    else:
        _append_columns(v_new_ptr, v_ptr, vc_ptr, wv_ptr, pev_ptr, tbl_ptr, i_b, i_c, pos, MAX_SEQLEN, MAX_CMP,
                        MAX_PAGES, H, H_PAD, D, BLOCK_D, BN, KS, J, STRIDE, LINEAR, IEEE, PAGE)


def append_tiles(batch: int, heads: int, head_dim: int, kernel_size: int, linear: bool, device: torch.device,
                 column_tile: int | None = None, kernel_chunk: int | None = None) -> tuple[int, int]:
    """(BN, J): columns per program and kernel positions per load / tl.dot. On CUDA the narrowest
    tiles (BN >= 16) up to about DECODE_LAUNCH.append_programs_per_sm programs per SM over the
    2 * B * D / BN programs; off CUDA (the interpreter) one tile of all D columns. J: DOT_K / D
    positions per dot (linear), a load of MEAN_TILE elements (mean). Either can be forced (tests)."""
    block_d, h_pad = head_pad(head_dim), next_pow2(heads)
    if column_tile is None:
        programs = gpu_programs(device, DECODE_LAUNCH.append_programs_per_sm)  # 0 off CUDA -> one tile
        tiles = next_pow2(-(-programs // (2 * batch)))
        column_tile = max(MIN_COLUMN_TILE, block_d // tiles)
    if kernel_chunk is None:
        # one stage holds x, the new row and W for J positions: bounded so the program fits shared memory
        kernel_chunk = (min(DOT_K, DOT_TILE // max(column_tile, h_pad)) // block_d if linear
                        else MEAN_TILE // (h_pad * column_tile))
    return column_tile, max(1, min(kernel_chunk, next_pow2(kernel_size)))


def _check_weights(name, w, pe, ks, d, dtype, device):
    if w is None and pe is None:
        return
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (ks * d, d) or w.device != device:
        fail(f"{name}_weight", f"must be [kernel_size * D, D] = [{ks * d}, {d}] on {device}, got "
             f"{tuple(getattr(w, 'shape', ()))}")
    if not isinstance(pe, torch.Tensor) or tuple(pe.shape) != (ks, d) or pe.device != device:
        fail(f"{name}_pos", f"must be [kernel_size, D] = [{ks}, {d}] on {device}, got {tuple(getattr(pe, 'shape', ()))}")


def _check_tiles(column_tile, kernel_chunk, d):
    block_d = head_pad(d)
    if column_tile is not None and (not isinstance(column_tile, int) or column_tile != next_pow2(column_tile)
                                    or not MIN_COLUMN_TILE <= column_tile <= block_d):
        fail("column_tile", f"must be None or a power of two in [{MIN_COLUMN_TILE}, {block_d}], got {column_tile!r}")
    if kernel_chunk is not None and (not isinstance(kernel_chunk, int) or kernel_chunk < 1
                                     or kernel_chunk != next_pow2(kernel_chunk)):
        fail("kernel_chunk", f"must be None or a power of two >= 1, got {kernel_chunk!r}")


def decode_append(k_new: torch.Tensor, v_new: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cmp: torch.Tensor,
                  v_cmp: torch.Tensor, lengths: torch.Tensor, kernel_size: int, kernel_stride: int,
                  k_weight=None, k_pos=None, v_weight=None, v_pos=None, advance: bool = True,
                  column_tile: int | None = None, kernel_chunk: int | None = None,
                  block_table: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
    r"""Append one token per slot: k_new, v_new [B, H, D] into the cache k, v [B, max_seqlen, H, D] at
    row lengths[b], the summary it completes into k_cmp, v_cmp [B, max_cmp, H, D] (mean pooling, or
    linear with k_weight / v_weight [kernel_size * D, D] and k_pos / v_pos [kernel_size, D]). Returns
    the positions written, int32 [B] (the lengths before). advance=True: lengths (int32 [B], in place)
    += 1 after the kernel; False: the caller moves them (the decode step's last kernel does).
    column_tile / kernel_chunk force append_tiles' BN / J (tests). A paged cache: k, v are its pools
    [num_pages, page_size, H, D], block_table its int32 [B, pages per slot] (the pages of every row
    written or read claimed), max_seqlen the slots' capacity."""
    for name, t in (("k", k), ("v", v), ("k_cmp", k_cmp), ("v_cmp", v_cmp)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_contiguous():
            fail(name, f"must be a contiguous [B, rows, H, D] tensor, got {tuple(getattr(t, 'shape', ()))}")
    b, h, d = k_cmp.shape[0], k.shape[2], k.shape[3]
    if block_table is None:
        if k.shape[0] != b:
            fail("k", f"must be [B={b}, max_seqlen, H, D] (k_cmp's B), got {tuple(k.shape)}")
        max_seqlen = k.shape[1]
    elif not isinstance(max_seqlen, int) or max_seqlen < 1:
        fail("max_seqlen", f"must be the slots' capacity (an int >= 1) with a block_table, got {max_seqlen!r}")
    table, max_pages, page = cache_layout(block_table, k, b)
    for name, t in (("v", v), ("k_cmp", k_cmp), ("v_cmp", v_cmp), ("k_new", k_new), ("v_new", v_new)):
        want = (tuple(k.shape) if name == "v" else (b, t.shape[1], h, d)) if t.dim() == 4 else (b, h, d)
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
    _check_tiles(column_tile, kernel_chunk, d)
    pos = new_output((b,), torch.int32, k.device)
    max_cmp = k_cmp.shape[1]
    if max_cmp == 0:  # no summary fits: keep valid pointers, the summary branch never runs
        k_cmp = v_cmp = k.new_zeros(b, 1, h, d)
    w = (k_weight.to(k.dtype).contiguous(), v_weight.to(k.dtype).contiguous(), k_pos.to(k.dtype).contiguous(),
         v_pos.to(k.dtype).contiguous()) if linear else (k, v, k, v)
    bn, j = append_tiles(b, h, d, kernel_size, linear, k.device, column_tile, kernel_chunk)
    block_d = head_pad(d)
    _append_kernel[(b, block_d // bn, 2)](
        k_new.contiguous(), v_new.contiguous(), k, v, k_cmp, v_cmp, lengths, pos, *w, table, max_seqlen, max_cmp,
        max_pages, PAGE=page, H=h, H_PAD=group_pad(h) if linear else next_pow2(h), D=d, BLOCK_D=block_d, BN=bn,
        KS=kernel_size, J=j,
        STRIDE=kernel_stride, LINEAR=linear, IEEE=k.dtype == torch.float32, num_warps=4,
        num_stages=1,  # a summary is <= KS / J dependent steps: pipelining them only multiplied shared memory (3 x 130 KiB)
    )
    if advance:
        lengths.add_(1)
    return pos
