"""Could cuDNN / FlashAttention SDPA carry the window and compressed branches? One call, timings only.

    python -m experiments.gpu.sdpa_branch_probe [--lengths 8192,16384,65536] [--heads 64]

Our Triton window and compressed kernels run at ~200-240 TFLOP/s; dense causal SDPA (cuDNN) at ~570.
Both branches can be written as batched causal SDPA calls:
- window (W keys): query chunk i of W tokens sees chunk i causally and chunk i - 1 through a strict
  upper triangle (a triangle again once both are reversed), the two merged by their LSEs;
- compressed (stride s, summaries j visible to t iff j * s + kernel - 1 <= t): the queries of one
  residue t mod s see the summaries causally with a fixed offset, so s batches of N / s queries.
This times those SDPA shapes (fwd and fwd+bwd, cuDNN and flash backends, contiguous [B, H, L, D]
inputs: layout copies, reversal and the LSE merge are not included) beside our kernels at the
module's shape (g = 1, d = 128, window 512, (32, 16) compression), so the decision rests on a
measurement. Writes $OUT/sdpa_branch_probe.csv with GPU, torch, Triton and commit.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from experiments.gpu.provenance import out_dir, print_table, require_cuda, run_meta, write_rows
from nsa_baseline.ops import compressed_sdpa
from nsa_baseline.ops.compressed import compressed_attention
from nsa_baseline.ops.compressed_triton import compressed_attention_triton
from nsa_baseline.ops.window_triton import sliding_window_attention_triton

D, WINDOW, KERNEL, STRIDE = 128, 512, 32, 16
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def fwd_bwd(fn, inputs):
    """(forward-only ms, forward + backward ms) of fn(*inputs), inputs requiring grad."""
    do = torch.randn_like(fn(*inputs))

    def both():
        torch.autograd.grad(fn(*inputs), inputs, do)

    with torch.no_grad():
        fwd = bench(lambda: fn(*inputs))
    return fwd, bench(both)


def leaf(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_()


def sdpa_rows(name: str, shapes: list[tuple], flops: float) -> list[dict]:
    """Rows per backend for a sum of causal SDPA calls of the given (B, H, Lq, Lk) shapes."""
    rows = []
    for backend, kind in BACKENDS.items():
        fwd = both = 0.0
        try:
            for b, h, lq, lk in shapes:
                q, k, v = leaf(b, h, lq, D), leaf(b, h, lk, D), leaf(b, h, lk, D)
                with sdpa_kernel(kind):
                    f, fb = fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v))
                fwd, both = fwd + f, both + fb
            rows.append(dict(impl=f"{name}_sdpa_{backend}", fwd_ms=round(fwd, 4), fwd_bwd_ms=round(both, 4),
                             fwd_bwd_tflops=round(flops * 3.5 / both / 1e9, 1), status="ok"))
        except Exception as exc:  # noqa: BLE001 - a backend refusing the shape is a result
            rows.append(dict(impl=f"{name}_sdpa_{backend}", status=f"{type(exc).__name__}: {str(exc)[:80]}"))
    return rows


def compressed_paths(q, kc, vc, flops: float) -> list[dict]:
    """The whole compressed branch (layout gathers included) through ops/compressed_sdpa.py with each
    fused backend forced, and through our Triton kernels, as the module calls them."""
    rows = []
    paths = {"compressed_branch_triton": (None, compressed_attention_triton)}
    paths.update({f"compressed_branch_sdpa_{b}": (b, compressed_sdpa.compressed_attention_sdpa)
                  for b in compressed_sdpa.CUDA_BACKENDS})
    saved = compressed_sdpa.CUDA_BACKENDS
    for name, (backend, fn) in paths.items():
        compressed_sdpa._CHOSEN.clear()
        compressed_sdpa.CUDA_BACKENDS = (backend,) if backend else saved
        try:
            f, fb = fwd_bwd(lambda q, k, v: fn(q, k, v, None, None, KERNEL, STRIDE)[0], (q, kc, vc))
            rows.append(dict(impl=name, fwd_ms=round(f, 4), fwd_bwd_ms=round(fb, 4),
                             fwd_bwd_tflops=round(flops * 3.5 / fb / 1e9, 1), status="ok"))
        except Exception as exc:  # noqa: BLE001 - a backend refusing the shape is a result
            rows.append(dict(impl=name, status=f"{type(exc).__name__}: {str(exc)[:80]}"))
        finally:
            compressed_sdpa.CUDA_BACKENDS = saved
            compressed_sdpa._CHOSEN.clear()
    return rows


def profile_branch(n: int, h: int) -> None:
    """torch.profiler's CUDA kernel table of one fwd+bwd of the compressed branch on cuDNN."""
    q, kc, vc = leaf(n, h, D), leaf((n - KERNEL) // STRIDE + 1, h, D), leaf((n - KERNEL) // STRIDE + 1, h, D)
    compressed_sdpa.CUDA_BACKENDS, saved = ("cudnn",), compressed_sdpa.CUDA_BACKENDS

    def step():
        o = compressed_sdpa.compressed_attention_sdpa(q, kc, vc, None, None, KERNEL, STRIDE)[0]
        torch.autograd.grad(o, (q, kc, vc), torch.ones_like(o))

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    compressed_sdpa.CUDA_BACKENDS = saved
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=90))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="8192,16384,65536")
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--profile", type=int, default=0, help="N: profile the cuDNN compressed branch's fwd+bwd at N")
    args = ap.parse_args()
    require_cuda()
    if args.profile:
        profile_branch(args.profile, args.heads)
    meta, rows = run_meta(), []
    h = args.heads
    for n in map(int, args.lengths.split(",")):
        point = dict(N=n, heads=h, d=D)
        # forward FLOPs of each branch (2 products of 2 * rows * keys * D), the backward counted as 2.5x
        win_flops = 4 * n * WINDOW * D * h
        n_cmp = (n - KERNEL) // STRIDE + 1
        cmp_flops = 4 * n * (n_cmp / 2) * D * h
        q, k, v = leaf(n, h, D), leaf(n, h, D), leaf(n, h, D)
        f, fb = fwd_bwd(lambda q, k, v: sliding_window_attention_triton(q, k, v, WINDOW), (q, k, v))
        rows.append(dict(point, impl="window_ours", fwd_ms=round(f, 4), fwd_bwd_ms=round(fb, 4),
                         fwd_bwd_tflops=round(win_flops * 3.5 / fb / 1e9, 1), status="ok"))
        chunks = n // WINDOW
        rows += [dict(point, **r) for r in sdpa_rows(
            "window", [(chunks, h, WINDOW, WINDOW), (chunks, h, WINDOW - 1, WINDOW)], win_flops)]
        kc, vc = leaf(n_cmp, h, D), leaf(n_cmp, h, D)
        f, fb = fwd_bwd(lambda q, k, v: compressed_attention(q, k, v, None, None, KERNEL, STRIDE)[0], (q, kc, vc))
        rows.append(dict(point, impl="compressed_flex", fwd_ms=round(f, 4), fwd_bwd_ms=round(fb, 4),
                         fwd_bwd_tflops=round(cmp_flops * 3.5 / fb / 1e9, 1), status="ok"))
        rows += [dict(point, **r) for r in sdpa_rows("compressed", [(STRIDE, h, n // STRIDE, n_cmp)], cmp_flops)]
        rows += [dict(point, **r) for r in compressed_paths(q, kc, vc, cmp_flops)]
        q_d, k_d, v_d = leaf(1, h, n, D), leaf(1, h, n, D), leaf(1, h, n, D)
        with sdpa_kernel(BACKENDS["cudnn"]):
            f, fb = fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), (q_d, k_d, v_d))
        rows.append(dict(point, impl="dense_causal_sdpa_cudnn", fwd_ms=round(f, 4), fwd_bwd_ms=round(fb, 4),
                         fwd_bwd_tflops=round(4 * n * n / 2 * D * h * 3.5 / fb / 1e9, 1), status="ok"))
        # the private cuDNN op that returns the LSE the merge needs (a smoke test of its signature)
        try:
            qb, kb, vb = (x.detach()[:, :, :1024] for x in (q_d, k_d, v_d))
            res = torch.ops.aten._scaled_dot_product_cudnn_attention(qb, kb, vb, None, True, 0.0, True, False)
            rows.append(dict(point, impl="cudnn_private_op_lse", status=f"ok: lse {tuple(res[1].shape)} {res[1].dtype}"))
        except Exception as exc:  # noqa: BLE001
            rows.append(dict(point, impl="cudnn_private_op_lse", status=f"{type(exc).__name__}: {str(exc)[:100]}"))
        print_table(rows[-12:])
        del q, k, v, kc, vc, q_d, k_d, v_d
        torch.cuda.empty_cache()
    path = out_dir() / "sdpa_branch_probe.csv"
    write_rows(path, rows, meta)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
