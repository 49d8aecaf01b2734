"""Chunked prefill: one call of c new tokens against a cache of L tokens (one slot), NSA through the
decode kernels (every new token a row of their batch at its own position) against the PyTorch path
the kernels replaced and dense SDPA.

    python -m experiments.gpu.chunk_bench [--lengths 16384,65536] [--chunks 16,256,2048] [--page-size 64] [--profile]

Llama3-8B heads (32 query / 8 KV, d = 128), the (64, 16) preset, bf16, FSA backend; the cache holds
L random tokens and summaries (timing only: tests/inference checks the maths). Timed (do_bench
medians) between the projections, as the cache call runs it: writing the c keys / values and the
summaries they complete, the attention, the lengths (inference.step.attend_with_cache; each call
gives the length back). `pytorch` is skipped where its gathers would pass --torch-max-tokens.
Dense: SDPA of the c queries over the L + c keys, causal from the bottom right (enable_gqa).
Writes chunk_bench.csv (GPU, torch, Triton, commit on every row) under $OUT (else ./out).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from experiments import decode_timing as timing
from experiments.gpu.decode_bench import BF16, D, H, HQ, bench_module
from experiments.gpu.provenance import out_dir, print_table, require_cuda, run_meta, write_rows

START = time.time()
DEV, DTYPE = "cuda", BF16  # the CPU smoke test (tests/experiments/test_chunk_bench.py) swaps these


def print_profile(label: str, fn, calls: int = 5) -> None:
    """torch.profiler's table of `calls` calls of fn (CUDA time per kernel, host time per op)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    print(f"== profile {label}, {calls} calls")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


def time_point(rows, module, length: int, chunk: int, page_size, torch_max: int, profile: bool = False) -> None:
    from torch.nn.attention.bias import causal_lower_right

    from nsa_baseline.inference.plan import plan_counts
    from nsa_baseline.inference.step import attend_with_cache

    hq, h, d = module.num_q_heads, module.num_kv_heads, module.head_dim
    base = dict(L=length, chunk=chunk, HQ=hq, H=h, D=d, dtype=str(DTYPE).replace("torch.", ""),
                page_size=page_size or 0)
    cache = timing.fill_cache(module, 1, length + chunk + 1, page_size)
    cache.set_lengths([length])
    q = torch.randn(chunk, hq, d, device=DEV, dtype=DTYPE)
    k, v = (torch.randn(chunk, h, d, device=DEV, dtype=DTYPE) for _ in range(2))
    gates = torch.rand(chunk, hq, 3, device=DEV, dtype=DTYPE)
    plan = plan_counts([chunk], cache, q.device)

    def call(kernels: bool):
        def run():
            attend_with_cache(module, q, k, v, gates, plan, cache, decode_kernels=kernels)
            cache.set_lengths([length])
        return run

    ways = [("nsa_kernels", call(True))]
    if chunk * length <= torch_max:
        ways.append(("nsa_pytorch", call(False)))
    else:
        rows.append(dict(base, impl="nsa_pytorch", status=f"skipped: chunk * L > --torch-max-tokens {torch_max}"))
    qd = q.transpose(0, 1)[None]  # [1, HQ, c, D]
    kd, vd = (torch.randn(1, h, length + chunk, d, device=DEV, dtype=DTYPE) for _ in range(2))
    mask = causal_lower_right(chunk, length + chunk)
    ways.append(("sdpa", lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=True)))
    for impl, fn in ways:
        if profile and impl == "nsa_kernels":
            print_profile(f"L={length} chunk={chunk} {impl}", fn)
        ms = timing.bench(fn)[1]
        rows.append(dict(base, impl=impl, ms=f"{ms:.4f}", us_per_token=f"{1e3 * ms / chunk:.2f}", status="ok"))
        print(f"  L={length:6d} chunk={chunk:5d} {impl:<12} {ms:9.4f} ms  ({time.time() - START:.0f} s)", flush=True)
    del cache, kd, vd
    if DEV == "cuda":
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="16384,65536")
    ap.add_argument("--chunks", default="16,256,2048")
    ap.add_argument("--page-size", type=int, default=None, help="a paged cache (pages of this many rows)")
    ap.add_argument("--torch-max-tokens", type=int, default=1 << 24,
                    help="skip the PyTorch path where chunk * L is larger (its gathers grow with both)")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables of the kernel path")
    args = ap.parse_args()
    require_cuda()

    out, meta = out_dir(), run_meta()
    print(f"chunk_bench on {meta['gpu']}, torch {meta['torch']}, Triton {meta['triton']}, commit {meta['git_commit']}",
          flush=True)
    module = bench_module()
    rows = []
    for length in (int(s) for s in args.lengths.split(",")):
        for chunk in (int(s) for s in args.chunks.split(",")):
            time_point(rows, module, length, chunk, args.page_size, args.torch_max_tokens, args.profile)
    write_rows(out / "chunk_bench.csv", rows, meta)
    print_table(rows)
    print(f"wrote {out}/chunk_bench.csv in {time.time() - START:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
