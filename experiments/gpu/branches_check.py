"""GPU timings of NSA's non-selected branches (their correctness checks against the reference are GPU
tests: `python -m pytest tests/ops/test_gpu_branch_checks.py`).

    OUT=./out python -m experiments.gpu.branches_check [--budget 200]

bf16, 4 KV heads, d = 128, G in {1, 4, 16}, N 8K and 64K: `triton.testing.do_bench` medians of
compress_kv, compressed_attention, selection (scores, top-T, select_blocks_from_compressed,
nsa_block_indices), sliding_window_attention (w = 512, beside the FlexAttention timings of
shared/targets/README.md) and SDPA full attention, then launch configurations of the scores kernel.
Items run in priority order until the time budget is spent (FlexAttention compiles once per shape);
whatever is left is listed as skipped. Writes $OUT/branches_timings.csv and prints the table.
"""
from __future__ import annotations

import argparse
import csv
import os
import time
import traceback

import torch
import torch._functorch.config
import triton

from experiments.gpu.provenance import require_cuda
from nsa_baseline.ops.compressed import compressed_attention
from nsa_baseline.ops.compression import compress_kv
from nsa_baseline.ops.selection import (nsa_block_indices, select_blocks, select_blocks_from_compressed,
                                        selection_scores, selection_scores_fwd)
from nsa_baseline.ops.window import full_attention, sliding_window_attention

H, D, WINDOW = 4, 128, 512
KS, STRIDE, BS, TOPK = 32, 16, 64, 16
BF16 = torch.bfloat16
# shared/targets/README.md: torch.compile(flex_attention), w=512, H100, (g, N) -> (fwd ms, bwd ms)
TARGET_WINDOW = {(1, 8192): (0.164, 0.341), (1, 65536): (0.354, 1.026), (4, 8192): (0.179, 0.540),
                 (4, 65536): (1.291, 4.196), (16, 8192): (0.649, 2.040), (16, 65536): (5.146, 16.04)}

TIMES: list[dict] = []


def inputs(n, g, cu=None, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(n, H * g, D, device="cuda", dtype=BF16)
    k, v = torch.randn(n, H, D, device="cuda", dtype=BF16), torch.randn(n, H, D, device="cuda", dtype=BF16)
    return q, k, v, None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")


# ----------------------------------------------------------------------------------- timings


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def peak_gb(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def time_fwd_bwd(op, n, g, fwd, ins, note="", target=(None, None)):
    """fwd() -> output tensor (or tuple whose first element is differentiated); bwd timed alone."""
    fwd_ms = bench(fwd)
    mem = peak_gb(fwd)
    bwd_ms = None
    if ins:
        out = fwd()
        o = out[0] if isinstance(out, tuple) else out
        do = torch.randn_like(o)
        bwd_ms = bench(lambda: torch.autograd.grad(o, ins, do, retain_graph=True))
        del out, o, do
    TIMES.append(dict(op=op, N=n, G=g, HQ=H * g, fwd_ms=f"{fwd_ms:.3f}",
                      bwd_ms="" if bwd_ms is None else f"{bwd_ms:.3f}", fwd_peak_gb=f"{mem:.2f}",
                      target_fwd_ms="" if target[0] is None else target[0],
                      target_bwd_ms="" if target[1] is None else target[1],
                      vs_target="" if target[0] is None else
                      f"{fwd_ms / target[0]:.2f}x / {'' if bwd_ms is None else f'{bwd_ms / target[1]:.2f}x'}",
                      note=note))


def time_all(n, g):
    q, k, v, _ = inputs(n, g)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    time_fwd_bwd("sliding_window_attention", n, g, lambda: sliding_window_attention(qg, kg, vg, WINDOW),
                 (qg, kg, vg), note="w=512 FlexAttention", target=TARGET_WINDOW.get((g, n), (None, None)))
    k_cmp, cu_cmp = compress_kv(k)
    v_cmp, _ = compress_kv(v)
    kc, vc = k_cmp.clone().requires_grad_(), v_cmp.clone().requires_grad_()
    time_fwd_bwd("compressed_attention", n, g, lambda: compressed_attention(qg, kc, vc, None, None),
                 (qg, kc, vc))
    _, lse = compressed_attention(q, k_cmp, v_cmp, None, None)
    time_fwd_bwd("selection_scores", n, g, lambda: selection_scores(q, k_cmp, lse, None, None, KS, STRIDE, BS),
                 (), note="[N, H, NB] fp32 out")
    scores = selection_scores(q, k_cmp, lse, None, None, KS, STRIDE, BS)
    time_fwd_bwd("select_blocks", n, g, lambda: select_blocks(scores, None, BS, TOPK), (), note="top-16")
    del scores
    time_fwd_bwd("select_blocks_from_compressed", n, g,
                 lambda: select_blocks_from_compressed(q, k_cmp, None, None, KS, STRIDE, BS, TOPK, lse=lse), (),
                 note="given lse: scores + top-16, chunked")
    time_fwd_bwd("nsa_block_indices", n, g, lambda: nsa_block_indices(q, k, None, KS, STRIDE, BS, TOPK), (),
                 note="compress + in-kernel lse + scores + top-16, chunked")
    time_fwd_bwd("compress_kv_mean", n, g, lambda: compress_kv(kg)[0], (kg,), note="k only")
    w = (torch.randn(KS * D, D, device="cuda") / 64).to(BF16).requires_grad_()
    pe = torch.zeros(KS, D, device="cuda", dtype=BF16, requires_grad=True)
    time_fwd_bwd("compress_kv_weight", n, g, lambda: compress_kv(kg, None, KS, STRIDE, w, pe)[0], (kg, w, pe),
                 note="k only")
    time_fwd_bwd("full_attention_sdpa", n, g, lambda: full_attention(qg, kg, vg), (qg, kg, vg),
                 note="dense causal SDPA, for scale")


SCORE_CONFIGS = [dict(rows=64, summaries=64, num_warps=4, num_stages=2),  # the default
                 dict(rows=128, summaries=64, num_warps=8, num_stages=2),
                 dict(rows=64, summaries=32, num_warps=4, num_stages=3),
                 dict(rows=128, summaries=32, num_warps=4, num_stages=2)]


def tune_selection(n, g):
    """Scores-kernel launch configurations (no spills on sm_90 per ptxas), given lse and in-kernel lse."""
    q, k, _, _ = inputs(n, g)
    k_cmp, cu_cmp = compress_kv(k)
    _, lse = compressed_attention(q, k_cmp, k_cmp, None, None)
    cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    tok_seq = torch.zeros(n, dtype=torch.int32, device="cuda")
    nb = triton.cdiv(n, BS)
    out = torch.empty(n, H, nb, dtype=torch.float32, device="cuda")
    for cfg in SCORE_CONFIGS:
        for name, l in (("selection_scores", lse), ("selection_scores(+lse)", None)):
            ms = bench(lambda: selection_scores_fwd(q, k_cmp, l, cu, cu_cmp, tok_seq, 0, n, nb, D ** -0.5,
                                                    KS, STRIDE, BS, out=out, config=cfg))
            TIMES.append(dict(op=f"tune {name}", N=n, G=g, HQ=H * g, fwd_ms=f"{ms:.3f}",
                              note=" ".join(f"{k2}={v2}" for k2, v2 in cfg.items())))


# ------------------------------------------------------------------------------------- main


def write(path, rows):
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def show(rows, cols):
    if not rows:  # nothing timed (budget spent, or every item failed)
        print("  (none)")
        return
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(wd) for c, wd in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(wd) for c, wd in zip(cols, widths)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=200.0, help="seconds; later items are skipped")
    args = ap.parse_args()
    require_cuda()
    out_dir = os.environ.get("OUT", "./out")
    os.makedirs(out_dir, exist_ok=True)
    torch._functorch.config.donated_buffer = False  # repeated backward on one graph (do_bench)
    t_start = time.time()
    plan = [  # priority order (FlexAttention compiles once per shape: ~10-30 s per new item)
        ("time", dict(n=65536, g=1)), ("time", dict(n=65536, g=4)), ("time", dict(n=65536, g=16)),
        ("time", dict(n=8192, g=1)), ("time", dict(n=8192, g=4)), ("time", dict(n=8192, g=16)),
        ("tune", dict(n=65536, g=4)), ("tune", dict(n=65536, g=16)), ("tune", dict(n=65536, g=1)),
    ]
    skipped, failed = [], []
    for kind, cfg in plan:
        if time.time() - t_start > args.budget:
            skipped.append(f"{kind} {cfg}")
            continue
        t0 = time.time()
        try:
            dict(time=time_all, tune=tune_selection)[kind](**cfg)
        except Exception as e:  # keep going: one broken item must not hide the others
            traceback.print_exc()
            failed.append(f"{kind} {cfg}: {type(e).__name__}: {str(e)[:200]}")
        torch.cuda.empty_cache()
        print(f"[{time.time() - t_start:6.1f}s] {kind} {cfg} done in {time.time() - t0:.1f}s", flush=True)
    write(os.path.join(out_dir, "branches_timings.csv"), TIMES)
    print("\n== timings (do_bench median ms; target = FlexAttention w=512 from shared/targets/README.md, "
          "vs_target = ours / target, fwd / bwd) ==")
    show(TIMES, ["op", "N", "G", "HQ", "fwd_ms", "bwd_ms", "fwd_peak_gb", "target_fwd_ms", "target_bwd_ms",
                 "vs_target", "note"])
    print(f"\nfailed: {failed or 'none'}; skipped for time: {skipped or 'none'}")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"total {time.time() - t_start:.0f}s; CSVs in {out_dir}")


if __name__ == "__main__":
    main()
