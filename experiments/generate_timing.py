"""scope=generate on the GPU: prefill L tokens in each of B sequences, then `steps` decode steps, one
attention layer with its q/k/v/o projections (the same weights on both sides), timed with CUDA
events around the prefill (time to first token) and around the decode loop.

ours: NativeSparseAttention with an NSACache (prefill = module(x, cu_seqlens, cache=cache), then
decode_step eagerly or DecodeGraph.step). dense: the module's q/k/v/o projections and RoPE, SDPA
causal prefill, and decode through SDPA over a plain KV cache [B, H, L + steps, D] kept here (eager:
the first pos + 1 keys; graph: one captured step over the whole preallocated cache, masked past the
position, which moves on the device). Every run is done twice (the first compiles, captures and warms
up), the second is timed. Needs CUDA."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class GenerateTiming:
    ttft_ms: float  # prefill of all B sequences (to the first token's output)
    per_token_ms: float  # one decode step of all B sequences, averaged over the steps
    total_ms: float
    finite: bool  # the last step's outputs are finite


def _timed(prefill, step, steps: int) -> GenerateTiming:
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
    ev[0].record()
    prefill()
    ev[1].record()
    for _ in range(steps):
        y = step()
    ev[2].record()
    torch.cuda.synchronize()
    ttft, decode = ev[0].elapsed_time(ev[1]), ev[1].elapsed_time(ev[2])
    return GenerateTiming(ttft, decode / steps, ttft + decode, bool(torch.isfinite(y).all()))


def ours(module, batch: int, length: int, steps: int, mode: str, seed: int = 0) -> GenerateTiming:
    from nsa_baseline.inference.decode import decode_step
    from nsa_baseline.inference.graph import DecodeGraph

    dev, dt = module.q_proj.weight.device, module.q_proj.weight.dtype
    gen = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(batch * length, module.hidden_size, device=dev, dtype=dt, generator=gen)
    xs = torch.randn(batch, module.hidden_size, device=dev, dtype=dt, generator=gen)
    cu = torch.arange(batch + 1, device=dev, dtype=torch.int32) * length
    cache = module.new_cache(batch, length + steps)
    graph = []

    def prefill():
        cache.set_lengths([0] * batch)  # the prefill rewrites every row a later step reads
        module(x, cu, cache=cache)
        if mode == "graph" and not graph:  # captured once, outside the timed run (serving does the same)
            graph.append(DecodeGraph(module, cache))

    def step():
        return graph[0].step(xs) if mode == "graph" else decode_step(module, xs, cache)

    _timed(prefill, step, steps)  # compile, capture, warm up
    return _timed(prefill, step, steps)


class DenseLayer:
    """Dense attention with the module's projections and RoPE, over a plain KV cache."""

    def __init__(self, module, batch: int, max_len: int):
        self.m, self.b = module, batch
        h, d = module.num_kv_heads, module.head_dim
        w = module.q_proj.weight
        self.kc = torch.zeros(batch, h, max_len, d, device=w.device, dtype=w.dtype)
        self.vc = torch.zeros_like(self.kc)
        self.pos = torch.zeros(1, dtype=torch.long, device=w.device)  # the graph step's position
        self.keys = torch.arange(max_len, device=w.device)

    def _qkv(self, x, pos):
        from nsa_baseline.reference.rope import apply_rope

        m, n = self.m, x.shape[0]
        q = apply_rope(m.q_proj(x).view(n, m.num_q_heads, m.head_dim), pos, m.rope_theta)
        k = apply_rope(m.k_proj(x).view(n, m.num_kv_heads, m.head_dim), pos, m.rope_theta)
        return q, k, m.v_proj(x).view(n, m.num_kv_heads, m.head_dim)

    def _out(self, o):
        return self.m.o_proj(o.reshape(o.shape[0], -1))

    @torch.no_grad()
    def prefill(self, x, length: int):
        b, m = self.b, self.m
        pos = torch.arange(length, device=x.device).repeat(b)
        q, k, v = (t.view(b, length, t.shape[1], t.shape[2]).transpose(1, 2) for t in self._qkv(x, pos))
        self.kc[:, :, :length].copy_(k)
        self.vc[:, :, :length].copy_(v)
        self.pos.fill_(length)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self._out(o.transpose(1, 2).reshape(b * length, m.num_q_heads, m.head_dim))

    @torch.no_grad()
    def step_eager(self, x, pos: int):
        q, k, v = self._qkv(x, torch.full((self.b,), pos, device=x.device))
        self.kc[:, :, pos].copy_(k)
        self.vc[:, :, pos].copy_(v)
        o = F.scaled_dot_product_attention(q[:, :, None], self.kc[:, :, :pos + 1], self.vc[:, :, :pos + 1],
                                           enable_gqa=True)
        return self._out(o[:, :, 0])

    @torch.no_grad()
    def step_masked(self, x):
        """The step a CUDA graph captures: position from self.pos (device), every key read, masked."""
        q, k, v = self._qkv(x, self.pos.expand(self.b))
        self.kc.index_copy_(2, self.pos, k[:, :, None])
        self.vc.index_copy_(2, self.pos, v[:, :, None])
        mask = (self.keys <= self.pos)[None, None, None, :]
        o = F.scaled_dot_product_attention(q[:, :, None], self.kc, self.vc, attn_mask=mask, enable_gqa=True)
        self.pos.add_(1)
        return self._out(o[:, :, 0])


def dense(module, batch: int, length: int, steps: int, mode: str, seed: int = 0) -> GenerateTiming:
    from experiments.decode_timing import graphed

    dev, dt = module.q_proj.weight.device, module.q_proj.weight.dtype
    gen = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(batch * length, module.hidden_size, device=dev, dtype=dt, generator=gen)
    xs = torch.randn(batch, module.hidden_size, device=dev, dtype=dt, generator=gen)
    layer = DenseLayer(module, batch, length + steps)
    state = {"pos": length, "graph": None, "y": None}

    def prefill():
        layer.prefill(x, length)
        state["pos"] = length
        if mode == "graph" and state["graph"] is None:
            def capture():
                state["y"] = layer.step_masked(xs)
            state["graph"] = graphed(capture)  # its warm-up calls moved pos: back to the prefill's
            layer.pos.fill_(length)

    def step():
        if mode == "graph":
            state["graph"]()
            return state["y"]
        y = layer.step_eager(xs, state["pos"])
        state["pos"] += 1
        return y

    _timed(prefill, step, steps)
    return _timed(prefill, step, steps)
