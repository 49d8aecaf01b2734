"""NSAAttention: a drop-in for the self-attention of a Hugging Face Llama / Qwen2 / Qwen3 decoder layer.

    hidden [B, S, hidden] -> the model's own q/k/v projections (+ q_norm / k_norm, Qwen3) -> the
    model's RoPE (its position_embeddings cos / sin) -> B * S packed tokens [N, heads, D] ->
    NSA (NativeSparseAttention.attention, gates = sigmoid(gate_proj(hidden))) or, for backend
    "dense", causal attention inside each sequence (nsa_baseline.branches.full_attention) ->
    the model's o_proj -> (out [B, S, hidden], None), what HF's decoder layer expects.

Sequences: cu_seq_lens_q from the caller (the swap's hook on the model sets it once per forward),
else derived from position_ids (restarts per packed sequence), else one sequence per row.
With `nsa_cache` (a GenerationCache of nsa_baseline.models.generate, handed down by the decoder's
hook): the B * S tokens are the new tokens of the cache's slots and NSA runs against this layer's
NSACache (inference.step.attend_with_cache: the decode kernels or the branches at an offset).
Not supported (ValueError): HF's KV cache (past_key_values; generation runs through nsa_cache).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from nsa_baseline.branches import full_attention
from nsa_baseline.checks import fail
from nsa_baseline.inference.step import attend_with_cache
from nsa_baseline.models.packing import check_packed_cu_seqlens, cu_seqlens_from_position_ids
from nsa_baseline.module import NativeSparseAttention

DENSE = "dense"


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's RoPE (half-split pairs): x * cos + rotate_half(x) * sin. x: [N, heads, D]; cos, sin: [N, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class NSAAttention(nn.Module):
    r"""Self-attention of one HF decoder layer with NSA (or dense causal) attention between the
    model's projections.

    Args:
        attn: the HF attention module replaced (LlamaAttention, Qwen2Attention, Qwen3Attention): its
            q_proj, k_proj, v_proj, o_proj (and q_norm, k_norm when present) are kept, not copied.
        num_q_heads, num_kv_heads: HQ and H of the model. backend: "dense" or a
            NativeSparseAttention backend ("torch" | "nsa" | "fsa" | "auto").
        gate_std: std of the normal init of gate_proj (the model's initializer_range).
        nsa: NativeSparseAttention sizes (kernel_size, kernel_stride, block_size, topk, init_blocks,
            local_blocks, window_size, compression).
    """

    def __init__(self, attn: nn.Module, num_q_heads: int, num_kv_heads: int, backend: str,
                 gate_std: float = 0.02, **nsa):
        super().__init__()
        self.layer_idx = getattr(attn, "layer_idx", None)
        self.head_dim = int(attn.head_dim)
        self.scaling = float(getattr(attn, "scaling", self.head_dim ** -0.5))
        self.num_q_heads, self.num_kv_heads, self.backend = num_q_heads, num_kv_heads, backend
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.q_norm = getattr(attn, "q_norm", None)
        self.k_norm = getattr(attn, "k_norm", None)
        hidden = self.q_proj.in_features
        weight = self.q_proj.weight
        self.gate_proj: Optional[nn.Linear] = None
        self.nsa: Optional[NativeSparseAttention] = None
        if backend != DENSE:
            if self.scaling != self.head_dim ** -0.5:
                fail("attn", f"has softmax scale {self.scaling}, but NSA uses head_dim ** -0.5")
            self.nsa = NativeSparseAttention(hidden, num_q_heads, num_kv_heads, self.head_dim, backend=backend,
                                             projections=False, **nsa).to(weight.device, weight.dtype)
            # hidden -> 3 gates per query head (compressed, selected, window), sigmoid in forward
            self.gate_proj = nn.Linear(hidden, 3 * num_q_heads, bias=False, device=weight.device, dtype=weight.dtype)
            nn.init.normal_(self.gate_proj.weight, std=gate_std)

    def sequences(self, batch: int, seqlen: int, device, kwargs: dict) -> Optional[torch.Tensor]:
        """cu_seqlens int32 over the B * S tokens (None: one sequence)."""
        cu = kwargs.get("cu_seq_lens_q")
        if cu is not None:
            return check_packed_cu_seqlens(cu.to(device), batch * seqlen)
        return cu_seqlens_from_position_ids(kwargs.get("position_ids"), batch, seqlen, device)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, past_key_values=None, **kwargs):
        r"""
        Args:
            hidden_states: [B, S, hidden]. position_embeddings: (cos, sin), each [B or 1, S, D].
            attention_mask: ignored (HF builds none for this model: the sequences come from
                cu_seq_lens_q / position_ids; the swap's hook rejects padding masks).
            kwargs: cu_seq_lens_q (int32 [num_seqs + 1] over B * S tokens) or position_ids [B, S];
                nsa_cache: a GenerationCache whose current plan places the B * S = N new tokens
                (position_embeddings then at their absolute positions).
        Returns:
            (out [B, S, hidden], None): no attention weights.
        """
        if past_key_values is not None:
            fail("past_key_values", "is not supported: NSA attention keeps no HF KV cache (pass use_cache=False); "
                 "generation goes through nsa_baseline.models.generate (the NSA cache)")
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
            fail("hidden_states", f"must be [B, S, hidden], got {tuple(getattr(hidden_states, 'shape', ()))}")
        if position_embeddings is None:
            fail("position_embeddings", "must be the model's RoPE (cos, sin), each [B or 1, S, head_dim]; got None")
        b, s, hidden = hidden_states.shape
        n, hq, h, d = b * s, self.num_q_heads, self.num_kv_heads, self.head_dim
        gen = kwargs.get("nsa_cache")
        if gen is not None and self.nsa is None:
            fail("nsa_cache", "needs NSA attention: backend 'dense' keeps no NSA cache")
        cu = None if gen is not None else self.sequences(b, s, hidden_states.device, kwargs)
        x = hidden_states.reshape(n, hidden)
        q, k, v = self.q_proj(x).view(n, hq, d), self.k_proj(x).view(n, h, d), self.v_proj(x).view(n, h, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = (t.expand(b, s, d).reshape(n, 1, d) for t in position_embeddings)
        q, k = rotate_half_rope(q, cos, sin), rotate_half_rope(k, cos, sin)
        if self.nsa is None:
            o = full_attention(q, k, v, cu, scale=self.scaling)
        else:
            gates = torch.sigmoid(self.gate_proj(x)).view(n, hq, 3)
            if gen is not None:
                o = attend_with_cache(self.nsa, q, k, v, gates, gen.plan, gen.for_layer(self))
            else:
                o = self.nsa.attention(q, k, v, gates, cu)
        return self.o_proj(o.reshape(n, hq * d)).view(b, s, -1), None

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, HQ={self.num_q_heads}, H={self.num_kv_heads}, D={self.head_dim}, " \
               f"backend={self.backend}"
