"""Where one NSA decode step's time goes: every CUDA kernel of module.attention's decode equivalent
(decode_append, the compressed-select kernel(s), the attend kernel), from torch.profiler over 50
graph replays, for each (B, L). Llama3-8B heads (32 / 8, d = 128), (64, 16), bf16.

    OUT=./out python -m experiments.gpu.decode_profile [--points 1:65536,8:65536]

Writes $OUT/decode_profile.csv (kernel, calls per step, mean us per step; GPU/torch/Triton/commit
on every row) and prints the table.
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from experiments.decode_timing import fill_cache, graphed
from experiments.gpu.decode_bench import BF16, D, H, HQ, bench_module, parse_points
from experiments.gpu.provenance import out_dir, print_table, require_cuda, run_meta, write_rows

REPLAYS = 50


def profile_point(module, b: int, length: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    from nsa_baseline.inference.decode import decode_attention

    cache = fill_cache(module, b, length)
    q = torch.randn(b, HQ, D, device="cuda", dtype=BF16)
    k, v = torch.randn(b, H, D, device="cuda", dtype=BF16), torch.randn(b, H, D, device="cuda", dtype=BF16)
    gates = torch.rand(b, HQ, 3, device="cuda", dtype=BF16)

    def attn():
        decode_attention(module, q, k, v, gates, cache)
        cache.lengths.sub_(1)

    replay = graphed(attn)
    for _ in range(10):
        replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPLAYS):
            replay()
        torch.cuda.synchronize()
    total, calls = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total[e.name] += e.device_time
            calls[e.name] += 1
    rows = [dict(B=b, L=length, kernel=name[:60], calls_per_step=calls[name] / REPLAYS,
                 us_per_step=f"{total[name] / REPLAYS:.2f}")
            for name in sorted(total, key=total.get, reverse=True)]
    rows.append(dict(B=b, L=length, kernel="(sum of kernels)", calls_per_step=sum(calls.values()) / REPLAYS,
                     us_per_step=f"{sum(total.values()) / REPLAYS:.2f}"))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", default="1:65536,8:65536", help="B:L pairs")
    args = ap.parse_args()
    require_cuda()

    out, meta = out_dir(), run_meta()
    module = bench_module()
    rows = []
    for b, length in parse_points(args.points):
        rows += profile_point(module, b, length)
    write_rows(out / "decode_profile.csv", rows, meta)
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
