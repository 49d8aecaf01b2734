"""NativeSparseAttention: the NSA attention layer (compressed + selected + sliding-window branches).

    x -> q, k, v projections -> RoPE (positions restart per sequence) ->
         compressed branch (learnable or mean-pooled summaries of k and v),
         selected branch (top-n blocks from the compressed scores, no gradient through the choice),
         sliding-window branch -> per-head sigmoid gates -> output projection.
The three branches share one set of k and v projections. Branch implementations come from
nsa_baseline.backends by the `backend` name.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from nsa_baseline.backends import BACKENDS, Backend, resolve_backend
from nsa_baseline.checks import check_block_mapping, check_cu_seqlens
from nsa_baseline.families import FAMILIES
from nsa_baseline.inference import CacheConfig, NSACache
from nsa_baseline.inference.step import forward_with_cache
from nsa_baseline.reference.rope import apply_rope, rope_positions

COMPRESSIONS = ("linear", "mean")


class NativeSparseAttention(nn.Module):
    r"""Native Sparse Attention layer on packed sequences.

    Args:
        hidden_size: model width. num_q_heads: HQ. num_kv_heads: H (HQ = G * H). head_dim: D (even).
        kernel_size, kernel_stride: compression summary length and step.
        block_size: BS of the selected branch. topk: T selected blocks, counting `init_blocks` first
            blocks and `local_blocks` blocks ending at the query's own block.
        window_size: keys of the sliding-window branch. rope_theta: RoPE base.
        compression: "linear" (learnable weight [kernel_size * D, D] and pos_emb [kernel_size, D]
            for k and for v, initialised to mean pooling) or "mean" (parameter-free).
        backend: "torch" | "nsa" | "fsa" | "auto" (see nsa_baseline.backends). bias: for the projections.
        projections: False builds the attention core alone (no q/k/v/gate/o projections; only
            `attention` works), for models that bring their own (nsa_baseline.models).

    Attribute `fused_backward` (default True): with a kernel backend, `attention` runs as one
    autograd Function whose backward adds every branch's gradient into shared dq / dk / dv buffers
    (nsa_baseline.fused_attention); False: one Function per branch, autograd adding their gradients.
    """

    def __init__(self, hidden_size: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 kernel_size: int = 32, kernel_stride: int = 16, block_size: int = 64, topk: int = 16,
                 init_blocks: int = 1, local_blocks: int = 2, window_size: int = 512,
                 rope_theta: float = 10000.0, compression: str = "linear", backend: str = "torch",
                 bias: bool = False, projections: bool = True):
        super().__init__()
        for name, val in (("hidden_size", hidden_size), ("num_q_heads", num_q_heads),
                          ("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("topk", topk),
                          ("window_size", window_size)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"argument `{name}` must be a positive int, got {val!r}")
        if num_q_heads % num_kv_heads:
            raise ValueError(f"argument `num_q_heads` ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim % 2:
            raise ValueError(f"argument `head_dim` must be even for RoPE, got {head_dim}")
        check_block_mapping(kernel_size, kernel_stride, block_size)
        for name, val in (("init_blocks", init_blocks), ("local_blocks", local_blocks)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 0:
                raise ValueError(f"argument `{name}` must be an int >= 0, got {val!r}")
        if init_blocks + local_blocks > topk:
            raise ValueError(f"argument `topk` ({topk}) must be >= init_blocks + local_blocks")
        if compression not in COMPRESSIONS:
            raise ValueError(f"argument `compression` must be one of {list(COMPRESSIONS)}, got {compression!r}")
        if backend not in BACKENDS:
            raise ValueError(f"argument `backend` must be one of {sorted(BACKENDS)}, got {backend!r}")
        if backend in FAMILIES:  # the kernels' constraints, here rather than at the first forward
            FAMILIES[backend].check_block_size(block_size)
        self.hidden_size, self.num_q_heads, self.num_kv_heads = hidden_size, num_q_heads, num_kv_heads
        self.head_dim, self.kernel_size, self.kernel_stride = head_dim, kernel_size, kernel_stride
        self.block_size, self.topk, self.init_blocks, self.local_blocks = block_size, topk, init_blocks, local_blocks
        self.window_size, self.rope_theta, self.compression, self.backend = window_size, rope_theta, compression, backend
        self._backend: Optional[Backend] = None
        self.projections = bool(projections)
        # One autograd Function for the whole attention whose backward sums the branches' gradients
        # in shared buffers (nsa_baseline.fused_attention) where every branch runs a kernel; False:
        # one Function per branch, autograd adds their gradients (for comparisons).
        self.fused_backward = True

        if self.projections:
            self.q_proj = nn.Linear(hidden_size, num_q_heads * head_dim, bias=bias)
            self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
            self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
            self.gate_proj = nn.Linear(hidden_size, 3 * num_q_heads, bias=bias)
            self.o_proj = nn.Linear(num_q_heads * head_dim, hidden_size, bias=bias)
        if compression == "linear":
            mean_pool = torch.eye(head_dim).repeat(kernel_size, 1) / kernel_size  # [kernel_size * D, D]
            self.k_cmp_weight = nn.Parameter(mean_pool.clone())
            self.v_cmp_weight = nn.Parameter(mean_pool.clone())
            self.k_cmp_pos = nn.Parameter(torch.zeros(kernel_size, head_dim))
            self.v_cmp_pos = nn.Parameter(torch.zeros(kernel_size, head_dim))

    def branches(self) -> Backend:
        """The resolved branch functions (looked up on first use, so construction never imports kernels)."""
        if self._backend is None:
            self._backend = resolve_backend(self.backend)
        return self._backend

    def _check_input(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> None:
        if not self.projections:
            raise RuntimeError("NativeSparseAttention(projections=False) has no projections: call "
                               ".attention(q, k, v, gates, cu_seqlens) instead of forward")
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.hidden_size or x.shape[0] < 1:
            raise ValueError(f"argument `x` must be [N >= 1, hidden_size={self.hidden_size}], got "
                             f"{tuple(getattr(x, 'shape', ()))}")
        if x.dtype != self.q_proj.weight.dtype:
            raise ValueError(f"argument `x` dtype must match the parameters ({self.q_proj.weight.dtype}), got {x.dtype}")
        if x.device != self.q_proj.weight.device:
            raise ValueError(f"argument `x` must be on the parameters' device {self.q_proj.weight.device}, got {x.device}")
        check_cu_seqlens(cu_seqlens)

    def new_cache(self, batch_size: int, max_seqlen: int, *, device=None, dtype=None, page_size: Optional[int] = None,
                  num_pages: Optional[int] = None) -> NSACache:
        """A KV cache of `batch_size` sequence slots of up to `max_seqlen` tokens (zeroed; device and
        dtype default to the parameters'). page_size (a multiple of block_size): a paged cache, keys
        and values in a pool of num_pages pages (default: enough for every slot to reach max_seqlen)
        claimed as slots grow. See nsa_baseline.inference.cache."""
        w = self.q_proj.weight
        device = w.device if device is None else torch.device(device)
        return NSACache(CacheConfig.of(self), batch_size, max_seqlen, device, w.dtype if dtype is None else dtype,
                        page_size=page_size, num_pages=num_pages, block_size=self.block_size)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, return_branches: bool = False,
                cache: Optional[NSACache] = None):
        r"""
        Args:
            x: [N, hidden_size] packed tokens. cu_seqlens: int32 [B + 1] or None for one sequence.
            return_branches: also return the per-branch outputs.
            cache: an NSACache from new_cache: x then packs the NEW tokens of its batch_size slots
                (cu_seqlens int32 [batch_size + 1], None only for one slot), appended to the cache;
                inference only (no autograd), see nsa_baseline.inference.step.
        Returns:
            [N, hidden_size]; with return_branches also a dict of "compressed", "selected", "window"
            ([N, HQ, D] each, before gating), "gates" ([N, HQ, 3]) and "block_indices" (int32 [N, H, T]).
        """
        if cache is not None:
            if return_branches:
                raise ValueError("argument `return_branches` is not supported with a cache")
            return forward_with_cache(self, x, cu_seqlens, cache)
        self._check_input(x, cu_seqlens)
        n, hq, h, d = x.shape[0], self.num_q_heads, self.num_kv_heads, self.head_dim
        if cu_seqlens is not None:
            cu_seqlens = cu_seqlens.to(x.device)
        pos = rope_positions(n, cu_seqlens, x.device)
        q = apply_rope(self.q_proj(x).view(n, hq, d), pos, self.rope_theta)
        k = apply_rope(self.k_proj(x).view(n, h, d), pos, self.rope_theta)
        v = self.v_proj(x).view(n, h, d)
        gates = torch.sigmoid(self.gate_proj(x)).view(n, hq, 3)
        o, branches = self.attention(q, k, v, gates, cu_seqlens, return_branches=True)
        out = self.o_proj(o.reshape(n, hq * d))
        if not return_branches:
            return out
        return out, dict(branches, gates=gates)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor,
                  cu_seqlens: Optional[torch.Tensor] = None, return_branches: bool = False):
        r"""NSA's attention between the projections: compression, compressed attention, block
        selection, selected and sliding-window attention, gated sum. This is the part that replaces
        dense attention (what benchmarks compare with FlashAttention; the q/k/v/o projections are
        the same for both).

        Args:
            q: [N, HQ, D]; k, v: [N, H, D] (after RoPE); gates: [N, HQ, 3] in [0, 1] for the
                compressed, selected and window branches; cu_seqlens: int32 [B + 1] or None.
        Returns:
            o [N, HQ, D]; with return_branches also a dict of "compressed", "selected", "window" and
            "block_indices".
        """
        n, hq, h, d = q.shape[0], self.num_q_heads, self.num_kv_heads, self.head_dim
        for name, t, shape in (("q", q, (n, hq, d)), ("k", k, (n, h, d)), ("v", v, (n, h, d)), ("gates", gates, (n, hq, 3))):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                raise ValueError(f"argument `{name}` must be {list(shape)}, got {tuple(getattr(t, 'shape', ()))}")
        fns = self.branches()
        if self._fused(q, k, v, gates):
            from nsa_baseline.fused_attention import fused_attention

            o, o_cmp, o_slc, o_win, block_indices = fused_attention(
                q, k, v, gates, cu_seqlens, self._fused_config(fns), *self._compression_weights())
        else:
            o, o_cmp, o_slc, o_win, block_indices = self._branch_attention(fns, q, k, v, gates, cu_seqlens)
        if not return_branches:
            return o
        return o, {"compressed": o_cmp, "selected": o_slc, "window": o_win, "block_indices": block_indices}

    def _compression_weights(self) -> tuple:
        """(k weight, k pos_emb, v weight, v pos_emb); Nones for mean pooling."""
        if self.compression == "linear":
            return self.k_cmp_weight, self.k_cmp_pos, self.v_cmp_weight, self.v_cmp_pos
        return None, None, None, None

    def _fused(self, q, k, v, gates) -> bool:
        """Whether attention runs as one Function with the fused backward (kernel backends only; the
        kernels are imported on first use, as in branches())."""
        if not self.fused_backward or self.backend not in FAMILIES:
            return False
        from nsa_baseline.fused_attention import fused_supported

        return fused_supported(self.backend, q, k, v, gates)

    def _fused_config(self, fns: Backend):
        from nsa_baseline.fused_attention import Config

        return Config(self.kernel_size, self.kernel_stride, self.block_size, self.topk, self.init_blocks,
                      self.local_blocks, self.window_size, self.backend, fns.select_blocks_from_compressed)

    def _branch_attention(self, fns: Backend, q, k, v, gates, cu_seqlens):
        """One autograd Function per branch (the torch backend, and where a kernel does not serve)."""
        ks, st = self.kernel_size, self.kernel_stride
        if self.compression == "linear":
            k_cmp, cu_cmp = fns.compress_kv(k, cu_seqlens, ks, st, self.k_cmp_weight, self.k_cmp_pos)
            v_cmp, _ = fns.compress_kv(v, cu_seqlens, ks, st, self.v_cmp_weight, self.v_cmp_pos)
        else:
            k_cmp, cu_cmp = fns.compress_kv(k, cu_seqlens, ks, st)
            v_cmp, _ = fns.compress_kv(v, cu_seqlens, ks, st)
        o_cmp, lse_cmp = fns.compressed_attention(q, k_cmp, v_cmp, cu_seqlens, cu_cmp, ks, st)
        with torch.no_grad():
            block_indices = fns.select_blocks_from_compressed(
                q.detach(), k_cmp.detach(), cu_seqlens, cu_cmp, ks, st, self.block_size, self.topk,
                self.init_blocks, self.local_blocks, lse=lse_cmp.detach())
        o_slc = fns.selected_attention(q, k, v, block_indices, self.block_size, cu_seqlens=cu_seqlens)
        o_win = fns.sliding_window_attention(q, k, v, self.window_size, cu_seqlens)
        o = fns.gated_sum(gates, o_cmp, o_slc, o_win)  # [N, HQ, D] = sum_b gates[..., b:b+1] * o_b
        return o, o_cmp, o_slc, o_win, block_indices

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, HQ={self.num_q_heads}, H={self.num_kv_heads}, D={self.head_dim}, "
                f"kernel={self.kernel_size}/{self.kernel_stride}, BS={self.block_size}, T={self.topk}, "
                f"window={self.window_size}, compression={self.compression}, backend={self.backend}")
