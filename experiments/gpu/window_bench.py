"""Sliding-window attention on the GPU in one call: our Triton kernels (nsa_baseline.ops.window_triton)
against the FlexAttention path (nsa_baseline.ops.window, what the module runs today) and the
reference, then fwd and fwd+bwd timings of both.

    python -m experiments.gpu.window_bench [--budget 130]

Tasks, in priority order, each started only while --budget seconds are not spent (Flex compiles
once per shape, ~10-30 s; our kernels once per G and config, a few s); whatever the budget cuts is
listed as skipped (--budget 600 runs all):
1. bf16 check at 16K (G = 4 over packed sequences; G = 16 and G = 3 with a window of 100 in 3.):
   o, lse, dq, dk, dv vs Flex (gradients through o) and vs `sliding_window_attention_ref` (on fp32
   copies; through o and lse), and a bitwise-deterministic backward.
2. Timings (`triton.testing.do_bench` medians, bf16, d = 128, 64 query heads, window 512, one
   sequence, G = 1, 4, 16 -> KV heads = 64 / G) at 64K: ours (default config), then Flex, then the
   other named configs of window_triton.CHOICES (G = 1 and 16). TFLOP/s against 4 * D * (visible
   keys summed over queries) per query head forward, 3.5x that for fwd+bwd.
3. Ours at 16K, the checks G = 16 and G = 3 (window 100, packed), Flex at 16K.
Writes window_bench_{checks,timings}.csv with GPU, torch, Triton and commit under $OUT (else ./out)
and prints the tables; exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback

import torch

from experiments.gpu.compressed_bench import rel_err
from experiments.gpu.provenance import out_dir, print_table, require_cuda, run_meta, write_rows

HQ, D, WINDOW = 64, 128, 512
BF16 = torch.bfloat16
DEVICE = "cuda"
TOL = 2e-2  # tests/helpers.py, bf16
START = time.time()


def make_inputs(n, h, g, cu=None, seed=0, dtype=BF16):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(n, heads, D, device=DEVICE, generator=gen).to(dtype) for heads in (h * g, h, h))
    return q, k, v, cu


def visible_pairs(n, cu, window) -> int:
    """Sum over queries of the keys each sees (per query head)."""
    lens = [n] if cu is None else [b - a for a, b in zip(cu[:-1], cu[1:])]
    return sum(sum(min(t + 1, window) for t in range(length)) for length in lens)


# ------------------------------------------------------------------------------------ checks

def check(rows, name, n, h, g, window, cu):
    from nsa_baseline.ops.window import sliding_window_attention as flex
    from nsa_baseline.ops.window_triton import sliding_window_attention_triton as ours
    from nsa_baseline.reference.window import sliding_window_attention_ref as ref

    q, k, v, cu_t = make_inputs(n, h, g, cu)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = ours(*ins, window, cu_t, return_lse=True)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    do = torch.randn(o.shape, device=DEVICE, generator=gen).to(BF16)
    dlse = torch.randn(lse.shape, device=DEVICE, generator=gen)
    for other, fn in (("flex", flex), ("ref", ref)):
        dtype = torch.float32 if other == "ref" else BF16
        oin = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        ro, rlse = fn(*oin, window, cu_t, return_lse=True)
        if other == "ref":  # gradients through o and lse
            ga = torch.autograd.grad([o, lse], ins, [do, dlse], retain_graph=True)
            gb = torch.autograd.grad([ro, rlse], oin, [do.float(), dlse])
        else:  # through o only (Flex's lse gradient is not what is compared here)
            ga = torch.autograd.grad(o, ins, do, retain_graph=True)
            gb = torch.autograd.grad(ro, oin, do)
        for qty, a, b in [("o", o, ro), ("lse", lse, rlse)] + list(zip(("dq", "dk", "dv"), ga, gb)):
            err = rel_err(a, b)
            rows.append(dict(case=name, N=n, H=h, G=g, W=window, vs=other, quantity=qty, rel_err=f"{err:.3e}",
                             tol=TOL, ok=err <= TOL))
        del ro, rlse, oin, ga, gb
    g1 = torch.autograd.grad(o, ins, do, retain_graph=True)
    g2 = torch.autograd.grad(o, ins, do)
    rows.append(dict(case=name, N=n, H=h, G=g, W=window, vs="itself", quantity="bitwise equal backward",
                     rel_err="", tol="", ok=all(torch.equal(a, b) for a, b in zip(g1, g2))))


CHECKS = {  # name: (N, H, G, window, cu_seqlens)
    "g4-varlen": (16384, 4, 4, WINDOW, [0, 3000, 3010, 3011, 9000, 16384]),
    "g16": (16384, 1, 16, WINDOW, None),
    "g3-w100-varlen": (16384, 2, 3, 100, [0, 5000, 5000, 16384]),
}


# ----------------------------------------------------------------------------------- timings

def bench(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def time_point(rows, n, g, impl: str, config=None):
    from nsa_baseline.ops.window import sliding_window_attention as flex
    from nsa_baseline.ops.window_triton import sliding_window_attention_triton

    h = HQ // g
    q, k, v, cu = make_inputs(n, h, g)
    fn = flex if impl == "flex" else lambda *a: sliding_window_attention_triton(*a, config=config)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    do = torch.randn_like(q)
    t0 = time.time()
    # forward timed on inputs that need gradients: how training calls it (and Flex compiles no
    # second, no-grad graph)
    fwd = bench(lambda: fn(*ins, WINDOW, cu))
    fb = bench(lambda: torch.autograd.grad(fn(*ins, WINDOW, cu), ins, do))
    flops_fwd = 4 * D * visible_pairs(n, None, WINDOW) * HQ
    row = dict(impl=impl, config=config or ("default" if impl == "triton" else ""), N=n, HQ=HQ, H=h, G=g,
               D=D, W=WINDOW, fwd_ms=f"{fwd:.3f}", fwd_bwd_ms=f"{fb:.3f}",
               fwd_tflops=f"{flops_fwd / fwd * 1e-9:.1f}", fwd_bwd_tflops=f"{3.5 * flops_fwd / fb * 1e-9:.1f}",
               wall_s=f"{time.time() - t0:.1f}")
    rows.append(row)
    print(f"  {impl:6s} {row['config']:8s} N={n:6d} G={g:2d} fwd {fwd:8.3f} ms  fwd+bwd {fb:8.3f} ms  "
          f"({row['fwd_tflops']} / {row['fwd_bwd_tflops']} TFLOP/s)", flush=True)
    del q, k, v, ins, do
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------- main

def tasks():
    """(label, run(checks, times)) in priority order: what the budget cuts comes last."""
    from nsa_baseline.ops.window_triton import CHOICES

    def chk(name):
        return f"check {name}", lambda c, t: check(c, name, *CHECKS[name])

    def tim(n, g, impl, config=None):
        return (f"time {impl}{' ' + config if config else ''} N={n} G={g}",
                lambda c, t: time_point(t, n, g, impl, config))

    out = [chk("g4-varlen")]
    out += [tim(65536, g, "triton") for g in (1, 4, 16)]
    out += [tim(65536, g, "flex") for g in (1, 4, 16)]
    out += [tim(65536, g, "triton", name) for g in (1, 16) for name in CHOICES if name != "default"]
    out += [tim(16384, g, "triton") for g in (1, 4, 16)]
    out += [chk("g16"), chk("g3-w100-varlen")]
    out += [tim(16384, g, "flex") for g in (1, 4, 16)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=130.0,
                    help="seconds: no new task starts after this (one task takes up to ~30 s)")
    args = ap.parse_args()
    require_cuda()
    out = out_dir()
    meta = run_meta()
    print(f"window_bench on {meta['gpu']}, torch {meta['torch']}, Triton {meta['triton']}, "
          f"commit {meta['git_commit']}", flush=True)
    checks, times, skipped = [], [], []
    for label, run in tasks():
        if time.time() - START > args.budget:
            skipped.append(label)
            continue
        print(f"== {label} ({time.time() - START:.0f} s)", flush=True)
        try:
            run(checks, times)
        except Exception:  # noqa: BLE001 - report it and go on with the next task
            traceback.print_exc()
            skipped.append(f"{label} (error)")
            if label.startswith("check"):
                checks.append(dict(case=label, quantity="exception", ok=False))
        torch.cuda.empty_cache()

    write_rows(out / "window_bench_checks.csv", checks, meta)
    write_rows(out / "window_bench_timings.csv", times, meta)
    print("\n== checks (rel_err = ||out - other|| / ||other||)")
    print_table(checks)
    bad = [r for r in checks if not r["ok"]]
    print(f"checks: {len(checks) - len(bad)}/{len(checks)} ok" + (" -- FAILURES above" if bad else ""))
    print(f"\n== timings (bf16, d={D}, {HQ} query heads, window {WINDOW}, one sequence; do_bench medians)")
    print_table(times)
    speedups = []
    for r in times:
        flex = [f for f in times if f["impl"] == "flex" and (f["N"], f["G"]) == (r["N"], r["G"])]
        if r["impl"] == "triton" and flex:
            speedups.append(dict(N=r["N"], G=r["G"], config=r["config"],
                                 fwd_speedup=f"{float(flex[0]['fwd_ms']) / float(r['fwd_ms']):.2f}x",
                                 fwd_bwd_speedup=f"{float(flex[0]['fwd_bwd_ms']) / float(r['fwd_bwd_ms']):.2f}x"))
    if speedups:
        print("\n== Triton vs Flex (Flex time / Triton time)")
        print_table(speedups)
    if skipped:
        print("\nskipped (budget or error):", ", ".join(skipped))
    print(f"wrote {out}/window_bench_*.csv in {time.time() - START:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
