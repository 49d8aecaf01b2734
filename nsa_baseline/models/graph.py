"""The decode step of a whole swapped model (every layer's projections, RoPE, NSA decode kernels and
MLP, the norm and LM head), one new token per slot, captured in one CUDA graph and replayed per token.

Eagerly a swapped model's decode step is host-bound: every layer plans and checks the call on the host
and launches a dozen kernels from Python (~1.8 ms per layer at 64K against ~0.06 ms of decode kernels,
results/e2e). Replayed, the step costs its kernels alone.

The captured body reads no host state: the positions are the slots' lengths on the device (the graph
copies the first layer's cache.lengths into its static position buffer), and every layer's decode
kernels append at and move their own cache's device lengths. The host mirrors move by one per replay,
never read back. Shapes are static: the cache's batch_size slots, its max_seqlen rows.
"""
from __future__ import annotations

import torch
from torch import nn

from nsa_baseline.checks import fail


class GenerationGraph:
    r"""`GenerationGraph(model, cache)`, then `out = graph.step(tokens)`: the swapped `model`'s decode
    step for every slot of `cache` (a GenerationCache holding at least one token per slot, e.g. after
    the prefill), replayed from a CUDA graph. Same result as
    `cache.begin([1] * batch_size, device); model(tokens[None], position_ids=plan.pos[None], nsa_cache=cache)`.

    Args:
        model: a model swapped by use_nsa_attention (an NSA backend the decode kernels serve).
        cache: its GenerationCache; every slot needs room for one more token at capture.
        inputs_embeds: step() takes embeddings [batch_size, hidden] instead of token ids [batch_size].
        capture: False runs the same body eagerly each step (what the graph records; any device).
        warmup: eager steps before capture (they compile the kernels and are taken back).
    step() returns the logits [batch_size, vocab] (…ForCausalLM) or the last hidden states
    [batch_size, hidden] (a bare decoder), a copy. The graph holds the cache's tensors by address:
    GenerationCache.clear() and new prefills keep it valid; a new GenerationCache needs a new graph.
    """

    def __init__(self, model: nn.Module, cache, *, inputs_embeds: bool = False, capture: bool = True,
                 warmup: int = 2):
        first = cache.first
        if capture and first.device.type != "cuda":
            fail("cache", f"must be on a CUDA device for graph capture, got {first.device} "
                          "(capture=False runs eagerly)")
        if not cache.decode_kernels():
            fail("model", "must run its decode steps on the decode kernels (an nsa / fsa / auto backend on "
                          "tensors the kernels serve) to be captured")
        if min(cache.host_lengths) < 1:
            fail("cache", f"must hold at least one token in every slot (prefill first), got lengths "
                          f"{list(cache.host_lengths)}")
        self.model, self.cache, self.embeds = model, cache, inputs_embeds
        self.batch_size, self.max_seqlen = first.batch_size, first.max_seqlen
        dev = first.device
        weight = next(model.parameters())
        self.inputs = (torch.zeros(1, self.batch_size, model.config.hidden_size, device=dev, dtype=weight.dtype)
                       if inputs_embeds else torch.zeros(1, self.batch_size, dtype=torch.long, device=dev))
        self.pos = torch.zeros(1, self.batch_size, dtype=torch.long, device=dev)
        self.graph = None
        if not capture:
            return
        self._check_room()
        for c in cache.caches():  # paged caches: before capture
            c.claim_step()
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):
                self._body()
                for c in cache.caches():  # give the step back: rows past a length are never read
                    c.lengths.sub_(1)
                    c.advance_host(-1)
        torch.cuda.current_stream(dev).wait_stream(side)
        self._plan()  # outside the capture: the plan's positions are host -> device copies
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.out = self._run()
        for c in cache.caches():  # capture ran the Python (the mirrors moved), not the kernels
            c.advance_host(-1)

    def _check_room(self) -> None:
        if max(self.cache.host_lengths) + 1 > self.max_seqlen:
            fail("cache", f"has a full slot (lengths {list(self.cache.host_lengths)}, max_seqlen {self.max_seqlen}): "
                          "no room for the next token")

    def _plan(self) -> None:
        """The cache's plan for one token per slot: every layer checks its call against it (host only)."""
        self.cache.begin([1] * self.batch_size, self.pos.device)

    def _run(self) -> torch.Tensor:
        """The recorded body: positions from the device lengths, the model on the static inputs."""
        self.pos.copy_(self.cache.first.lengths[None])
        kw = {"inputs_embeds" if self.embeds else "input_ids": self.inputs}
        out = self.model(**kw, position_ids=self.pos, nsa_cache=self.cache)
        logits = getattr(out, "logits", None)
        return (logits if logits is not None else out.last_hidden_state)[0]

    def _body(self) -> torch.Tensor:
        self._plan()
        return self._run()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per slot (ids [batch_size], or embeddings [batch_size, hidden] with
        inputs_embeds=True) and return its logits / hidden states (a copy). ValueError, before
        anything is written, for a full slot or a wrong input."""
        want = tuple(self.inputs.shape[1:])
        if not isinstance(tokens, torch.Tensor) or tuple(tokens.shape) != want or tokens.dtype != self.inputs.dtype \
                or tokens.device != self.inputs.device:
            fail("tokens", f"must be a {self.inputs.dtype} tensor of shape {list(want)} on {self.inputs.device}, got "
                           f"{getattr(tokens, 'dtype', type(tokens).__name__)} {list(getattr(tokens, 'shape', []))} "
                           f"on {getattr(tokens, 'device', '-')}")
        self._check_room()
        for c in self.cache.caches():  # paged caches: the step's rows, outside the graph
            c.claim_step()
        self.inputs.copy_(tokens[None])
        if self.graph is None:
            with torch.no_grad():
                return self._body().clone()
        self.graph.replay()
        for c in self.cache.caches():
            c.advance_host()
        return self.out.clone()
