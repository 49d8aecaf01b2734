"""GPU check of NSA's non-selected branches: correctness against the reference and fwd/bwd timings.

    OUT=./out python experiments/gpu/branches_check.py [--budget 200]

bf16, 4 KV heads, d = 128, G in {1, 4, 16}. Checks (relative error vs nsa_baseline.reference, fwd and
bwd at 8K incl. packed sequences, forward at 64K) and `triton.testing.do_bench` medians of
compress_kv, compressed_attention, selection (scores, top-T, select_blocks_from_compressed,
nsa_block_indices), sliding_window_attention (w = 512, beside the FlexAttention timings of
shared/targets/README.md) and SDPA full attention. Items run in priority order until the time budget is spent (FlexAttention
compiles once per shape); whatever is left is listed as skipped. Writes $OUT/branches_checks.csv and
$OUT/branches_timings.csv and prints both tables.
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

from nsa_baseline.ops.compressed import compressed_attention
from nsa_baseline.ops.compression import compress_kv
from nsa_baseline.ops.selection import (nsa_block_indices, select_blocks, select_blocks_from_compressed,
                                        selection_scores, selection_scores_fwd)
from nsa_baseline.ops.window import full_attention, sliding_window_attention
from nsa_baseline.reference.compressed import compressed_attention_ref, selection_scores_ref
from nsa_baseline.reference.compression import compress_kv as compress_kv_ref
from nsa_baseline.reference.selection import select_blocks_ref
from nsa_baseline.reference.window import full_attention_ref, sliding_window_attention_ref

H, D, WINDOW = 4, 128, 512
KS, STRIDE, BS, TOPK = 32, 16, 64, 16
BF16 = torch.bfloat16
TOL = 2e-2  # bf16 relative-error bound (tests/helpers.py)
# shared/targets/README.md: torch.compile(flex_attention), w=512, H100, (g, N) -> (fwd ms, bwd ms)
TARGET_WINDOW = {(1, 8192): (0.164, 0.341), (1, 65536): (0.354, 1.026), (4, 8192): (0.179, 0.540),
                 (4, 65536): (1.291, 4.196), (16, 8192): (0.649, 2.040), (16, 65536): (5.146, 16.04)}

CHECKS: list[dict] = []
TIMES: list[dict] = []


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    fin = torch.isfinite(ref)
    if not torch.equal(fin, torch.isfinite(out)) or not torch.equal(out[~fin], ref[~fin]):
        return float("inf")
    den = ref[fin].norm().item()
    num = (out[fin] - ref[fin]).norm().item()
    return num / den if den > 0 else num


def inputs(n, g, cu=None, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(n, H * g, D, device="cuda", dtype=BF16)
    k, v = torch.randn(n, H, D, device="cuda", dtype=BF16), torch.randn(n, H, D, device="cuda", dtype=BF16)
    return q, k, v, None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")


def grads(outs, ins, seed=1):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dos = [torch.randn(o.shape, generator=gen, device="cuda", dtype=o.dtype) for o in outs]
    return torch.autograd.grad(outs, ins, dos)


def record(op, n, g, layout, qty, err, tol=TOL, note=""):
    CHECKS.append(dict(op=op, N=n, G=g, HQ=H * g, layout=layout, quantity=qty, rel_err=f"{err:.3e}",
                       tol=tol, ok=bool(err <= tol), note=note))


def same_sets(a, b):
    return (a.sort(-1).values == b.sort(-1).values).all(-1).float().mean().item()


# ------------------------------------------------------------------------------------ checks


def check_all(n, g, cu=None, backward=True):
    layout = "single" if cu is None else "varlen"
    q, k, v, cu = inputs(n, g, cu)
    # compression (mean for k/v; learned weight once)
    kk = k.clone().requires_grad_()
    w = (torch.randn(KS * D, D, device="cuda") / 64).to(BF16).requires_grad_()
    pe = (torch.randn(KS, D, device="cuda") / 8).to(BF16).requires_grad_()
    for name, args in (("compress_kv_mean", ()), ("compress_kv_weight", (w, pe))):
        out, _ = compress_kv(kk, cu, KS, STRIDE, *args)
        ref, _ = compress_kv_ref(kk, cu, KS, STRIDE, *args)
        record(name, n, g, layout, "x_cmp", rel_err(out, ref))
        if backward:
            ins = (kk,) + tuple(args)
            for qty, a, b in zip(("dx", "dweight", "dpos_emb"), grads([out], ins), grads([ref], ins)):
                record(name, n, g, layout, qty, rel_err(a, b))
    # compressed attention
    k_cmp, cu_cmp = compress_kv(k, cu, KS, STRIDE)
    v_cmp, _ = compress_kv(v, cu, KS, STRIDE)
    qq, kc, vc = (t.detach().clone().requires_grad_(backward) for t in (q, k_cmp, v_cmp))
    o, lse = compressed_attention(qq, kc, vc, cu, cu_cmp, KS, STRIDE)
    ro, rlse = compressed_attention_ref(qq, kc, vc, cu, cu_cmp, KS, STRIDE)
    record("compressed_attention", n, g, layout, "o", rel_err(o, ro))
    record("compressed_attention", n, g, layout, "lse", rel_err(lse, rlse))
    if backward:
        for qty, a, b in zip(("dq", "dk_cmp", "dv_cmp"), grads([o], (qq, kc, vc)), grads([ro], (qq, kc, vc))):
            record("compressed_attention", n, g, layout, qty, rel_err(a, b))
    del o, ro, rlse
    # selection
    with torch.no_grad():
        s = selection_scores(q, k_cmp, lse.detach(), cu, cu_cmp, KS, STRIDE, BS)
        r = selection_scores_ref(q, k_cmp, lse.detach(), cu, cu_cmp, KS, STRIDE, BS)
        record("selection_scores", n, g, layout, "scores", rel_err(s, r), tol=5e-3)
        idx, ridx = select_blocks(s, cu, BS, TOPK), select_blocks_ref(r, cu, BS, TOPK)
        frac = same_sets(idx, ridx)
        record("select_blocks", n, g, layout, "rows with different block set", 1 - frac, tol=0.01,
               note="near-ties of bf16 scores may swap a block")
        from_cmp = select_blocks_from_compressed(q, k_cmp, cu, cu_cmp, KS, STRIDE, BS, TOPK, lse=lse.detach())
        record("select_blocks_from_compressed", n, g, layout, "rows with different block set",
               1 - same_sets(from_cmp, ridx), tol=0.01, note="given the FlexAttention lse")
        fused = nsa_block_indices(q, k, cu, KS, STRIDE, BS, TOPK)
        frac = same_sets(fused, ridx)
        record("nsa_block_indices", n, g, layout, "rows with different block set", 1 - frac, tol=0.01,
               note="in-kernel lse vs FlexAttention lse: near-ties")
        del s, r
    # sliding window (and full causal at <= 8K)
    for op in ("sliding_window_attention", "full_attention"):
        if op == "full_attention" and n > 8192:
            continue
        qq, kk2, vv = (t.detach().clone().requires_grad_(backward) for t in (q, k, v))
        if op == "full_attention":
            o = full_attention(qq, kk2, vv, cu)
            o2, lse2 = full_attention(qq, kk2, vv, cu, return_lse=True)
            ro, rlse = full_attention_ref(qq, kk2, vv, cu, return_lse=True)
        else:
            o = sliding_window_attention(qq, kk2, vv, WINDOW, cu)
            o2, lse2 = sliding_window_attention(qq, kk2, vv, WINDOW, cu, return_lse=True)
            ro, rlse = sliding_window_attention_ref(qq, kk2, vv, WINDOW, cu, return_lse=True)
        record(op, n, g, layout, "o", rel_err(o, ro))
        record(op, n, g, layout, "o (return_lse path)", rel_err(o2, ro))
        record(op, n, g, layout, "lse", rel_err(lse2, rlse))
        if backward:
            for qty, a, b in zip(("dq", "dk", "dv"), grads([o], (qq, kk2, vv)), grads([ro], (qq, kk2, vv))):
                record(op, n, g, layout, qty, rel_err(a, b))
        del o, o2, ro, rlse, lse2


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
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(wd) for c, wd in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(wd) for c, wd in zip(cols, widths)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=200.0, help="seconds; later items are skipped")
    args = ap.parse_args()
    out_dir = os.environ.get("OUT", "./out")
    os.makedirs(out_dir, exist_ok=True)
    torch._functorch.config.donated_buffer = False  # repeated backward on one graph (do_bench)
    t_start = time.time()
    plan = [  # priority order (FlexAttention compiles once per shape: ~10-30 s per new item)
        ("check", dict(n=8192, g=4)),
        ("time", dict(n=65536, g=1)), ("time", dict(n=65536, g=4)), ("time", dict(n=65536, g=16)),
        ("check", dict(n=8192, g=4, cu=[0, 3000, 3010, 3100, 8192])),
        ("time", dict(n=8192, g=1)), ("time", dict(n=8192, g=4)), ("time", dict(n=8192, g=16)),
        ("check", dict(n=65536, g=4, backward=False)),
        ("check", dict(n=8192, g=16)),
        ("check", dict(n=8192, g=1)),
        ("check", dict(n=65536, g=16, backward=False)),
        ("tune", dict(n=65536, g=4)), ("tune", dict(n=65536, g=16)), ("tune", dict(n=65536, g=1)),
    ]
    skipped = []
    for kind, cfg in plan:
        if time.time() - t_start > args.budget:
            skipped.append(f"{kind} {cfg}")
            continue
        t0 = time.time()
        try:
            dict(check=check_all, time=time_all, tune=tune_selection)[kind](**cfg)
        except Exception as e:  # keep going: one broken item must not hide the others
            traceback.print_exc()
            CHECKS.append(dict(op=f"{kind} {cfg}", quantity="ERROR", rel_err="", ok=False,
                               note=f"{type(e).__name__}: {str(e)[:200]}"))
        torch.cuda.empty_cache()
        print(f"[{time.time() - t_start:6.1f}s] {kind} {cfg} done in {time.time() - t0:.1f}s", flush=True)
    write(os.path.join(out_dir, "branches_checks.csv"), CHECKS)
    write(os.path.join(out_dir, "branches_timings.csv"), TIMES)
    print(f"\n== correctness (bf16, H={H}, D={D}; ok = rel_err <= tol) ==")
    show(CHECKS, ["op", "N", "G", "layout", "quantity", "rel_err", "tol", "ok", "note"])
    print("\n== timings (do_bench median ms; target = FlexAttention w=512 from shared/targets/README.md, "
          "vs_target = ours / target, fwd / bwd) ==")
    show(TIMES, ["op", "N", "G", "HQ", "fwd_ms", "bwd_ms", "fwd_peak_gb", "target_fwd_ms", "target_bwd_ms",
                 "vs_target", "note"])
    bad = [c for c in CHECKS if not c.get("ok")]
    print(f"\n{len(CHECKS) - len(bad)}/{len(CHECKS)} checks ok; skipped for time: {skipped or 'none'}")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"total {time.time() - t_start:.0f}s; CSVs in {out_dir}")


if __name__ == "__main__":
    main()
