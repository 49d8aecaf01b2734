"""Tiny transformers decoders (random weights, built from configs) and the hand-built reference
forward of a swapped model: a loop over the layers calling the model's embedding / norm / MLP modules
and nsa_baseline.reference functions directly (never NativeSparseAttention)."""
from __future__ import annotations

import pytest
import torch

from nsa_baseline.reference import (apply_rope, compress_kv, compressed_attention_ref, gated_sum_ref,
                                    rope_positions, select_blocks_from_compressed_ref, selected_attention_ref,
                                    sliding_window_attention_ref)

transformers = pytest.importorskip("transformers", reason="the `models` extra (transformers) is not installed")

# name -> (config class, model class, heads HQ / H, extra config). g = 2, 3 (not a power of two), 2.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", 4, 2, {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", 6, 2, {}),  # q_norm / k_norm, g = 3
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", 4, 2, {}),  # biased q/k/v projections
}
VOCAB = 61
# Reference-backend sizes (block 8 is below the kernels' 16) and kernel-backend sizes.
SMALL = dict(kernel_size=4, kernel_stride=2, block_size=8, topk=3, init_blocks=1, local_blocks=1, window_size=6)
KERNEL = dict(kernel_size=8, kernel_stride=4, block_size=16, topk=3, init_blocks=1, local_blocks=1, window_size=12)


def tiny_model(family: str, seed: int = 0):
    cfg_name, model_name, hq, h, extra = FAMILIES[family]
    config = getattr(transformers, cfg_name)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=hq,
        num_key_value_heads=h, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False,
        use_cache=False, **extra)
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


def cu(*lengths: int) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def packed_positions(*lengths: int) -> torch.Tensor:
    """position_ids [1, N] restarting at 0 per sequence."""
    return torch.cat([torch.arange(n) for n in lengths])[None]


def reference_logits(model, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, nsa: dict) -> torch.Tensor:
    """Logits [1, N, vocab] of the swapped `model` on one packed row, computed layer by layer from
    the model's weights with the reference NSA branches (RoPE from positions restarting per sequence)."""
    base, n = model.model, input_ids.shape[1]
    hq, h = model.config.num_attention_heads, model.config.num_key_value_heads
    theta = model.config.rope_parameters["rope_theta"]
    ks, st, bs = nsa["kernel_size"], nsa["kernel_stride"], nsa["block_size"]
    pos = rope_positions(n, cu_seqlens, input_ids.device)
    x = base.embed_tokens(input_ids)[0]  # [N, hidden]
    for layer in base.layers:
        a = layer.self_attn
        hs = layer.input_layernorm(x)
        q, k, v = a.q_proj(hs).view(n, hq, -1), a.k_proj(hs).view(n, h, -1), a.v_proj(hs).view(n, h, -1)
        if getattr(a, "q_norm", None) is not None:
            q, k = a.q_norm(q), a.k_norm(k)
        q, k = apply_rope(q, pos, theta), apply_rope(k, pos, theta)
        gates = torch.sigmoid(a.gate_proj(hs)).view(n, hq, 3)
        k_cmp, cu_cmp = compress_kv(k, cu_seqlens, ks, st, a.nsa.k_cmp_weight, a.nsa.k_cmp_pos)
        v_cmp, _ = compress_kv(v, cu_seqlens, ks, st, a.nsa.v_cmp_weight, a.nsa.v_cmp_pos)
        o_cmp, lse = compressed_attention_ref(q, k_cmp, v_cmp, cu_seqlens, cu_cmp, ks, st)
        with torch.no_grad():
            idx = select_blocks_from_compressed_ref(q, k_cmp, cu_seqlens, cu_cmp, ks, st, bs, nsa["topk"],
                                                    nsa["init_blocks"], nsa["local_blocks"], lse=lse)
        o_slc = selected_attention_ref(q, k, v, idx, bs, cu_seqlens=cu_seqlens)
        o_win = sliding_window_attention_ref(q, k, v, nsa["window_size"], cu_seqlens)
        o = gated_sum_ref(gates, o_cmp, o_slc, o_win)
        x = x + a.o_proj(o.reshape(n, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(base.norm(x))[None]


@pytest.fixture(autouse=True)
def one_thread():
    """Import into a test module to apply there: tiny ops on one intra-op thread avoid
    oversubscribing a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
