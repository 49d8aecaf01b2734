"""Where the module's forward departs from the torch backend: per-branch relative errors (bf16,
kernel backend vs backend="torch" with the same weights and inputs), the share of (token, KV head)
rows whose selected block sets differ, and the same with compress_kv forced onto its gather path.

    OUT=./out python -m experiments.gpu.module_error_probe [--points 8192:2,8192:4,16384:4]

Found why fig4's module rel_err rose from ~0.003 (6e1c72c) to ~0.02 at the points where compress_kv
takes its block path on CUDA (>= 2^18 token x KV-head rows): the path rounded each summary's partial
products to bf16 before summing them, and the slightly different summaries flipped ~2% of the block
selections (results/module_error_probe/). Writes $OUT/module_error_probe.csv.
"""
from __future__ import annotations

import argparse
import contextlib

import torch

from experiments.gpu.provenance import out_dir, print_table, require_cuda, run_meta, write_rows

HQ, D, HIDDEN = 64, 128, 4096


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    b = b.float()
    return ((a.float() - b).norm() / b.norm()).item()


def differing_sets(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of (token, KV head) rows whose block sets differ (order ignored)."""
    return (a.sort(-1).values != b.sort(-1).values).any(-1).float().mean().item()


@contextlib.contextmanager
def gather_path():
    from nsa_baseline.ops import compression, compression_grad

    old = compression.BLOCK_PATH_MIN_CUDA_ROWS
    for mod in (compression, compression_grad):  # the fused module's copy too
        mod.BLOCK_PATH_MIN_CUDA_ROWS = 1 << 62
    try:
        yield
    finally:
        for mod in (compression, compression_grad):
            mod.BLOCK_PATH_MIN_CUDA_ROWS = old


def probe(n: int, g: int, backend: str) -> list[dict]:
    from nsa_baseline.module import NativeSparseAttention
    from nsa_baseline.ops.compression import compress_kv
    from nsa_baseline.reference.compression import compress_kv as compress_ref
    from nsa_baseline.utils.varlen import single_sequence_cu_seqlens

    h = HQ // g
    torch.manual_seed(0)
    ours = NativeSparseAttention(HIDDEN, HQ, h, D, backend=backend).cuda().bfloat16()
    ref = NativeSparseAttention(HIDDEN, HQ, h, D, backend="torch").cuda().bfloat16()
    ref.load_state_dict(ours.state_dict())
    q = torch.randn(n, HQ, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(n, h, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    gates = torch.rand(n, HQ, 3, device="cuda", dtype=torch.bfloat16)
    cu = single_sequence_cu_seqlens(n, "cuda")
    rows = []
    with torch.no_grad():
        o_ref, b_ref = ref.attention(q, k, v, gates, cu, return_branches=True)
        w, pe = ours.k_cmp_weight, ours.k_cmp_pos
        exact = compress_ref(k.double(), cu, 32, 16, w.double(), pe.double())[0]
        for path, ctx in (("default", contextlib.nullcontext()), ("gather", gather_path())):
            with ctx:
                o, br = ours.attention(q, k, v, gates, cu, return_branches=True)
                k_cmp = compress_kv(k, cu, 32, 16, w.to(k.dtype), pe.to(k.dtype))[0]
            rows.append(dict(n=n, g=g, backend=backend, compress_path=path, rows_x_heads=n * h,
                             o=rel(o, o_ref), compressed=rel(br["compressed"], b_ref["compressed"]),
                             selected=rel(br["selected"], b_ref["selected"]),
                             window=rel(br["window"], b_ref["window"]),
                             sets_differ=differing_sets(br["block_indices"], b_ref["block_indices"]),
                             k_cmp_vs_fp64=rel(k_cmp, exact)))
        rows.append(dict(n=n, g=g, backend="torch", compress_path="reference", rows_x_heads=n * h,
                         k_cmp_vs_fp64=rel(compress_ref(k, cu, 32, 16, w.to(k.dtype), pe.to(k.dtype))[0], exact)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", default="8192:2,8192:4,16384:4", help="N:g,...")
    parser.add_argument("--backend", default="fsa")
    args = parser.parse_args()
    require_cuda()
    rows = []
    for item in args.points.split(","):
        n, g = (int(x) for x in item.split(":"))
        rows += probe(n, g, args.backend)
        print_table(rows[-3:])
    write_rows(out_dir() / "module_error_probe.csv", rows, run_meta())


if __name__ == "__main__":
    main()
