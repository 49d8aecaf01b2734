"""Launch variants of two module stages in one GPU call: the fused selection kernel's top-T merge
(insertion, the bitonic network on 64-bit or 32-bit sort keys) and the compressed backward's dK/dV
with the rows of every summary tile shared by several programs (few KV heads).

    python -m experiments.gpu.stage_bench [--budget 300] [--stages selection,dkdv]

bf16, 64 query heads, d = 128, kernel 32 / stride 16, one sequence. Selection: every variant's block
sets are compared with the insertion merge's (rows whose sets differ are counted: exact ties with
64-bit keys, near-ties within 2^-11 with 32-bit ones), then timed (`triton.testing.do_bench`
medians). dK/dV: each row-share count checked against one share (max relative error), then timed.
Writes stage_bench_{selection,dkdv}.csv with GPU, torch, Triton and commit under $OUT (else ./out)
and prints the tables.
"""
from __future__ import annotations

import argparse
import time

import torch
import triton

from experiments.gpu.provenance import out_dir, print_table, require_cuda, run_meta, write_rows

HQ, D, KS, STRIDE = 64, 128, 32, 16
BF16 = torch.bfloat16
START = time.time()


def bench(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=50)


def inputs(n: int, g: int, seed: int = 0):
    from nsa_baseline.ops.compression import compress_kv

    h = HQ // g
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(n, HQ, D, device="cuda", generator=gen).to(BF16)
    k_cmp, cu_cmp = compress_kv(torch.randn(n, h, D, device="cuda", generator=gen).to(BF16), None, KS, STRIDE)
    v_cmp, _ = compress_kv(torch.randn(n, h, D, device="cuda", generator=gen).to(BF16), None, KS, STRIDE)
    return q, k_cmp.contiguous(), v_cmp.contiguous(), cu_cmp


# The first is the reference for rows_differing (insertion: the rule's exact order). Decided earlier
# (results/stage_bench/README.md): bitonic, 64 rows, 4 warps, 64 summaries per tile. keys: the width of
# the network's packed (score, block) keys (32: scores ranked to a relative 2^-11, so near-ties may differ).
SELECTION_VARIANTS = [dict(merge="insert"), dict(merge="bitonic", keys=64), dict(merge="bitonic", keys=32)]


def selection(rows: list, n: int, g: int, bs: int, topk: int) -> None:
    from nsa_baseline.ops.compressed_triton import compressed_attention_triton
    from nsa_baseline.ops.selection_kernel import selection_scores_fwd
    from nsa_baseline.utils.varlen import single_sequence_cu_seqlens, token_sequence_ids

    q, k_cmp, v_cmp, cu_cmp = inputs(n, g)
    cu = single_sequence_cu_seqlens(n, q.device)
    tok = token_sequence_ids(cu, n).int()
    with torch.no_grad():
        _, lse = compressed_attention_triton(q, k_cmp, v_cmp, None, cu_cmp, KS, STRIDE)
    nb = triton.cdiv(n, bs)

    def run(cfg):
        return selection_scores_fwd(q, k_cmp, lse, cu, cu_cmp, tok, 0, n, nb, D ** -0.5, KS, STRIDE, bs,
                                    topk=topk, init_blocks=1, local_blocks=2, config=cfg)

    base = run(SELECTION_VARIANTS[0]).sort(-1).values
    for cfg in SELECTION_VARIANTS:
        try:
            got = run(cfg).sort(-1).values
            differ = float((got != base).any(-1).float().mean())
            ms = bench(lambda: run(cfg))
            note = ""
        except Exception as e:  # noqa: BLE001 - e.g. out of resources: record and go on
            differ, ms, note = float("nan"), float("nan"), f"{type(e).__name__}: {str(e)[:100]}"
        rows.append(dict(N=n, G=g, BS=bs, T=topk, config=str(cfg), ms=f"{ms:.3f}",
                         rows_differing=f"{differ:.2e}", note=note))
        print(rows[-1], flush=True)


def dkdv(rows: list, n: int, g: int) -> None:
    from nsa_baseline.ops.compressed import checked_compressed_args
    from nsa_baseline.ops.compressed_triton import (TileConfig, bwd_dkdv, bwd_preprocess, compressed_fwd,
                                                    config_key, dkdv_config, launch_configs, varlen_meta)

    q, k, v, _ = inputs(n, g)
    h = HQ // g
    cu, cu_cmp, scale = checked_compressed_args(q, k, v, None, None, KS, STRIDE, None)
    meta = varlen_meta(None, None, cu, cu_cmp, n, k.shape[0])
    default = dkdv_config(launch_configs(D, BF16).dkdv, k.shape[0], h, q.device, config_key(D, BF16))
    o, lse = compressed_fwd(q, k, v, meta, KS, STRIDE, scale)
    do = torch.randn_like(o)
    lse2, delta = bwd_preprocess(o, do, lse, None)
    ref = None
    for tile in (default, TileConfig(64, 64, 8, 2), TileConfig(32, 128, 8, 3), TileConfig(64, 128, 8, 2)):
        for splits in (1, 2, 4, 8):
            try:
                dk, dv = bwd_dkdv(q, k, v, do, lse2, delta, meta, KS, STRIDE, scale, tile, splits)
                if ref is None:
                    ref = (dk.float(), dv.float())
                err = max(float((a.float() - b).norm() / b.norm()) for a, b in zip((dk, dv), ref))
                ms = bench(lambda: bwd_dkdv(q, k, v, do, lse2, delta, meta, KS, STRIDE, scale, tile, splits))
                note = ""
            except Exception as e:  # noqa: BLE001
                err, ms, note = float("nan"), float("nan"), f"{type(e).__name__}: {str(e)[:100]}"
            rows.append(dict(N=n, G=g, H=h, tile=f"{tile.block_m}x{tile.block_n} w{tile.num_warps} s{tile.num_stages}",
                             default_tile=tile == default, splits=splits, ms=f"{ms:.3f}", rel_err_vs_first=f"{err:.1e}",
                             note=note))
            print(rows[-1], flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=300.0, help="seconds: no new task starts after this")
    ap.add_argument("--stages", default="selection,dkdv", help="comma list of: selection, dkdv")
    args = ap.parse_args()
    stages = set(args.stages.split(","))
    require_cuda()
    out = out_dir()
    meta = run_meta()
    sel, dk = [], []
    tasks = []
    if "selection" in stages:
        tasks += [lambda: selection(sel, 65536, 1, 64, 16), lambda: selection(sel, 16384, 1, 64, 16),
                  lambda: selection(sel, 65536, 4, 64, 16), lambda: selection(sel, 65536, 1, 128, 8),
                  lambda: selection(sel, 8192, 1, 64, 16), lambda: selection(sel, 65536, 16, 64, 16)]
    if "dkdv" in stages:
        tasks += [lambda: dkdv(dk, 65536, 16), lambda: dkdv(dk, 65536, 4), lambda: dkdv(dk, 16384, 16)]
    skipped = 0
    for task in tasks:
        if time.time() - START > args.budget:
            skipped += 1
            continue
        task()
        torch.cuda.empty_cache()
    write_rows(out / "stage_bench_selection.csv", sel, meta)
    write_rows(out / "stage_bench_dkdv.csv", dk, meta)
    print_table(sel)
    print_table(dk)
    print(f"{meta}; tasks skipped by the budget: {skipped}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
