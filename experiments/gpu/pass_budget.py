"""What the FSA partial-buffer budget costs: selected-attention fwd and fwd+bwd latency and peak extra
memory for several FSA_BUFFER_BUDGET_GB values (fewer, bigger passes vs more, smaller ones), and a
check that the outputs and gradients are bitwise the same whatever the pass split.

    python -m experiments.gpu.pass_budget [--seqlen 65536,131072] [--budgets 2.5,8,1000]
Writes $OUT/pass_budget.csv (OUT defaults to ./out).
"""
from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import torch
import triton

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", default="65536,131072")
    ap.add_argument("--gqa", default="1,8")
    ap.add_argument("--presets", default="64x16,128x8")
    ap.add_argument("--budgets", default="2.5,8,1000")
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", "out"))
    out_dir.mkdir(parents=True, exist_ok=True)
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
                for backward in (False, True):
                    first = None
                    for budget in args.budgets.split(","):
                        os.environ[tuning.BUDGET_ENV] = budget
                        plan = tuning.launch_plan(q, k, block, topk, backward)
                        row = dict(seqlen=n, gqa=g, kv_heads=h, block=block, topk=topk,
                                   pass_name="fwd+bwd" if backward else "fwd", budget_gb=budget,
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
    keys = sorted({key for r in rows for key in r}, key=lambda x: list(rows[0]).index(x) if x in rows[0] else 99)
    with open(out_dir / "pass_budget.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
