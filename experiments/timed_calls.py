"""The kernels a sweep can time, imported lazily (a missing kernel becomes an error row, never a
fake number), each turned into a zero-argument call on a point's inputs.

selected scope: nsa | fsa | auto | fla run selected attention on (q, k, v, block_indices);
module scope: nsa | fsa | auto run NativeSparseAttention(backend=...).attention on (q, k, v, gates):
compression, compressed attention, selection, selected and window attention and the gated sum, i.e.
everything that replaces dense attention (the q/k/v/o projections, equal for both, are left out);
and each of its three branches alone (`branch_calls`); fla runs fla-core's own whole path
(`parallel_nsa` without block indices: mean-pool compression in blocks of BS, compressed attention,
its top-T, selected attention, gated sum; no window, which needs flash-attn), a peer of another
variant of NSA, so its output has no shared reference; sdpa is dense causal attention over the
same heads in both scopes (the paper's full-attention baseline is the kernel alone).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from experiments.inputs import Inputs
from experiments.points import Point
from experiments.schema import SweepConfig
from nsa_baseline.families import get_family

@dataclass
class Call:
    run: Callable[[], torch.Tensor]  # one forward; returns the output
    leaves: list  # tensors whose .grad the backward fills (reset to None between timed calls)
    family: str  # "selected", "dense", "module" or "peer" (no shared reference): what the output is compared against


def unsupported_reason(kernel: str, point: Point, check_installed: bool = True) -> Optional[str]:
    """Why a kernel cannot run a point at all (recorded as status "unsupported"), or None."""
    if kernel == "fla":
        if point.scope not in ("selected", "module"):
            return f"fla: scope={point.scope} is not wired (selected, module)"
        if check_installed and importlib.util.find_spec("fla") is None:
            return "fla: the optional fla-core package is not installed"
        g = point.gqa
        if g < 16 or g & (g - 1):
            return f"fla: needs gqa a power of two >= 16 (its backward does not compile on Triton 3.6 below), got {g}"
        if point.dtype == "float32":
            return "fla: float32 inputs are not supported"
    if kernel == "flashinfer":
        if point.scope != "decode":
            return f"flashinfer: only scope=decode (its dense batch decode, a peer of sdpa), not scope={point.scope}"
        if check_installed and importlib.util.find_spec("flashinfer") is None:
            return ("flashinfer: the optional flashinfer-python package is not installed (a JIT wheel; "
                    "experiments/flashinfer_wheel.py slims it for the GPU machine)")
        if point.dtype == "float32":
            return "flashinfer: float32 caches are not timed (fp16 / bf16)"
    return None


def _entry(module: str, name: str):
    return getattr(importlib.import_module(module), name)


def _selected_call(fn, inp: Inputs, block_size: int) -> Call:
    q, k, v = (t.detach().requires_grad_(True) for t in (inp.q, inp.k, inp.v))
    batch = inp.cu_seqlens.numel() - 1
    cu = None if batch == 1 else inp.cu_seqlens
    return Call(lambda: fn(q, k, v, inp.block_indices, block_size, cu_seqlens=cu), [q, k, v], "selected")


def _sdpa_call(inp: Inputs, point: Point) -> Call:
    b, n = point.batch, point.seqlen
    q, k, v = (t.detach().view(b, n, t.shape[1], t.shape[2]).transpose(1, 2).requires_grad_(True)
               for t in (inp.q, inp.k, inp.v))  # [B, heads, N, D] views

    def run():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return o.transpose(1, 2).reshape(b * n, point.q_heads, point.head_dim)

    return Call(run, [q, k, v], "dense")


def _fla_call(inp: Inputs, point: Point) -> Call:
    fn = _entry("fla.ops.nsa.parallel", "parallel_nsa")
    b, n, hq = point.batch, point.seqlen, point.q_heads
    q, k, v = (t.detach().view(b, n, t.shape[1], t.shape[2]).requires_grad_(True) for t in (inp.q, inp.k, inp.v))
    idx = inp.block_indices.long().view(b, n, point.kv_heads, point.topk)
    idx = torch.where(idx < 0, torch.full_like(idx, n), idx).sort(-1).values  # fla pads past the end, sorted
    kwargs = dict(block_indices=idx, block_counts=point.topk, block_size=point.block_size)
    params = inspect.signature(fn).parameters
    if "g_slc" in params:  # gate 1 on the selected branch, 0 on the window branch: selected output alone
        kwargs["g_slc"] = torch.ones(b, n, hq, device=q.device, dtype=q.dtype)
    if "g_swa" in params:
        kwargs["g_swa"] = torch.zeros(b, n, hq, device=q.device, dtype=q.dtype)

    def run():
        o = fn(q, k, v, **kwargs)
        o = o[0] if isinstance(o, tuple) else o
        return o.reshape(b * n, hq, point.head_dim)

    return Call(run, [q, k, v], "selected")


def _fla_module_call(inp: Inputs, point: Point) -> Call:
    fn = _entry("fla.ops.nsa.parallel", "parallel_nsa")
    n, hq = point.num_tokens, point.q_heads
    q, k, v = (t.detach().unsqueeze(0).requires_grad_(True) for t in (inp.q, inp.k, inp.v))  # [1, N, heads, D]
    gates = inp.gates.detach().unsqueeze(0)  # [1, N, HQ, 3]: compressed, selected, (window: fla has none)
    g_cmp, g_slc = (gates[..., i].contiguous().requires_grad_(True) for i in (0, 1))
    cu = None if point.batch == 1 else inp.cu_seqlens.long()

    def run():
        o = fn(q, k, v, g_cmp=g_cmp, g_slc=g_slc, block_counts=point.topk, block_size=point.block_size,
               window_size=0, cu_seqlens=cu)
        return o.reshape(n, hq, point.head_dim)

    return Call(run, [q, k, v, g_cmp, g_slc], "peer")


def build_module(kernel: str, cfg: SweepConfig, point: Point, device) -> torch.nn.Module:
    module_cls = _entry("nsa_baseline.module", "NativeSparseAttention")
    torch.manual_seed(cfg.seed)  # the same weights for every backend
    sel = cfg.selection
    module = module_cls(point.q_heads * point.head_dim, point.q_heads, point.kv_heads, point.head_dim,
                        kernel_size=sel.kernel_size, kernel_stride=sel.kernel_stride, block_size=point.block_size,
                        topk=point.topk, init_blocks=sel.init_blocks, local_blocks=sel.local_blocks,
                        window_size=sel.window_size, backend=kernel)
    return module.to(device=device, dtype=getattr(torch, point.dtype))


def _module_call(kernel: str, cfg: SweepConfig, point: Point, inp: Inputs) -> Call:
    module = build_module(kernel, cfg, point, inp.q.device)
    q, k, v, gates = (t.detach().requires_grad_(True) for t in (inp.q, inp.k, inp.v, inp.gates))
    cu = None if point.batch == 1 else inp.cu_seqlens
    params = [p for name, p in module.named_parameters() if "_cmp_" in name]  # the compression's
    return Call(lambda: module.attention(q, k, v, gates, cu), [q, k, v, gates, *params], "module")


BRANCHES = ("compressed", "selected", "window")


def branch_calls(kernel: str, cfg: SweepConfig, point: Point, inp: Inputs) -> dict[str, Call]:
    """The module's three branches with backend `kernel`'s functions, on the point's q, k, v, each
    timed alone for breakdown.png. "compressed" = mean-pooled compression + compressed attention +
    top-T selection (the selection runs without gradient, so its backward is the attention's)."""
    fns = build_module(kernel, cfg, point, inp.q.device).branches()
    sel, bs = cfg.selection, point.block_size
    cu = None if point.batch == 1 else inp.cu_seqlens
    q, k, v = (t.detach().requires_grad_(True) for t in (inp.q, inp.k, inp.v))

    def compressed():
        k_cmp, cu_cmp = fns.compress_kv(k, cu, sel.kernel_size, sel.kernel_stride)
        v_cmp, _ = fns.compress_kv(v, cu, sel.kernel_size, sel.kernel_stride)
        o, lse = fns.compressed_attention(q, k_cmp, v_cmp, cu, cu_cmp, sel.kernel_size, sel.kernel_stride)
        with torch.no_grad():
            fns.select_blocks_from_compressed(q, k_cmp, cu, cu_cmp, sel.kernel_size, sel.kernel_stride, bs,
                                              point.topk, sel.init_blocks, sel.local_blocks, lse=lse)
        return o

    return {
        "compressed": Call(compressed, [q, k, v], "module"),
        "selected": Call(lambda: fns.selected_attention(q, k, v, inp.block_indices, bs, cu_seqlens=cu),
                         [q, k, v], "selected"),
        "window": Call(lambda: fns.sliding_window_attention(q, k, v, sel.window_size, cu), [q, k, v], "module"),
    }


def build_call(kernel: str, cfg: SweepConfig, point: Point, inp: Inputs) -> Call:
    if kernel == "sdpa":
        return _sdpa_call(inp, point)
    if kernel == "fla":
        return _fla_module_call(inp, point) if point.scope == "module" else _fla_call(inp, point)
    if point.scope == "module":
        return _module_call(kernel, cfg, point, inp)
    return _selected_call(get_family(kernel).selected_attention, inp, point.block_size)
