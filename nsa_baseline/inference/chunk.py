"""Compressed attention and block selection of a long chunk against the cache, through the prefill
kernels (nsa_baseline.ops.compressed_triton, nsa_baseline.ops.selection_kernel) instead of the decode
kernels' one-row-per-token path.

The decode kernels give every new token its own program over its slot's summaries, so a chunk of c
tokens reads the summaries c times (chunk_bench, H100, 256 tokens at 64K: their select kernel took
1.23 ms of the call's 1.6 ms on the GPU). The prefill kernels tile c tokens x G heads against one
summary tile, so a tile reads each summary once. They place a token by `tok - cu[seq]` and its
sequence's summaries at `cu_cmp[seq]`, so no kernel changes: the cache's slots are the sequences,
cu[b] = (first new token of slot b in the call) - (tokens slot b held before), which puts every new
token at its absolute position, and cu_cmp[b] = b * max_cmp, the slot's row of the summary cache.
"""
from __future__ import annotations

import torch
import triton

from nsa_baseline.inference.cache import NSACache
from nsa_baseline.inference.plan import CallPlan
from nsa_baseline.ops.compressed_triton import VarlenMeta, compressed_fwd, compressed_triton_supported
from nsa_baseline.ops.selection import selection_kernel_supported
from nsa_baseline.ops.selection_kernel import selection_scores_fwd
from nsa_baseline.utils.varlen import host_to_device

# New tokens in one call from which the prefill kernels serve the compressed branch and the selection
# (below it the decode kernels' rows are cheap and the prefill tiles would run mostly empty).
CHUNK_KERNEL_MIN_TOKENS = 64


def chunk_kernels_serve(module, q: torch.Tensor) -> bool:
    """Whether the prefill compressed and selection kernels serve this module's chunk call."""
    return (q.shape[0] >= CHUNK_KERNEL_MIN_TOKENS and compressed_triton_supported(q)
            and selection_kernel_supported(q, module.kernel_size, module.kernel_stride, module.block_size))


def chunk_compressed_select(module, q: torch.Tensor, cache: NSACache, plan: CallPlan, slots: torch.Tensor):
    """o_cmp float32 [N, HQ, D] and block_indices int32 [N, H, T] of the call's new tokens (q [N, HQ, D]
    after RoPE, packed in slot order as plan says; slots: int32 [N], each token's slot on the device),
    each at its absolute position against its slot's summaries (the call's own summaries already
    written), as decode_compressed_select returns them."""
    b, n = cache.batch_size, q.shape[0]
    starts = [0]
    for c in plan.counts:
        starts.append(starts[-1] + c)
    shift = [s - a for s, a in zip(starts, plan.old + [0])]  # tok - shift[b] = absolute position
    dev = q.device
    cu = host_to_device(torch.tensor(shift, dtype=torch.int32, device="cpu"), dev)
    cu_cmp = torch.arange(0, (b + 1) * cache.max_cmp, cache.max_cmp, dtype=torch.int32, device=dev)[:b + 1]
    h, d = cache.k_cmp.shape[2], cache.k_cmp.shape[3]
    k_cmp = cache.k_cmp.view(b * cache.max_cmp, h, d)
    v_cmp = cache.v_cmp.view(b * cache.max_cmp, h, d)
    scale = module.head_dim ** -0.5
    q = q.contiguous()
    o_cmp, lse = compressed_fwd(q, k_cmp, v_cmp, VarlenMeta(cu, cu_cmp, slots, cu, True), module.kernel_size,
                                module.kernel_stride, scale)
    num_blocks = triton.cdiv(max(plan.new), module.block_size)
    idx = selection_scores_fwd(q, k_cmp, lse, cu, cu_cmp, slots, 0, n, num_blocks, scale, module.kernel_size,
                               module.kernel_stride, module.block_size, topk=module.topk,
                               init_blocks=module.init_blocks, local_blocks=module.local_blocks)
    return o_cmp.float(), idx
