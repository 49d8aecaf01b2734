"""NSA's sliding-window branch in Triton (forward and backward), a drop-in for
`nsa_baseline.branches.sliding_window_attention` (same arguments; `config` added for tuning).

Kernels in nsa_baseline/ops/window_kernels.py. Forward and dQ: grid (row tile, KV head), rows =
(token, query head of the KV group) pairs looping over the key tiles of their band; dK/dV: grid
(key tile, KV head) looping over the row tiles that see it; deterministic (no atomics). The
backward's preprocess (delta, base-2 lse) is the compressed branch's. No host synchronisation
after the first call with a given cu_seqlens tensor (its checks and token tables are cached).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import triton

from nsa_baseline.checks import check_int, check_qkv, fail, require_kernel_device
from nsa_baseline.contract import KERNEL_DTYPES, kernels_serve
from nsa_baseline.ops.compressed_triton import LaunchConfigs, TileConfig, bwd_preprocess, dot_precision
from nsa_baseline.ops.flex import tensor_key
from nsa_baseline.ops.window_kernels import window_bwd_dkdv_kernel, window_bwd_dq_kernel, window_fwd_kernel
from nsa_baseline.utils.attention_bwd import lse_base2
from nsa_baseline.utils.triton_utils import LOG2E, is_interpreter, new_output, next_pow2
from nsa_baseline.utils.varlen import token_sequence_ids

MAX_HEAD_DIM = 256
_WHERE = "sliding_window_attention_triton: "

# TileConfig here: block_m = rows (token x group head pairs), block_n = keys per tile. dkdv: a
# program owns block_n keys and steps over block_m rows. Keyed by (padded D, input element bytes).
# Starting points from the compressed branch's measured shapes; the (128, 2) dK/dV config is the best
# of experiments/gpu/window_tune.py's variants on an H200 (results/window_bench/window_tune_h200_7c12158.csv:
# fwd+bwd 4.84 -> 4.51 ms at 16K g=1, 19.1 -> 18.2 ms at 64K g=1, 16.2 -> 16.1 ms at 64K g=16).
CONFIGS: dict[tuple[int, int], LaunchConfigs] = {
    (64, 2): LaunchConfigs(TileConfig(128, 64, 4, 3), TileConfig(64, 64, 4, 3), TileConfig(128, 64, 8, 3)),
    (128, 2): LaunchConfigs(TileConfig(128, 64, 8, 3), TileConfig(32, 64, 4, 3), TileConfig(128, 64, 8, 3)),
    (256, 2): LaunchConfigs(TileConfig(64, 32, 8, 2), TileConfig(32, 32, 8, 2), TileConfig(64, 32, 8, 2)),
    # fp32 (exact fp32 dots): half the bytes per tile
    (64, 4): LaunchConfigs(TileConfig(64, 64, 4, 2), TileConfig(32, 64, 4, 2), TileConfig(64, 64, 4, 2)),
    (128, 4): LaunchConfigs(TileConfig(64, 32, 4, 2), TileConfig(32, 32, 4, 2), TileConfig(64, 32, 4, 2)),
    (256, 4): LaunchConfigs(TileConfig(32, 16, 4, 1), TileConfig(16, 16, 4, 1), TileConfig(32, 16, 4, 1)),
}
# Named alternatives for D = 128, 16-bit (the module's shape), passed as `config="<name>"` by the
# GPU bench; "default" is CONFIGS[(128, 2)]. ptxas (sm_90, experiments/window_aot_check.py) reports
# no spills for any of them at G = 1, 3, 16 (fwd 128 x 128 with 3 stages did not spill either, but
# 64 x 128 dK/dV and 128 x 128 dQ programs did).
CHOICES: dict[str, LaunchConfigs] = {
    "default": CONFIGS[(128, 2)],
    "n128": LaunchConfigs(TileConfig(128, 128, 8, 2), TileConfig(32, 128, 8, 2), TileConfig(128, 32, 8, 3)),
    "m64": LaunchConfigs(TileConfig(64, 64, 4, 3), TileConfig(32, 128, 8, 3), TileConfig(64, 64, 4, 3)),
    "stages2": LaunchConfigs(TileConfig(128, 64, 8, 2), TileConfig(64, 64, 8, 2), TileConfig(128, 32, 8, 2)),
}
# The interpreter runs numpy per tile: small tiles keep the CPU tests quick.
INTERPRETER_CONFIGS = LaunchConfigs(TileConfig(16, 16, 1, 1), TileConfig(16, 16, 1, 1), TileConfig(16, 16, 1, 1))


def launch_configs(d: int, dtype: torch.dtype) -> LaunchConfigs:
    if is_interpreter():
        return INTERPRETER_CONFIGS
    return CONFIGS[(max(64, next_pow2(d)), 4 if dtype == torch.float32 else 2)]


class TokenTables(NamedTuple):
    """Per-token int32 [N] start and end (packed rows) of its sequence; varlen False = one sequence."""

    start: torch.Tensor
    end: torch.Tensor
    varlen: bool


_TABLE_CACHE: dict[tuple, tuple] = {}


def token_tables(cu_seqlens: Optional[torch.Tensor], n: int, device) -> TokenTables:
    """TokenTables of cu_seqlens (already checked), built on the device and cached per tensor."""
    if cu_seqlens is None or cu_seqlens.numel() == 2:
        dummy = torch.empty(1, dtype=torch.int32, device=device)
        return TokenTables(dummy, dummy, False)
    key = (tensor_key(cu_seqlens), n, str(device))
    hit = _TABLE_CACHE.get(key)
    if hit is None:
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        seq = token_sequence_ids(cu, n)
        tables = TokenTables(cu[seq].int(), cu[seq + 1].int(), True)
        if len(_TABLE_CACHE) > 64:
            _TABLE_CACHE.clear()
        hit = (cu_seqlens, tables)  # the tensor is held so that its id stays unique
        _TABLE_CACHE[key] = hit
    return hit[1]


def _constexprs(q, k) -> dict:
    hq, d, h = q.shape[1], q.shape[2], k.shape[1]
    return dict(HQ=hq, H=h, G=hq // h, D=d, BLOCK_D=max(16, next_pow2(d)), PREC=dot_precision(q.dtype),
                WHILE_LOOP=is_interpreter())


def window_fwd(q, k, v, tables: TokenTables, window: int, scale: float, cfg: TileConfig, block_local: int = 0):
    """o [N, HQ, D] (q.dtype) and lse float32 [HQ, N] (natural log); contiguous inputs of one dtype.
    block_local = BS > 0: the `window` blocks of BS keys ending at each token's block (NSA's local
    blocks, counted from its sequence's start) instead of the last `window` keys."""
    n, hq, d = q.shape
    h = k.shape[1]
    o = new_output((n, hq, d), q.dtype, q.device)
    lse = new_output((hq, n), torch.float32, q.device)
    if n == 0:
        return o, lse
    window_fwd_kernel[(triton.cdiv(n * (hq // h), cfg.block_m), h)](
        q, k, v, o, lse, tables.start, n, window, scale * LOG2E, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        VARLEN=tables.varlen, BLOCK_LOCAL=block_local, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **_constexprs(q, k),
    )
    return o, lse


def window_bwd(q, k, v, o, lse, do, dlse, tables: TokenTables, window: int, scale: float, cfgs: LaunchConfigs,
               out=None, accumulate: bool = False, delta=None, block_local: int = 0):
    """(dq, dk, dv) for the upstream gradients do [N, HQ, D] and dlse [HQ, N] (or None). `out`: the
    (dq, dk, dv) buffers to write (contiguous, q's / k's / v's shape and dtype; None allocates);
    accumulate: add to what they hold instead of overwriting it; delta: rowsum(o * do) - dlse float32
    [HQ, N] when the caller has it (else one pass computes it); block_local as in window_fwd. o and lse
    may be those of a softmax over more keys than the window's (the module's local blocks inside the
    selected branch): P = exp(s - lse) is then this window's share of it."""
    n, hq, _ = q.shape
    h = k.shape[1]
    if out is None:
        out = (new_output(q.shape, q.dtype, q.device), new_output(k.shape, k.dtype, k.device),
               new_output(v.shape, v.dtype, v.device))
    dq, dk, dv = out
    if n == 0:
        return dq, dk, dv
    lse2, delta = bwd_preprocess(o, do, lse, dlse) if delta is None else (lse_base2(lse), delta)
    c = cfgs.dkdv
    window_bwd_dkdv_kernel[(triton.cdiv(n, c.block_n), h)](
        q, k, v, do, lse2, delta, dk, dv, tables.start, tables.end, n, window, scale * LOG2E, scale,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, VARLEN=tables.varlen, ACCUMULATE=accumulate, BLOCK_LOCAL=block_local,
        num_warps=c.num_warps, num_stages=c.num_stages, **_constexprs(q, k),
    )
    c = cfgs.dq
    window_bwd_dq_kernel[(triton.cdiv(n * (hq // h), c.block_m), h)](
        q, k, v, do, lse2, delta, dq, tables.start, n, window, scale * LOG2E, scale,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, VARLEN=tables.varlen, ACCUMULATE=accumulate, BLOCK_LOCAL=block_local,
        num_warps=c.num_warps, num_stages=c.num_stages, **_constexprs(q, k),
    )
    return dq, dk, dv


class WindowAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, tables, window, scale, cfgs):
        o, lse = window_fwd(q, k, v, tables, window, scale, cfgs.fwd)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (tables, window, scale, cfgs)
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        if do is None and dlse is None:
            return (None,) * 7
        do = torch.zeros_like(o) if do is None else do.contiguous()
        dlse = None if dlse is None else dlse.contiguous()
        dq, dk, dv = window_bwd(q, k, v, o, lse, do, dlse, *ctx.args)
        return dq, dk, dv, None, None, None, None


def window_triton_supported(q: torch.Tensor) -> bool:
    """Whether the kernels serve `q`: CUDA, or the interpreter on CPU without bf16, for fp16 / bf16 /
    fp32 and D <= MAX_HEAD_DIM."""
    return kernels_serve(q) and q.dim() == 3 and q.shape[2] <= MAX_HEAD_DIM


def _checked_configs(config, d: int, dtype: torch.dtype) -> LaunchConfigs:
    if config is None:
        return launch_configs(d, dtype)
    if isinstance(config, str) and config in CHOICES:
        return CHOICES[config]
    if isinstance(config, LaunchConfigs):
        return config
    fail("config", f"must be None, a LaunchConfigs or one of {sorted(CHOICES)}, got {config!r}", _WHERE)


def sliding_window_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    config: Union[None, str, LaunchConfigs] = None,
):
    r"""Causal sliding-window attention in Triton: key s is visible to query t iff
    t - window_size < s <= t inside the same sequence. Differentiable w.r.t. q, k and v, through o
    and lse; deterministic backward.

    CUDA (fp16 / bf16 / fp32) and the Triton interpreter (fp16 / fp32); anything else (float64, CPU
    without the interpreter) is a ValueError: nsa_baseline.reference computes those.

    Args:
        q: [N, HQ, D]; k, v: [N, H, D]; HQ = G * H (any integer G), query head hq uses kv head hq // G;
            D <= 256 (padded to a power of two inside).
        window_size: int >= 1 (larger than a sequence = causal attention over it).
        cu_seqlens: int32 [B + 1] or None (one sequence). scale: defaults to D ** -0.5.
        config: launch configs (tuning only): None (CONFIGS by D and dtype), a name of CHOICES, or a
            LaunchConfigs (fwd, dkdv, dq).
    Returns:
        o [N, HQ, D] in q.dtype, and with return_lse the float32 lse [HQ, N] (natural log).
    """
    check_int("window_size", window_size)
    scale = check_qkv(q, k, v, cu_seqlens, scale, check_values=True)
    require_kernel_device(q, _WHERE)
    if q.dtype not in KERNEL_DTYPES or (not q.is_cuda and q.dtype == torch.bfloat16):
        fail("q", f"has dtype {q.dtype}; the Triton kernels take {[str(t) for t in KERNEL_DTYPES]} (bf16 only "
             "on CUDA: the interpreter's bf16 tl.dot is wrong); use "
             "nsa_baseline.reference.sliding_window_attention_ref", _WHERE)
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            fail(name, f"must be on q's device {q.device}, got {t.device}", _WHERE)
    n, _, d = q.shape
    if d > MAX_HEAD_DIM:
        fail("q", f"has head dim D={d} > {MAX_HEAD_DIM}, which the Triton kernels do not support", _WHERE)
    cfgs = _checked_configs(config, d, q.dtype)
    tables = token_tables(cu_seqlens, n, q.device)
    window = min(window_size, max(n, 1))  # wider windows see the same keys; keeps W + t in int32
    q, k, v = (t.contiguous() for t in (q, k, v))
    o, lse = WindowAttentionFunction.apply(q, k, v, tables, window, scale, cfgs)
    return (o, lse) if return_lse else o
