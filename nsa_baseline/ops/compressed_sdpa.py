"""Compressed attention through PyTorch's fused attention kernels (cuDNN on Hopper, with fallbacks:
CUDA_BACKENDS; CPU: its flash kernel), forward and backward, with the lse.

Query t sees summary i iff i * stride + kernel_size - 1 <= t. Writing t = a * stride + b (b = t mod
stride), that is i <= a - s_b with s_b = -floor((b - kernel_size + 1) / stride): the queries of one
residue b, renumbered a' = a - s_b, see summaries i <= a', which is plain causal attention (top-left,
as many queries as keys) over the summaries. The residues share the summaries, so they become stride
more query heads per KV head: one GQA call with query heads ordered (KV head, residue, group head),
L = ceil(N / stride) - min_b s_b + 1 rows each (the last row of every residue, and the rows past a
residue's end, are no query: q and do are zero there, so they add nothing to dK / dV and get dQ = 0).
Queries t < kernel_size - 1 see no summary: o = 0, lse = -inf, dq += 0. Packed sequences run as a
batch of their own calls, each padded to the longest (padded rows are no query, padded summaries are
zero and unseen); sdpa_sequences declines batches whose padding wastes too much.

Moving q, o, do and dq between [N, HQ, D] and the residue layout [B, H * stride * G, L, D] is one
tiled Triton copy each (ops/residue_rows.py, cached row maps; index_select without Triton), 3.3x
faster than index_select's row gathers on the H100. Timed against the Triton kernels by
experiments/gpu/module_vs_dense.py --compressed-sdpa; the module uses it when
fused_attention.COMPRESSED_SDPA_MIN_TOKENS says so.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from nsa_baseline.ops.flex import tensor_key
from nsa_baseline.ops.residue_rows import gather_rows, scatter_rows
from nsa_baseline.utils.triton_utils import is_interpreter

_LAYOUTS: dict[tuple, "ResidueLayout"] = {}
_SEQUENCES: dict[tuple, tuple] = {}

# A packed batch runs as a batch of its sequences, each padded to the longest one's rows; beyond this
# share of padded (wasted) attention work the Triton kernels serve the call instead.
MAX_PADDING_WASTE = 0.5
# The call's row copies (q, o, do, dq: [N, HQ, D] each) and cuDNN's backward buffers grow with the
# token x query-head rows: at 256K tokens x 64 heads the module's fwd+bwd asked for 16 GiB more and ran
# out of memory on an 80 GB H100 where the Triton kernels fit (results/tables67, 44f7b49). Above this
# many rows the Triton kernels serve the call (128K x 64 heads still routes: measured to fit).
MAX_QUERY_ROWS = 131072 * 64


class ResidueLayout(NamedTuple):
    """Row maps of one call (int32 while they fit, else int64: index_select takes both)."""

    batch: int  # B: sequences with at least one summary
    heads: int  # H * stride * G query heads of the call
    length: int  # L rows per head (queries = keys), the longest sequence's
    gather: torch.Tensor  # [B * heads * L]: row t * HQ + hq of q [N, HQ, D] for each call row (0 where none)
    empty: torch.Tensor  # int64 [k] (index_fill_'s index): call rows that are no query
    scatter: torch.Tensor  # [N * HQ]: call row of q row (t, hq); an empty call row where t sees no summary
    unseen: torch.Tensor  # int64 [k]: q rows (t, hq) whose token sees no summary
    key_gather: torch.Tensor  # int64 [B * L]: summary row of each call key row (0 past a sequence's summaries)
    key_empty: torch.Tensor  # int64 [k]: call key rows past their sequence's summaries
    key_scatter: torch.Tensor  # int64 [N_cmp]: call key row of each summary
    rows: torch.Tensor  # [B * heads * L]: gather, -1 on call rows that are no query (residue_rows' map)
    heads_per_group: int  # stride * G: the call heads of one (sequence, KV head), consecutive in row order

    @property
    def groups(self) -> int:
        """B * H: the (sequence, KV head) blocks of the call's rows (residue_rows' program rows)."""
        return self.batch * self.heads // self.heads_per_group


def host_sequences(cu: torch.Tensor, cu_cmp: torch.Tensor) -> tuple:
    """((start, length, summary start, summaries), ...) of the sequences with a summary, from the int32
    tables [B + 1] (one host read per pair of tensors, cached)."""
    key = tensor_key(cu) + tensor_key(cu_cmp)
    hit = _SEQUENCES.get(key)
    if hit is not None:
        return hit[1]
    bounds, cmp_bounds = torch.stack([cu.long(), cu_cmp.long()]).tolist()
    seqs = tuple((s, e - s, cs, ce - cs) for s, e, cs, ce in zip(bounds, bounds[1:], cmp_bounds, cmp_bounds[1:])
                 if ce > cs)
    if len(_SEQUENCES) > 64:
        _SEQUENCES.clear()
    _SEQUENCES[key] = ((cu, cu_cmp), seqs)  # held: the ids stay theirs while cached
    return seqs


def _shifts(kernel_size: int, stride: int) -> list[int]:
    """s_b: residue b's queries a see summaries i <= a - s_b."""
    return [-((b - kernel_size + 1) // stride) for b in range(stride)]


def _rows_per_head(length: int, kernel_size: int, stride: int) -> int:
    return -(-length // stride) - min(_shifts(kernel_size, stride)) + 1


def padding_waste(seqs: tuple, kernel_size: int, stride: int) -> float:
    """Share of the batched call's causal attention work that falls on padding."""
    rows = [_rows_per_head(n, kernel_size, stride) for _, n, _, _ in seqs]
    return 1.0 - sum(r * r for r in rows) / (len(rows) * max(rows) ** 2) if rows else 0.0


def residue_layout(n: int, hq: int, g: int, kernel_size: int, stride: int, device, seqs: tuple) -> ResidueLayout:
    """The call's row maps for N packed tokens of sequences `seqs` (host_sequences; cached: built once
    per shape, on the device)."""
    key = (n, hq, g, kernel_size, stride, str(device), seqs)
    hit = _LAYOUTS.get(key)
    if hit is not None:
        return hit
    h, b_count = hq // g, len(seqs)
    length = max(_rows_per_head(m, kernel_size, stride) for _, m, _, _ in seqs)
    starts, lengths, cmp_starts, cmp_counts = (torch.tensor(col, device=device) for col in zip(*seqs))
    a = torch.arange(length, device=device)
    shift = torch.tensor(_shifts(kernel_size, stride), device=device)
    local = (a[None, :] + shift[:, None]) * stride + torch.arange(stride, device=device)[:, None]  # [stride, L]
    local = local[None, None, :, None, :]  # call row (s, h, b, g, a')
    tok = starts[:, None, None, None, None] + local
    head = (torch.arange(h, device=device)[:, None] * g + torch.arange(g, device=device)[None, :])[None, :, None, :, None]
    is_query = (local < lengths[:, None, None, None, None]).expand(b_count, h, stride, g, length).flatten()
    gather = (tok * hq + head).flatten()
    gather = torch.where(is_query, gather, 0)
    empty = (~is_query).nonzero().squeeze(1)
    rows = torch.arange(gather.numel(), device=device)
    scatter = torch.full((n * hq,), -1, dtype=torch.int64, device=device)
    scatter[gather[is_query]] = rows[is_query]
    unseen = (scatter < 0).nonzero().squeeze(1)
    scatter[unseen] = empty[0]  # an empty call row: its dq is exactly 0, its o is overwritten
    j = torch.arange(length, device=device)
    is_key = j[None, :] < cmp_counts[:, None]  # [B, L]
    key_gather = torch.where(is_key, cmp_starts[:, None] + j[None, :], 0).flatten()
    key_scatter = torch.empty(int(sum(c for *_, c in seqs)), dtype=torch.int64, device=device)
    key_scatter[key_gather[is_key.flatten()]] = torch.arange(b_count * length, device=device)[is_key.flatten()]
    index = torch.int32 if gather.numel() < 2**31 else torch.int64
    layout = ResidueLayout(b_count, h * stride * g, length, gather.to(index), empty, scatter.to(index), unseen,
                           key_gather, (~is_key).flatten().nonzero().squeeze(1), key_scatter,
                           torch.where(is_query, gather, -1).to(index), stride * g)
    if len(_LAYOUTS) >= 2:  # the maps are as long as q has rows: keep few
        _LAYOUTS.clear()
    _LAYOUTS[key] = layout
    return layout


def _tiled(x: torch.Tensor) -> bool:
    """Rows move through residue_rows' Triton kernel (CUDA, or the interpreter in the tests)."""
    return x.is_cuda or is_interpreter()


def _rows(x: torch.Tensor, layout: ResidueLayout) -> torch.Tensor:
    """[N, HQ, D] -> the call's [B, heads, L, D], zero on rows that are no query."""
    d = x.shape[2]
    if _tiled(x):
        out = gather_rows(x.reshape(-1, d), layout.rows, layout.groups, layout.heads_per_group, layout.length)
    else:
        out = x.reshape(-1, d).index_select(0, layout.gather)
        out.index_fill_(0, layout.empty, 0)
    return out.view(layout.batch, layout.heads, layout.length, d)


def _unrows(x_r: torch.Tensor, layout: ResidueLayout, out: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
    """The call's [B, heads, L, D] -> out [N, HQ, D] (written, or added to with accumulate); rows of
    tokens that see no summary get 0 (unchanged with accumulate)."""
    d = out.shape[2]
    if _tiled(x_r) and out.is_contiguous():  # (a strided dq from a caller takes the index_select path)
        scatter_rows(x_r.reshape(-1, d), layout.rows, out.view(-1, d), layout.groups, layout.heads_per_group,
                     layout.length, accumulate)
        if not accumulate:
            out.view(-1, d).index_fill_(0, layout.unseen, 0)
        return out
    part = x_r.reshape(-1, d).index_select(0, layout.scatter)
    part.index_fill_(0, layout.unseen, 0)
    part = part.view(out.shape)
    return out.add_(part) if accumulate else out.copy_(part)


def _keys(k_cmp: torch.Tensor, layout: ResidueLayout) -> torch.Tensor:
    """[N_cmp, H, D] -> [B, H, L, D], zero keys past a sequence's summaries (no query sees them)."""
    _, h, d = k_cmp.shape
    out = k_cmp.index_select(0, layout.key_gather)
    out.index_fill_(0, layout.key_empty, 0)
    return out.view(layout.batch, layout.length, h, d).transpose(1, 2).contiguous()


def _unkeys(dk: torch.Tensor, layout: ResidueLayout, dtype) -> torch.Tensor:
    """The call's [B, H, L, D] key gradient -> [N_cmp, H, D]."""
    b, h, length, d = dk.shape
    return dk.transpose(1, 2).reshape(b * length, h, d).index_select(0, layout.key_scatter).to(dtype)


# The fused kernels tried in order on CUDA (the first that takes the call runs it): cuDNN with the
# summaries shared by the query heads (GQA), cuDNN with them repeated per query head (if this build's
# cuDNN path rejects unequal head counts: more traffic, dK / dV summed back), FlashAttention-2 (GQA).
CUDA_BACKENDS = ("cudnn", "cudnn_repeat", "flash")
CPU_BACKEND = "cpu"  # tests: "cpu_repeat" runs the repeated layout on the CPU flash kernel


def last_backend() -> Optional[str]:
    """The fused kernel the last forward ran (a CUDA_BACKENDS name or CPU_BACKEND; benchmarks record it)."""
    return _LAST_BACKEND[0]


_LAST_BACKEND = [None]


def _repeated(k: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, H, L, D] -> [B, heads, L, D]: KV head h for query heads h * rep .. (h + 1) * rep - 1."""
    return k.repeat_interleave(heads // k.shape[1], dim=1)


_CHOSEN: dict[tuple, str] = {}  # call shape -> the backend that took it (no retries under CUDA-graph capture)


def _attend(q, k, v, scale: float):
    """(o, lse [B, heads, L] natural log, what the backward needs) of causal attention, GQA."""
    key = (tuple(q.shape), tuple(k.shape), q.dtype, str(q.device))
    names = (_CHOSEN[key],) if key in _CHOSEN else CUDA_BACKENDS if q.is_cuda else (CPU_BACKEND,)
    for i, name in enumerate(names):
        op, repeat = name.removesuffix("_repeat"), name.endswith("_repeat")
        kk, vv = (_repeated(k, q.shape[1]), _repeated(v, q.shape[1])) if repeat else (k, v)
        try:
            o, lse, saved = _FORWARD[op](q, kk, vv, scale)
        except (RuntimeError, TypeError):  # this build or GPU lacks the backend for the shape: the next
            if i == len(names) - 1:
                raise
            continue
        _LAST_BACKEND[0] = _CHOSEN[key] = name
        return o, lse, (op, repeat, lse.shape, lse.dtype) + saved
    raise AssertionError("unreachable")


def _forward_cpu(q, k, v, scale):
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    return o, lse, ()


def _forward_cudnn(q, k, v, scale):
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)
    return out[0], out[1], tuple(out[2:8])  # cum_q, cum_k, max_q, max_k, philox seed, offset


def _forward_flash(q, k, v, scale):
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
    return out[0], out[1], tuple(out[2:8])  # cum_q, cum_k, max_q, max_k, rng state, unused


_FORWARD = {"cpu": _forward_cpu, "cudnn": _forward_cudnn, "flash": _forward_flash}


def _attend_bwd(do, q, k, v, o, lse, aux, scale):
    """(dq, dk, dv) of _attend; lse [B, heads, L] float32 (given back in the backend's shape and dtype)."""
    op, repeat, lse_shape, lse_dtype = aux[:4]
    lse = lse.view(lse_shape).to(lse_dtype)
    kk, vv = (_repeated(k, q.shape[1]), _repeated(v, q.shape[1])) if repeat else (k, v)
    if op == "cpu":
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(do, q, kk, vv, o, lse, 0.0, True,
                                                                                     scale=scale)
    elif op == "cudnn":
        cum_q, cum_k, max_q, max_k, seed, offset = aux[4:]
        grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            do, q, kk, vv, o, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, True, scale=scale)
    else:
        cum_q, cum_k, max_q, max_k, seed, offset = aux[4:]
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            do, q, kk, vv, o, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset, scale=scale)
    dq, dk, dv = grads
    if repeat:  # sum each KV head's query heads (in fp32 at least)
        b, h, length, d = k.shape
        acc = torch.promote_types(dk.dtype, torch.float32)
        dk, dv = (t.view(b, h, -1, length, d).sum(2, dtype=acc) for t in (dk, dv))
    return dq, dk, dv


def sdpa_serves(q: torch.Tensor, kernel_size: int, kernel_stride: int) -> bool:
    """A dtype and head dim the fused kernels take: fp16 / bf16 on CUDA (the CPU kernel, for the tests,
    takes any float), D a multiple of 8 up to 256 (the caller checks the sequences: sdpa_sequences)."""
    d = q.shape[2]
    dtype_ok = q.dtype in (torch.float16, torch.bfloat16) or not q.is_cuda
    return dtype_ok and d % 8 == 0 and d <= 256 and kernel_stride <= kernel_size


def sdpa_sequences(n: int, n_cmp: int, cu=None, cu_cmp=None, kernel_size: int = 32, kernel_stride: int = 16,
                   max_waste: float = MAX_PADDING_WASTE):
    """The sequences with a summary for compressed_sdpa_fwd (host_sequences; one sequence without
    tables), or None when padding them into one batch wastes more than max_waste of the work."""
    if cu is None or cu.numel() == 2:
        seqs = ((0, n, 0, n_cmp),) if n_cmp else ()
    else:
        seqs = host_sequences(cu, cu_cmp)
    if padding_waste(seqs, kernel_size, kernel_stride) > max_waste:
        return None
    return seqs


def compressed_sdpa_fwd(q, k_cmp, v_cmp, kernel_size: int, kernel_stride: int, scale: float, seqs: tuple):
    """(o [N, HQ, D] in q.dtype, lse float32 [HQ, N] natural log, aux) of packed sequences `seqs`
    (sdpa_sequences); k_cmp, v_cmp [N_cmp, H, D] in q.dtype. aux (the backend and what its backward
    takes) goes to compressed_sdpa_bwd."""
    n, hq, d = q.shape
    if not seqs:  # no summary anywhere
        return torch.zeros_like(q), torch.full((hq, n), float("-inf"), device=q.device), None
    layout = residue_layout(n, hq, hq // k_cmp.shape[1], kernel_size, kernel_stride, q.device, seqs)
    o_r, lse_r, aux = _attend(_rows(q, layout), _keys(k_cmp, layout), _keys(v_cmp, layout), scale)
    o = _unrows(o_r, layout, torch.empty(q.shape, dtype=q.dtype, device=q.device))
    lse = lse_r.reshape(-1).float().index_select(0, layout.scatter)
    lse.index_fill_(0, layout.unseen, float("-inf"))
    return o, lse.view(n, hq).t().contiguous(), aux


def compressed_sdpa_bwd(q, k_cmp, v_cmp, o, lse, do, aux: tuple, kernel_size: int, kernel_stride: int,
                        scale: float, seqs: tuple, dq: Optional[torch.Tensor] = None, accumulate: bool = False):
    """(dq, dk_cmp, dv_cmp) for upstream do [N, HQ, D] (the branch's o and lse as the forward gave
    them). dq: the buffer to write (None allocates); accumulate: add the branch's dq to what it holds."""
    n, hq, d = q.shape
    if not seqs:  # no summary anywhere: the branch adds nothing
        if dq is None or not accumulate:
            dq = torch.zeros_like(q) if dq is None else dq.zero_()
        return dq, torch.zeros_like(k_cmp), torch.zeros_like(v_cmp)
    layout = residue_layout(n, hq, hq // k_cmp.shape[1], kernel_size, kernel_stride, q.device, seqs)
    lse_r = lse.t().reshape(-1).index_select(0, layout.gather)  # element (t, hq) of row t * HQ + hq
    lse_r.index_fill_(0, layout.empty, 0.)  # rows that are no query: finite (q = do = 0 there)
    dq_r, dk_r, dv_r = _attend_bwd(_rows(do.contiguous(), layout), _rows(q, layout), _keys(k_cmp, layout),
                                   _keys(v_cmp, layout), _rows(o, layout), lse_r, aux, scale)
    if dq is None:
        dq, accumulate = torch.empty(q.shape, dtype=q.dtype, device=q.device), False
    _unrows(dq_r, layout, dq, accumulate)
    return dq, _unkeys(dk_r, layout, k_cmp.dtype), _unkeys(dv_r, layout, v_cmp.dtype)


def route_bounds_hold(num_tokens: int, q_heads: int, min_tokens) -> bool:
    """The size rule of routed_sequences: at least `min_tokens` tokens (None: never) and at most
    MAX_QUERY_ROWS token x query-head rows (the longest sequence must reach min_tokens as well)."""
    return min_tokens is not None and num_tokens >= min_tokens and num_tokens * q_heads <= MAX_QUERY_ROWS


def routed_sequences(q, k_cmp, cu, cu_cmp, kernel_size: int, kernel_stride: int, min_tokens):
    """The sequences for this module's compressed branch on the fused kernels when its longest sequence
    has at least `min_tokens` tokens (fused_attention.COMPRESSED_SDPA_MIN_TOKENS; None: never), q has
    at most MAX_QUERY_ROWS token x head rows and padding them wastes at most MAX_PADDING_WASTE, else
    None. cu, cu_cmp: checked (checked_compressed_args)."""
    if not route_bounds_hold(q.shape[0], q.shape[1], min_tokens) or not k_cmp.shape[0] or k_cmp.dtype != q.dtype \
            or not sdpa_serves(q, kernel_size, kernel_stride):
        return None
    seqs = sdpa_sequences(q.shape[0], k_cmp.shape[0], cu, cu_cmp, kernel_size, kernel_stride)
    return seqs if seqs and max(n for _, n, _, _ in seqs) >= min_tokens else None


def attend_routed(q, k_cmp, v_cmp, kernel_size: int, kernel_stride: int, scale: float, seqs: tuple):
    """(o, lse) of routed_sequences' call, differentiable in q, k_cmp, v_cmp through o."""
    return _CompressedSdpa.apply(q.contiguous(), k_cmp.contiguous(), v_cmp.contiguous(), kernel_size,
                                 kernel_stride, scale, seqs)


class _CompressedSdpa(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, kernel_size, kernel_stride, scale, seqs):
        o, lse, aux = compressed_sdpa_fwd(q, k_cmp, v_cmp, kernel_size, kernel_stride, scale, seqs)
        ctx.save_for_backward(q, k_cmp, v_cmp, o, lse)
        ctx.args = (aux, kernel_size, kernel_stride, scale, seqs)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _):
        q, k_cmp, v_cmp, o, lse = ctx.saved_tensors
        aux, kernel_size, kernel_stride, scale, seqs = ctx.args
        dq, dk, dv = compressed_sdpa_bwd(q, k_cmp, v_cmp, o, lse, do, aux, kernel_size, kernel_stride, scale, seqs)
        return dq, dk, dv, None, None, None, None


def compressed_attention_sdpa(q, k_cmp, v_cmp, cu_seqlens=None, cu_seqlens_cmp=None, kernel_size: int = 32,
                              kernel_stride: int = 16, scale: Optional[float] = None):
    """(o [N, HQ, D], lse float32 [HQ, N]) of compressed attention through the fused SDPA kernels (the
    packed sequences padded into one batch), differentiable in q, k_cmp, v_cmp through o (lse is not).
    Same contract as compressed_attention_triton; D a multiple of 8, at most 256."""
    from nsa_baseline.ops.compressed import checked_compressed_args

    cu, cu_cmp, scale = checked_compressed_args(q, k_cmp, v_cmp, cu_seqlens, cu_seqlens_cmp, kernel_size,
                                                kernel_stride, scale)
    if not sdpa_serves(q, kernel_size, kernel_stride):
        raise ValueError(f"argument `q`: {q.dtype} with head dim {q.shape[2]}; the fused kernels take fp16 / bf16 on "
                         "CUDA and D a multiple of 8 up to 256")
    n_cmp = k_cmp.shape[0]
    k_cmp, v_cmp = k_cmp.to(q.dtype).contiguous(), v_cmp.to(q.dtype).contiguous()
    seqs = sdpa_sequences(q.shape[0], n_cmp, cu, cu_cmp, kernel_size, kernel_stride, max_waste=1.0)
    return attend_routed(q, k_cmp, v_cmp, kernel_size, kernel_stride, scale, seqs)
