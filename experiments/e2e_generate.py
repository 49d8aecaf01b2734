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
Two modes (experiments.e2e's steps `generate` and `generate_graph`):
- eager: one Python call of the model per step, as above (HF DynamicCache / GenerationCache).
- graph: every step replays one CUDA graph of the whole decoder's step, captured after the first
  (untimed) call's prefill, as a server captures once: dense through HF's StaticCache (its lengths on
  the device, the rows past them masked; SDPA with enable_gqa, see _sdpa_gqa), nsa / fsa through
  nsa_baseline.models.GenerationGraph.

`generate_fn` returns the body, fn(mark) -> the last step's hidden state [hidden]; mark() is called
between the prefill and the first step, so the timing wrapper (e2e_timing.cuda_median, split=True)
records a CUDA event there and the body stays testable on CPU (tests/experiments/test_e2e_generate.py).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

NEW_TOKENS = 512
MODES = ("eager", "graph")
STEP_MODES = {"generate": "eager", "generate_graph": "graph"}  # experiments.e2e's step -> mode


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


SDPA_GQA = "sdpa_gqa"  # the HF attention function _DenseStatic runs the unswapped decoder with


def _sdpa_gqa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
              **kwargs):
    """HF attention function: SDPA with HF's mask and enable_gqa. HF's own "sdpa" repeats the KV heads
    (a copy of the whole cache per layer and step) whenever a mask is given, which a StaticCache always
    gives at decode: that would time HF's copy, not dense attention."""
    causal = attention_mask is None and query.shape[2] > 1 and getattr(module, "is_causal", True)
    o = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                       is_causal=causal, enable_gqa=True)
    return o.transpose(1, 2).contiguous(), None


def _register_sdpa_gqa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SDPA_GQA, _sdpa_gqa)
    AttentionMaskInterface.register(SDPA_GQA, sdpa_mask)


class _DenseStatic:
    """mode graph, dense: the unswapped decoder over HF's StaticCache of N + T rows (HF's path for CUDA
    graphs: the lengths live on the device, a mask hides the rows past them), attention by _sdpa_gqa,
    its decode step captured after the first call's prefill and replayed per token (capture=False: run
    eagerly)."""

    def __init__(self, model, capture: bool):
        self.model, self.capture, self.cache, self.replay = model, capture, None, None
        _register_sdpa_gqa()

    def _step(self):
        return self.model(inputs_embeds=self.inp, past_key_values=self.cache, use_cache=True).last_hidden_state

    def _capture(self) -> None:
        from experiments.decode_timing import graphed

        def step():
            self.out = self._step()

        self.replay = graphed(step)
        for layer in self.cache.layers:  # graphed's two warm-up steps, taken back (rows past a length are masked)
            layer.cumulative_length.sub_(2)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, steps: torch.Tensor, mark: Optional[Callable]) -> torch.Tensor:
        from transformers import StaticCache

        config = self.model.config
        kept, config._attn_implementation = config._attn_implementation, SDPA_GQA
        try:
            if self.cache is None:
                self.cache = StaticCache(config=config, max_cache_len=x.shape[1] + steps.shape[0])
                self.inp = steps[:1, None].clone()  # [1, 1, hidden]: the static input of the captured step
            self.cache.reset()  # in place: the graph keeps its addresses
            out = self.model(inputs_embeds=x, past_key_values=self.cache, use_cache=True).last_hidden_state
            if self.capture and self.replay is None:
                self._capture()
            if mark:
                mark()
            for t in steps:
                self.inp.copy_(t.view(1, 1, -1))
                if self.replay is None:
                    out = self._step()
                else:
                    self.replay()
                    out = self.out
        finally:
            config._attn_implementation = kept
        return out[0, -1]


class _NSAGraph:
    """mode graph, nsa / fsa: the swapped decoder with one GenerationCache (N + T rows per layer) made at
    the first call and cleared by the next ones, its decode step a GenerationGraph captured after the
    first prefill and replayed per token (capture=False: the graph's body run eagerly)."""

    def __init__(self, model, capture: bool):
        self.model, self.capture, self.cache, self.graph = model, capture, None, None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, steps: torch.Tensor, mark: Optional[Callable]) -> torch.Tensor:
        from nsa_baseline.models import GenerationCache, GenerationGraph

        if self.cache is None:
            self.cache = GenerationCache(self.model, 1, x.shape[1] + steps.shape[0])
        else:
            self.cache.clear()
        plan = self.cache.begin([x.shape[1]], x.device)
        out = self.model(inputs_embeds=x, position_ids=plan.pos[None], nsa_cache=self.cache).last_hidden_state[0]
        if self.graph is None:
            self.graph = GenerationGraph(self.model, self.cache, inputs_embeds=True, capture=self.capture)
        if mark:
            mark()
        for t in steps:
            out = self.graph.step(t.view(1, -1))
        return out[-1]


def generate_fn(base, model, backend: str, x: torch.Tensor, steps: torch.Tensor, mode: str = "eager",
                capture: Optional[bool] = None) -> Callable:
    """fn(mark=None) -> last hidden state: dense runs the unswapped decoder `base` (its HF attention
    takes HF's caches; our dense swap keeps none), nsa / fsa the swapped copy `model`. mode eager: one
    Python call per step (DynamicCache / GenerationCache); graph: CUDA-graph replays (a StaticCache /
    GenerationGraph; capture defaults to x being on CUDA, else the captured body runs eagerly)."""
    if mode not in MODES:
        raise ValueError(f"argument `mode` must be one of {list(MODES)}, got {mode!r}")
    if mode == "graph":
        run = (_DenseStatic if backend == "dense" else _NSAGraph)(base if backend == "dense" else model,
                                                                 x.is_cuda if capture is None else capture)
        return lambda mark=None: run(x, steps, mark)
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


def message(backend: str, model, mode: str = "eager") -> str:
    """What an ok generate row ran (its `message`)."""
    if backend == "dense":
        cache = "HF StaticCache, SDPA (mask, enable_gqa)" if mode == "graph" else "HF DynamicCache, SDPA"
    else:
        cache = "NSA GenerationCache, " + ("decode kernels" if decode_kernels(model) else "PyTorch branches")
    what = "CUDA graph of the whole decode step, captured once before the timed call" if mode == "graph" else mode
    return f"{what}, {NEW_TOKENS} steps, {cache}; ttft_ms timed within the call"
