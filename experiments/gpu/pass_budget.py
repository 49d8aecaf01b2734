"""What the FSA partial-buffer budget costs: selected-attention fwd and fwd+bwd latency and peak extra
memory for several pass splits (fewer, bigger passes vs more, smaller ones; KV heads vs query heads),
and whether outputs and gradients are bitwise the same as the first variant's.

Variants: `auto` (the default budget), `b<GB>` (FSA_BUFFER_BUDGET_GB), `s<kv>x<q>` (a forced split:
kv KV heads and q query heads of each group per pass; `sHxG` is one pass).
    python -m experiments.gpu.pass_budget [--seqlen 65536,131072] [--variants auto,b2.5,sHxG]
Writes $OUT/pass_budget.csv (OUT defaults to ./out).
"""
from __future__ import annotations

import argparse
import os

import pandas as pd
import torch
import triton

from experiments.gpu.provenance import out_dir, require_cuda, run_meta
from fsa import tuning
from fsa.selected import selected_attention
from nsa_baseline.utils.indices import random_causal_block_indices

Q_HEADS, HEAD_DIM = 64, 128


def run(q, k, v, idx, block, do, backward):
    for t in (q, k, v):
        t.grad = None
    if not backward:
        with torch.no_grad():
            return (selected_attention(q, k, v, idx, block),)
    o = selected_attention(q, k, v, idx, block)
    o.backward(do)
    return o, q.grad, k.grad, v.grad


SPLIT = tuning.pass_split


def apply_variant(variant, h, g):
    os.environ.pop(tuning.BUDGET_ENV, None)
    tuning.pass_split = SPLIT
    if variant.startswith("b"):
        os.environ[tuning.BUDGET_ENV] = variant[1:]
    elif variant.startswith("s"):
        kv, q = (int(x.replace("H", str(h)).replace("G", str(g))) for x in variant[1:].split("x"))
        tuning.pass_split = lambda *_: (kv, q)
    elif variant != "auto":
        raise ValueError(f"variant {variant!r}: expected auto, b<GB> or s<kv>x<q>")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", default="65536,131072")
    ap.add_argument("--gqa", default="1,8")
    ap.add_argument("--presets", default="64x16,128x8")
    ap.add_argument("--variants", default="auto,b2.5,b8,sHxG")
    ap.add_argument("--passes", default="fwd,fwd+bwd")
    args = ap.parse_args()
    require_cuda()
    out, meta = out_dir(), run_meta()
    rows = []
    for n in map(int, args.seqlen.split(",")):
        for g in map(int, args.gqa.split(",")):
            for preset in args.presets.split(","):
                block, topk = map(int, preset.split("x"))
                h = Q_HEADS // g
                torch.manual_seed(0)
                q, k, v = (torch.randn(n, hh, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for hh in (Q_HEADS, h, h))
                do = torch.randn(n, Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                idx = random_causal_block_indices(n, h, topk, block, device="cuda")
                for pass_name in args.passes.split(","):
                    backward = pass_name == "fwd+bwd"
                    first = None
                    for variant in args.variants.split(","):
                        apply_variant(variant, h, g)
                        plan = tuning.launch_plan(q, k, block, topk, backward)
                        row = dict(**meta, seqlen=n, gqa=g, kv_heads=h, block=block, topk=topk,
                                   pass_name=pass_name, variant=variant,
                                   kv_heads_per_pass=plan.kv_heads_per_pass, heads_per_pass=plan.heads_per_pass)
                        try:
                            torch.cuda.synchronize()
                            torch.cuda.reset_peak_memory_stats()
                            base = torch.cuda.memory_allocated()
                            res = [t.detach().clone() for t in run(q, k, v, idx, block, do, backward)]
                            torch.cuda.synchronize()
                            row["peak_extra_gb"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)
                            if first is None:
                                first = res
                            row["bitwise_same_as_first"] = all(torch.equal(a, b) for a, b in zip(res, first))
                            row["nan"] = any(torch.isnan(t).any().item() for t in res)
                            del res
                            ms = triton.testing.do_bench(lambda: run(q, k, v, idx, block, do, backward),
                                                         warmup=50, rep=300)
                            row.update(ms=round(ms, 3), status="ok")
                        except torch.OutOfMemoryError as e:
                            row.update(status="oom", error=str(e).splitlines()[0][:120])
                            torch.cuda.empty_cache()
                        print(row, flush=True)
                        rows.append(row)
                    del first
                del q, k, v, do, idx
                torch.cuda.empty_cache()
    pd.DataFrame(rows).to_csv(out / "pass_budget.csv", index=False)  # columns in order of first appearance


if __name__ == "__main__":
    main()
