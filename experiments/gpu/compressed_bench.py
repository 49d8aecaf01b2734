"""Compressed attention on the GPU in one call: the Triton kernels (nsa_baseline.ops.compressed_triton)
against the reference and the FlexAttention path, then fwd and fwd+bwd timings of both.

    python -m experiments.gpu.compressed_bench [--budget 230]

Tasks, in priority order, each started only while --budget seconds are not spent (Flex compiles
once per shape, ~10-30 s); whatever the budget cuts is listed as skipped (--budget 600 runs all):
1. bf16 check at 8K (G = 4, packed): o, lse, dq, dk, dv vs `compressed_attention_ref` (fp32 maths;
   gradients through o and lse) and vs the Flex path (`compressed_attention`; through o), and a
   bitwise-deterministic backward.
2. Timings at 64K (`triton.testing.do_bench` medians, bf16, d = 128, 64 query heads, kernel 32
   stride 16, G = 1, 4, 16 -> KV heads = 64 / G, one sequence; plus G = 4 over 5 packed sequences),
   ours, then Flex. TFLOP/s against 4 * D * (visible summaries summed over queries) per query head
   forward and 3.5x that for fwd+bwd.
3. Launch-config sweep at 64K, G = 1 (each kernel alone: default and two alternatives; best printed),
   fp32 checks vs the reference (D = 128 packed G = 3, D = 64 G = 16), the sweep at G = 16.
4. Our timings at 8K and 16K; bf16 checks G = 16 (also vs Flex) and G = 1; Flex at 8K and 16K.
--sdpa instead times ours against ops/compressed_sdpa.py (the residue layout through PyTorch's fused
kernels, cuDNN on Hopper; its checks are tests/ops/test_compressed_sdpa.py) at 64K and 16K, G = 1, 4, 16,
and 64K G = 4 over 5 packed sequences (padded into one batch).
Writes compressed_bench_{checks,timings,configs}.csv with GPU, torch, Triton and commit under $OUT
(else ./out) and prints the tables.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback

import torch

from experiments.gpu.provenance import out_dir, print_table, require_cuda, run_meta, write_rows

HQ, D, KS, STRIDE = 64, 128, 32, 16
BF16 = torch.bfloat16
DEVICE = "cuda"
TOL = {torch.float32: 2e-4, BF16: 2e-2}  # tests/helpers.py
START = time.time()


def rel_err(out, ref) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    fin = torch.isfinite(ref)
    if not torch.equal(fin, torch.isfinite(out)) or not torch.equal(out[~fin], ref[~fin]):
        return float("inf")
    den = ref[fin].norm().item()
    num = (out[fin] - ref[fin]).norm().item()
    return num / den if den > 0 else num


def make_inputs(n, h, g, d, dtype, cu=None, seed=0):
    from nsa_baseline.ops.compression import compress_kv

    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    q = torch.randn(n, h * g, d, device=DEVICE, generator=gen).to(dtype)
    k_cmp, cu_cmp = compress_kv(torch.randn(n, h, d, device=DEVICE, generator=gen).to(dtype), cu, KS, STRIDE)
    v_cmp, _ = compress_kv(torch.randn(n, h, d, device=DEVICE, generator=gen).to(dtype), cu, KS, STRIDE)
    return q, k_cmp.contiguous(), v_cmp.contiguous(), cu, cu_cmp


def visible_pairs(n, cu) -> int:
    """Sum over queries of the summaries each sees (per query head)."""
    lens = [n] if cu is None else [b - a for a, b in zip(cu[:-1], cu[1:])]
    total = 0
    for L in lens:
        m = max(0, (L - KS) // STRIDE + 1)  # summaries; summary i is seen by positions >= i*stride+KS-1
        total += sum(L - (i * STRIDE + KS - 1) for i in range(m))
    return total


# ------------------------------------------------------------------------------------ checks

def check(rows, name, n, h, g, d, dtype, cu, flex: bool):
    from nsa_baseline.ops.compressed import compressed_attention
    from nsa_baseline.ops.compressed_triton import compressed_attention_triton
    from nsa_baseline.reference.compressed import compressed_attention_ref

    q, k, v, cu_t, cu_cmp = make_inputs(n, h, g, d, dtype, cu)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = compressed_attention_triton(*ins, cu_t, cu_cmp, KS, STRIDE)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    do = torch.randn(o.shape, device=DEVICE, generator=gen).to(dtype)
    dlse = torch.randn(lse.shape, device=DEVICE, generator=gen)
    others = [("ref", compressed_attention_ref)] + ([("flex", compressed_attention)] if flex else [])
    for other, fn in others:
        oin = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        ro, rlse = fn(*oin, cu_t, cu_cmp, KS, STRIDE)
        seen = torch.isfinite(rlse)
        if other == "ref":  # gradients through o and lse
            ga = torch.autograd.grad([o, torch.where(seen, lse, 0.)], ins, [do, dlse], retain_graph=True)
            gb = torch.autograd.grad([ro, torch.where(seen, rlse, 0.)], oin, [do, dlse])
        else:  # through o only (Flex's lse gradient is not what is compared here)
            ga = torch.autograd.grad(o, ins, do, retain_graph=True)
            gb = torch.autograd.grad(ro, oin, do)
        for qty, a, b in [("o", o, ro), ("lse", lse, rlse)] + list(zip(("dq", "dk_cmp", "dv_cmp"), ga, gb)):
            err = rel_err(a, b)
            rows.append(dict(case=name, N=n, H=h, G=g, D=d, dtype=str(dtype).split(".")[-1], vs=other,
                             quantity=qty, rel_err=f"{err:.3e}", tol=TOL[dtype], ok=err <= TOL[dtype]))
        del ro, rlse, oin, ga, gb
    # determinism of the backward
    g1 = torch.autograd.grad(o, ins, do, retain_graph=True)
    g2 = torch.autograd.grad(o, ins, do)
    rows.append(dict(case=name, N=n, H=h, G=g, D=d, dtype=str(dtype).split(".")[-1], vs="itself",
                     quantity="bitwise equal backward", rel_err="", tol="",
                     ok=all(torch.equal(a, b) for a, b in zip(g1, g2))))


CHECKS = {  # name: (N, H, G, D, dtype, cu_seqlens, also vs Flex)
    "bf16-g4-varlen": (8192, 4, 4, 128, BF16, [0, 3000, 3010, 3041, 8192], True),
    "fp32-g3-varlen": (4096, 2, 3, 128, torch.float32, [0, 1000, 1017, 1050, 4096], False),
    "fp32-g16-d64": (2048, 1, 16, 64, torch.float32, None, False),
    "bf16-g16": (8192, 1, 16, 128, BF16, None, True),
    "bf16-g1": (8192, 16, 1, 128, BF16, None, False),
}


# ----------------------------------------------------------------------------------- timings

def bench(fn):
    import triton

    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")


def time_impl(fn, q, k, v, cu, cu_cmp):
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    # forward timed on the inputs that need gradients too: a no_grad call would make Flex compile
    # another graph (tens of seconds per shape) and is not how training calls it
    fwd = bench(lambda: fn(*ins, cu, cu_cmp, KS, STRIDE))
    o, _ = fn(*ins, cu, cu_cmp, KS, STRIDE)
    do = torch.randn_like(o)
    del o

    def fwd_bwd():
        out, _ = fn(*ins, cu, cu_cmp, KS, STRIDE)
        torch.autograd.grad(out, ins, do)

    return fwd, bench(fwd_bwd)


VARLEN_64K = [0, 30000, 30017, 30100, 50000, 65536]
POINTS_64K = [(65536, g, None) for g in (1, 4, 16)] + [(65536, 4, VARLEN_64K)]
POINTS_SMALL = [(n, g, None) for n in (8192, 16384) for g in (1, 4, 16)]


def _sdpa(q, k, v, cu, cu_cmp, kernel_size, kernel_stride):
    """ops/compressed_sdpa.py (packed sequences padded into one batch)."""
    from nsa_baseline.ops.compressed_sdpa import compressed_attention_sdpa

    return compressed_attention_sdpa(q, k, v, cu, cu_cmp, kernel_size, kernel_stride)


def _sdpa_backend() -> str:
    from nsa_baseline.ops.compressed_sdpa import last_backend

    return last_backend() or "?"


def time_point(rows, n, g, cu, impl: str):
    from nsa_baseline.ops.compressed import compressed_attention
    from nsa_baseline.ops.compressed_triton import compressed_attention_triton

    h = HQ // g
    q, k, v, cu_t, cu_cmp = make_inputs(n, h, g, D, BF16, cu)
    flops_fwd = 4 * D * visible_pairs(n, cu) * HQ
    fn = {"triton": compressed_attention_triton, "flex": compressed_attention, "sdpa": _sdpa}[impl]
    t0 = time.time()
    fwd, fb = time_impl(fn, q, k, v, cu_t, cu_cmp)
    row = dict(impl=impl, N=n, HQ=HQ, H=h, G=g, D=D, layout="single" if cu is None else f"varlen{len(cu) - 1}",
               fwd_ms=f"{fwd:.3f}", fwd_bwd_ms=f"{fb:.3f}", fwd_tflops=f"{flops_fwd / fwd * 1e-9:.1f}",
               fwd_bwd_tflops=f"{3.5 * flops_fwd / fb * 1e-9:.1f}", wall_s=f"{time.time() - t0:.1f}",
               backend=_sdpa_backend() if impl == "sdpa" else impl)
    rows.append(row)
    print(f"  {impl:6s} N={n:6d} G={g:2d} {row['layout']:8s} fwd {fwd:8.3f} ms  fwd+bwd {fb:8.3f} ms  "
          f"({row['fwd_tflops']} / {row['fwd_bwd_tflops']} TFLOP/s)", flush=True)
    del q, k, v
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ config sweep

def sweep(rows, n, g):
    """Each kernel alone with a few tile configs (the first is the default)."""
    from nsa_baseline.ops.compressed import checked_compressed_args
    from nsa_baseline.ops.compressed_triton import (TileConfig, bwd_dkdv, bwd_dq, bwd_preprocess, compressed_fwd,
                                                    config_key, dkdv_config, launch_configs, varlen_meta)

    h = HQ // g
    q, k, v, cu, cu_cmp = make_inputs(n, h, g, D, BF16)
    cu, cu_cmp, scale = checked_compressed_args(q, k, v, None, None, KS, STRIDE, None)
    meta = varlen_meta(None, None, cu, cu_cmp, n, k.shape[0])
    default = launch_configs(D, BF16)
    default = default._replace(dkdv=dkdv_config(default.dkdv, k.shape[0], h, q.device, config_key(D, BF16)))  # as the default path
    o, lse = compressed_fwd(q, k, v, meta, KS, STRIDE, scale)
    do = torch.randn_like(o)
    lse2, delta = bwd_preprocess(o, do, lse, None)
    alts = {
        "fwd": [default.fwd, TileConfig(128, 64, 8, 2), TileConfig(64, 64, 4, 3)],
        "dkdv": [default.dkdv, TileConfig(32, 128, 8, 3), TileConfig(64, 64, 8, 2), TileConfig(32, 64, 4, 2)],
        "dq": [default.dq, TileConfig(128, 64, 8, 3), TileConfig(64, 64, 4, 3)],
    }
    calls = {
        "fwd": lambda c: compressed_fwd(q, k, v, meta, KS, STRIDE, scale, c),
        "dkdv": lambda c: bwd_dkdv(q, k, v, do, lse2, delta, meta, KS, STRIDE, scale, c),
        "dq": lambda c: bwd_dq(q, k, v, do, lse2, delta, meta, KS, STRIDE, scale, c),
    }
    for kernel, cfgs in alts.items():
        best = None
        for i, c in enumerate(cfgs):
            try:
                ms = bench(lambda: calls[kernel](c))
                note = ""
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: record and go on
                ms, note = float("nan"), f"{type(e).__name__}: {str(e)[:80]}"
            rows.append(dict(kernel=kernel, N=n, G=g, H=h, block_m=c.block_m, block_n=c.block_n,
                             num_warps=c.num_warps, num_stages=c.num_stages, default=i == 0,
                             ms="" if ms != ms else f"{ms:.3f}", note=note))
            if ms == ms and (best is None or ms < best[0]):
                best = (ms, c)
            print(f"  {kernel:5s} N={n} G={g:2d} {c} {'default ' if i == 0 else ''}"
                  f"{'failed: ' + note if note else f'{ms:.3f} ms'}", flush=True)
        if best is not None:
            print(f"  -> best {kernel} at N={n} G={g}: {best[1]} ({best[0]:.3f} ms)", flush=True)


# ---------------------------------------------------------------------------------------- main

def tasks(sdpa_only: bool = False):
    """(label, run(checks, times, configs)) in priority order: what the budget cuts comes last."""
    def chk(name):
        return f"check {name}", lambda c, t, s: check(c, name, *CHECKS[name])

    def tim(n, g, cu, impl):
        return (f"time {impl} N={n} G={g}{' varlen' if cu else ''}", lambda c, t, s: time_point(t, n, g, cu, impl))

    def swp(g):
        return f"sweep G={g}", lambda c, t, s: sweep(s, 65536, g)

    if sdpa_only:  # --sdpa: the fused-SDPA path against ours
        points = [(n, g, None) for n in (65536, 16384) for g in (1, 4, 16)] + [(65536, 4, VARLEN_64K)]
        return [tim(n, g, cu, impl) for n, g, cu in points for impl in ("triton", "sdpa")]
    out = [chk("bf16-g4-varlen")]
    out += [tim(n, g, cu, "triton") for n, g, cu in POINTS_64K]
    out += [tim(n, g, cu, "flex") for n, g, cu in POINTS_64K]
    out += [swp(1), chk("fp32-g3-varlen"), chk("fp32-g16-d64"), swp(16)]
    out += [tim(n, g, cu, "triton") for n, g, cu in POINTS_SMALL]
    out += [chk("bf16-g16"), chk("bf16-g1")]
    out += [tim(n, g, cu, "flex") for n, g, cu in POINTS_SMALL]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=230.0,
                    help="seconds: no new task starts after this (one task takes up to ~40 s)")
    ap.add_argument("--sdpa", action="store_true",
                    help="only time ours against ops/compressed_sdpa.py (64K and 16K, G = 1, 4, 16)")
    args = ap.parse_args()
    require_cuda()
    out = out_dir()
    meta = run_meta()
    print(f"compressed_bench on {meta['gpu']}, torch {meta['torch']}, Triton {meta['triton']}, "
          f"commit {meta['git_commit']}", flush=True)
    checks, times, configs, skipped = [], [], [], []
    for label, run in tasks(args.sdpa):
        if time.time() - START > args.budget:
            skipped.append(label)
            continue
        print(f"== {label} ({time.time() - START:.0f} s)", flush=True)
        try:
            run(checks, times, configs)
        except Exception:  # noqa: BLE001 - report it and go on with the next task
            traceback.print_exc()
            skipped.append(f"{label} (error)")
            if label.startswith("check"):
                checks.append(dict(case=label, quantity="exception", ok=False))
        torch.cuda.empty_cache()

    write_rows(out / "compressed_bench_checks.csv", checks, meta)
    write_rows(out / "compressed_bench_timings.csv", times, meta)
    write_rows(out / "compressed_bench_configs.csv", configs, meta)
    print("\n== checks (rel_err = ||out - other|| / ||other||)")
    print_table(checks)
    bad = [r for r in checks if not r["ok"]]
    print(f"checks: {len(checks) - len(bad)}/{len(checks)} ok" + (" -- FAILURES above" if bad else ""))
    print("\n== timings (bf16, d=128, 64 query heads, kernel 32 stride 16; do_bench medians)")
    print_table(times)
    for other in ("flex", "sdpa"):
        speedups = []
        for r in times:
            key = (r["N"], r["G"], r["layout"])
            peer = [f for f in times if f["impl"] == other and (f["N"], f["G"], f["layout"]) == key]
            if r["impl"] == "triton" and peer:
                speedups.append(dict(N=r["N"], G=r["G"], layout=r["layout"],
                                     fwd_speedup=f"{float(peer[0]['fwd_ms']) / float(r['fwd_ms']):.2f}x",
                                     fwd_bwd_speedup=f"{float(peer[0]['fwd_bwd_ms']) / float(r['fwd_bwd_ms']):.2f}x"))
        if speedups:
            print(f"\n== Triton vs {other} ({other} time / Triton time: above 1, Triton is faster)")
            print_table(speedups)
    if configs:
        print("\n== launch-config sweep (each kernel alone, N=64K; first of each kernel = default)")
        print_table(configs)
    if skipped:
        print("\nskipped (budget or error):", ", ".join(skipped))
    print(f"wrote {out}/compressed_bench_*.csv in {time.time() - START:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
