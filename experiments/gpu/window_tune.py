"""Launch configs of the sliding-window backward, one kernel at a time (the module's shape).

    OUT=./out python -m experiments.gpu.window_tune [--points 16384:1,65536:1,65536:16] [--budget 240]

bf16, 64 query heads, d = 128, window 512, one sequence. For each point: the default LaunchConfigs,
then variants that change only the dK/dV config, then only the dQ config, then only the forward's;
each timed as fwd+bwd (`do_bench` median) and checked against the default's o, dq, dk, dv (relative
error <= 1e-2: tile shapes change only the rounding). Writes $OUT/window_tune.csv (GPU, torch,
Triton, commit on every row) and prints the best config per kernel and point.
"""
from __future__ import annotations

import argparse
import time

import torch
import triton

from experiments.gpu.provenance import out_dir, print_table, require_cuda, run_meta, write_rows
from nsa_baseline.ops.window_triton import CONFIGS, LaunchConfigs, TileConfig, sliding_window_attention_triton

HQ, D, W = 64, 128, 512
BF16 = torch.bfloat16
START = time.time()
# TileConfig(block_m rows, block_n keys, warps, stages)
DKDV = [TileConfig(64, 128, 8, 2), TileConfig(64, 64, 4, 3), TileConfig(32, 64, 4, 3), TileConfig(16, 128, 8, 3),
        TileConfig(32, 128, 4, 3), TileConfig(64, 128, 8, 3), TileConfig(128, 64, 8, 2), TileConfig(32, 128, 8, 4)]
DQ = [TileConfig(64, 64, 4, 3), TileConfig(128, 32, 8, 3), TileConfig(64, 128, 8, 2), TileConfig(128, 64, 8, 2),
      TileConfig(128, 128, 8, 2)]
FWD = [TileConfig(128, 128, 8, 2), TileConfig(64, 64, 4, 3), TileConfig(128, 64, 8, 4)]


def fmt(c: TileConfig) -> str:
    return f"{c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}"


def variants() -> list[tuple[str, str, LaunchConfigs]]:
    base = CONFIGS[(128, 2)]
    out = [("default", "", base)]
    out += [("dkdv", fmt(c), base._replace(dkdv=c)) for c in DKDV]
    out += [("dq", fmt(c), base._replace(dq=c)) for c in DQ]
    out += [("fwd", fmt(c), base._replace(fwd=c)) for c in FWD]
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def point(rows: list, n: int, g: int, budget: float) -> None:
    h = HQ // g
    torch.manual_seed(0)
    ins = [torch.randn(n, hh, D, device="cuda", dtype=BF16).requires_grad_() for hh in (HQ, h, h)]
    do = torch.randn(n, HQ, D, device="cuda", dtype=BF16)
    ref = None
    for kernel, cfg_s, cfg in variants():
        if time.time() - START > budget:
            rows.append(dict(N=n, g=g, kernel=kernel, config=cfg_s, status="skipped: budget"))
            continue
        try:
            o = sliding_window_attention_triton(*ins, W, config=cfg)
            grads = torch.autograd.grad(o, ins, do)
            got = (o, *grads)
            if ref is None:
                ref = got
            err = max(rel(a, b) for a, b in zip(got, ref))
            ms = triton.testing.do_bench(
                lambda: torch.autograd.grad(sliding_window_attention_triton(*ins, W, config=cfg), ins, do),
                warmup=25, rep=100)
            status = "ok" if err <= 1e-2 and all(bool(torch.isfinite(t).all()) for t in got) else "WRONG"
            rows.append(dict(N=n, g=g, kernel=kernel, config=cfg_s or "default", fwd_bwd_ms=f"{ms:.3f}",
                             max_rel_err=f"{err:.2e}", status=status))
            print(f"N={n} g={g} {kernel:7s} {cfg_s:22s} {ms:8.3f} ms  err {err:.1e} {status}", flush=True)
        except Exception as e:  # noqa: BLE001 - an unusable config (e.g. out of shared memory) is a row
            rows.append(dict(N=n, g=g, kernel=kernel, config=cfg_s, status=f"error: {type(e).__name__}: {e}"[:200]))
            print(f"N={n} g={g} {kernel} {cfg_s}: {type(e).__name__}", flush=True)
    del ins, do, ref
    torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", default="16384:1,65536:1,65536:16", help="N:g pairs")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds: no new variant starts after this")
    args = ap.parse_args()
    require_cuda()
    out, meta = out_dir(), run_meta()
    rows: list[dict] = []
    for p in args.points.split(","):
        n, g = (int(s) for s in p.split(":"))
        point(rows, n, g, args.budget)
    write_rows(out / "window_tune.csv", rows, meta)
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
