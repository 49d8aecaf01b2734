"""FSA launch-config sweep on the GPU in one call. The defaults of fsa/tuning.py were set from register
and shared-memory budgets and never swept like NSA's tables; this times the alternatives.

    python -m experiments.gpu.fsa_tune [--gqa 1,4] [--seqlen 65536] [--sparsity 64:16,128:8] [--budget-s 420]
                                       [--kv-heads 4] [--grids full|focus]

Per point (bf16, d=128, 4 KV heads unless --kv-heads: 64 at g=1 is the module's 64-query-head shape,
NSA-path indices): the forward kernels (fsa_selected_fwd) and the backward
kernels (fsa_selected_bwd) under every config of FWD_GRID / BWD_GRID, each result checked against the default
config's first (a config that computes something else is reported as "mismatch", not timed), then
timed with do_bench. Stops cleanly when the time budget is spent (compiling a config takes seconds).
Writes $OUT/fsa_tune.csv (OUT defaults to ./out) with GPU, torch, Triton and git commit per row.
"""
from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import asdict
from typing import Callable

import pandas as pd
import torch
import triton

from fsa import tuning
from fsa.backward import fsa_selected_bwd
from experiments.gpu.provenance import out_dir, require_cuda, run_meta
from fsa.forward import fsa_selected_fwd
from nsa_baseline.utils.block_index import build_block_index

FWD_GRID = [tuning.LaunchConfig(m, c, w, s) for m, c, w, s in
            itertools.product((32, 64, 128), (4, 8, 16), (4, 8), (2, 3))]
BWD_GRID = [tuning.LaunchConfig(m, c, w, s, key_tile=kt) for m, c, w, s, kt in
            itertools.product((32, 64), (8, 16, 32), (4, 8), (1, 2), (32, 64))]
# --grids focus: the backward's rows, warps, stages and key tiles at the default's 16 tiles, no forward
# sweep (the default forward is still timed): what bounds registers and spills, in a short call
FOCUS_BWD_GRID = [c for c in BWD_GRID if c.chunk_tiles == 16]
MATCH_TOL = 1e-2  # bf16 results of two tilings differ by rounding only


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error over the finite entries of b; inf where a and b disagree on which are finite
    (lse is -inf for a row that sees no key)."""
    a, b = a.float(), b.float()
    finite = torch.isfinite(b)
    if not torch.equal(finite, torch.isfinite(a)):
        return float("inf")
    return ((a - b)[finite].norm() / b[finite].norm().clamp_min(1e-30)).item()


def tune_point(q, k, v, idx, block: int, topk: int, do, fwd_grid, bwd_grid,
               timer: Callable[[Callable], float], seconds_left: Callable[[], float]) -> list[dict]:
    """Rows (pass, config fields, ms or status) for one point; the defaults first, as the reference."""
    cu = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=q.device)
    scale = q.shape[-1] ** -0.5
    index = build_block_index(idx, block, cu, k.shape[1])
    o_ref, lse_ref = fsa_selected_fwd(q, k, v, index, block, topk, scale)
    grads_ref = fsa_selected_bwd(q, k, v, o_ref, lse_ref, do, index, block, topk, scale)
    runs = {
        "fwd": (fwd_grid, lambda: fsa_selected_fwd(q, k, v, index, block, topk, scale), (o_ref, lse_ref)),
        "bwd": (bwd_grid, lambda: fsa_selected_bwd(q, k, v, o_ref, lse_ref, do, index, block, topk, scale), grads_ref),
    }
    rows = []
    for pass_name, (grid, call, expected) in runs.items():
        default = tuning.launch_config(q.shape[-1], block, pass_name == "bwd", q.device)
        for cfg in [default] + [c for c in grid if c != default]:
            row = {"pass": pass_name, "default": cfg == default, **asdict(cfg)}
            if seconds_left() <= 0:
                rows.append(dict(row, status="budget spent"))
                continue
            overrides = {"bwd" if pass_name == "bwd" else "fwd": cfg}
            try:
                with tuning.launch_config_override(**overrides):
                    got = call()
                    err = max(rel(a, b) for a, b in zip(got, expected))
                    if not err < MATCH_TOL:
                        rows.append(dict(row, status="mismatch", rel_err=err))
                        continue
                    rows.append(dict(row, status="ok", rel_err=err, ms=timer(call)))
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: record and go on
                rows.append(dict(row, status="error", message=f"{type(exc).__name__}: {exc}"[:200]))
    return rows


def main() -> None:
    from experiments.gpu.fsa_bench import KV_HEADS, make_indices

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gqa", default="1,4")
    ap.add_argument("--seqlen", default="65536")
    ap.add_argument("--sparsity", default="64:16,128:8")
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--kv-heads", type=int, default=KV_HEADS)
    ap.add_argument("--grids", choices=("full", "focus"), default="full",
                    help="focus: no forward sweep, the backward at 16 tiles per item (FOCUS_BWD_GRID)")
    args = ap.parse_args()
    fwd_grid, bwd_grid = (FWD_GRID, BWD_GRID) if args.grids == "full" else ([], FOCUS_BWD_GRID)
    require_cuda()
    deadline = time.monotonic() + args.budget_s
    meta, out = run_meta(), out_dir()
    rows = []
    for sp in args.sparsity.split(","):
        block, topk = map(int, sp.split(":"))
        for g, n in itertools.product(map(int, args.gqa.split(",")), map(int, args.seqlen.split(","))):
            q = torch.randn(n, g * args.kv_heads, 128, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(n, args.kv_heads, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            idx = make_indices("nsa", q, k, n, block, topk)
            do = torch.randn_like(q)
            point = dict(gqa=g, kv_heads=args.kv_heads, seqlen=n, block_size=block, topk=topk, **meta)
            for r in tune_point(q, k, v, idx, block, topk, do, fwd_grid, bwd_grid,
                                lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"),
                                lambda: deadline - time.monotonic()):
                rows.append(dict(point, **r))
                print({k: v for k, v in rows[-1].items() if k not in meta}, flush=True)
            pd.DataFrame(rows).to_csv(out / "fsa_tune.csv", index=False)
            del q, k, v, idx, do
            torch.cuda.empty_cache()
    best = pd.DataFrame(rows)
    best = best[best["status"] == "ok"].sort_values("ms").groupby(["gqa", "seqlen", "block_size", "pass"]).head(3)
    print(best.to_string())


if __name__ == "__main__":
    main()
