"""Where the NSA module's time goes at the paper's 64 query heads: every stage timed alone, and the
top CUDA kernels of one module fwd+bwd from torch.profiler.

    OUT=./out python -m experiments.gpu.module_profile [--points 16384:1,65536:1,65536:4] [--budget 500]

bf16, d = 128, (BS, T) = (64, 16), kv heads = 64 / g. Stages (do_bench medians, ms): compress_kv of k and v,
compressed attention, the selection (scores + top-T, and the scores kernel alone), selected attention of
each family, sliding window, SDPA full attention, and the module with its projections and without
(module.attention: what the sweep times; also with fused_backward=False, the per-branch autograd path).
Writes $OUT/module_stages.csv and $OUT/module_profile_<N>_<g>[_per_branch].txt; plot a profile's stage
breakdown with `python -m experiments.module_stage_plot` (no GPU needed).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import triton

from experiments.gpu.provenance import require_cuda, run_meta, write_rows
from nsa_baseline.module import NativeSparseAttention
from nsa_baseline.branches import compressed_attention  # what the module runs
from nsa_baseline.ops.compression import compress_kv
from nsa_baseline.ops.selection import SCORE_BUDGET, select_blocks_from_compressed
from nsa_baseline.ops.selection_kernel import selection_scores_fwd
from nsa_baseline.ops.window import full_attention, sliding_window_attention
from nsa_baseline.utils.varlen import single_sequence_cu_seqlens, token_sequence_ids

HQ, D, KS, ST, BS, T, WIN = 64, 128, 32, 16, 64, 16, 512
BF16 = torch.bfloat16
ROWS: list[dict] = []


def bench(fn, grads_of=()):
    fn()
    torch.cuda.synchronize()

    def run():
        for t in grads_of:
            t.grad = None
        fn()
    return triton.testing.do_bench(run, warmup=25, rep=100)


def fwd_bwd(f):
    def run():
        out = f()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
    return run


def stages(n: int, g: int) -> None:
    h = HQ // g
    torch.manual_seed(0)
    q = torch.randn(n, HQ, D, device="cuda", dtype=BF16, requires_grad=True)
    k = torch.randn(n, h, D, device="cuda", dtype=BF16, requires_grad=True)
    v = torch.randn(n, h, D, device="cuda", dtype=BF16, requires_grad=True)
    k_cmp, cu_cmp = compress_kv(k.detach(), None, KS, ST)
    v_cmp, _ = compress_kv(v.detach(), None, KS, ST)
    kc, vc = k_cmp.requires_grad_(), v_cmp.requires_grad_()
    with torch.no_grad():
        _, lse = compressed_attention(q, kc, vc, None, cu_cmp, KS, ST)
        idx = select_blocks_from_compressed(q, kc, None, cu_cmp, KS, ST, BS, T, lse=lse)
    cu = single_sequence_cu_seqlens(n, q.device)
    tok_seq = token_sequence_ids(cu, n).int()
    nb = triton.cdiv(n, BS)
    chunk = max(1, SCORE_BUDGET // (h * nb))  # the scores buffer select_blocks allows itself
    from fsa.selected import selected_attention as fsa_sel
    from nsa_baseline.ops.selected import selected_attention as nsa_sel

    items = {
        "compress_kv k+v fwd": (lambda: (compress_kv(k, None, KS, ST), compress_kv(v, None, KS, ST)), ()),
        "compressed_attention fwd": (lambda: compressed_attention(q, kc, vc, None, cu_cmp, KS, ST), ()),
        "compressed_attention fwd+bwd": (fwd_bwd(lambda: compressed_attention(q, kc, vc, None, cu_cmp, KS, ST)),
                                         (q, kc, vc)),
        "selection scores kernel (all chunks)": (
            lambda: [selection_scores_fwd(q, kc, lse, cu, cu_cmp, tok_seq, c0, min(chunk, n - c0), nb, D ** -0.5,
                                          KS, ST, BS) for c0 in range(0, n, chunk)], ()),
        "select_blocks_from_compressed (scores+topk)": (
            lambda: select_blocks_from_compressed(q, kc, None, cu_cmp, KS, ST, BS, T, lse=lse), ()),
        "selected fsa fwd+bwd": (fwd_bwd(lambda: fsa_sel(q, k, v, idx, BS)), (q, k, v)),
        "selected nsa fwd+bwd": (fwd_bwd(lambda: nsa_sel(q, k, v, idx, BS)), (q, k, v)),
        "window fwd+bwd": (fwd_bwd(lambda: sliding_window_attention(q, k, v, WIN)), (q, k, v)),
        "sdpa full fwd+bwd": (fwd_bwd(lambda: full_attention(q, k, v)), (q, k, v)),
    }
    for name, (fn, leaves) in items.items():
        try:
            ms = bench(fn if "bwd" in name else _no_grad(fn), leaves)
        except Exception as e:  # noqa: BLE001 - record and go on
            ms = float("nan")
            print(name, "failed:", repr(e)[:300])
        ROWS.append(dict(N=n, g=g, stage=name, ms=round(ms, 3)))
        print(f"N={n} g={g} {name}: {ms:.3f} ms", flush=True)
    x = torch.randn(n, HQ * D, device="cuda", dtype=BF16, requires_grad=True)
    gates = torch.rand(n, HQ, 3, device="cuda", dtype=BF16, requires_grad=True)
    for backend in ("fsa", "nsa"):
        mod = NativeSparseAttention(HQ * D, HQ, h, D, backend=backend).cuda().to(BF16)
        attn_leaves = (q, k, v, gates, *mod.parameters())
        calls = {"module {} fwd+bwd (with projections)": (lambda: mod(x), (x, *mod.parameters()), True),
                 "module.attention {} fwd+bwd": (lambda: mod.attention(q, k, v, gates), attn_leaves, True),
                 # one autograd Function per branch, autograd adding their gradients (before issue #14)
                 "module.attention {} fwd+bwd per-branch": (lambda: mod.attention(q, k, v, gates), attn_leaves,
                                                            False)}
        for label, (f, leaves, fused) in calls.items():
            mod.fused_backward = fused
            ms = bench(fwd_bwd(f), leaves)
            ROWS.append(dict(N=n, g=g, stage=label.format(backend), ms=round(ms, 3)))
            print(f"N={n} g={g} {label.format(backend)}: {ms:.3f} ms", flush=True)
        if backend == "fsa":
            for fused, suffix in ((True, ""), (False, "_per_branch")):
                mod.fused_backward = fused
                profile(lambda: mod.attention(q, k, v, gates), attn_leaves, f"module_profile_{n}_{g}{suffix}.txt")
        mod.fused_backward = True


def profile(f, leaves, name: str) -> None:
    """CUDA kernel table of one fwd+bwd, the leaves' grads reset first as in bench (else AccumulateGrad
    adds to the previous step's grads, kernels that a training step with zero_grad() does not run)."""
    for t in leaves:
        t.grad = None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fwd_bwd(f)()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=200)
    with open(os.path.join(os.environ.get("OUT", "."), name), "w") as f:
        f.write(table)


def _no_grad(fn):
    def run():
        with torch.no_grad():
            fn()
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", default="16384:1,65536:1,65536:4")
    ap.add_argument("--budget", type=float, default=500)
    args = ap.parse_args()
    require_cuda()
    meta = run_meta()  # GPU, torch, Triton, commit on every row
    t0 = time.time()
    out = os.environ.get("OUT", ".")
    for p in args.points.split(","):
        if time.time() - t0 > args.budget:
            print("budget spent; skipped", p)
            continue
        n, g = map(int, p.split(":"))
        stages(n, g)
        torch.cuda.empty_cache()
        write_rows(Path(out) / "module_stages.csv", ROWS, meta)  # after every point: a cut run keeps its rows


if __name__ == "__main__":
    main()
