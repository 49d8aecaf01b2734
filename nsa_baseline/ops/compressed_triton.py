"""Compressed-branch attention of NSA in Triton (forward and backward), a drop-in for
`nsa_baseline.ops.compressed.compressed_attention`.

Kernels in nsa_baseline/ops/compressed_kernels.py. Forward and dQ: one program per (row tile, KV
head), rows = (token, query head of the KV group) pairs, looping over the summary tiles its rows see.
dK/dV: one program per (summary tile, KV head), looping over the row tiles that see its summaries.
No host synchronisation after the first call with a given cu_seqlens tensor (argument checks and the
per-token / per-summary sequence ids are cached per tensor).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import triton

from nsa_baseline.checks import fail, require_kernel_device
from nsa_baseline.contract import KERNEL_DTYPES, kernels_serve
from nsa_baseline.ops.compressed import checked_compressed_args
from nsa_baseline.ops.compressed_kernels import (compressed_bwd_dkdv_kernel, compressed_bwd_dq_kernel,
                                                 compressed_fwd_kernel)
from nsa_baseline.utils.attention_bwd import lse_base2, softmax_bwd_preprocess
from nsa_baseline.ops.flex import tensor_key
from nsa_baseline.utils.triton_utils import LOG2E, is_interpreter, new_output, next_pow2
from nsa_baseline.utils.varlen import token_sequence_ids

MAX_HEAD_DIM = 256
MAX_DKDV_SPLITS = 8


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # rows (token x group head pairs) per tile
    block_n: int  # summaries per tile
    num_warps: int
    num_stages: int

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            val = getattr(self, name)
            if val < 16 or val & (val - 1):  # tl.dot needs >= 16; tl.arange a power of two
                raise ValueError(f"TileConfig.{name} must be a power of two >= 16, got {val}")


class LaunchConfigs(NamedTuple):
    fwd: TileConfig
    dkdv: TileConfig  # block_n = summaries owned by a program, block_m = rows per step
    dq: TileConfig
    dkdv_splits: int = 0  # programs sharing one summary tile's rows; 0 = dkdv_splits()'s choice


# H100 (sm_90, 227 KiB shared memory per program), keyed by (padded D, input element bytes).
# Forward / dQ keep a [block_m, D] fp32 accumulator, dK/dV two [block_n, D] ones. At D = 128, 16-bit:
# ptxas (sm_90, via Triton's AOT compile) reports no spills for these; 128 x 128 forward tiles and
# 4-warp 64 x 64 dK/dV programs spill. experiments/gpu/compressed_bench.py times alternatives.
CONFIGS: dict[tuple[int, int], LaunchConfigs] = {
    (64, 2): LaunchConfigs(TileConfig(128, 64, 4, 3), TileConfig(64, 64, 4, 3), TileConfig(128, 64, 8, 3)),
    (128, 2): LaunchConfigs(TileConfig(128, 64, 8, 3), TileConfig(32, 128, 8, 3), TileConfig(128, 64, 8, 3)),
    (256, 2): LaunchConfigs(TileConfig(64, 32, 8, 2), TileConfig(32, 32, 8, 2), TileConfig(64, 32, 8, 2)),
    # fp32 (exact fp32 dots): half the bytes per tile
    (64, 4): LaunchConfigs(TileConfig(64, 64, 4, 2), TileConfig(32, 64, 4, 2), TileConfig(64, 64, 4, 2)),
    (128, 4): LaunchConfigs(TileConfig(64, 32, 4, 2), TileConfig(32, 32, 4, 2), TileConfig(64, 32, 4, 2)),
    (256, 4): LaunchConfigs(TileConfig(32, 16, 4, 1), TileConfig(16, 16, 4, 1), TileConfig(32, 16, 4, 1)),
}
# dK/dV where CONFIGS' tiles give fewer programs than SMs (few KV heads), with its rows shared by
# dkdv_splits() programs. NVIDIA H200, D = 128, bf16, 64 query heads (results/stage_bench): at 64K
# tokens, 4 KV heads (G = 16), 64 x 128 tiles in 2 shares take 22.1 ms where the earlier rule
# (64 x 64, one share) took 44.9; at 16K 2.3 ms with 8 shares where 64 x 32 tiles took 8.5.
# (H100, results/compressed_bench: dQ 128 x 64, 8 warps: 13.7 / 11.9 ms against 17.2 / 14.7 for
# 64 x 64.)
DKDV_FEW_PROGRAMS: dict[tuple[int, int], TileConfig] = {(128, 2): TileConfig(64, 128, 8, 2)}
# The interpreter runs numpy per tile: small tiles keep the CPU tests quick.
INTERPRETER_CONFIGS = LaunchConfigs(TileConfig(32, 16, 1, 1), TileConfig(32, 16, 1, 1), TileConfig(32, 16, 1, 1))


def config_key(d: int, dtype: torch.dtype) -> tuple[int, int]:
    """(padded D, input element bytes): the key of CONFIGS."""
    return max(64, next_pow2(d)), 4 if dtype == torch.float32 else 2


def launch_configs(d: int, dtype: torch.dtype) -> LaunchConfigs:
    if is_interpreter():
        return INTERPRETER_CONFIGS
    return CONFIGS[config_key(d, dtype)]


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def dkdv_config(cfg: TileConfig, n_cmp: int, h: int, device, key: tuple[int, int] = (0, 0)) -> TileConfig:
    """The dK/dV tile: where `cfg` makes fewer programs than SMs (few KV heads), the measured
    few-programs tile DKDV_FEW_PROGRAMS[key] if there is one; dkdv_splits then shares each tile's
    rows among programs until the GPU is full."""
    if is_interpreter() or torch.device(device).type != "cuda":
        return cfg
    if triton.cdiv(n_cmp, cfg.block_n) * h < _sm_count(torch.device(device)):
        cfg = DKDV_FEW_PROGRAMS.get(key, cfg)
    return cfg


def dkdv_splits(cfg: TileConfig, n_cmp: int, h: int, device) -> int:
    """Row shares per dK/dV summary tile: 1 where the tiles alone give every SM two programs, else
    enough shares for that (at most MAX_DKDV_SPLITS). With 4 KV heads (G = 16 of 64 query heads) a
    program would otherwise walk up to 16 x N rows alone."""
    if is_interpreter() or torch.device(device).type != "cuda":
        return 1
    programs = triton.cdiv(n_cmp, cfg.block_n) * h
    return max(1, min(MAX_DKDV_SPLITS, triton.cdiv(2 * _sm_count(torch.device(device)), max(programs, 1))))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input_precision: exact fp32 products for fp32 inputs (the reference has no tf32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


class VarlenMeta(NamedTuple):
    """Device tables of one (cu_seqlens, cu_seqlens_cmp) pair; varlen False = one sequence."""

    cu: torch.Tensor  # int32 [B + 1]
    cu_cmp: torch.Tensor  # int32 [B + 1]
    tok_seq: torch.Tensor  # int32 [N]: sequence of each token (varlen only, else cu)
    cmp_seq: torch.Tensor  # int32 [N_cmp]: sequence of each summary (varlen only, else cu)
    varlen: bool


_META_CACHE: dict[tuple, tuple] = {}


def varlen_meta(cu_seqlens, cu_seqlens_cmp, cu, cu_cmp, n: int, n_cmp: int) -> VarlenMeta:
    """Sequence ids of tokens and summaries, on the device (searchsorted), cached per pair of
    cu_seqlens tensors (cu, cu_cmp: the checked int32 tables of `checked_compressed_args`)."""
    if cu.numel() == 2:
        return VarlenMeta(cu, cu_cmp, cu, cu, False)
    key = (tensor_key(cu_seqlens), tensor_key(cu_seqlens_cmp), tensor_key(cu_cmp), n, n_cmp)
    hit = _META_CACHE.get(key)
    if hit is None:
        tok_seq = token_sequence_ids(cu, n).int()
        cmp_seq = token_sequence_ids(cu_cmp, n_cmp).int() if n_cmp else cu
        if len(_META_CACHE) > 64:
            _META_CACHE.clear()
        hit = ((cu_seqlens, cu_seqlens_cmp), VarlenMeta(cu, cu_cmp, tok_seq, cmp_seq, True))  # held: ids stay unique
        _META_CACHE[key] = hit
    return hit[1]


def compressed_fwd(q, k_cmp, v_cmp, meta: VarlenMeta, kernel_size: int, kernel_stride: int, scale: float,
                   cfg: Optional[TileConfig] = None):
    """o [N, HQ, D] (q.dtype) and lse float32 [HQ, N] (natural log); contiguous inputs of one dtype."""
    n, hq, d = q.shape
    n_cmp, h, _ = k_cmp.shape
    g = hq // h
    o = new_output((n, hq, d), q.dtype, q.device)
    lse = new_output((hq, n), torch.float32, q.device)
    if n_cmp == 0:  # no sequence is long enough for a summary
        return o.zero_(), lse.fill_(float("-inf"))
    cfg = cfg or launch_configs(d, q.dtype).fwd
    compressed_fwd_kernel[(triton.cdiv(n * g, cfg.block_m) * h,)](
        q, k_cmp, v_cmp, o, lse, meta.tok_seq, meta.cu, meta.cu_cmp, n, scale * LOG2E,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **_constexprs(q, k_cmp, meta, kernel_size, kernel_stride),
    )
    return o, lse


def bwd_preprocess(o, do, lse, dlse):
    """(lse2, delta) float32 [HQ, N]: lse * log2e (+inf where -inf) and rowsum(o * do) - dlse."""
    return softmax_bwd_preprocess(o, do, lse, dlse)


def _constexprs(q, k_cmp, meta: VarlenMeta, kernel_size: int, kernel_stride: int) -> dict:
    hq, d, h = q.shape[1], q.shape[2], k_cmp.shape[1]
    return dict(HQ=hq, H=h, G=hq // h, D=d, BLOCK_D=max(16, next_pow2(d)), KS=kernel_size, STRIDE=kernel_stride,
                VARLEN=meta.varlen, PREC=dot_precision(q.dtype), WHILE_LOOP=is_interpreter())


def bwd_dkdv(q, k_cmp, v_cmp, do, lse2, delta, meta: VarlenMeta, kernel_size: int, kernel_stride: int,
             scale: float, cfg: TileConfig, splits: int = 1):
    """(dk_cmp, dv_cmp): one program per (summary tile, KV head, share of its rows), looping over
    the rows of its share that see the tile; with splits > 1 the shares' fp32 partials are summed
    (fixed order: deterministic)."""
    n = q.shape[0]
    n_cmp, h, _ = k_cmp.shape
    if splits > 1:
        dk = new_output((splits,) + tuple(k_cmp.shape), torch.float32, k_cmp.device)
        dv = new_output((splits,) + tuple(v_cmp.shape), torch.float32, v_cmp.device)
    else:
        dk = new_output(k_cmp.shape, k_cmp.dtype, k_cmp.device)
        dv = new_output(v_cmp.shape, v_cmp.dtype, v_cmp.device)
    compressed_bwd_dkdv_kernel[(triton.cdiv(n_cmp, cfg.block_n) * h, splits)](
        q, k_cmp, v_cmp, do, lse2, delta, dk, dv, meta.tok_seq, meta.cmp_seq, meta.cu, meta.cu_cmp, n, n_cmp,
        scale * LOG2E, scale, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, SPLITS=splits, **_constexprs(q, k_cmp, meta, kernel_size, kernel_stride),
    )
    if splits > 1:
        return dk.sum(0).to(k_cmp.dtype), dv.sum(0).to(v_cmp.dtype)
    return dk, dv


def bwd_dq(q, k_cmp, v_cmp, do, lse2, delta, meta: VarlenMeta, kernel_size: int, kernel_stride: int,
           scale: float, cfg: TileConfig, dq=None, accumulate: bool = False):
    """dq: one program per (row tile, KV head), looping over the summaries its rows see. `dq`: the
    buffer to write (None allocates); accumulate: add to what it holds."""
    n, hq, _ = q.shape
    h = k_cmp.shape[1]
    if dq is None:
        dq = new_output(q.shape, q.dtype, q.device)
    compressed_bwd_dq_kernel[(triton.cdiv(n * (hq // h), cfg.block_m) * h,)](
        q, k_cmp, v_cmp, do, lse2, delta, dq, meta.tok_seq, meta.cu, meta.cu_cmp, n, scale * LOG2E, scale,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        ACCUMULATE=accumulate, **_constexprs(q, k_cmp, meta, kernel_size, kernel_stride),
    )
    return dq


def compressed_bwd(q, k_cmp, v_cmp, o, lse, do, dlse, meta: VarlenMeta, kernel_size: int, kernel_stride: int,
                   scale: float, cfgs: Optional[LaunchConfigs] = None, dq=None, accumulate: bool = False,
                   delta=None):
    """(dq, dk_cmp, dv_cmp) for the upstream gradients do [N, HQ, D] and dlse [HQ, N] (or None).
    `dq`: the buffer to write (None allocates); accumulate: add the branch's dq to what it holds;
    delta: rowsum(o * do) - dlse float32 [HQ, N] when the caller has it (else one pass computes it)."""
    if k_cmp.shape[0] == 0:  # no summary: the branch adds nothing to dq
        empty = (new_output(k_cmp.shape, k_cmp.dtype, k_cmp.device), new_output(v_cmp.shape, v_cmp.dtype, v_cmp.device))
        if dq is None:
            dq = torch.zeros_like(q)
        elif not accumulate:
            dq.zero_()
        return (dq,) + empty
    if cfgs is None:
        cfgs = launch_configs(q.shape[2], q.dtype)
        cfgs = cfgs._replace(dkdv=dkdv_config(cfgs.dkdv, k_cmp.shape[0], k_cmp.shape[1], q.device,
                                              config_key(q.shape[2], q.dtype)))
    splits = cfgs.dkdv_splits or dkdv_splits(cfgs.dkdv, k_cmp.shape[0], k_cmp.shape[1], q.device)
    lse2, delta = bwd_preprocess(o, do, lse, dlse) if delta is None else (lse_base2(lse), delta)
    dk, dv = bwd_dkdv(q, k_cmp, v_cmp, do, lse2, delta, meta, kernel_size, kernel_stride, scale, cfgs.dkdv, splits)
    dq = bwd_dq(q, k_cmp, v_cmp, do, lse2, delta, meta, kernel_size, kernel_stride, scale, cfgs.dq, dq, accumulate)
    return dq, dk, dv


class CompressedAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, meta, kernel_size, kernel_stride, scale, cfgs):
        o, lse = compressed_fwd(q, k_cmp, v_cmp, meta, kernel_size, kernel_stride, scale,
                                cfgs.fwd if cfgs is not None else None)
        ctx.save_for_backward(q, k_cmp, v_cmp, o, lse)
        ctx.args = (meta, kernel_size, kernel_stride, scale, cfgs)
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k_cmp, v_cmp, o, lse = ctx.saved_tensors
        if do is None and dlse is None:
            return (None,) * 8
        do = torch.zeros_like(o) if do is None else do.contiguous()
        dlse = None if dlse is None else dlse.contiguous()
        dq, dk, dv = compressed_bwd(q, k_cmp, v_cmp, o, lse, do, dlse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def compressed_triton_supported(q: torch.Tensor) -> bool:
    """Whether the kernels serve `q`: CUDA, or the interpreter on CPU (whose bf16 tl.dot is wrong),
    for fp16 / bf16 / fp32 and D <= MAX_HEAD_DIM."""
    return kernels_serve(q) and q.dim() == 3 and q.shape[2] <= MAX_HEAD_DIM


def require_triton(q: torch.Tensor) -> None:
    """ValueError naming `q` unless the kernels serve it; nsa_baseline.reference computes the rest."""
    where = "compressed_attention_triton: "
    require_kernel_device(q, where)
    if q.dtype not in KERNEL_DTYPES or (not q.is_cuda and q.dtype == torch.bfloat16):
        fail("q", f"has dtype {q.dtype}; the Triton kernels take {[str(t) for t in KERNEL_DTYPES]} (bf16 only on "
             "CUDA: the interpreter's bf16 tl.dot is wrong); use nsa_baseline.reference.compressed_attention_ref",
             where)


def compressed_attention_triton(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    cu_seqlens_cmp: Optional[torch.Tensor],
    kernel_size: int = 32,
    kernel_stride: int = 16,
    scale: Optional[float] = None,
    configs: Optional[LaunchConfigs] = None,
):
    r"""Causal attention of every query over its sequence's compressed keys, in Triton.
    Differentiable w.r.t. q, k_cmp and v_cmp, through o and lse; deterministic backward.

    CUDA (fp16 / bf16 / fp32) and the Triton interpreter (fp16 / fp32): the kernels of
    compressed_kernels.py; anything else (float64, CPU without the interpreter) is a ValueError.

    Args:
        q: [N, HQ, D]; k_cmp, v_cmp: [N_cmp, H, D] from compress_kv; HQ = G * H (any integer G) and
            query head hq uses kv head hq // G; D <= 256 (padded to a power of two inside).
        cu_seqlens: int32 [B + 1] of the tokens; cu_seqlens_cmp: int32 [B + 1] of the summaries
            (None for both = one sequence). kernel_size, kernel_stride: as given to compress_kv.
        scale: defaults to D ** -0.5. configs: launch configs (tuning only; default CONFIGS by D).
    Returns:
        o [N, HQ, D] in q.dtype and lse float32 [HQ, N] (natural log). Summary i is visible to the
        query at position t iff i * stride + kernel_size - 1 <= t; a query that sees none gets o = 0,
        lse = -inf and a zero gradient.
    """
    require_triton(q)
    cu, cu_cmp, scale = checked_compressed_args(q, k_cmp, v_cmp, cu_seqlens, cu_seqlens_cmp, kernel_size,
                                      kernel_stride, scale)
    d = q.shape[2]
    if d > MAX_HEAD_DIM:
        raise ValueError(f"argument `q`: head dim D={d} > {MAX_HEAD_DIM} is not supported by the Triton kernels")
    meta = varlen_meta(cu_seqlens, cu_seqlens_cmp, cu, cu_cmp, q.shape[0], k_cmp.shape[0])
    q, k_cmp, v_cmp = (t.to(q.dtype).contiguous() for t in (q, k_cmp, v_cmp))
    return CompressedAttentionFunction.apply(q, k_cmp, v_cmp, meta, kernel_size, kernel_stride, scale, configs)
