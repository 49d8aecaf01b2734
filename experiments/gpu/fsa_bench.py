"""FSA on the GPU in one call: fwd/bwd timings, a per-stage breakdown, and extra memory at the
issue's target points, printed beside the published kernels' times (results/targets or
../shared/targets). Its bf16 correctness and determinism checks are GPU tests:
`python -m pytest tests/ops/test_gpu_selected_checks.py -k fsa_bench`.

    python -m experiments.gpu.fsa_bench [--quick] [--gqa 1,4] [--seqlen 65536] [--indices nsa,random]
Writes $OUT/fsa_bench.csv (OUT defaults to ./out).
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
import triton

from experiments.gpu.provenance import out_dir, require_cuda, run_meta
from nsa_baseline.utils.indices import random_causal_block_indices

KV_HEADS, HEAD_DIM = 4, 128


def published():
    for base in (Path("results/targets"), Path("../shared/targets")):
        f = base / "upstream_fsa_vs_nsa_h100.csv"
        if f.exists():
            rows = list(csv.DictReader(open(f)))
            return {(int(r["gqa"]), int(r["seqlen"]), int(r["block"])): r for r in rows}
    return {}


def make_indices(kind, q, k, n, block, topk):
    if kind == "nsa":
        from nsa_baseline.reference import nsa_block_indices_ref

        return nsa_block_indices_ref(q, k, block_size=block, topk=topk)
    return random_causal_block_indices(n, KV_HEADS, topk, block, device="cuda")


def bench(fn):
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def run_point(impl, g, n, block, topk, kind):
    hq = g * KV_HEADS
    q = torch.randn(n, hq, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(n, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(n, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():
        idx = make_indices(kind, q, k, n, block, topk)
    do = torch.randn(n, hq, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    row = dict(impl=impl.__module__.split(".")[0], gqa=g, seqlen=n, block=block, topk=topk, indices=kind)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    o = impl(q, k, v, idx, block)
    torch.cuda.synchronize()
    row["fwd_peak_extra_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
    torch.cuda.synchronize()
    row["bwd_peak_extra_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
    row["fwd_ms"] = bench(lambda: impl(q, k, v, idx, block))
    row["bwd_ms"] = bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
    if impl.__module__.startswith("fsa"):
        row.update(stage_times(q, k, v, idx, block, topk, do))
    return row


def stage_times(q, k, v, idx, block, topk, do):
    from fsa.backward import fsa_selected_bwd
    from fsa.forward import fsa_selected_fwd
    from nsa_baseline.utils.block_index import build_block_index

    cu = torch.tensor([0, q.shape[0]], dtype=torch.int32, device="cuda")
    scale = q.shape[-1] ** -0.5
    index = build_block_index(idx, block, cu, k.shape[1])
    o, lse = fsa_selected_fwd(q, k, v, index, block, topk, scale)
    return dict(
        index_ms=bench(lambda: build_block_index(idx, block, cu, k.shape[1])),
        fwd_kernels_ms=bench(lambda: fsa_selected_fwd(q, k, v, index, block, topk, scale)),
        bwd_kernels_ms=bench(lambda: fsa_selected_bwd(q, k, v, o, lse, do, index, block, topk, scale)),
        pairs=int(index.row_offsets[-1]),
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gqa", default="1,2,4,8,16")
    ap.add_argument("--seqlen", default="8192,16384,32768,65536")
    ap.add_argument("--sparsity", default="64:16,128:8")
    ap.add_argument("--indices", default="nsa,random")
    ap.add_argument("--impls", default="fsa,nsa")
    args = ap.parse_args()
    require_cuda()
    impls = []
    for name in args.impls.split(","):
        try:
            impls.append(__import__(name if name == "fsa" else "nsa_baseline", fromlist=["selected_attention"]).selected_attention)
        except (ImportError, AttributeError) as e:
            print(f"skip {name}: {e}")
    pub = published()
    out, meta = out_dir(), run_meta()
    rows = []
    for kind in args.indices.split(","):
        for sp in args.sparsity.split(","):
            block, topk = map(int, sp.split(":"))
            for g in map(int, args.gqa.split(",")):
                for n in map(int, args.seqlen.split(",")):
                    for impl in impls:
                        try:
                            row = run_point(impl, g, n, block, topk, kind)
                        except Exception as e:  # record and go on
                            row = dict(impl=impl.__module__.split(".")[0], gqa=g, seqlen=n, block=block, topk=topk,
                                       indices=kind, error=repr(e)[:300])
                        p = pub.get((g, n, block))
                        if p:
                            row.update(pub_fsa_fwd=float(p["fsa_fwd_ms"]), pub_fsa_bwd=float(p["fsa_bwd_ms"]),
                                       pub_nsa_fwd=float(p["nsa_fwd_ms"]), pub_nsa_bwd=float(p["nsa_bwd_ms"]))
                        row.update(meta)
                        rows.append(row)
                        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k not in meta},
                              flush=True)
                        torch.cuda.empty_cache()
    keys = sorted({k for r in rows for k in r})
    with open(out / "fsa_bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print(meta)


if __name__ == "__main__":
    main()
