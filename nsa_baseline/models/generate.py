"""Generation for models swapped by use_nsa_attention, through NSA's own KV cache (nsa_baseline.inference).

    out = generate(model, [prompt_a, prompt_b, ...], max_new_tokens=64, eos_token_id=2)
    # -> one 1-D LongTensor of generated ids per prompt (ending at eos_token_id when it came)

One NSACache per layer (keys after the model's RoPE and q/k norms, values, compressed summaries,
lengths), one slot per prompt. The prompts of different lengths are prefilled in one packed row
(cu_seqlens, positions restarting per sequence; no padding), then every step feeds one new token per
slot for all sequences at once. Each layer's NSA runs against its cache through
inference.step.attend_with_cache: the module's forward at prefill, the decode kernels for the steps
with the nsa / fsa / auto backends where they serve (CUDA, or fp32 / fp16 under the interpreter),
else the PyTorch branches at an offset. Every generated token is what the full forward over prompt +
generated tokens picks at that position (teacher forcing; tests/models/test_generate.py).

Why a loop of ours and not HF's `model.generate(past_key_values=...)` (transformers 5):
- generate batches prompts of different lengths as left-padded rows [B, S] with an attention mask,
  while NSA (its kernels, the cache's slots) works on packed sequences with no padding: every layer
  would have to strip and re-scatter the pads, and the pads would shift the compression and block
  boundaries unless removed exactly;
- HF's Cache is a list of per-layer dense key/value layers whose `update` returns the whole K, V to
  the attention, and generate drives input slicing and mask sizes from `get_seq_length` /
  `cache_position` as one length for the batch. NSA's cache holds per-slot lengths and compressed
  summaries and is written by the attention itself; a subclass would override most of Cache and lean
  on generate's internals (prepare_inputs_for_generation, mask creation), which change between minor
  releases. Not simple and not robust, so generate keeps rejecting a cache (use_cache=False; without
  a cache it works but re-runs the whole prefix per token).
The loop takes greedy or sampled tokens (temperature), stops a sequence at eos_token_id and stops
when all have, and keeps feeding stopped slots (their tokens are dropped) so every step stays one
token per slot: the decode kernels' case.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from nsa_baseline.checks import check_int, fail
from nsa_baseline.inference.cache import CacheConfig, NSACache
from nsa_baseline.inference.decode import decode_serves
from nsa_baseline.inference.plan import CallPlan, plan_counts
from nsa_baseline.models.attention import NSAAttention
from nsa_baseline.models.graph import GenerationGraph
from nsa_baseline.models.swap import _decoder


class GenerationCache:
    r"""The NSA caches of a swapped model: one NSACache per layer, `batch_size` slots of up to
    `max_seqlen` tokens each (device and dtype: each layer's q_proj weight), and the plan of the call
    in flight (every layer appends the same new tokens). Passed to the model as `nsa_cache=`.
    page_size / num_pages: paged caches (a pool of pages per layer, inference/cache.py).
    """

    def __init__(self, model: nn.Module, batch_size: int, max_seqlen: int, *, page_size: Optional[int] = None,
                 num_pages: Optional[int] = None):
        check_int("batch_size", batch_size)
        check_int("max_seqlen", max_seqlen)
        layers = _decoder(model).layers
        self._caches: dict[int, NSACache] = {}
        self._attns: list[NSAAttention] = []
        for i, layer in enumerate(layers):
            attn = getattr(layer, "self_attn", None)
            if not isinstance(attn, NSAAttention):
                fail("model", f"layer {i}: self_attn must be NSAAttention (call use_nsa_attention first)")
            if attn.nsa is None:
                fail("model", "has backend 'dense': generation with a cache needs NSA attention (the NSA cache)")
            w = attn.q_proj.weight
            self._caches[id(attn)] = NSACache(CacheConfig.of(attn.nsa), batch_size, max_seqlen, w.device, w.dtype,
                                              page_size=page_size, num_pages=num_pages, block_size=attn.nsa.block_size)
            self._attns.append(attn)
        self.first = next(iter(self._caches.values()))
        self.plan: Optional[CallPlan] = None

    @property
    def host_lengths(self) -> tuple[int, ...]:
        return self.first.host_lengths

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._caches.values())

    def caches(self) -> list[NSACache]:
        return list(self._caches.values())

    def decode_kernels(self) -> bool:
        """Whether every layer's decode steps run the decode kernels (inference.decode.decode_serves)."""
        return all(decode_serves(a.nsa, self._caches[id(a)]) for a in self._attns)

    def clear(self) -> None:
        """Every slot empty (lengths 0; rows past a length are never read), the tensors kept in place:
        a CUDA graph captured over this cache (GenerationGraph) keeps working for new sequences."""
        for c in self._caches.values():
            c.set_lengths([0] * c.batch_size)
        self.plan = None

    def reset(self, slot: int) -> None:
        """Empty slot `slot` of every layer for a new sequence (a paged cache's pages go back)."""
        for c in self._caches.values():
            c.reset(slot)

    def for_layer(self, attn: NSAAttention) -> NSACache:
        cache = self._caches.get(id(attn))
        if cache is None:
            fail("nsa_cache", f"was made for another model (no cache for layer {attn.layer_idx})")
        if self.plan is None or cache.host_lengths != tuple(self.plan.old):
            fail("nsa_cache", "layers out of step: a call failed half-way; start a new GenerationCache")
        return cache

    def begin(self, counts: list[int], device) -> CallPlan:
        """Plan the next call: counts[b] new tokens for slot b (ValueError past max_seqlen)."""
        if any(c.host_lengths != self.host_lengths for c in self._caches.values()):
            fail("nsa_cache", "layers out of step: a call failed half-way; start a new GenerationCache")
        self.plan = plan_counts(list(counts), self.first, device, arg="counts")
        return self.plan


def _pick(logits: torch.Tensor, greedy: bool, temperature: float, generator) -> torch.Tensor:
    if greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: nn.Module, input_ids_list: Sequence, max_new_tokens: int, *, greedy: bool = True,
             eos_token_id: Optional[int] = None, temperature: float = 1.0,
             generator: Optional[torch.Generator] = None, return_logits: bool = False, cuda_graph: bool = False):
    r"""Generate up to `max_new_tokens` tokens after each prompt with the swapped `model`'s NSA cache.

    Args:
        model: a …ForCausalLM swapped by use_nsa_attention (an NSA backend, not "dense").
        input_ids_list: B prompts, each 1-D ids (tensor or list) of length >= 1; lengths may differ.
        max_new_tokens: tokens to generate per prompt (>= 1).
        greedy: argmax; False samples from softmax(logits / temperature) (with `generator`).
        eos_token_id: a sequence stops after this token (kept in its output); None: never.
        return_logits: also return the logits each token was picked from.
        cuda_graph: run the decode steps as replays of one CUDA graph of the whole model's step
            (GenerationGraph, captured after the prefill; needs CUDA and the decode kernels): the same
            tokens without the per-layer host work of eager steps.
    Returns:
        B 1-D LongTensors of generated ids (on the model's device), each of length <= max_new_tokens;
        with return_logits also B tensors [length, vocab].
    """
    check_int("max_new_tokens", max_new_tokens)
    if not greedy and not temperature > 0:
        fail("temperature", f"must be > 0 for sampling, got {temperature!r}")
    device = next(model.parameters()).device
    if isinstance(input_ids_list, torch.Tensor) and input_ids_list.dim() < 2:
        fail("input_ids_list", "must be a sequence of prompts (a list of 1-D ids), got one 1-D tensor")
    prompts = [torch.as_tensor(p, dtype=torch.long, device=device).flatten() for p in input_ids_list]
    if not prompts or any(p.numel() == 0 for p in prompts):
        fail("input_ids_list", f"must hold >= 1 prompts of >= 1 token each, got lengths {[p.numel() for p in prompts]}")
    if cuda_graph and device.type != "cuda":
        fail("cuda_graph", f"needs the model on a CUDA device, got {device}")
    lengths = [p.numel() for p in prompts]
    b = len(prompts)
    cache = GenerationCache(model, b, max(lengths) + max_new_tokens)
    if cuda_graph and not cache.decode_kernels():
        fail("cuda_graph", "needs decode steps on the decode kernels (an nsa / fsa / auto backend; bf16 / fp16 / fp32)")
    plan = cache.begin(lengths, device)
    last = torch.tensor(lengths, device=device).cumsum(0) - 1  # each prompt's last token in the packed row
    logits = model(torch.cat(prompts)[None], position_ids=plan.pos[None], nsa_cache=cache,
                   logits_to_keep=last).logits[0]  # [B, vocab]
    graph = GenerationGraph(model, cache) if cuda_graph and max_new_tokens > 1 else None
    done = torch.zeros(b, dtype=torch.bool, device=device)
    out, scores = [], []
    for step in range(max_new_tokens):
        token = _pick(logits, greedy, temperature, generator)
        out.append(token)
        if return_logits:
            scores.append(logits)
        if eos_token_id is not None:
            done |= token == eos_token_id
            if bool(done.all()):
                break
        if step + 1 == max_new_tokens:
            break
        if graph is not None:
            logits = graph.step(token)
            continue
        plan = cache.begin([1] * b, device)
        logits = model(token[None], position_ids=plan.pos[None], nsa_cache=cache).logits[0]
    ids = torch.stack(out, dim=1)  # [B, steps]
    keep = [ids.shape[1]] * b
    if eos_token_id is not None:
        hits = [(row == eos_token_id).nonzero() for row in ids.unbind(0)]
        keep = [int(h[0]) + 1 if h.numel() else ids.shape[1] for h in hits]
    result = [row[:n] for row, n in zip(ids.unbind(0), keep)]
    if not return_logits:
        return result
    logits = torch.stack(scores, dim=1)  # [B, steps, vocab]
    return result, [row[:n] for row, n in zip(logits.unbind(0), keep)]
