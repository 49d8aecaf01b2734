"""The selected-attention contract that every implementation (reference, NSA, FSA) follows.

    selected_attention(q, k, v, block_indices, block_size, *, cu_seqlens=None, scale=None,
                       return_lse=False) -> o  or  (o, lse)

q [N, HQ, D], k/v [N, H, D] packed sequences; HQ = G * H for any integer G >= 1.
block_indices int32 [N, H, T]: key-block ids counted from the start of the query's own sequence,
-1 for an empty slot; shared by the G query heads of a KV head. Causal inside a block.
lse is float32 [HQ, N] (natural log); a row that sees no key gives o = 0 and lse = -inf.

`check_selected_args` runs the checks that cost (almost) nothing and always run; index values are
checked by `check_block_indices` when asked (argument `check_indices=True` or env NSA_CHECK_INDICES=1).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from nsa_baseline.checks import check_cu_seqlens, check_scale, device_values_readable, fail
from nsa_baseline.utils.triton_utils import is_interpreter
from nsa_baseline.utils.varlen import single_sequence_cu_seqlens

# Block sizes the kernels of both families support (the reference takes any positive block size).
BLOCK_SIZES = (16, 32, 64, 128)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the kernels' input dtypes
SUPPORTED_DTYPES = KERNEL_DTYPES + (torch.float64,)  # the reference computes in float64 too


def kernels_serve(*tensors) -> bool:
    """Whether Triton kernels can run on these inputs: all tensors of KERNEL_DTYPES, on CUDA, or on
    the CPU under the interpreter without bf16 (the interpreter's bf16 tl.dot is wrong)."""
    if not all(isinstance(t, torch.Tensor) and t.dtype in KERNEL_DTYPES for t in tensors):
        return False
    return tensors[0].is_cuda or (is_interpreter() and all(t.dtype != torch.bfloat16 for t in tensors))
CHECK_INDICES_ENV = "NSA_CHECK_INDICES"
MAX_PAIRS = 2**31 - 1  # the inverted block index and pair positions are int32 (N * H * T of them)
_WHERE = "selected_attention: "


@dataclass(frozen=True)
class SelectedArgs:
    """Validated sizes of one selected-attention call (letters as in the docs: N, HQ, H, G, D, T)."""

    num_tokens: int
    num_q_heads: int
    num_kv_heads: int
    group_size: int
    head_dim: int
    topk: int
    block_size: int
    scale: float
    cu_seqlens: torch.Tensor  # int32 [B + 1] on q.device (made for a single sequence when None)

    @property
    def batch(self) -> int:
        return self.cu_seqlens.numel() - 1


def _fail(arg: str, msg: str) -> None:
    fail(arg, msg, _WHERE)


def check_selected_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    supported_block_sizes: tuple[int, ...] = BLOCK_SIZES,
    supported_dtypes: tuple[torch.dtype, ...] = SUPPORTED_DTYPES,
) -> SelectedArgs:
    """Validate a selected-attention call and return its sizes; raises ValueError naming the argument."""
    for name, t in (("q", q), ("k", k), ("v", v), ("block_indices", block_indices)):
        if not isinstance(t, torch.Tensor):
            _fail(name, f"must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3:
        _fail("q", f"must be [total_tokens, num_q_heads, head_dim], got shape {tuple(q.shape)}")
    n, hq, d = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 3 or t.shape[0] != n or t.shape[2] != d:
            _fail(name, f"must be [total_tokens={n}, num_kv_heads, head_dim={d}], got shape {tuple(t.shape)}")
    h = k.shape[1]
    if v.shape[1] != h:
        _fail("v", f"must have num_kv_heads={h} like k, got shape {tuple(v.shape)}")
    if h < 1 or hq % h != 0:
        _fail("q", f"num_q_heads={hq} must be a positive multiple of num_kv_heads={h}")
    if n < 1 or d < 1:
        _fail("q", f"must have total_tokens >= 1 and head_dim >= 1, got shape {tuple(q.shape)}")
    if q.dtype not in supported_dtypes:
        _fail("q", f"dtype must be one of {[str(x) for x in supported_dtypes]}, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            _fail(name, f"dtype must equal q.dtype={q.dtype}, got {t.dtype}")
    for name, t in (("k", k), ("v", v), ("block_indices", block_indices)):
        if t.device != q.device:
            _fail(name, f"must be on q's device {q.device}, got {t.device}")
    if block_indices.dtype != torch.int32:
        _fail("block_indices", f"dtype must be torch.int32, got {block_indices.dtype}")
    if block_indices.dim() != 3 or block_indices.shape[0] != n or block_indices.shape[1] != h:
        _fail("block_indices", f"must be [total_tokens={n}, num_kv_heads={h}, T], got shape "
              f"{tuple(block_indices.shape)}")
    t_sel = block_indices.shape[2]
    if t_sel < 1:
        _fail("block_indices", f"must have T >= 1 selected slots, got T={t_sel}")
    if n * h * t_sel > MAX_PAIRS:
        _fail("block_indices", f"has N * H * T = {n} * {h} * {t_sel} = {n * h * t_sel} entries, more than the "
              f"int32 pair index holds ({MAX_PAIRS}); split the batch into calls of fewer tokens")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size not in supported_block_sizes:
        _fail("block_size", f"must be one of {supported_block_sizes}, got {block_size!r}")
    scale = check_scale(scale, d, _WHERE)
    compiling = torch.compiler.is_compiling()
    if cu_seqlens is None:  # (the cached tensor is for eager calls; a traced graph makes its own)
        cu_seqlens = (torch.tensor([0, n], dtype=torch.int32, device=q.device) if compiling
                      else single_sequence_cu_seqlens(n, q.device))
    else:
        check_cu_seqlens(cu_seqlens, n, _WHERE)  # values in eager mode only
        if cu_seqlens.device != q.device:
            cu_seqlens = cu_seqlens.to(q.device)
    return SelectedArgs(n, hq, h, hq // h, d, t_sel, block_size, scale, cu_seqlens)


def index_checks_requested(check_indices: Optional[bool]) -> bool:
    """Explicit argument wins; otherwise the NSA_CHECK_INDICES environment variable decides. Never while a
    CUDA graph is captured or torch.compile traces (the checks read values: a device sync)."""
    if not device_values_readable():
        return False
    if check_indices is not None:
        return bool(check_indices)
    return os.environ.get(CHECK_INDICES_ENV, "0") not in ("", "0", "false", "False")


def check_block_indices(block_indices: torch.Tensor, block_size: int, cu_seqlens: torch.Tensor) -> None:
    """Value checks of block_indices (costs a device sync): every entry is -1 or a block of the
    query's own sequence, and the valid entries of a row are distinct."""
    from nsa_baseline.utils.varlen import token_positions

    pos, seq_len = token_positions(cu_seqlens, block_indices.shape[0])
    num_blocks = (seq_len + block_size - 1) // block_size  # [N]
    idx = block_indices.long()
    bad = (idx < -1) | (idx >= num_blocks[:, None, None])
    if bool(bad.any()):
        where = tuple(int(x) for x in bad.nonzero()[0].tolist())
        _fail("block_indices", f"entry {where} = {int(idx[where])} is outside [-1, num_blocks of its "
              f"sequence = {int(num_blocks[where[0]])})")
    srt, _ = idx.sort(dim=-1)
    dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    if bool(dup.any()):
        where = tuple(int(x) for x in dup.nonzero()[0].tolist()[:2])
        _fail("block_indices", f"row (token, kv_head) = {where} repeats a block; valid entries must be distinct")
