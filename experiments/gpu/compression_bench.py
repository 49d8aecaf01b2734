"""Key/value compression on the GPU: compress_kv's block path (nsa_baseline.ops.compression_blocks,
what compress_kv runs for kernel 32 stride 16) against the row-gather path it replaced
(`compress_gather`: a [N_cmp, kernel_size, H, D] gather whose backward is an atomic index_add).

    python -m experiments.gpu.compression_bench [--sizes 16384,65536] [--fused-grad]

bf16, HQ = 64 query heads, D = 128, kernel 32 stride 16, G = 1 (64 KV heads) and G = 16 (4 KV heads),
linear (weight + pos_emb, bf16 like a bf16 model's parameters) and mean compression, one sequence and
4 packed sequences whose starts are off the stride grid (the block path's row-gather layout):
1. Checks first, at every point: new vs old (outputs and the gradients of k, weight, pos_emb) and both
   vs the fp32 reference on the same values (`nsa_baseline.reference.compress_kv`); bound 2e-2
   (tests/helpers.py, bf16).
2. fwd and fwd+bwd times of one module step's compression (k and v: two calls; `triton.testing.do_bench`
   medians) of old and new, and the memory fwd+bwd allocates beyond its inputs (peak - before).
Writes compression_bench_{checks,timings}.csv with GPU, torch, Triton and commit under $OUT (else ./out)
and prints the tables; exit status 1 when a check fails. About a minute on an H100.
--in-place instead times the module's linear compression of k (compress_kv_forward + compress_into_backward
with the weights' gradients; one sequence, and 4 sequences starting on the stride grid) with
compression_grad.IN_PLACE_LINEAR off and on (ops/compression_inplace.py), after checking that they agree,
and the memory each forward keeps for the backward: compression_bench_in_place.csv.
--fused-grad instead times the module backward's share of the linear compression
(compression_grad.compress_into_backward, one call for k, one sequence) with FUSED_BLOCK_GRAD off (a GEMM
and a strided add) and on (ops/compression_grad_kernel.py), after checking that they agree:
compression_bench_fused_grad.csv.
"""
from __future__ import annotations

import argparse
import sys
import time
from unittest import mock

import torch

from experiments.gpu.provenance import out_dir, print_table, require_cuda, run_meta, write_rows

HQ, D, KS, STRIDE = 64, 128, 32, 16
BF16 = torch.bfloat16
DEV, DTYPE = "cuda", BF16  # the CPU smoke test (tests/experiments/test_compression_bench.py) swaps these
TOL = 2e-2  # tests/helpers.py, bf16
START = time.time()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32 (inf on a non-finite output); fp32, not fp64: dk at 64K x 64
    heads is 512M elements."""
    out, ref = out.detach().float(), ref.detach().float()
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item()


def layouts(n: int) -> dict:
    return {"single": None,
            "varlen4": torch.tensor([0, n // 4 + 5, n // 2 + 3, 3 * n // 4 + 7, n], dtype=torch.int32, device="cuda")}


def make_inputs(n: int, h: int, linear: bool, seed: int = 0):
    """(k, v, params of k, params of v, upstream gradients of k_cmp and v_cmp) in bf16."""
    gen = torch.Generator(device=DEV).manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEV, generator=gen) * scale).to(DTYPE).requires_grad_()

    k, v = rand(n, h, D), rand(n, h, D)
    params = [(rand(KS * D, D, scale=1 / KS), rand(KS, D, scale=0.125)) if linear else (None, None)
              for _ in range(2)]
    n_cmp = (n - KS) // STRIDE + 1  # an upper bound for the packed layout; sliced per call
    douts = [torch.randn(n_cmp, h, D, device=DEV, generator=gen).to(DTYPE) for _ in range(2)]
    return k, v, params, douts


def step(fn, k, v, cu, params, douts):
    """One module step's compression: (k_cmp, v_cmp) and, with douts, the gradients of every input."""
    outs = [fn(x, cu, KS, STRIDE, *p)[0] for x, p in zip((k, v), params)]
    if douts is None:
        return outs
    ins = [t for t in (k, v) + params[0] + params[1] if t is not None]
    return outs, torch.autograd.grad(outs, ins, [g[: o.shape[0]] for o, g in zip(outs, douts)])


def check(rows, n: int, h: int, linear: bool, layout: str, cu):
    from nsa_baseline.ops.compression import compress_gather, compress_kv
    from nsa_baseline.reference.compression import compress_kv as compress_kv_ref

    k, v, params, douts = make_inputs(n, h, linear, seed=1)
    p, dout = params[0], douts[0]
    ins = [t for t in (k,) + p if t is not None]
    ref_in = [t.detach().float().requires_grad_() for t in ins]
    results = {}
    for impl, fn, args in (("new", compress_kv, ins), ("old", compress_gather, ins), ("ref", compress_kv_ref, ref_in)):
        out = fn(args[0], cu, KS, STRIDE, *(args[1:] if linear else ()))[0]
        g = dout[: out.shape[0]].to(out.dtype)
        results[impl] = [out] + list(torch.autograd.grad(out, args, g))
    names = ("x_cmp", "dk", "dweight", "dpos_emb")
    for a, b in (("new", "old"), ("new", "ref"), ("old", "ref")):
        for qty, x, y in zip(names, results[a], results[b]):
            err = rel_err(x, y)
            rows.append(dict(N=n, H=h, mode="linear" if linear else "mean", layout=layout, impl=a, vs=b,
                             quantity=qty, rel_err=f"{err:.3e}", tol=TOL, ok=err <= TOL))


def bench(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def fused_grad_bench(fn) -> float:
    return bench(fn)


def time_point(rows, n: int, h: int, linear: bool, layout: str, cu):
    from nsa_baseline.ops.compression import compress_gather, compress_kv

    k, v, params, douts = make_inputs(n, h, linear)
    for impl, fn in (("old", compress_gather), ("new", compress_kv)):
        step(fn, k, v, cu, params, douts)  # builds and caches the layout (its one host read)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(fn, k, v, cu, params, douts)
        extra = (torch.cuda.max_memory_allocated() - before) / 2 ** 30
        fwd = bench(lambda: step(fn, k, v, cu, params, None))
        fb = bench(lambda: step(fn, k, v, cu, params, douts))
        rows.append(dict(N=n, G=HQ // h, H=h, mode="linear" if linear else "mean", layout=layout, impl=impl,
                         fwd_ms=f"{fwd:.3f}", fwd_bwd_ms=f"{fb:.3f}", fwd_bwd_extra_GiB=f"{extra:.2f}",
                         k_GiB=f"{k.numel() * 2 / 2 ** 30:.2f}"))
        print(f"  {impl} N={n} H={h} {rows[-1]['mode']:6s} {layout:7s} fwd {fwd:7.3f} ms  fwd+bwd {fb:7.3f} ms  "
              f"extra {extra:.2f} GiB", flush=True)


def fused_grad_point(rows, n: int, h: int) -> None:
    """compress_into_backward of k (linear, one sequence) with the Triton add-into-dx kernel off and on
    (the GEMM path's backward: IN_PLACE_LINEAR off for the point, its own kernels replace this one)."""
    from nsa_baseline.ops import compression_grad as cg

    k, _, params, douts = make_inputs(n, h, True)
    k, (w, pe) = k.detach(), params[0]
    with mock.patch.object(cg, "IN_PLACE_LINEAR", False):  # the backward follows the state it makes
        k_cmp, _, state = cg.compress_kv_forward(k, None, KS, STRIDE, w.detach(), pe.detach(), False)
    dout = douts[0][: k_cmp.shape[0]].contiguous()
    base = torch.randn_like(k)  # dx already holds the other branches' share

    keep = cg.FUSED_BLOCK_GRAD

    def run(fused: bool):
        cg.FUSED_BLOCK_GRAD = fused
        dx = base.clone()
        cg.compress_into_backward(dout, dx, k, None, KS, STRIDE, state, w, pe, need_weights=False)
        return dx

    try:
        err = rel_err(run(True), run(False))
        times = {flag: fused_grad_bench(lambda: run(flag)) for flag in (False, True)}
        clone = fused_grad_bench(lambda: base.clone())  # in both timings: subtracted for the ratio
    finally:
        cg.FUSED_BLOCK_GRAD = keep
    off, on = times[False] - clone, times[True] - clone
    # below BLOCK_PATH_MIN_CUDA_ROWS rows the gather path runs: the kernel is not used, both time the same
    rows.append(dict(N=n, G=HQ // h, H=h, path="block" if state.layout is not None else "gather",
                     gemm_add_ms=f"{off:.3f}", fused_ms=f"{on:.3f}", speedup=f"{off / max(on, 1e-6):.2f}",
                     rel_err=f"{err:.2e}", ok=err <= TOL))
    print(rows[-1], flush=True)


def _allocated(device: torch.device) -> int:
    if device.type != "cuda":
        return 0  # the CPU smoke test
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def in_place_point(rows, n: int, h: int, layout: str, cu) -> None:
    """The module's compression of k (linear; compress_kv_forward keeping what d weight needs, then
    compress_into_backward with the weights' gradients) with compression_grad.IN_PLACE_LINEAR off and
    on: agreement, fwd and fwd+bwd time, and the memory the forward leaves for the backward."""
    from nsa_baseline.ops import compression_grad as cg

    k, _, params, douts = make_inputs(n, h, True)
    k, (w, pe) = k.detach(), (t.detach() for t in params[0])
    base = torch.randn_like(k)  # dx already holds the other branches' share
    keep = cg.IN_PLACE_LINEAR

    def forward(flag: bool):
        cg.IN_PLACE_LINEAR = flag
        return cg.compress_kv_forward(k, cu, KS, STRIDE, w, pe, True)

    def fwd_bwd(flag: bool):
        k_cmp, _, state = forward(flag)
        dx = base.clone()
        grads = cg.compress_into_backward(douts[0][: k_cmp.shape[0]], dx, k, cu, KS, STRIDE, state, w, pe)
        return k_cmp, dx, *grads

    try:
        errs = [rel_err(a, b) for a, b in zip(fwd_bwd(True), fwd_bwd(False))]
        res = {}
        for flag in (False, True):
            before = _allocated(k.device)
            kept = forward(flag)
            kept_gib = (_allocated(k.device) - before) / 2 ** 30
            del kept
            res[flag] = (bench(lambda: forward(flag)), bench(lambda: fwd_bwd(flag)), kept_gib)
        clone = bench(lambda: base.clone())  # in both fwd+bwd timings
    finally:
        cg.IN_PLACE_LINEAR = keep
    (f0, b0, m0), (f1, b1, m1) = res[False], res[True]
    rows.append(dict(N=n, G=HQ // h, H=h, layout=layout, fwd_off_ms=f"{f0:.3f}", fwd_on_ms=f"{f1:.3f}",
                     fwd_bwd_off_ms=f"{b0 - clone:.3f}", fwd_bwd_on_ms=f"{b1 - clone:.3f}",
                     speedup_fwd_bwd=f"{(b0 - clone) / max(b1 - clone, 1e-6):.2f}", kept_off_GiB=f"{m0:.2f}",
                     kept_on_GiB=f"{m1:.2f}", max_rel_err=f"{max(errs):.2e}", ok=max(errs) <= TOL))
    print(rows[-1], flush=True)


def points(sizes):
    for n in sizes:
        for h in (HQ // 1, HQ // 16):
            for linear in (True, False):
                for layout, cu in layouts(n).items():
                    yield n, h, linear, layout, cu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="16384,65536", help="token counts N, comma-separated")
    ap.add_argument("--fused-grad", action="store_true",
                    help="time the module backward's compression share with the add-into-dx kernel off / on")
    ap.add_argument("--in-place", action="store_true",
                    help="time the module's linear compression (fwd, fwd+bwd) with IN_PLACE_LINEAR off / on")
    args = ap.parse_args()
    require_cuda()
    sizes = [int(s) for s in args.sizes.split(",")]
    out, meta = out_dir(), run_meta()
    print(f"compression_bench on {meta['gpu']}, torch {meta['torch']}, Triton {meta['triton']}, "
          f"commit {meta['git_commit']}", flush=True)
    if args.fused_grad:
        rows = []
        for n in sizes:
            for h in (HQ, HQ // 4, HQ // 16):
                fused_grad_point(rows, n, h)
                torch.cuda.empty_cache()
        write_rows(out / "compression_bench_fused_grad.csv", rows, meta)
        print_table(rows)
        return 0 if all(r["ok"] for r in rows) else 1
    if args.in_place:
        rows = []
        for n in sizes:
            for h in (HQ, HQ // 4, HQ // 16):
                for layout, cu in (("single", None), ("varlen4_grid", layouts(n)["varlen4"] // STRIDE * STRIDE)):
                    in_place_point(rows, n, h, layout, cu)
                    torch.cuda.empty_cache()
        write_rows(out / "compression_bench_in_place.csv", rows, meta)
        print_table(rows)
        return 0 if all(r["ok"] for r in rows) else 1
    checks, times = [], []
    print(f"== checks ({time.time() - START:.0f} s)", flush=True)
    for point in points(sizes):
        check(checks, *point)
        torch.cuda.empty_cache()
    print(f"== timings ({time.time() - START:.0f} s)", flush=True)
    for point in points(sizes):
        time_point(times, *point)
        torch.cuda.empty_cache()
    write_rows(out / "compression_bench_checks.csv", checks, meta)
    write_rows(out / "compression_bench_timings.csv", times, meta)
    print("\n== checks (rel_err = ||a - b|| / ||b||; ref = fp32 reference on the same bf16 values)")
    print_table(checks)
    bad = [r for r in checks if not r["ok"]]
    print(f"checks: {len(checks) - len(bad)}/{len(checks)} ok" + (" -- FAILURES above" if bad else ""))
    print(f"\n== timings (bf16, k and v, D={D}, kernel {KS} stride {STRIDE}; do_bench medians)")
    print_table(times)
    for old, new in zip(times[::2], times[1::2]):  # rows come in (old, new) pairs
        fwd, fb = (float(old[c]) / float(new[c]) for c in ("fwd_ms", "fwd_bwd_ms"))
        print(f"  N={old['N']} G={old['G']} {old['mode']:6s} {old['layout']:7s}: speedup fwd {fwd:.2f}x, "
              f"fwd+bwd {fb:.2f}x")
    print(f"wrote {out}/compression_bench_*.csv in {time.time() - START:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
