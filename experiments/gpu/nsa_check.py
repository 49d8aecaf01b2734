"""Vanilla NSA selected attention on the H100 in one call (< 8 min by default):
(1) fwd / bwd times (triton.testing.do_bench medians) at the target points (4 KV heads, d=128, bf16,
    N 8K..64K, (BS, T) = (64, 16) and (128, 8), G 1..16) beside the published NSA kernel, with a
    per-kernel breakdown (index build, dQ, dK/dV) and the extra memory of one call;
(2) a num_warps / num_stages (/ skip_unused, BLOCK_M) sweep of the fwd, dQ and dK/dV kernels,
    printing the best per (D, BS, G) as lines for the tables in nsa_baseline/ops/selected_{fwd,bwd}.py.
Its bf16 correctness and backward determinism checks are GPU tests:
`python -m pytest tests/ops/test_gpu_selected_checks.py -k nsa_check`.

    python -m experiments.gpu.nsa_check [--budget 420] [--indices nsa|random] [--no-sweep] [--quick]
    python -m experiments.gpu.nsa_check --sweep-only --budget 420   # the whole sweep, separately
Writes $OUT/nsa_check.csv and $OUT/nsa_sweep.csv (OUT defaults to ./out).
Every section stops when its share of --budget seconds is spent (the rows left out are printed).
"""
from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import torch
import triton

from experiments.gpu.provenance import require_cuda
from nsa_baseline.ops import selected_attention
from nsa_baseline.utils.block_index import build_block_index
from nsa_baseline.ops.selected_bwd import nsa_selected_bwd_dkdv, nsa_selected_bwd_dq
from nsa_baseline.ops.selected_fwd import nsa_selected_fwd
from nsa_baseline.utils.indices import random_causal_block_indices
from nsa_baseline.utils.varlen import token_positions

H, D = 4, 128
PRESETS = ((64, 16), (128, 8))
GROUPS = (1, 2, 4, 8, 16)
SEQLENS = (65536, 32768, 16384, 8192)

# (block, topk, gqa, seqlen): (fwd_ms, bwd_ms) of the published NSA kernel on our H100
# (../shared/targets/upstream_fsa_vs_nsa_h100.csv; the file wins when it is there).
PUBLISHED_NSA_MS = {
    (64, 16, 1, 8192): (2.20, 3.22), (64, 16, 1, 16384): (4.44, 6.08), (64, 16, 1, 32768): (8.90, 12.33),
    (64, 16, 1, 65536): (18.28, 24.96), (64, 16, 2, 8192): (2.23, 3.90), (64, 16, 2, 16384): (4.52, 6.52),
    (64, 16, 2, 32768): (9.08, 12.88), (64, 16, 2, 65536): (18.17, 24.71), (64, 16, 4, 8192): (2.24, 3.37),
    (64, 16, 4, 16384): (4.55, 6.60), (64, 16, 4, 32768): (9.19, 12.84), (64, 16, 4, 65536): (18.39, 26.55),
    (64, 16, 8, 8192): (2.23, 3.94), (64, 16, 8, 16384): (4.62, 7.46), (64, 16, 8, 32768): (9.20, 14.55),
    (64, 16, 8, 65536): (18.50, 29.92), (64, 16, 16, 8192): (2.19, 4.76), (64, 16, 16, 16384): (4.48, 9.20),
    (64, 16, 16, 32768): (9.00, 18.45), (64, 16, 16, 65536): (18.09, 36.96), (128, 8, 1, 8192): (3.54, 5.27),
    (128, 8, 1, 16384): (7.07, 9.68), (128, 8, 1, 32768): (14.29, 18.63), (128, 8, 1, 65536): (28.72, 36.46),
    (128, 8, 2, 8192): (3.47, 5.21), (128, 8, 2, 16384): (7.09, 10.07), (128, 8, 2, 32768): (14.31, 18.11),
    (128, 8, 2, 65536): (28.77, 36.20), (128, 8, 4, 8192): (3.55, 5.50), (128, 8, 4, 16384): (7.10, 9.63),
    (128, 8, 4, 32768): (14.42, 18.35), (128, 8, 4, 65536): (28.92, 36.42), (128, 8, 8, 8192): (3.52, 6.54),
    (128, 8, 8, 16384): (7.14, 12.32), (128, 8, 8, 32768): (14.50, 23.93), (128, 8, 8, 65536): (29.05, 46.67),
    (128, 8, 16, 8192): (3.63, 9.26), (128, 8, 16, 16384): (7.30, 17.35), (128, 8, 16, 32768): (14.71, 33.76),
    (128, 8, 16, 65536): (29.48, 68.89),
}


def published() -> dict:
    table = dict(PUBLISHED_NSA_MS)
    for base in (Path("../shared/targets"), Path("results/targets")):
        f = base / "upstream_fsa_vs_nsa_h100.csv"
        if f.exists():
            for r in csv.DictReader(open(f)):
                key = (int(r["block"]), int(r["topk"]), int(r["gqa"]), int(r["seqlen"]))
                table[key] = (float(r["nsa_fwd_ms"]), float(r["nsa_bwd_ms"]))
            break
    return table


class Clock:
    def __init__(self, budget: float):
        self.t0, self.budget = time.time(), budget

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)


def bench(fn, rep=100) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


_INDEX_CACHE: dict = {}


def inputs(n, h, g, d, bs, t_sel, kind, seqlens=None, seed=0, grad=True):
    """bf16 q [N, H*G, D], k, v [N, H, D], block_indices, cu_seqlens and the index kind used.
    NSA-path indices are made once per (N, H, D, BS, T, seqlens) from the G = 1 heads of q (random
    inputs: the choice does not depend on G in distribution) and reused for every G."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    seqlens = seqlens or [n]
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(n, hh, d, device="cuda", dtype=torch.bfloat16, generator=gen)
               for hh in (h * g, h, h))
    key = (kind, n, h, d, bs, t_sel, tuple(seqlens))
    idx = _INDEX_CACHE.get(key)
    if idx is None and kind == "nsa":
        try:
            from nsa_baseline.reference import nsa_block_indices_ref

            t0 = time.time()
            idx = nsa_block_indices_ref(q.view(n, h, g, d)[:, :, 0], k, cu, block_size=bs, topk=t_sel)
            print(f"  (nsa indices for N={n} BS={bs} T={t_sel}: {time.time() - t0:.1f} s)")
        except Exception as e:  # noqa: BLE001 - fall back, but say so
            print(f"  nsa indices failed ({type(e).__name__}: {e}); using random causal indices")
            kind = "random"
    if idx is None:
        idx = random_causal_block_indices(n, h, t_sel, bs, cu, device="cuda", generator=gen)
    if len(_INDEX_CACHE) > 4:
        _INDEX_CACHE.clear()
    _INDEX_CACHE[key] = idx
    if grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    return q, k, v, idx.contiguous(), cu, kind


# ------------------------------------------------------------------------------- (1) timings
def time_point(g, n, bs, t_sel, kind, pub, breakdown=True):
    q, k, v, idx, cu, kind = inputs(n, H, g, D, bs, t_sel, kind)
    do = torch.randn(n, H * g, D, device="cuda", dtype=torch.bfloat16)
    row = dict(gqa=g, kv_heads=H, q_heads=H * g, seqlen=n, block=bs, topk=t_sel, indices=kind)

    def fwd():
        return selected_attention(q, k, v, idx, bs, cu_seqlens=cu)

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    o = fwd()
    torch.cuda.synchronize()
    row["fwd_peak_extra_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
    torch.cuda.synchronize()
    row["bwd_peak_extra_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
    row["fwd_ms"] = bench(fwd)
    row["bwd_ms"] = bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
    if breakdown:
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        pos = token_positions(cu, n)[0].int()
        scale = D ** -0.5
        o_, lse = nsa_selected_fwd(qd, kd, vd, idx, bs, scale, pos)
        bi = build_block_index(idx, bs, cu, H)
        _, delta = nsa_selected_bwd_dq(qd, kd, vd, o_, lse, do, idx, bs, scale, pos)
        row["fwd_kernel_ms"] = bench(lambda: nsa_selected_fwd(qd, kd, vd, idx, bs, scale, pos))
        row["index_ms"] = bench(lambda: build_block_index(idx, bs, cu, H))
        row["dq_ms"] = bench(lambda: nsa_selected_bwd_dq(qd, kd, vd, o_, lse, do, idx, bs, scale, pos))
        row["dkdv_ms"] = bench(lambda: nsa_selected_bwd_dkdv(qd, kd, vd, do, lse, delta, bi, bs, scale, t_sel))
        counts = (bi.row_offsets[1:] - bi.row_offsets[:-1]).float()
        row["max_row_pairs"] = int(counts.max())
        row["mean_row_pairs"] = round(float(counts[counts > 0].mean()), 1)
    p = pub.get((bs, t_sel, g, n))
    if p:
        row.update(nsa_pub_fwd_ms=p[0], nsa_pub_bwd_ms=p[1], fwd_speedup=p[0] / row["fwd_ms"],
                   bwd_speedup=p[1] / row["bwd_ms"])
    return row


def timings(clock: Clock, rows: list, kind: str, quick: bool):
    print(f"\n== (1) timings: bf16, H={H}, D={D}, indices={kind}; do_bench medians in ms ==")
    pub = published()
    seqlens = (65536, 8192) if quick else SEQLENS
    hdr = (f"{'BS':>4} {'T':>3} {'G':>3} {'N':>6} | {'fwd':>7} {'pub':>7} {'x':>5} | {'bwd':>7} {'pub':>7} {'x':>5}"
           f" | {'fwdk':>6} {'index':>6} {'dq':>7} {'dkdv':>7} | {'maxrow':>7} {'fwdGB':>5} {'bwdGB':>5}")
    print(hdr)
    for bs, t_sel in PRESETS:
        for n in seqlens:
            for g in GROUPS:
                if clock.left() < 0:
                    print(f"  budget spent: skipped BS={bs} T={t_sel} G={g} N={n}")
                    continue
                try:
                    r = time_point(g, n, bs, t_sel, kind, pub)
                except Exception as e:  # noqa: BLE001 - report the point and go on
                    print(f"{bs:>4} {t_sel:>3} {g:>3} {n:>6} | FAILED {type(e).__name__}: {str(e)[:160]}")
                    torch.cuda.empty_cache()
                    continue
                rows.append(r)
                print(f"{bs:>4} {t_sel:>3} {g:>3} {n:>6} | {r['fwd_ms']:7.2f} {r.get('nsa_pub_fwd_ms', 0):7.2f} "
                      f"{r.get('fwd_speedup', 0):5.2f} | {r['bwd_ms']:7.2f} {r.get('nsa_pub_bwd_ms', 0):7.2f} "
                      f"{r.get('bwd_speedup', 0):5.2f} | {r['fwd_kernel_ms']:6.2f} {r['index_ms']:6.2f} "
                      f"{r['dq_ms']:7.2f} {r['dkdv_ms']:7.2f} | {r['max_row_pairs']:7d} "
                      f"{r['fwd_peak_extra_gb']:5.2f} {r['bwd_peak_extra_gb']:5.2f}", flush=True)
                torch.cuda.empty_cache()


# ------------------------------------------------------------------------------- (2) sweep
FWD_SWEEP = [(w, s, k) for w in (4, 8) for s in (1, 2, 3) for k in (True, False)] + [(2, 2, True)]
DQ_SWEEP = [(w, s, k) for w in (4, 8) for s in (1, 2) for k in (True, False)]
DKDV_SWEEP = [(m, w, s) for m, w in ((32, 4), (32, 8), (64, 4), (64, 8), (128, 8)) for s in (2, 3)] + [(32, 16, 2)]
CHUNK_TILES = (16, 64, 256, 1024, 4096)  # dK/dV work-item sizes in BLOCK_M tiles (None = the default rule)


def sweep(clock: Clock, rows: list, kind: str, n: int, groups):
    print(f"\n== (2) launch-config sweep at N={n}, H={H}, D={D}, bf16, indices={kind} (ms) ==")
    scale = D ** -0.5
    for bs, t_sel in PRESETS:
        for g in groups:
            if clock.left() < 20:
                print(f"  budget spent: skipped BS={bs} G={g}")
                continue
            print(f"  -- BS={bs} T={t_sel} G={g}", flush=True)
            q, k, v, idx, cu, kind_used = inputs(n, H, g, D, bs, t_sel, kind, grad=False)
            do = torch.randn_like(q)
            pos = token_positions(cu, n)[0].int()
            o, lse = nsa_selected_fwd(q, k, v, idx, bs, scale, pos)
            _, delta = nsa_selected_bwd_dq(q, k, v, o, lse, do, idx, bs, scale, pos)
            bi = build_block_index(idx, bs, cu, H)
            from nsa_baseline.ops.tuning import dkdv_config

            bm, w_, s_ = dkdv_config(D, bs, g)
            kernels = (
                ("dkdv_chunk", [None, *CHUNK_TILES], lambda c: nsa_selected_bwd_dkdv(
                    q, k, v, do, lse, delta, bi, bs, scale, t_sel, chunk=None if c is None else c * bm)),
                ("fwd", FWD_SWEEP, lambda c: nsa_selected_fwd(q, k, v, idx, bs, scale, pos, num_warps=c[0],
                                                              num_stages=c[1], skip_unused=c[2])),
                ("dq", DQ_SWEEP, lambda c: nsa_selected_bwd_dq(q, k, v, o, lse, do, idx, bs, scale, pos,
                                                               num_warps=c[0], num_stages=c[1], skip_unused=c[2])),
                ("dkdv", DKDV_SWEEP, lambda c: nsa_selected_bwd_dkdv(q, k, v, do, lse, delta, bi, bs, scale, t_sel,
                                                                     block_m=c[0], num_warps=c[1], num_stages=c[2])),
            )
            for name, configs, fn in kernels:
                results = []
                for c in configs:
                    if clock.left() < 15:
                        break
                    try:
                        ms = bench(lambda: fn(c), rep=50)
                    except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: record and go on
                        print(f"  {name} {c}: {type(e).__name__}: {str(e)[:100]}")
                        ms = float("inf")
                    results.append((ms, c))
                    rows.append(dict(kernel=name, d=D, bs=bs, topk=t_sel, g=g, n=n, indices=kind_used,
                                     config=str(c), ms=ms))
                if results:
                    results.sort(key=lambda x: x[0])
                    best, worst = results[0], results[-1]
                    print(f"  BS={bs:3d} G={g:2d} {name:5s} best {best[1]} {best[0]:.3f} ms   "
                          f"(worst {worst[1]} {worst[0]:.3f}; {len(results)} configs)", flush=True)
            del q, k, v, do, o, lse, delta, bi
            torch.cuda.empty_cache()
    best = {}
    for r in rows:
        key = (r["kernel"], r["d"], r["bs"], r["g"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    print("  best per (kernel, D, BS, G) -- fwd/dq: (num_warps, num_stages, skip_unused) for FWD_CONFIGS/DQ_CONFIGS;\n"
          "  dkdv: (BLOCK_M, num_warps, num_stages) for DKDV_CONFIGS; dkdv_chunk: tiles per work item (None = rule):")
    for (kern, d, bs, g), r in sorted(best.items()):
        print(f"    {kern:5s} ({d}, {bs}) G={g:2d}: {r['config']}  # {r['ms']:.3f} ms at N={r['n']}")


def write_csv(path: Path, rows: list):
    if not rows:
        return
    keys = []
    for r in rows:
        keys += [kk for kk in r if kk not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=420, help="seconds for the whole run (the last point may overrun by ~20 s)")
    ap.add_argument("--indices", default="nsa", choices=("nsa", "random"))
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep-only", action="store_true")
    ap.add_argument("--sweep-n", type=int, default=32768)
    ap.add_argument("--sweep-groups", default="1,16,4")
    ap.add_argument("--quick", action="store_true", help="timings at 8K and 64K only")
    args = ap.parse_args()
    require_cuda()
    out = Path(os.environ.get("OUT", "./out"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    total = Clock(args.budget)
    table, swept = [], []
    if not args.sweep_only:
        share = 0.55 if not args.no_sweep else 1.0
        timings(Clock(total.left() * share - 5), table, args.indices, args.quick)
        write_csv(out / "nsa_check.csv", table)
    if not args.no_sweep:
        groups = [int(x) for x in args.sweep_groups.split(",")]
        sweep(Clock(total.left() - 5), swept, args.indices, args.sweep_n, groups)
        write_csv(out / "nsa_sweep.csv", swept)
    print(f"done in {time.time() - total.t0:.0f} s")


if __name__ == "__main__":
    main()
