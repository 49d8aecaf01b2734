"""NSA inside real model shapes: L decoder layers of Llama3-8B / Qwen3-14B (transformers, random
weights, bf16) with dense, NSA and FSA attention (nsa_baseline.models.use_nsa_attention), one H100.

    OUT=./out python -m experiments.gpu.e2e_layers [--models llama3_8b,qwen3_14b] [--layers 2]
        [--seqlens 32768,65536] [--presets 64:16,128:8] [--backends dense,nsa,fsa] [--reps 3]

Per (model, N, backend, preset; dense once per N), one sequence of N tokens through L bare decoder
layers: one training step (fwd + bwd + AdamW) and one prefill, medians, peak memory, per-layer time
and layer 0's attention / MLP split (experiments/e2e_timing.py says how each is timed).
Writes $OUT/e2e_layers.csv (GPU, torch, Triton, commit on every row; oom / error rows recorded) and
prints the table and the FSA speedups. About 4 minutes on an H100 for the defaults.
The resumable Hydra version with plots beside the paper, which also times prefill + 512 generated
tokens: `python -m experiments.e2e` (results/e2e/).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from experiments import e2e_timing
from experiments.gpu.provenance import out_dir, print_table, require_cuda, run_meta, write_rows

START = time.time()


def measure(rows, base, model_name: str, n: int, backend: str, preset, args):
    bs, topk = preset if preset else (None, None)
    key = dict(model=model_name, layers=args.layers, N=n, backend=backend, block_size=bs or "", topk=topk or "")
    for res in e2e_timing.measure(base, n, backend, preset, args.reps, ("train", "prefill")):
        row = dict(key, step=res["step"], status=res["status"])
        if res["status"] == "ok":
            row.update({k: f"{res[k]:.2f}" for k in ("ms", "ms_per_layer", "peak_gb", "attn_ms", "mlp_ms")},
                       attn_share=f"{res['attn_share']:.3f}")
        else:
            row["message"] = res["message"]
        rows.append(row)
        print(f"  [{time.time() - START:5.0f} s] " + " ".join(f"{k}={v}" for k, v in row.items()), flush=True)


def speedups(rows) -> list[dict]:
    """FSA over NSA and over dense, per model, N, preset and step (training step and prefill)."""
    ok = {(r["model"], r["N"], r["backend"], r["block_size"], r["topk"], r["step"]): float(r["ms"])
          for r in rows if r.get("status") == "ok"}
    out = []
    for (model, n, backend, bs, topk, step), ms in ok.items():
        if backend != "fsa":
            continue
        nsa, dense = ok.get((model, n, "nsa", bs, topk, step)), ok.get((model, n, "dense", "", "", step))
        out.append(dict(model=model, N=n, preset=f"({bs},{topk})", step=step, fsa_ms=f"{ms:.1f}",
                        fsa_over_nsa=f"{nsa / ms:.2f}x" if nsa else "", fsa_over_dense=f"{dense / ms:.2f}x" if dense else ""))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="llama3_8b,qwen3_14b", help=f"of {sorted(e2e_timing.SHAPES)}")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers L (as many as fit)")
    ap.add_argument("--seqlens", default="32768,65536", help="tokens N of the one sequence")
    ap.add_argument("--presets", default="64:16,128:8", help="NSA (block_size:topk) presets")
    ap.add_argument("--backends", default="dense,nsa,fsa", help="dense and NSA backends (nsa fsa auto torch)")
    ap.add_argument("--reps", type=int, default=3, help="timed calls per step (after one warmup)")
    args = ap.parse_args()
    require_cuda()
    models = args.models.split(",")
    bad = [m for m in models if m not in e2e_timing.SHAPES]
    if bad:
        sys.exit(f"--models: unknown {bad}, expected some of {sorted(e2e_timing.SHAPES)}")
    seqlens = [int(s) for s in args.seqlens.split(",")]
    presets = [tuple(int(v) for v in p.split(":")) for p in args.presets.split(",")]
    out, meta = out_dir(), run_meta()
    print(f"e2e_layers on {meta['gpu']}, torch {meta['torch']}, Triton {meta['triton']}, commit {meta['git_commit']}",
          flush=True)
    rows: list[dict] = []
    for model_name in models:
        base = e2e_timing.build(model_name, args.layers, max(seqlens))
        print(f"== {model_name}: {args.layers} layers, {sum(p.numel() for p in base.parameters()) / 1e9:.2f} B params",
              flush=True)
        for n in seqlens:
            for backend in args.backends.split(","):
                for preset in ([None] if backend == "dense" else presets):
                    measure(rows, base, model_name, n, backend, preset, args)
        del base
        torch.cuda.empty_cache()
    write_rows(out / "e2e_layers.csv", rows, meta)
    print("\n== per step (ms: median; per-layer = step / L; attn / mlp: layer 0 alone, do_bench medians)")
    print_table(rows)
    print("\n== FSA speedups (issue #16 targets at 64K, (128,8), training step: Llama3-8B >= 1.2x over NSA and "
          ">= 1.8x over dense; Qwen3-14B >= 1.15x / 1.7x; prefill >= 1.5x over dense)")
    print_table(speedups(rows))
    print(f"wrote {out}/e2e_layers.csv in {time.time() - START:.0f} s")
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
