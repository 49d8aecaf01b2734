"""Selected attention replayed from CUDA graphs vs eager, at the small N where FSA is host-bound.

    python -m experiments.gpu.graph_replay [--gqa 1,2,4] [--seqlen 8192,16384] [--kernels fsa,nsa,sdpa]

Below ~16K tokens an eager FSA call costs ~0.5 ms of host launches, more than dense FlashAttention's
whole forward. Training loops that capture the step in CUDA graphs pay the launches once; this times
each kernel's fwd and fwd+bwd both ways (torch.cuda.make_graphed_callables; do_bench medians, the
same inputs), checks that the replay reproduces the eager output, and writes $OUT/graph_replay.csv
(OUT defaults to ./out) with GPU, torch, Triton and git commit.
"""
from __future__ import annotations

import argparse
import gc
import itertools

import pandas as pd
import torch
import triton

import fsa
import nsa_baseline
from experiments.gpu.provenance import out_dir, require_cuda, run_meta
from nsa_baseline.ops.window import full_attention
from nsa_baseline.reference import nsa_block_indices_ref

KV_HEADS, HEAD_DIM = 4, 128


def family(name: str, idx: torch.Tensor, block: int):
    if name == "sdpa":  # the library's dense baseline: FlashAttention through 4-D SDPA
        return full_attention
    fn = {"fsa": fsa.selected_attention, "nsa": nsa_baseline.selected_attention}[name]
    return lambda q, k, v: fn(q, k, v, idx, block, check_indices=False)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def measure(name: str, g: int, n: int, block: int, topk: int) -> dict:
    q = torch.randn(n, g * KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(n, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    with torch.no_grad():
        idx = nsa_block_indices_ref(q, k, block_size=block, topk=topk)
    call = family(name, idx, block)
    do = torch.randn_like(q)
    graphed = torch.cuda.make_graphed_callables(call, (q, k, v))
    with torch.no_grad():
        same = bool(torch.equal(graphed(q, k, v), call(q, k, v)))

    def step(fn):
        def run():
            torch.autograd.grad(fn(q, k, v), (q, k, v), do)
        return run

    row = dict(kernel=name, gqa=g, seqlen=n, block_size=block, topk=topk, replay_equals_eager=same)
    with torch.no_grad():
        row.update(eager_fwd_ms=bench(lambda: call(q, k, v)), graph_fwd_ms=bench(lambda: graphed(q, k, v)))
    row.update(eager_fwd_bwd_ms=bench(step(call)), graph_fwd_bwd_ms=bench(step(graphed)))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gqa", default="1,2,4")
    ap.add_argument("--seqlen", default="8192,16384")
    ap.add_argument("--sparsity", default="64:16")
    ap.add_argument("--kernels", default="fsa,nsa,sdpa")
    args = ap.parse_args()
    require_cuda()
    meta, out = run_meta(), out_dir()
    rows = []
    for sp, g, n, name in itertools.product(args.sparsity.split(","), map(int, args.gqa.split(",")),
                                            map(int, args.seqlen.split(",")), args.kernels.split(",")):
        block, topk = map(int, sp.split(":"))
        try:
            rows.append(dict(measure(name, g, n, block, topk), **meta))
        except Exception as exc:  # noqa: BLE001 - record and go on (e.g. a call that cannot be captured)
            rows.append(dict(kernel=name, gqa=g, seqlen=n, block_size=block, topk=topk,
                             error=f"{type(exc).__name__}: {exc}"[:300], **meta))
        gc.collect()  # drop this case's graphs: their private memory pools stay reserved otherwise
        torch.cuda.empty_cache()
        print({k: v for k, v in rows[-1].items() if k not in meta}, flush=True)
        pd.DataFrame(rows).to_csv(out / "graph_replay.csv", index=False)


if __name__ == "__main__":
    main()
