"""The decode step (exactly one new token in every slot) on the kernels, with no host read.

    q, k, v, gates of the B new tokens, RoPE at positions = cache.lengths (device) ->
    decode_append (one kernel: k, v at row lengths[b] of every slot, the summary a slot completes,
    the positions) -> decode_compressed_select (o_cmp, block indices; one kernel, or three when
    split over several programs per (slot, KV head) because the GPU would idle) ->
    decode_selected_window (gated output; one kernel, or split + combine; its last kernel sets
    lengths = positions + 1) -> output projection. 3 launches, up to 5 with both splits (small B):
    then the select's merge kernel is skipped and decode_selected_window merges its partials
    (DECODE_LAUNCH.fold_merge).
The lengths move in the step's last kernel, not in decode_append: all of decode_append's programs of a
slot read its length, in any order, so none of them may change it.
Checks use the host mirror of the lengths, which the caller advances arithmetically (+1 per step),
never by reading the device: so the step captures in a CUDA graph (graph.py). Served for the
kernel backends where the kernels serve the tensors (`decode_serves`); step.py takes it for any call
with one new token per slot, the PyTorch path (cached_attention.py) everywhere else.
"""
from __future__ import annotations

import torch

from nsa_baseline.contract import BLOCK_SIZES, kernels_serve
from nsa_baseline.inference.cache import NSACache
from nsa_baseline.inference.chunk import chunk_compressed_select, chunk_kernels_serve
from nsa_baseline.inference.plan import CallPlan, check_decode_call
from nsa_baseline.ops.decode_append import decode_append
from nsa_baseline.ops.decode_attend import decode_selected_window, decode_window_partials
from nsa_baseline.ops.decode_select import decode_compressed_select
from nsa_baseline.ops.decode_tiles import DECODE_LAUNCH
from nsa_baseline.reference.rope import apply_rope
from nsa_baseline.utils.triton_utils import next_pow2


def decode_serves(module, cache: NSACache) -> bool:
    """Whether the decode kernels serve this module and cache: a kernel backend (nsa, fsa, auto),
    tensors the kernels take (CUDA, or the interpreter without bf16), BS / stride a power of two."""
    r = module.block_size // module.kernel_stride
    return (module.backend != "torch" and module.block_size in BLOCK_SIZES and r == next_pow2(r)
            and kernels_serve(cache.k))  # the cache holds the module's dtype (checked by every call)


@torch.no_grad()
def decode_attention(module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor,
                     cache: NSACache) -> torch.Tensor:
    """NSA's attention of one new token per slot between the projections (what replaces dense decode):
    q [B, HQ, D], k, v [B, H, D] after RoPE at positions cache.lengths, gates [B, HQ, 3]. Appends k, v
    and any completed summary, moves the device lengths by one, returns o [B, HQ, D] in q.dtype."""
    cache.claim_step()  # a paged cache's page for row lengths[b]; no-op when it is there (graph capture)
    w = {}
    if module.compression == "linear":
        w = dict(k_weight=module.k_cmp_weight, k_pos=module.k_cmp_pos, v_weight=module.v_cmp_weight,
                 v_pos=module.v_cmp_pos)
    # one launch: k, v at row lengths[b], the summary each slot completes (pos: the lengths); the
    # lengths move in the step's last kernel (decode_append's programs all read them)
    pos32 = decode_append(k, v, cache.k, cache.v, cache.k_cmp, cache.v_cmp, cache.lengths, module.kernel_size,
                          module.kernel_stride, advance=False, block_table=cache.block_table,
                          max_seqlen=cache.max_seqlen, **w)
    scale = module.head_dim ** -0.5
    window = {}  # DECODE_LAUNCH.window_stream: the window branch, launched beside kernel 1's select

    def launch_window():  # on the side stream, after the append and the summary pass
        window["partials"] = decode_window_partials(q, cache.k, cache.v, pos32, module.topk, module.block_size,
                                                    module.window_size, scale, block_table=cache.block_table,
                                                    stream=_side_stream(q.device))

    early = bool(DECODE_LAUNCH.window_stream)
    # unmerged: with both kernels split, the selected + window kernel takes the top T and the compressed
    # output from the select pass's partials itself (no merge launch); otherwise they are merged first
    o_cmp, idx = decode_compressed_select(q, cache.k_cmp, cache.v_cmp, pos32, module.kernel_size,
                                          module.kernel_stride, module.block_size, module.topk,
                                          module.init_blocks, module.local_blocks, scale,
                                          after_summaries=launch_window if early else None,
                                          unmerged=bool(DECODE_LAUNCH.fold_merge) and not early)
    o = decode_selected_window(q, cache.k, cache.v, pos32, idx, o_cmp, gates.contiguous(), module.block_size,
                               module.window_size, scale, advance=cache.lengths, block_table=cache.block_table,
                               window_partials=window.get("partials"))
    return o


_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    """One side stream per CUDA device for the decode step's early window branch; None off CUDA."""
    if device.type != "cuda":
        return None
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


@torch.no_grad()
def cached_kernel_attention(module, q: torch.Tensor, gates: torch.Tensor, cache: NSACache,
                            plan: CallPlan) -> torch.Tensor:
    """New queries at any offset against the cache (chunked prefill: many new tokens of a slot), the
    call's keys, values and summaries already in the cache. The compressed branch and the selection:
    the prefill kernels for chunks of CHUNK_KERNEL_MIN_TOKENS or more (inference/chunk.py), else the
    decode kernels with each query a row of their batch mapped to its cache slot (slots=) at its own
    position; then the selected + window decode kernel the same way. q [N, HQ, D] after RoPE, gates
    [N, HQ, 3]; returns o [N, HQ, D]. Moves no lengths."""
    scale = module.head_dim ** -0.5
    pos32, slots = plan.pos.to(torch.int32).contiguous(), plan.seq.to(torch.int32).contiguous()
    if chunk_kernels_serve(module, q):
        o_cmp, idx = chunk_compressed_select(module, q, cache, plan, slots)
    else:
        o_cmp, idx = decode_compressed_select(q.contiguous(), cache.k_cmp, cache.v_cmp, pos32, module.kernel_size,
                                              module.kernel_stride, module.block_size, module.topk,
                                              module.init_blocks, module.local_blocks, scale, slots=slots)
    return decode_selected_window(q, cache.k, cache.v, pos32, idx, o_cmp, gates.contiguous(), module.block_size,
                                  module.window_size, scale, block_table=cache.block_table, slots=slots)


@torch.no_grad()
def decode_device(module, x: torch.Tensor, cache: NSACache) -> torch.Tensor:
    """The device part of a decode step (no checks, no host state): appends x's B tokens, moves the
    device lengths by one and returns the outputs [B, hidden_size]. What DecodeGraph captures."""
    b, hq, h, d = x.shape[0], module.num_q_heads, module.num_kv_heads, module.head_dim
    pos = cache.lengths.long()
    theta = module.rope_theta
    q = apply_rope(module.q_proj(x).view(b, hq, d), pos, theta)
    k = apply_rope(module.k_proj(x).view(b, h, d), pos, theta)
    v = module.v_proj(x).view(b, h, d)
    gates = torch.sigmoid(module.gate_proj(x)).view(b, hq, 3)
    o = decode_attention(module, q, k, v, gates, cache)
    return module.o_proj(o.view(b, hq * d))


def decode_step(module, x: torch.Tensor, cache: NSACache) -> torch.Tensor:
    r"""One decode step: x [batch_size, hidden_size] holds the next token of every slot.

    Same result as module(x, cu_seqlens of all ones, cache=cache) but checked on the host mirror only
    (no read of cu_seqlens or of the device lengths). ValueError naming the argument, before any
    write, for a bad x, a cache of another module or a full slot, or where the decode kernels do not
    serve the module and cache (see decode_serves; the module's forward falls back there instead).
    """
    check_decode_call(module, x, cache)
    if not decode_serves(module, cache):
        raise ValueError(f"argument `cache` ({cache.dtype} on {cache.device}) with backend {module.backend!r} is not "
                         "served by the decode kernels (a kernel backend on CUDA, or the interpreter without bf16)")
    y = decode_device(module, x, cache)
    cache.advance_host()
    return y
