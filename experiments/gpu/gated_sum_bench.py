"""NSA's gated three-branch sum on the GPU: the fused Triton kernels (nsa_baseline.ops.gated_sum) against
the eager expression `g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win`.

    python -m experiments.gpu.gated_sum_bench [--sizes 16384,65536] [--no-configs]

bf16 branches and gates (the module's gates come from a Linear in the parameter dtype), HQ = 64, D = 128:
1. Checks first, at every size: o, d gates and the three branch gradients of ours vs the reference in
   fp32 (tolerance of tests/helpers.py for bf16), and the eager bf16 forward's error for comparison.
2. fwd and fwd+bwd times (`triton.testing.do_bench` medians, inputs requiring gradients) of eager and
   ours, and the achieved GB/s against the byte floor: fwd reads the 3 branches + gates and writes o
   (4 x [N, HQ, D] + gates); bwd reads do and the 3 branches + gates and writes the 3 branch
   gradients + d gates (7 x [N, HQ, D] + 2 x gates). At N = 64K each [N, HQ, D] is 1 GiB.
3. Unless --no-configs: each kernel alone at the largest size with a few (elements per program,
   warps) launch configs (the first is the default).
Writes gated_sum_bench_{checks,timings,configs}.csv with GPU, torch, Triton and commit under $OUT (else
./out) and prints the tables; exit status 1 when a check fails. About 30 s on an H100.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from experiments.gpu.compressed_bench import rel_err
from experiments.gpu.provenance import out_dir, print_table, require_cuda, run_meta, write_rows

HQ, D = 64, 128
BF16 = torch.bfloat16
TOL = 2e-2  # tests/helpers.py, bf16
START = time.time()


def eager(g, o_cmp, o_slc, o_win):
    """The expression NativeSparseAttention.attention used before the fused kernel."""
    return g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win


def make_inputs(n: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    gates = torch.sigmoid(torch.randn(n, HQ, 3, device="cuda", generator=gen)).to(BF16)
    outs = [torch.randn(n, HQ, D, device="cuda", generator=gen).to(BF16) for _ in range(3)]
    do = torch.randn(n, HQ, D, device="cuda", generator=gen).to(BF16)
    return [gates, *outs], do


def check(rows, n: int):
    from nsa_baseline.ops.gated_sum import gated_sum
    from nsa_baseline.reference.gating import gated_sum_ref

    ins, do = make_inputs(n, seed=1)
    ours = [t.detach().requires_grad_() for t in ins]
    o = gated_sum(*ours)
    grads = torch.autograd.grad(o, ours, do)
    ref_in = [t.detach().float().requires_grad_() for t in ins]
    ro = gated_sum_ref(*ref_in)
    rgrads = torch.autograd.grad(ro, ref_in, do.float())
    pairs = [("o", o, ro)] + list(zip(("d_gates", "d_o_cmp", "d_o_slc", "d_o_win"), grads, rgrads))
    for qty, a, b in pairs:
        err = rel_err(a, b)
        rows.append(dict(N=n, HQ=HQ, D=D, impl="ours", quantity=qty, dtype=str(a.dtype).split(".")[-1],
                         rel_err=f"{err:.3e}", tol=TOL, ok=err <= TOL))
    err = rel_err(eager(*[t.detach() for t in ins]), ro)
    rows.append(dict(N=n, HQ=HQ, D=D, impl="eager", quantity="o", dtype="bfloat16", rel_err=f"{err:.3e}",
                     tol=TOL, ok=err <= TOL))


def bench(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def byte_floor(n: int) -> tuple[int, int]:
    """(fwd, bwd) bytes that must move at least, bf16."""
    big, gates = n * HQ * D * 2, n * HQ * 3 * 2
    return 4 * big + gates, 7 * big + 2 * gates


def time_size(rows, n: int):
    from nsa_baseline.ops.gated_sum import gated_sum

    ins, do = make_inputs(n)
    ins = [t.requires_grad_() for t in ins]
    fwd_bytes, bwd_bytes = byte_floor(n)
    for impl, fn in (("eager", eager), ("ours", gated_sum)):
        def fwd_bwd():
            torch.autograd.grad(fn(*ins), ins, do)

        fwd, fb = bench(lambda: fn(*ins)), bench(fwd_bwd)
        rows.append(dict(impl=impl, N=n, HQ=HQ, D=D, fwd_ms=f"{fwd:.3f}", fwd_bwd_ms=f"{fb:.3f}",
                         fwd_GBps=f"{fwd_bytes / fwd * 1e-6:.0f}",
                         fwd_bwd_GBps=f"{(fwd_bytes + bwd_bytes) / fb * 1e-6:.0f}",
                         fwd_floor_GB=f"{fwd_bytes * 1e-9:.2f}",
                         fwd_bwd_floor_GB=f"{(fwd_bytes + bwd_bytes) * 1e-9:.2f}"))
        print(f"  {impl:5s} N={n:6d} fwd {fwd:7.3f} ms ({rows[-1]['fwd_GBps']} GB/s)  fwd+bwd {fb:7.3f} ms "
              f"({rows[-1]['fwd_bwd_GBps']} GB/s)", flush=True)


def sweep(rows, n: int):
    """Each kernel alone with a few launch configs (the first is the default)."""
    from nsa_baseline.ops.gated_sum import BWD_CONFIG, FWD_CONFIG, LaunchConfig, gated_sum_bwd, gated_sum_fwd

    (gates, *outs), do = make_inputs(n)
    fwd_bytes, bwd_bytes = byte_floor(n)
    dtypes = (gates.dtype,) + tuple(o.dtype for o in outs)
    alts = [LaunchConfig(2048, 4), LaunchConfig(4096, 4), LaunchConfig(8192, 8), LaunchConfig(4096, 8),
            LaunchConfig(16384, 8)]
    for kernel, default, call, nbytes in (
            ("fwd", FWD_CONFIG, lambda c: gated_sum_fwd(gates, tuple(outs), c), fwd_bytes),
            ("bwd", BWD_CONFIG, lambda c: gated_sum_bwd(do, gates, tuple(outs), (True,) * 4, dtypes, c), bwd_bytes)):
        for i, cfg in enumerate([default] + [c for c in alts if c != default]):
            ms = bench(lambda: call(cfg))
            rows.append(dict(kernel=kernel, N=n, tile=cfg.tile, num_warps=cfg.num_warps, default=i == 0,
                             ms=f"{ms:.3f}", GBps=f"{nbytes / ms * 1e-6:.0f}"))
            print(f"  {kernel} {cfg} {'default ' if i == 0 else ''}{ms:.3f} ms ({rows[-1]['GBps']} GB/s)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="16384,65536", help="token counts N, comma-separated")
    ap.add_argument("--no-configs", action="store_true", help="skip the launch-config sweep")
    args = ap.parse_args()
    require_cuda()
    sizes = [int(s) for s in args.sizes.split(",")]
    out, meta = out_dir(), run_meta()
    print(f"gated_sum_bench on {meta['gpu']}, torch {meta['torch']}, Triton {meta['triton']}, "
          f"commit {meta['git_commit']}", flush=True)
    checks, times, configs = [], [], []
    for n in sizes:
        print(f"== check N={n} ({time.time() - START:.0f} s)", flush=True)
        check(checks, n)
        torch.cuda.empty_cache()
    for n in sizes:
        print(f"== time N={n} ({time.time() - START:.0f} s)", flush=True)
        time_size(times, n)
        torch.cuda.empty_cache()
    if not args.no_configs:
        print(f"== launch configs N={max(sizes)} ({time.time() - START:.0f} s)", flush=True)
        sweep(configs, max(sizes))
    write_rows(out / "gated_sum_bench_checks.csv", checks, meta)
    write_rows(out / "gated_sum_bench_timings.csv", times, meta)
    write_rows(out / "gated_sum_bench_configs.csv", configs, meta)
    print("\n== checks vs the fp32 reference (rel_err = ||out - ref|| / ||ref||)")
    print_table(checks)
    bad = [r for r in checks if not r["ok"]]
    print(f"checks: {len(checks) - len(bad)}/{len(checks)} ok" + (" -- FAILURES above" if bad else ""))
    print(f"\n== timings (bf16, HQ={HQ}, D={D}; do_bench medians; GB/s = byte floor / time)")
    print_table(times)
    for n in sizes:
        e, o = (next(r for r in times if r["N"] == n and r["impl"] == impl) for impl in ("eager", "ours"))
        print(f"  N={n}: speedup fwd {float(e['fwd_ms']) / float(o['fwd_ms']):.2f}x, "
              f"fwd+bwd {float(e['fwd_bwd_ms']) / float(o['fwd_bwd_ms']):.2f}x")
    if configs:
        print("\n== launch configs (each kernel alone; first of each kernel = default)")
        print_table(configs)
    print(f"wrote {out}/gated_sum_bench_*.csv in {time.time() - START:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
