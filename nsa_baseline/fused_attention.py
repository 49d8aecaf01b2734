"""NativeSparseAttention.attention as ONE autograd Function whose backward sums the branches'
gradients in shared buffers (issue #14).

With one Function per branch, autograd adds the branches' gradients itself: dq of three branches
(two adds of [N, HQ, D]) and dk, dv of three paths (window, selected, compressed through compress_kv:
two adds of [N, H, D] each), each add one more pass over memory. Here the backward allocates dq, dk,
dv once and the kernels that write the final gradients add into them (their ACCUMULATE mode: load,
add in fp32, store), in a fixed order:

    gated sum bwd   -> d gates, do_cmp, do_slc, do_win and each branch's delta = rowsum(o_b * do_b)
    window bwd      -> dq, dk, dv  (first writer: overwrites, no zero-fill)
    selected bwd    -> dq, dk, dv  += (nsa or fsa family; deterministic for fsa)
    compressed bwd  -> dq += ; dk_cmp, dv_cmp (own buffers)
    compress_kv bwd -> dk, dv += (the summaries' gradient scattered back to the keys)

The forward runs the same kernels as the per-branch path (nsa_baseline.branches and the family's
selected_attention), so results agree to rounding of the sum order. Used by the module where every
branch runs a kernel (fused_supported); the per-branch functions keep their own autograd.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from nsa_baseline.contract import (BLOCK_SIZES, KERNEL_DTYPES, check_block_indices, check_selected_args,
                                   index_checks_requested)
from nsa_baseline.ops.compressed import checked_compressed_args
from nsa_baseline.ops.compressed_sdpa import compressed_sdpa_bwd, compressed_sdpa_fwd, routed_sequences
from nsa_baseline.ops.compressed_triton import (compressed_bwd, compressed_fwd, compressed_triton_supported,
                                                varlen_meta)
from nsa_baseline.ops.compression_grad import compress_into_backward, compress_kv_forward
from nsa_baseline.ops.gated_sum import gated_sum_bwd, gated_sum_fwd, gated_sum_supported
from nsa_baseline.ops.window_triton import launch_configs, token_tables, window_bwd, window_fwd, window_triton_supported
from nsa_baseline.utils.triton_utils import new_output

FAMILIES = ("nsa", "fsa", "auto")

# NSA's local blocks (the local_blocks ending at each token's own block, which the selection always
# keeps) through the window kernels in block-local mode instead of FSA's per-(token, block) pair rows:
# with the FSA family at small G every pair row gathers its query and writes a partial (the traffic
# that bounds FSA at g=1), and 2 of 16 slots are always these blocks. The FSA index drops their pairs
# and its reduction merges the window kernel's (o, lse) as one more partial; the backward adds the
# window kernels' share. Off: measured 4-6% slower on the H100 (16K g=1 fwd+bwd 32.09 -> 33.47 ms, 8K
# 15.02 -> 15.86; results/module_vs_dense/README.md); kept, tested, for experiments (--local-blocks).
LOCAL_BLOCKS_KERNEL = False

# The compressed branch through PyTorch's fused attention kernels (ops/compressed_sdpa.py: cuDNN on
# Hopper, which runs dense attention at ~540 TFLOP/s on the H100 against ~380 forward / ~290 backward
# for our Triton compressed kernels) when the longest sequence has at least this many tokens (packed
# sequences padded to it, unless that wastes over half the work); None: always the Triton kernels.
# The residue layout costs six row moves of [N, HQ, D] per step (ops/residue_rows.py) and cuDNN is
# slow on few keys: the branch alone on the H100 (a159ed9) 64K x 64 heads fwd+bwd 36.4 ms vs 55.9
# Triton, 16K 4.38 vs 4.02; the module at 64K g=1 194.7 -> 181.4 ms, g=4 152.8 -> 141.8, at 32K equal,
# at 16K g=1 31.0 -> 32.2 (results/module_vs_dense/README.md). 65536: the smallest length measured to win.
# Calls above compressed_sdpa.MAX_QUERY_ROWS (128K tokens x 64 heads) keep the Triton kernels: memory.
COMPRESSED_SDPA_MIN_TOKENS = 65536


@dataclass(frozen=True)
class Config:
    """The module's hyper-parameters that the Function needs (see NativeSparseAttention)."""

    kernel_size: int
    kernel_stride: int
    block_size: int
    topk: int
    init_blocks: int
    local_blocks: int
    window_size: int
    family: str  # "nsa", "fsa" or "auto"
    select_blocks: Callable  # the backend's select_blocks_from_compressed


def fused_supported(family: str, q, k, v, gates) -> bool:
    """Whether fused_attention serves the call: a kernel family, every branch on its kernels (CUDA, or
    the interpreter without bf16), one dtype for q, k, v, and not under torch.compile (which traces the
    per-branch custom ops instead)."""
    if family not in FAMILIES or torch.compiler.is_compiling():
        return False
    if not (q.dtype == k.dtype == v.dtype and q.dtype in KERNEL_DTYPES and k.device == q.device == v.device):
        return False
    return (compressed_triton_supported(q) and window_triton_supported(q)
            and gated_sum_supported(gates, q, q, q))


def fused_attention(q, k, v, gates, cu_seqlens, cfg: Config, k_weight=None, k_pos=None, v_weight=None,
                    v_pos=None):
    """(o, o_cmp, o_slc, o_win, block_indices) as module.attention computes them; differentiable in
    q, k, v, gates and the compression weights (o and the three branch outputs)."""
    q, k, v = (t.contiguous() for t in (q, k, v))
    return NSAAttentionFunction.apply(q, k, v, gates, k_weight, k_pos, v_weight, v_pos, cu_seqlens, cfg)


# ---- selected branch, by family -------------------------------------------------------------------

def _family(cfg: Config, q, k, v, block_indices, cu_seqlens, scale, batch: int, needs_grad: bool) -> str:
    if cfg.family != "auto":
        return cfg.family
    from fsa import auto  # fsa imports nsa_baseline: never at import time

    with torch.enable_grad() if needs_grad else torch.no_grad():  # times fwd+bwd where gradients are needed
        return auto.choose(q, k, v, block_indices, cfg.block_size, cu_seqlens, scale, batch)


def _local_blocks(family: str, cfg: Config) -> int:
    """Local blocks the window kernels serve for the selected branch (LOCAL_BLOCKS_KERNEL), else 0."""
    return cfg.local_blocks if LOCAL_BLOCKS_KERNEL and family == "fsa" else 0


def _selected_fwd(family: str, q, k, v, block_indices, block_size: int, cu_seqlens, scale, local=None):
    """(o, lse, state) of the family's selected-attention forward; state is what its backward needs.
    local: (token tables, local blocks, window launch config) when the window kernels serve the local
    blocks (FSA family; _local_blocks)."""
    if family == "fsa":
        from fsa.forward import fsa_selected_fwd
        from nsa_baseline.utils.block_index import build_block_index

        extra, skip = None, 0
        if local is not None:
            tables, skip, win_cfg = local
            extra = window_fwd(q, k, v, tables, skip, scale, win_cfg, block_local=block_size)
        index = build_block_index(block_indices, block_size, cu_seqlens, k.shape[1], skip_local=skip)
        o, lse = fsa_selected_fwd(q, k, v, index, block_size, block_indices.shape[2], scale, extra=extra)
        return o, lse, index
    from nsa_baseline.ops.selected_fwd import nsa_selected_fwd
    from nsa_baseline.utils.varlen import token_positions

    pos = token_positions(cu_seqlens, q.shape[0])[0].int()
    o, lse = nsa_selected_fwd(q, k, v, block_indices, block_size, scale, pos)
    return o, lse, pos


def _selected_bwd(family: str, state, q, k, v, o, lse, do, block_indices, block_size, cu_seqlens, scale, out,
                  delta=None):
    """Adds the selected branch's dq, dk, dv into `out` (delta: rowsum(o * do) if known; the NSA family
    computes its own inside its dQ kernel)."""
    if family == "fsa":
        from fsa.backward import fsa_selected_bwd

        fsa_selected_bwd(q, k, v, o, lse, do, state, block_size, block_indices.shape[2], scale, out=out,
                         accumulate=True, delta=delta)
    else:
        from nsa_baseline.ops.selected_bwd import nsa_selected_bwd

        nsa_selected_bwd(q, k, v, o, lse, do, block_indices, block_size, scale, cu_seqlens, state, out=out,
                         accumulate=True)


# ---- the Function ---------------------------------------------------------------------------------

class NSAAttentionFunction(torch.autograd.Function):
    """Inputs: q [N, HQ, D], k, v [N, H, D] (contiguous), gates [N, HQ, 3], the compression weights
    (None for mean pooling), cu_seqlens, Config. Outputs: o, o_cmp, o_slc, o_win [N, HQ, D] and
    block_indices int32 [N, H, T] (not differentiable)."""

    @staticmethod
    def forward(ctx, q, k, v, gates, k_weight, k_pos, v_weight, v_pos, cu_seqlens, cfg: Config):
        ks, st = cfg.kernel_size, cfg.kernel_stride
        need = ctx.needs_input_grad
        k_cmp, cu_cmp, k_state = compress_kv_forward(k, cu_seqlens, ks, st, k_weight, k_pos, need[4] or need[5])
        v_cmp, _, v_state = compress_kv_forward(v, cu_seqlens, ks, st, v_weight, v_pos, need[6] or need[7])
        cu, cu_cmp_checked, scale = checked_compressed_args(q, k_cmp, v_cmp, cu_seqlens, cu_cmp, ks, st, None)
        meta = varlen_meta(cu_seqlens, cu_cmp, cu, cu_cmp_checked, q.shape[0], k_cmp.shape[0])
        sdpa_aux, seqs = None, routed_sequences(q, k_cmp, meta.cu, meta.cu_cmp, ks, st, COMPRESSED_SDPA_MIN_TOKENS)
        if seqs is not None:
            o_cmp, lse_cmp, sdpa_aux = compressed_sdpa_fwd(q, k_cmp, v_cmp, ks, st, scale, seqs)
            sdpa_aux = (sdpa_aux, seqs)
        else:
            o_cmp, lse_cmp = compressed_fwd(q, k_cmp, v_cmp, meta, ks, st, scale)
        block_indices = cfg.select_blocks(q, k_cmp, cu_seqlens, cu_cmp, ks, st, cfg.block_size, cfg.topk,
                                          cfg.init_blocks, cfg.local_blocks, lse=lse_cmp)
        tables = token_tables(cu_seqlens, q.shape[0], q.device)
        win_cfgs = launch_configs(q.shape[2], q.dtype)
        o_slc, lse_slc, slc = _selected(ctx, cfg, q, k, v, block_indices, cu_seqlens, tables, win_cfgs)
        window = min(cfg.window_size, max(q.shape[0], 1))  # as sliding_window_attention_triton
        o_win, lse_win = window_fwd(q, k, v, tables, window, scale, win_cfgs.fwd)
        o = gated_sum_fwd(gates, (o_cmp, o_slc, o_win))
        ctx.save_for_backward(q, k, v, gates, k_weight, k_pos, v_weight, v_pos, k_cmp, v_cmp, o_cmp, lse_cmp,
                              o_slc, lse_slc, o_win, lse_win, block_indices)
        ctx.state = (cu_seqlens, cfg, scale, meta, k_state, v_state, slc, tables, window, win_cfgs, sdpa_aux)
        ctx.mark_non_differentiable(block_indices)
        ctx.set_materialize_grads(False)
        return o, o_cmp, o_slc, o_win, block_indices

    @staticmethod
    def backward(ctx, do, d_cmp, d_slc, d_win, _):
        (q, k, v, gates, k_weight, k_pos, v_weight, v_pos, k_cmp, v_cmp, o_cmp, lse_cmp, o_slc, lse_slc, o_win,
         lse_win, block_indices) = ctx.saved_tensors
        cu_seqlens, cfg, scale, meta, k_state, v_state, slc, tables, window, win_cfgs, sdpa_aux = ctx.state
        family, slc_state, slc_cu, slc_scale, local = slc
        outs = (o_cmp, o_slc, o_win)
        dgates, do_cmp, do_slc, do_win, deltas = _gated_sum_grads(do, gates, outs, (d_cmp, d_slc, d_win),
                                                                   ctx.needs_input_grad[3])
        dq = new_output(q.shape, q.dtype, q.device)
        dk, dv = new_output(k.shape, k.dtype, k.device), new_output(v.shape, v.dtype, v.device)
        window_bwd(q, k, v, o_win, lse_win, do_win, None, tables, window, scale, win_cfgs, out=(dq, dk, dv),
                   delta=deltas[2])
        _selected_bwd(family, slc_state, q, k, v, o_slc, lse_slc, do_slc, block_indices, cfg.block_size,
                      slc_cu, slc_scale, (dq, dk, dv), deltas[1])
        if local:  # the local blocks' share of the selected branch (its o, lse: the whole branch's)
            window_bwd(q, k, v, o_slc, lse_slc, do_slc, None, tables, local, slc_scale, win_cfgs, out=(dq, dk, dv),
                       accumulate=True, delta=deltas[1], block_local=cfg.block_size)
        if sdpa_aux is not None:
            _, dk_cmp, dv_cmp = compressed_sdpa_bwd(q, k_cmp, v_cmp, o_cmp, lse_cmp, do_cmp, sdpa_aux[0],
                                                    cfg.kernel_size, cfg.kernel_stride, scale, sdpa_aux[1], dq=dq,
                                                    accumulate=True)
        else:
            _, dk_cmp, dv_cmp = compressed_bwd(q, k_cmp, v_cmp, o_cmp, lse_cmp, do_cmp, None, meta, cfg.kernel_size,
                                               cfg.kernel_stride, scale, dq=dq, accumulate=True, delta=deltas[0])
        need = ctx.needs_input_grad
        dkw, dkp = compress_into_backward(dk_cmp, dk, k, cu_seqlens, cfg.kernel_size, cfg.kernel_stride, k_state,
                                          k_weight, k_pos, need[4] or need[5])
        dvw, dvp = compress_into_backward(dv_cmp, dv, v, cu_seqlens, cfg.kernel_size, cfg.kernel_stride, v_state,
                                          v_weight, v_pos, need[6] or need[7])
        return dq, dk, dv, dgates, dkw, dkp, dvw, dvp, None, None


def _selected(ctx, cfg: Config, q, k, v, block_indices, cu_seqlens, tables, win_cfgs):
    """The selected branch's forward: (o, lse, (family, its backward state, checked cu_seqlens, scale,
    local blocks served by the window kernels)), with the public entry points' argument and index checks."""
    a = check_selected_args(q, k, v, block_indices, cfg.block_size, cu_seqlens, None,
                            supported_block_sizes=BLOCK_SIZES, supported_dtypes=KERNEL_DTYPES)
    needs_grad = any(ctx.needs_input_grad[:3])
    family = _family(cfg, q, k, v, block_indices, a.cu_seqlens, a.scale, a.batch, needs_grad)
    if index_checks_requested(None):
        check_block_indices(block_indices, cfg.block_size, a.cu_seqlens)
    local = _local_blocks(family, cfg)
    o, lse, state = _selected_fwd(family, q, k, v, block_indices, cfg.block_size, a.cu_seqlens, a.scale,
                                  (tables, local, win_cfgs.fwd) if local else None)
    return o, lse, (family, state, a.cu_seqlens, a.scale, local)


def _gated_sum_grads(do, gates, outs, extra, need_dgates: bool):
    """(d gates, do_cmp, do_slc, do_win, deltas): the gated sum's backward, plus any gradient that reached
    a branch output directly (return_branches; rare, an add). deltas[b]: branch b's rowsum(o_b * do_b),
    float32 [HQ, N], from the gated sum's own pass over o_b; None where a direct gradient changed do_b
    (that branch's backward computes its own)."""
    if do is None:
        grads = [None] + [torch.zeros_like(o) for o in outs]
        deltas = [None] * 3
    else:
        need = (need_dgates, True, True, True)
        *grads, delta = gated_sum_bwd(do, gates, outs, need, (gates.dtype,) + tuple(o.dtype for o in outs),
                                      deltas=True)
        deltas = list(delta)
    for i, g in enumerate(extra, 1):
        if g is not None:
            grads[i] = grads[i] + g
            deltas[i - 1] = None
    grads[1:] = [g.contiguous() for g in grads[1:]]
    return tuple(grads) + (deltas,)
