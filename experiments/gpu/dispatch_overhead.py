"""Host-side cost of fsa.auto's dispatch: fsa vs auto (and nsa) at small N, interleaved, in one process.

    python -m experiments.gpu.dispatch_overhead
Prints do_bench medians (GPU events) and host microseconds per call (perf_counter over 200 calls,
one synchronize at the end) for fwd and fwd+bwd; at 8K FSA is host-bound, so host time is what counts.
"""
from __future__ import annotations

import time

import torch
import triton

from experiments.gpu.provenance import require_cuda
import fsa
import nsa_baseline
from fsa import auto
from nsa_baseline.utils.indices import random_causal_block_indices


def host_us(fn, calls=200):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def main():
    require_cuda()
    for n, g, bs, t_sel in ((8192, 1, 64, 16), (16384, 1, 64, 16), (8192, 2, 128, 8)):
        q = torch.randn(n, 4 * g, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(n, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(n, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        idx = random_causal_block_indices(n, 4, t_sel, bs, device="cuda")
        do = torch.randn_like(q)
        fns = {"fsa": fsa.selected_attention, "auto": auto.selected_attention, "nsa": nsa_baseline.selected_attention}
        for rep in range(2):
            for name, fn in fns.items():
                fwd = lambda: fn(q, k, v, idx, bs)  # noqa: E731
                both = lambda: torch.autograd.grad(fn(q, k, v, idx, bs), (q, k, v), do)  # noqa: E731
                print(f"N={n} g={g} ({bs},{t_sel}) rep{rep} {name:5s} fwd {triton.testing.do_bench(fwd):.3f} ms "
                      f"host {host_us(fwd):.0f} us | fwd+bwd {triton.testing.do_bench(both):.3f} ms "
                      f"host {host_us(both):.0f} us", flush=True)


if __name__ == "__main__":
    main()
