"""use_nsa_attention: replace every self-attention of a Hugging Face Llama / Qwen2 / Qwen3 decoder
with NSA (nsa_baseline.models.attention.NSAAttention), in place.

    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(...))                 # random weights, nothing downloaded
    use_nsa_attention(model, backend="fsa", block_size=64, topk=16)
    logits = model(input_ids, position_ids=pos).logits         # pos restarts at 0 per packed sequence

Kept: the q/k/v/o projections (the same modules), q_norm / k_norm, the model's RoPE and head layout.
Added per layer: the compression weights (NativeSparseAttention, projections=False) and gate_proj.
A pre-hook on the decoder computes the sequences once per forward (from cu_seq_lens_q, else
position_ids, else one per row) and hands them to every layer as cu_seq_lens_q; given only
cu_seq_lens_q it also sets position_ids restarting per sequence, so RoPE agrees.
Not supported (ValueError): padding masks (attention_mask with zeros: pack instead), HF's KV cache
and `generate` with a cache (use_cache / past_key_values): generation with NSA's cache is
nsa_baseline.models.generate.generate (its docstring says why HF's generate cannot carry it).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from nsa_baseline.backends import BACKENDS
from nsa_baseline.checks import fail
from nsa_baseline.models.attention import DENSE, NSAAttention
from nsa_baseline.models.packing import (check_packed_cu_seqlens, cu_seqlens_from_position_ids,
                                         positions_from_cu_seqlens)

MODEL_TYPES = ("llama", "qwen2", "qwen3")
BACKEND_NAMES = (DENSE, *sorted(BACKENDS))
# Config attention name with no HF mask function: HF then builds no [B, 1, S, S] mask (NSA needs none).
ATTN_IMPLEMENTATION = "nsa_baseline"
# What the model fixes; everything else of NativeSparseAttention may be passed as **nsa.
_FROM_MODEL = ("hidden_size", "num_q_heads", "num_kv_heads", "head_dim", "rope_theta", "bias", "backend",
               "projections")


def _decoder(model: nn.Module) -> nn.Module:
    """The module holding `layers` (LlamaModel inside LlamaForCausalLM, or the model itself)."""
    for m in (model, getattr(model, "model", None)):
        if m is not None and isinstance(getattr(m, "layers", None), nn.ModuleList):
            return m
    fail("model", f"must be a transformers decoder with .layers or .model.layers, got {type(model).__name__}")


def _check_model(model: nn.Module, decoder: nn.Module) -> None:
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in MODEL_TYPES:
        fail("model", f"must be one of the families {list(MODEL_TYPES)} (config.model_type), got "
                      f"{getattr(config, 'model_type', None)!r}")
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or ())):
        fail("model", f"must have full-attention layers only (config.layer_types = {config.layer_types}); "
                      "HF sliding-window layers are not replaced")
    for i, layer in enumerate(decoder.layers):
        attn = getattr(layer, "self_attn", None)
        missing = [p for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim") if not hasattr(attn, p)]
        if missing or isinstance(attn, NSAAttention):
            fail("model", f"layer {i}: self_attn must be an HF attention with q/k/v/o projections "
                          f"({'already NSAAttention' if not missing else f'missing {missing}'})")


def _pack_hook(decoder: nn.Module):
    """Forward pre-hook (with kwargs): reject padding masks and KV caches, derive the sequences once."""
    signature = inspect.signature(decoder.forward)

    def hook(module, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        kw = {**{k: v for k, v in bound.items() if k != "kwargs"}, **bound.get("kwargs", {})}
        mask = kw.get("attention_mask")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2 and bool(mask.all())):
            fail("attention_mask", "must be None or all ones: NSA attention supports no padding masks; pack the "
                 "sequences into one row (position_ids restarting at 0, or cu_seq_lens_q)")
        if kw.get("past_key_values") is not None or kw.get("use_cache"):
            fail("use_cache", "must be False (and past_key_values None): NSA attention keeps no HF KV cache; "
                 "generation with a cache is nsa_baseline.models.generate.generate")
        ref = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        if not isinstance(ref, torch.Tensor) or ref.dim() < 2:
            return args, kwargs  # HF raises its own error for missing inputs
        b, s = ref.shape[:2]
        cu = kw.get("cu_seq_lens_q")
        gen = kw.get("nsa_cache")
        if gen is not None:  # generation: the cache's plan places the new tokens (nsa_baseline.models.generate)
            plan = gen.plan
            if plan is None or b != 1 or s != len(plan.seq):
                fail("nsa_cache", f"must hold the plan of this call: one packed row [1, N] of the new tokens "
                                  f"(N = {None if plan is None else len(plan.seq)}), got input [{b}, {s}]")
            if cu is not None:
                fail("cu_seq_lens_q", "must be None with nsa_cache (the cache's plan gives the sequences)")
            if kw.get("position_ids") is None:
                kw["position_ids"] = plan.pos[None]
            kw["use_cache"] = False
            return (), kw
        if cu is not None:
            cu = check_packed_cu_seqlens(cu.to(ref.device), b * s)
            if kw.get("cu_seq_lens_k") is not None and not torch.equal(kw["cu_seq_lens_k"].to(cu), cu):
                fail("cu_seq_lens_k", "must equal cu_seq_lens_q (self-attention)")
            if kw.get("position_ids") is None:
                if b != 1:
                    fail("cu_seq_lens_q", f"needs a batch of one packed row [1, N], got batch {b}")
                kw["position_ids"] = positions_from_cu_seqlens(cu, b * s)
        else:
            cu = cu_seqlens_from_position_ids(kw.get("position_ids"), b, s, ref.device)
        kw.pop("cu_seq_lens_k", None)
        kw["cu_seq_lens_q"] = cu  # None: one sequence
        kw["use_cache"] = False
        return (), kw

    return hook


def use_nsa_attention(model: nn.Module, backend: str = "fsa", **nsa) -> nn.Module:
    r"""Replace every layer's self-attention of `model` with NSAAttention, in place; returns `model`.

    Args:
        model: a transformers Llama / Qwen2 / Qwen3 model (…ForCausalLM or the bare …Model).
        backend: "dense" (causal attention, nsa_baseline.branches.full_attention: SDPA /
            FlexAttention on CUDA, the reference elsewhere), or "torch" | "nsa" | "fsa" | "auto"
            (NativeSparseAttention's backends).
        nsa: NativeSparseAttention sizes: kernel_size, kernel_stride, block_size, topk, init_blocks,
            local_blocks, window_size, compression (ignored by "dense").
    Everything is checked before the model changes.
    """
    if backend not in BACKEND_NAMES:
        fail("backend", f"must be one of {list(BACKEND_NAMES)}, got {backend!r}")
    fixed = sorted(set(nsa) & set(_FROM_MODEL))
    if fixed:
        fail(fixed[0], "is fixed by the model (or by use_nsa_attention's own argument), not an NSA size")
    decoder = _decoder(model)
    _check_model(model, decoder)
    config = model.config
    hq, h = config.num_attention_heads, config.num_key_value_heads
    std = float(getattr(config, "initializer_range", 0.02))
    new = [NSAAttention(layer.self_attn, hq, h, backend, gate_std=std, **nsa) for layer in decoder.layers]
    for layer, attn in zip(decoder.layers, new):
        layer.self_attn = attn
    config._attn_implementation = ATTN_IMPLEMENTATION
    config.use_cache = False
    decoder.register_forward_pre_hook(_pack_hook(decoder), with_kwargs=True)
    return model
