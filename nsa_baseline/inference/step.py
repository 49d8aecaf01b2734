"""One call of the module with a cache: check, project the new tokens, append them, attend, project out.

    plan_call (every check; nothing written before it passes) ->
    q, k, v, gates of the new tokens, RoPE at their absolute positions ->
    write k, v into their slots -> new summaries whose kernel_size span the call completed ->
    attention: the module's own forward when no slot has history (prefill: the fast kernels),
               else the decode kernels with one query per row at its own offset where they serve
               (decode.cached_kernel_attention: chunked prefill), else cached_attention (PyTorch) ->
    (one new token in every slot with a kernel backend: the decode step of decode.py instead) ->
    lengths move last -> output projection.
`attend_with_cache` is the part between the projections (q, k, v after RoPE and gates in, o out), shared
with the swapped HF models' generation (nsa_baseline.models.generate).
Inference only: runs under no_grad (the cache is written in place and keeps no graph).
"""
from __future__ import annotations

from typing import Optional

import torch

from nsa_baseline.inference.cache import NSACache
from nsa_baseline.inference.cached_attention import cached_attention
from nsa_baseline.inference.decode import cached_kernel_attention, decode_attention, decode_device, decode_serves
from nsa_baseline.inference.plan import CallPlan, plan_call
from nsa_baseline.reference.compression import summarize_blocks
from nsa_baseline.reference.rope import apply_rope
from nsa_baseline.utils.varlen import host_to_device


def _new_summary_slots(cache: NSACache, plan: CallPlan) -> tuple[list[int], list[int]]:
    """(slot, summary index) of every summary the call completes: a slot growing from a to a + c tokens
    gains summaries num_summaries(a) .. num_summaries(a + c) - 1."""
    slots, index = [], []
    for b, (a, c) in enumerate(zip(plan.old, plan.counts)):
        lo, hi = cache.num_summaries(a), cache.num_summaries(a + c)
        slots += [b] * (hi - lo)
        index += range(lo, hi)
    return slots, index


def _update_summaries(module, cache: NSACache, plan: CallPlan) -> None:
    """Compress every newly completed span, one summary per span of kernel_size keys, as compress_kv
    does (mean pooling, or the module's weights and pos_emb; in float32, float64 for float64 caches),
    here straight from the gathered spans: compress_kv would build a varlen layout and check its
    cu_seqlens on the host on every call (host reads that stall the queue)."""
    slots, index = _new_summary_slots(cache, plan)
    if not slots:
        return
    ks, st = module.kernel_size, module.kernel_stride
    dev = cache.device
    b, i = host_to_device(torch.tensor([slots, index], dtype=torch.long, device="cpu"), dev)
    rows = i[:, None] * st + torch.arange(ks, device=dev)  # [m, ks] keys of each span
    at = cache.rows(b[:, None].expand_as(rows), rows)  # where the spans' rows are (paged: pages)
    compute = torch.float64 if cache.dtype == torch.float64 else torch.float32
    for src, dst, name in ((cache.k, cache.k_cmp, "k"), (cache.v, cache.v_cmp, "v")):
        spans = src[at].to(compute)  # [m, ks, H, D]
        if module.compression == "linear":
            w, pe = getattr(module, f"{name}_cmp_weight"), getattr(module, f"{name}_cmp_pos")
            summary = summarize_blocks(spans, w.to(compute), pe.to(compute))
        else:
            summary = summarize_blocks(spans)
        dst[b, i] = summary.to(dst.dtype)


@torch.no_grad()
def attend_with_cache(module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor,
                      plan: CallPlan, cache: NSACache, decode_kernels: bool = True) -> torch.Tensor:
    r"""NSA's attention of a call's new tokens against the cache, between the projections: appends k, v
    (and the summaries they complete), attends, moves the lengths. Needs no projections of the module
    (only its sizes, compression weights and backend), so models that bring their own projections and
    RoPE call it too (nsa_baseline.models: NSAAttention with a generation cache).

    Args:
        q: [N, HQ, D], k, v: [N, H, D] after RoPE at plan.pos; gates: [N, HQ, 3] in [0, 1];
        plan: from plan_call / plan_counts for this cache (N = sum of plan.counts, packed in slot order).
        decode_kernels: one new token in every slot runs the decode kernels where they serve.
    Returns:
        o [N, HQ, D] before the output projection.
    """
    if decode_kernels and all(c == 1 for c in plan.counts) and decode_serves(module, cache):
        o = decode_attention(module, q, k, v, gates, cache)  # appends, moves the device lengths
        cache.advance_host()
        return o
    cache.claim_pages(plan.new)  # a paged cache's pages for the new rows (the plan checked they are free)
    at = cache.rows(plan.seq, plan.pos)
    cache.k[at] = k
    cache.v[at] = v
    _update_summaries(module, cache, plan)
    if plan.has_history and decode_kernels and decode_serves(module, cache):  # chunked prefill, kernels
        o = cached_kernel_attention(module, q, gates, cache, plan)
    elif plan.has_history:
        o = cached_attention(module, cache, q, gates, plan.seq, plan.pos, module.branches().gated_sum)
    else:  # prefill: the new tokens are the whole sequences, the module's forward (fast kernels) serves them
        o = module.attention(q, k, v, gates, plan.cu_seqlens)
    cache.set_lengths(plan.new)
    return o


@torch.no_grad()
def forward_with_cache(module, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor], cache: NSACache,
                       decode_kernels: bool = True) -> torch.Tensor:
    r"""module(x, cu_seqlens, cache=cache): append each slot's new tokens and return their outputs.

    Args:
        x: [N, hidden_size] the new tokens of every slot, packed in slot order (N = 0 allowed).
        cu_seqlens: int32 [batch_size + 1] on x's device (0 new tokens for a slot allowed), or None
            when the cache has one slot.
        decode_kernels: a call with one new token in every slot runs the decode kernels (decode.py)
            where they serve, and so does a chunk against history (decode.cached_kernel_attention);
            False keeps the PyTorch path (tests compare the two).
    Returns:
        [N, hidden_size]: each token's output as the module's forward over its whole sequence gives it.
    """
    plan = plan_call(module, x, cu_seqlens, cache)
    n, hq, h, d = x.shape[0], module.num_q_heads, module.num_kv_heads, module.head_dim
    if n == 0:
        return x.new_zeros(0, module.hidden_size)
    if decode_kernels and all(c == 1 for c in plan.counts) and decode_serves(module, cache):
        y = decode_device(module, x, cache)  # RoPE at the device lengths: no host state (what DecodeGraph runs)
        cache.advance_host()
        return y
    theta = module.rope_theta
    q = apply_rope(module.q_proj(x).view(n, hq, d), plan.pos, theta)
    k = apply_rope(module.k_proj(x).view(n, h, d), plan.pos, theta)
    v = module.v_proj(x).view(n, h, d)
    gates = torch.sigmoid(module.gate_proj(x)).view(n, hq, 3)
    o = attend_with_cache(module, q, k, v, gates, plan, cache, decode_kernels=decode_kernels)
    return module.o_proj(o.reshape(n, hq * d))
