"""One NSA decode step (one new token in each of B slots over a cache of L tokens) on the GPU, beside
dense decode through torch SDPA.

    python -m experiments.gpu.decode_bench [--batches 1,8,32] [--lengths 8192,32768,65536,131072]
                                           [--window-stream 0|1] [--fold-merge 0|1]

Llama3-8B heads (32 query / 8 KV, d = 128), the (64, 16) preset (kernel 32 / stride 16, BS 64, T 16,
window 512), bf16, FSA backend (the decode kernels are the same for nsa / fsa / auto). The cache is
filled with random keys, values and summaries (timing only; tests/inference/test_decode_kernels.py
checks the maths) and every slot holds L - 1 tokens, so the new token attends L keys.
Timed (`triton.testing.do_bench` medians; each step gives its length back, so the cache stays put):
- ours attention: module.attention's decode equivalent (decode_append: k/v, summary; the
  compressed-select kernel(s) and the attend kernel(s), the last of which moves the length; no q/k/v/o
  projections), eager and replayed from a CUDA graph;
- ours module: the whole module step (projections included), eager and CUDA graph (DecodeGraph);
- graph16 (ours attention and dense): 16 consecutive steps in one CUDA graph, time per step (the cache
  grows; 1 step in 16 completes a summary, where the other rows time a step that completes one);
- dense: SDPA of q [B, 32, 1, 128] over k, v [B, 8, L, 128] with enable_gqa=True (the backend torch
  picks, named when torch says so), and each fused backend forced, eager and CUDA graph;
- FlashInfer's batch decode over the same keys (those k, v copied into its HND paged cache of 16-row
  pages), CUDA-core and tensor-core variants, checked against SDPA's output first; where the
  package is missing (carry it as a wheel: experiments/flashinfer_wheel.py) a row says so.
GB/s = bytes read / time: ours (T * BS + window + visible summaries) keys and values per KV head per
slot + q + out; dense L keys and values per KV head per slot + q + out. Configurations whose cache
(+ the dense copy) does not fit in 85% of free memory are recorded as skipped.
--window-stream 1 runs the step with DECODE_LAUNCH.window_stream (the window branch on a side stream
beside kernel 1's select and merge), --fold-merge 0 with the compressed select's merge kernel even where
both kernels split (DECODE_LAUNCH.fold_merge); the rows record the settings. Writes decode_bench.csv (GPU, torch,
Triton, commit on every row) under $OUT (else ./out). About 1-2 minutes on an H100.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from experiments import decode_timing as timing
from experiments.decode_costs import decode_bytes, nsa_tokens
from experiments.decode_timing import fill_cache, graphed, sdpa_choice
from experiments.gpu.provenance import out_dir, print_table, require_cuda, run_meta, write_rows

HQ, H, D, HIDDEN = 32, 8, 128, 4096
PRESET = dict(kernel_size=32, kernel_stride=16, block_size=64, topk=16, window_size=512)
BF16 = torch.bfloat16
START = time.time()


def bench_module():
    """The decode benches' module: Llama3-8B heads, PRESET, FSA backend (the decode kernels are the same
    for every backend), bf16 on CUDA, weights drawn from seed 0."""
    from nsa_baseline.module import NativeSparseAttention

    torch.manual_seed(0)
    return NativeSparseAttention(HIDDEN, HQ, H, D, backend="fsa", **PRESET).to("cuda", BF16)


def parse_points(text: str) -> list[tuple[int, int]]:
    """--points "B:L,B:L" -> [(B, L), ...]."""
    return [tuple(int(x) for x in p.split(":")) for p in text.split(",")]


def bench(fn) -> float:
    return timing.bench(fn)[1]


def bytes_ours(b: int, length: int) -> int:
    ks, st, bs, t, w = (PRESET[k] for k in ("kernel_size", "kernel_stride", "block_size", "topk", "window_size"))
    return decode_bytes(length, b, HQ, H, D, 2, nsa_tokens(length, ks, st, bs, t, w).total)


def bytes_dense(b: int, length: int) -> int:
    return decode_bytes(length, b, HQ, H, D, 2, length)


def flashinfer_note(best: dict) -> str:
    """", FlashInfer graph16 <ms>" (its faster variant) when it was timed, else ""."""
    fi = [ms for (impl, mode), ms in best.items() if impl.startswith("flashinfer") and mode == "graph16"]
    return f"; FlashInfer graph16 {min(fi):.4f} ms" if fi else ""


def time_point(rows, b: int, length: int, module, page_size=None):
    from nsa_baseline.inference.decode import decode_attention, decode_device
    from nsa_baseline.inference.graph import DecodeGraph

    base = dict(B=b, L=length, HQ=HQ, H=H, D=D, dtype="bfloat16", page_size=page_size or 0)
    need = 2 * 2 * b * length * H * D * 2  # cache k, v + the dense copy
    free, _ = torch.cuda.mem_get_info()
    if need > 0.85 * free:
        rows.append(dict(base, impl="all", status=f"skipped: needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} free"))
        print(f"  B={b} L={length}: skipped (memory)", flush=True)
        return
    cache = fill_cache(module, b, length, page_size)
    q = torch.randn(b, HQ, D, device="cuda", dtype=BF16)
    k, v = torch.randn(b, H, D, device="cuda", dtype=BF16), torch.randn(b, H, D, device="cuda", dtype=BF16)
    gates = torch.rand(b, HQ, 3, device="cuda", dtype=BF16)
    x = torch.randn(b, HIDDEN, device="cuda", dtype=BF16)

    def attn():
        decode_attention(module, q, k, v, gates, cache)
        cache.lengths.sub_(1)

    def step():
        decode_device(module, x, cache)
        cache.lengths.sub_(1)

    out = decode_attention(module, q, k, v, gates, cache)
    cache.lengths.sub_(1)
    ok = bool(torch.isfinite(out).all())
    ours = bytes_ours(b, length)
    timings = [("ours_attention", "eager", attn), ("ours_attention", "graph", graphed(attn)),
               ("ours_module", "eager", step)]
    mod_graph = DecodeGraph(module, cache, rewind=True)
    mod_graph.x.copy_(x)
    timings.append(("ours_module", "graph", mod_graph.replay))
    for impl, mode, fn in timings:
        ms = bench(fn)
        rows.append(dict(base, impl=impl, mode=mode, ms=f"{ms:.4f}", GBps=f"{ours / ms * 1e-6:.0f}",
                         bytes=ours, status="ok" if ok else "non-finite output"))
    del mod_graph
    ms = timing.time_consecutive(module, cache)[1]
    rows.append(dict(base, impl="ours_attention", mode="graph16", ms=f"{ms:.4f}", GBps=f"{ours / ms * 1e-6:.0f}",
                     bytes=ours, status="ok" if ok else "non-finite output"))
    assert cache.lengths.tolist() == [length - 1] * b, "a timed step did not give its length back"
    # dense decode over a contiguous [B, H, L, D] copy of the same keys (random ones beside a paged cache)
    if page_size is None:
        kd, vd = cache.k.transpose(1, 2).contiguous(), cache.v.transpose(1, 2).contiguous()
    else:
        kd, vd = (torch.randn(b, H, length, D, device="cuda", dtype=BF16) for _ in range(2))
    del cache
    qd = q.view(b, HQ, 1, D)
    dense = bytes_dense(b, length)
    picked = sdpa_choice(qd, kd, vd)
    for name, mode, t, err in timing.time_sdpa_backends(qd, kd, vd, ("eager", "graph", "graph16")):
        if t is None:
            rows.append(dict(base, impl=f"sdpa_{name}", mode=mode, status=f"unsupported: {err}"))
            continue
        rows.append(dict(base, impl=f"sdpa_{name}", mode=mode, ms=f"{t[1]:.4f}", GBps=f"{dense / t[1] * 1e-6:.0f}",
                         bytes=dense, status="ok", sdpa_picked=picked if name == "default" else ""))
    for name, mode, t, err in timing.time_flashinfer(qd, kd, vd, ("eager", "graph", "graph16")):
        if t is None:
            rows.append(dict(base, impl=name, mode=mode, status=f"unsupported: {err}"))
            continue
        rows.append(dict(base, impl=name, mode=mode, ms=f"{t[1]:.4f}", GBps=f"{dense / t[1] * 1e-6:.0f}",
                         bytes=dense, status="ok"))
    del kd, vd
    torch.cuda.empty_cache()
    best = {(r["impl"], r.get("mode")): float(r["ms"]) for r in rows if r["B"] == b and r["L"] == length and "ms" in r}
    dense_ms = {m: min(v for (i, mm), v in best.items() if i.startswith("sdpa") and mm == m) for m in ("graph", "graph16")}
    print(f"  B={b:2d} L={length:6d}: ours attention {best[('ours_attention', 'eager')]:.4f} / "
          f"{best[('ours_attention', 'graph')]:.4f} / {best[('ours_attention', 'graph16')]:.4f} ms (eager / graph / "
          f"graph16), module {best[('ours_module', 'graph')]:.4f} ms graph; best dense {dense_ms['graph']:.4f} / "
          f"{dense_ms['graph16']:.4f} ms (picked {picked or '?'}) -> {dense_ms['graph'] / best[('ours_attention', 'graph')]:.1f}x"
          f" / {dense_ms['graph16'] / best[('ours_attention', 'graph16')]:.1f}x{flashinfer_note(best)}"
          f"  ({time.time() - START:.0f} s)",
          flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--lengths", default="8192,32768,65536,131072")
    ap.add_argument("--page-size", type=int, default=None,
                    help="a paged cache with pages of this many rows (a multiple of 64); default contiguous")
    ap.add_argument("--window-stream", type=int, choices=(0, 1), default=None,
                    help="DECODE_LAUNCH.window_stream for the run (default: as committed)")
    ap.add_argument("--fold-merge", type=int, choices=(0, 1), default=None,
                    help="DECODE_LAUNCH.fold_merge for the run (default: as committed)")
    args = ap.parse_args()
    require_cuda()
    from nsa_baseline.ops.decode_tiles import DECODE_LAUNCH

    if args.window_stream is not None:
        DECODE_LAUNCH.window_stream = args.window_stream
    if args.fold_merge is not None:
        DECODE_LAUNCH.fold_merge = args.fold_merge

    out, meta = out_dir(), run_meta()
    print(f"decode_bench on {meta['gpu']}, torch {meta['torch']}, Triton {meta['triton']}, "
          f"commit {meta['git_commit']}", flush=True)
    module = bench_module()
    rows = []
    for length in (int(s) for s in args.lengths.split(",")):
        for b in (int(s) for s in args.batches.split(",")):
            time_point(rows, b, length, module, args.page_size)
    write_rows(out / "decode_bench.csv", rows, {**meta, "window_stream": DECODE_LAUNCH.window_stream,
                                                          "fold_merge": DECODE_LAUNCH.fold_merge})
    print(f"\n== one decode step, bf16, HQ={HQ}, H={H}, D={D}, (64, 16), window 512 (do_bench medians; "
          "GB/s = bytes read / time)")
    print_table(rows)
    bad = [r for r in rows if r["impl"].startswith("ours") and r["status"] != "ok"]
    print(f"wrote {out}/decode_bench.csv in {time.time() - START:.0f} s" + (" -- ours FAILED above" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
