"""Argument checks shared by every implementation (reference, NSA and FSA kernels, the module).

Each raises ValueError naming the argument. Checks that read tensor values (cu_seqlens) run in eager
mode only and once per tensor: a training step passes the same cu_seqlens to every layer, and reading
a CUDA tensor costs a device->host copy. The selected-attention contract itself is nsa_baseline.contract.
"""
from __future__ import annotations

from typing import Optional

import torch

from nsa_baseline.utils.compressed_varlen import compressed_cu_seqlens
from nsa_baseline.utils.triton_utils import is_interpreter

# cu_seqlens tensors whose values were checked: id -> (data_ptr, in-place version, numel, N).
_checked_cu_seqlens: dict[int, tuple[int, int, int, int]] = {}


def fail(arg: str, msg: str, where: str = "") -> None:
    """ValueError "<where>argument `arg` msg"."""
    raise ValueError(f"{where}argument `{arg}` {msg}")


def check_int(name: str, val, least: int = 1) -> None:
    """ValueError unless `val` is an int (not a bool) >= least."""
    if not isinstance(val, int) or isinstance(val, bool) or val < least:
        fail(name, f"must be an int >= {least}, got {val!r}")


def check_scale(scale: Optional[float], head_dim: int, where: str = "") -> float:
    """The softmax scale: D ** -0.5 when None, else a positive number."""
    if scale is None:
        return head_dim ** -0.5
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
        fail("scale", f"must be a positive float or None, got {scale!r}", where)
    return float(scale)


def device_values_readable() -> bool:
    """False while torch.compile traces or a CUDA graph is captured: reading a tensor's values (a device
    sync) is not allowed there. Value checks then rely on the eager calls before (graph warm-up)."""
    if torch.compiler.is_compiling():  # (dynamo cannot trace the capture query: ask it first)
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_cu_seqlens(cu_seqlens: Optional[torch.Tensor], num_tokens: Optional[int] = None,
                     where: str = "", name: str = "cu_seqlens") -> None:
    """None passes. Otherwise an int32 tensor [B + 1] with B >= 1; with `num_tokens` also its values
    (start at 0, non-decreasing, end at num_tokens), read when device_values_readable(), once per tensor."""
    if cu_seqlens is None:
        return
    if not isinstance(cu_seqlens, torch.Tensor):
        fail(name, f"must be an int32 tensor [B + 1] or None, got {type(cu_seqlens).__name__}", where)
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        fail(name, f"must be an int32 tensor [B + 1] with B >= 1 or None, got {cu_seqlens.dtype} of shape "
             f"{tuple(cu_seqlens.shape)}", where)
    if num_tokens is None or not device_values_readable():
        return
    key = id(cu_seqlens)
    stamp = (cu_seqlens.data_ptr(), cu_seqlens._version, cu_seqlens.numel(), num_tokens)
    if _checked_cu_seqlens.get(key) == stamp:
        return
    values = cu_seqlens.tolist()
    if values[0] != 0:
        fail(name, f"must start at 0, got {values[0]}", where)
    if any(b < a for a, b in zip(values, values[1:])):
        fail(name, f"must be non-decreasing, got {values[:8]}{'...' if len(values) > 8 else ''}", where)
    if values[-1] != num_tokens:
        fail(name, f"must end at N = total tokens = {num_tokens}, got {values[-1]}", where)
    if len(_checked_cu_seqlens) > 256:
        _checked_cu_seqlens.clear()
    _checked_cu_seqlens[key] = stamp


def require_kernel_device(q: torch.Tensor, where: str = "", arg: str = "q") -> None:
    """Triton kernels need a CUDA tensor, or the interpreter for CPU tensors (else Triton fails with
    "0 active drivers"). The error names `arg`."""
    if not q.is_cuda and not is_interpreter():
        fail(arg, f"is on {q.device}, but the Triton kernels need CUDA tensors. Use CUDA tensors, set "
             "TRITON_INTERPRET=1 before importing triton (runs the kernels on the CPU, slowly), or use the "
             "PyTorch reference (nsa_baseline.reference)", where)


def check_kernel(kernel_size: int, kernel_stride: int) -> None:
    """ValueError unless kernel_size and kernel_stride are positive ints with stride <= kernel_size."""
    check_int("kernel_size", kernel_size)
    check_int("kernel_stride", kernel_stride)
    if kernel_stride > kernel_size:
        fail("kernel_stride", f"({kernel_stride}) must be <= kernel_size ({kernel_size})")


def check_block_mapping(kernel_size: int, kernel_stride: int, block_size: int) -> None:
    """ValueError unless stride | kernel_size, stride | block_size and kernel_size <= block_size."""
    check_kernel(kernel_size, kernel_stride)
    check_int("block_size", block_size)
    if kernel_size % kernel_stride:
        fail("kernel_stride", f"({kernel_stride}) must divide kernel_size ({kernel_size})")
    if block_size % kernel_stride:
        fail("block_size", f"({block_size}) must be a multiple of kernel_stride ({kernel_stride})")
    if kernel_size > block_size:
        fail("block_size", f"({block_size}) must be >= kernel_size ({kernel_size})")


def check_selection(block_size: int, topk: int, init_blocks: int, local_blocks: int) -> None:
    """Top-T selection sizes: positive block_size and topk, forced blocks counting within T."""
    for name, val, least in (("block_size", block_size, 1), ("topk", topk, 1),
                             ("init_blocks", init_blocks, 0), ("local_blocks", local_blocks, 0)):
        check_int(name, val, least)
    if init_blocks + local_blocks > topk:
        fail("topk", f"({topk}) must be >= init_blocks + local_blocks ({init_blocks} + {local_blocks}): "
             "forced blocks count within T")


def check_compress_inputs(x, cu_seqlens, kernel_size, kernel_stride, weight, pos_emb) -> None:
    """compress_kv: x a floating [N, H, D]; weight [kernel_size * D, D] and pos_emb [kernel_size, D]
    given together or not at all."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        fail("x", f"must be a floating tensor [N, H, D], got {getattr(x, 'dtype', type(x).__name__)} of shape "
             f"{tuple(getattr(x, 'shape', ()))}")
    check_kernel(kernel_size, kernel_stride)
    d = x.shape[2]
    if (weight is None) != (pos_emb is None):
        raise ValueError("arguments `weight` and `pos_emb` must be given together (or both None for mean pooling)")
    if weight is not None and tuple(weight.shape) != (kernel_size * d, d):
        fail("weight", f"must be [kernel_size * D, D] = [{kernel_size * d}, {d}], got {tuple(weight.shape)}")
    if pos_emb is not None and tuple(pos_emb.shape) != (kernel_size, d):
        fail("pos_emb", f"must be [kernel_size, D] = [{kernel_size}, {d}], got {tuple(pos_emb.shape)}")
    check_cu_seqlens(cu_seqlens)


def check_qkv(q, k, v, cu_seqlens, scale, check_values: bool = False) -> float:
    """Window / full attention: floating q [N, HQ, D], k and v [N, H, D] of q's dtype, HQ a multiple of
    H; cu_seqlens' values too when `check_values` (a host read). Returns the scale."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or not t.is_floating_point():
            fail(name, "must be a floating tensor [N, heads, D]")
    n, hq, d = q.shape
    if k.shape[0] != n or k.shape[2] != d or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"arguments `k`, `v` must both be [N={n}, H, D={d}], got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if k.shape[1] < 1 or hq % k.shape[1] != 0:
        raise ValueError(f"argument `q`: num_q_heads={hq} must be a multiple of num_kv_heads={k.shape[1]}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"arguments `k`, `v` must have q's dtype {q.dtype}, got {k.dtype} and {v.dtype}")
    check_cu_seqlens(cu_seqlens, n if check_values else None)
    return check_scale(scale, d)


def check_compressed_args(q, k_cmp, cu_seqlens, cu_seqlens_cmp, kernel_size, kernel_stride, scale, v_cmp=None):
    """Validate a compressed-branch call (reads cu_seqlens on the host); returns (cu_seqlens,
    cu_seqlens_cmp, scale) filled in, both cu_seqlens on q's device."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or not q.is_floating_point() or q.shape[0] < 1:
        fail("q", f"must be a floating tensor [N >= 1, HQ, D], got {getattr(q, 'shape', q)!r}")
    n, hq, d = q.shape
    for name, t in (("k_cmp", k_cmp), ("v_cmp", v_cmp)):
        if t is None and name == "v_cmp":
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[2] != d:
            fail(name, f"must be [N_cmp, H, D={d}], got {getattr(t, 'shape', t)!r}")
    if v_cmp is not None and tuple(v_cmp.shape) != tuple(k_cmp.shape):
        fail("v_cmp", f"must have k_cmp's shape {tuple(k_cmp.shape)}, got {tuple(v_cmp.shape)}")
    if k_cmp.shape[1] < 1 or hq % k_cmp.shape[1] != 0:
        raise ValueError(f"argument `q`: num_q_heads={hq} must be a multiple of num_kv_heads={k_cmp.shape[1]}")
    check_kernel(kernel_size, kernel_stride)
    scale = check_scale(scale, d)
    check_cu_seqlens(cu_seqlens_cmp, name="cu_seqlens_cmp")
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, n], dtype=torch.int32, device=q.device)
    else:
        check_cu_seqlens(cu_seqlens, n)
        cu_seqlens = cu_seqlens.to(q.device)
    expected = compressed_cu_seqlens(cu_seqlens, kernel_size, kernel_stride)
    if cu_seqlens_cmp is None:
        cu_seqlens_cmp = expected
    cu_seqlens_cmp = cu_seqlens_cmp.to(q.device)
    if not torch.equal(cu_seqlens_cmp, expected):
        fail("cu_seqlens_cmp", "does not match cu_seqlens, kernel_size and kernel_stride (use compress_kv's "
             "second output)")
    if int(expected[-1]) != k_cmp.shape[0]:
        fail("k_cmp", f"must have N_cmp={int(expected[-1])} rows, got {k_cmp.shape[0]}")
    return cu_seqlens, cu_seqlens_cmp, scale


def check_gated_sum_args(gates, o_cmp, o_slc, o_win) -> None:
    """NSA's gated sum: floating o_cmp [N, HQ, D], o_slc and o_win of its shape, floating gates
    [N, HQ, 3], all on o_cmp's device (the eager expression would broadcast a wrong shape silently)."""
    if not isinstance(o_cmp, torch.Tensor) or o_cmp.dim() != 3 or not o_cmp.is_floating_point():
        fail("o_cmp", f"must be a floating tensor [N, HQ, D], got {getattr(o_cmp, 'dtype', type(o_cmp).__name__)} "
             f"of shape {tuple(getattr(o_cmp, 'shape', ()))}")
    n, hq, _ = o_cmp.shape
    for name, t, shape in (("o_slc", o_slc, tuple(o_cmp.shape)), ("o_win", o_win, tuple(o_cmp.shape)),
                           ("gates", gates, (n, hq, 3))):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or not t.is_floating_point():
            fail(name, f"must be a floating tensor {list(shape)}, got {getattr(t, 'dtype', type(t).__name__)} of "
                 f"shape {tuple(getattr(t, 'shape', ()))}")
        if t.device != o_cmp.device:
            fail(name, f"must be on o_cmp's device {o_cmp.device}, got {t.device}")


def forget_checked_cu_seqlens() -> None:
    """Drop the record of cu_seqlens tensors already checked (tests that mutate a tensor's values)."""
    _checked_cu_seqlens.clear()
