"""The `generate` step of experiments.e2e: prefill one N-token sequence through L bare decoder layers,
then NEW_TOKENS decode steps of one token each (issue #16: "prefill + 512 generated tokens").

The bare decoder has no LM head, so no token is picked: every step feeds the inputs_embeds of one new
token, random but fixed and made before timing (`decode_inputs`). What is measured is the
attention / cache cost of generation (plus the projections and MLPs), not sampling.
- dense: the model's own HF attention (SDPA) with HF's DynamicCache (use_cache=True,
  past_key_values); the cache grows by concatenation every step.
- nsa / fsa: the swapped model with nsa_baseline.models.GenerationCache (one NSACache per layer, room
  for N + NEW_TOKENS tokens) passed as nsa_cache=; the prefill runs the module's forward, every step
  the decode kernels (inference.step.attend_with_cache picks them on CUDA for the kernel backends;
  on CPU the torch backend takes the PyTorch branches at an offset).
Both eager: DecodeGraph (inference/graph.py) captures one NativeSparseAttention with its own
projections, not a swapped HF decoder, whose step builds its plan (positions) on the host.

`generate_fn` returns the body, fn(mark) -> the last step's hidden state [hidden]; mark() is called
between the prefill and the first step, so the timing wrapper (e2e_timing.cuda_median, split=True)
records a CUDA event there and the body stays testable on CPU (tests/experiments/test_e2e_generate.py).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

NEW_TOKENS = 512
MODE = "eager"  # no CUDA graph on either side (see the docstring); recorded in every ok row's message


def decode_inputs(hidden: int, new_tokens: int, device, dtype, seed: int = 2) -> torch.Tensor:
    """[new_tokens, hidden]: the inputs_embeds of the generated tokens, fixed by `seed`."""
    gen = torch.Generator(device).manual_seed(seed)
    return torch.randn(new_tokens, hidden, device=device, dtype=dtype, generator=gen)


@torch.no_grad()
def dense_generate(model, x: torch.Tensor, steps: torch.Tensor, mark: Optional[Callable] = None) -> torch.Tensor:
    """HF attention with a DynamicCache: prefill x [1, N, hidden], then one call per row of steps
    [T, hidden]; returns the last position's hidden state [hidden]."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(inputs_embeds=x, past_key_values=cache, use_cache=True).last_hidden_state
    if mark:
        mark()
    for t in steps:
        out = model(inputs_embeds=t.view(1, 1, -1), past_key_values=cache, use_cache=True).last_hidden_state
    return out[0, -1]


@torch.no_grad()
def nsa_generate(model, x: torch.Tensor, steps: torch.Tensor, mark: Optional[Callable] = None) -> torch.Tensor:
    """The swapped model with NSA's cache, sized N + T per layer: the same calls as dense_generate,
    each planned by the GenerationCache (positions continue from the cached length)."""
    from nsa_baseline.models import GenerationCache

    cache = GenerationCache(model, 1, x.shape[1] + steps.shape[0])
    plan = cache.begin([x.shape[1]], x.device)
    out = model(inputs_embeds=x, position_ids=plan.pos[None], nsa_cache=cache).last_hidden_state
    if mark:
        mark()
    for t in steps:
        plan = cache.begin([1], x.device)
        out = model(inputs_embeds=t.view(1, 1, -1), position_ids=plan.pos[None], nsa_cache=cache).last_hidden_state
    return out[0, -1]


def generate_fn(base, model, backend: str, x: torch.Tensor, steps: torch.Tensor) -> Callable:
    """fn(mark=None) -> last hidden state: dense runs the unswapped decoder `base` (its HF attention
    takes a DynamicCache; our dense swap keeps no cache), nsa / fsa the swapped copy `model`."""
    if backend == "dense":
        return lambda mark=None: dense_generate(base, x, steps, mark)
    return lambda mark=None: nsa_generate(model, x, steps, mark)


def decode_kernels(model) -> bool:
    """Whether the steps of `model` (swapped) run the decode kernels: attend_with_cache's own test
    (decode_serves) on a one-token cache like the GenerationCache's."""
    from nsa_baseline.inference.cache import CacheConfig, NSACache
    from nsa_baseline.inference.decode import decode_serves

    attn = model.layers[0].self_attn
    w = attn.q_proj.weight
    return decode_serves(attn.nsa, NSACache(CacheConfig.of(attn.nsa), 1, 1, w.device, w.dtype))


def message(backend: str, model) -> str:
    """What an ok generate row ran (its `message`)."""
    if backend == "dense":
        cache = "HF DynamicCache, SDPA"
    else:
        cache = "NSA GenerationCache, " + ("decode kernels" if decode_kernels(model) else "PyTorch branches")
    return f"{MODE}, {NEW_TOKENS} steps, {cache}; ttft_ms timed within the call"
