"""A decode step captured once in a CUDA graph and replayed per token (launch overhead gone: at small
batch a decode step is a few dozen short kernels).

Static shapes come from the cache (batch_size, max_seqlen); x is copied into a static buffer, the
positions are read from cache.lengths on the device by the captured kernels, and the host mirror of
the lengths moves by one per step. The graph holds the cache's tensors by address: reset(slot) and
set_lengths write in place, so they keep working between replays.
"""
from __future__ import annotations

import torch

from nsa_baseline.inference.cache import NSACache
from nsa_baseline.inference.decode import decode_device, decode_serves
from nsa_baseline.inference.plan import check_decode_call


class DecodeGraph:
    r"""`DecodeGraph(module, cache)`, then `y = graph.step(x)` with x [batch_size, hidden_size] the next
    token of every slot: the same as decode_step(module, x, cache), replayed from a CUDA graph.

    Capture runs `warmup` eager steps first (compiles the kernels); they write the row and summary
    past each slot's length, which no step reads before overwriting it, and then give the length back,
    so the cache is logically unchanged. Every slot needs room for one more token at capture.
    rewind=True (benchmarks): the graph also gives the length back after the step, so `replay()` can
    run any number of times over the same cache; step() is then refused.
    """

    def __init__(self, module, cache: NSACache, warmup: int = 2, rewind: bool = False):
        if not cache.device.type == "cuda":
            raise ValueError(f"argument `cache` must be on a CUDA device for graph capture, got {cache.device}")
        self.module, self.cache, self.rewind = module, cache, rewind
        self.x = torch.zeros(cache.batch_size, module.hidden_size, device=cache.device, dtype=cache.dtype)
        check_decode_call(module, self.x, cache)
        if not decode_serves(module, cache):
            raise ValueError(f"argument `module` (backend {module.backend!r}) is not served by the decode kernels")
        cache.claim_step()  # paged: before capture
        side = torch.cuda.Stream(cache.device)
        side.wait_stream(torch.cuda.current_stream(cache.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                decode_device(module, self.x, cache)
                cache.lengths.sub_(1)
        torch.cuda.current_stream(cache.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.y = decode_device(module, self.x, cache)
            if rewind:
                cache.lengths.sub_(1)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Append x's tokens (one per slot) and return their outputs [batch_size, hidden_size] (a copy)."""
        if self.rewind:
            raise ValueError("argument `rewind` was True at capture: this graph never appends; use replay()")
        check_decode_call(self.module, x, self.cache)
        self.cache.claim_step()  # paged: the step's rows, outside the graph
        self.x.copy_(x)
        self.graph.replay()
        self.cache.advance_host()
        return self.y.clone()

    def replay(self) -> None:
        """Replay on whatever the static input `self.x` holds, without checks or the host mirror (for a
        graph captured with rewind=True; otherwise the caller owns the host mirror)."""
        self.graph.replay()
