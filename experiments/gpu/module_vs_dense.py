"""Issue #14's headline number alone: `module.attention` fwd+bwd (and fwd) against dense causal SDPA
in the same run, without module_profile's per-stage timings (which take minutes at 64K).

    python -m experiments.gpu.module_vs_dense [--points 8192:1,16384:1,16384:4,65536:1] [--backend auto]
                                              [--sparsity 64:16|128:8]
                                              [--local-blocks off|on|both] [--in-place-linear off|on|both]
                                              [--compressed-sdpa off|on|both]
                                              [--selection-keys32 off|on|both]

bf16, 64 query heads, d = 128, (64, 16) unless --sparsity, kv heads = 64 / g, one sequence; fresh random inputs per
point; `triton.testing.do_bench` medians after a warm-up call (compiles and `auto`'s choice outside
the timing). --local-blocks sets nsa_baseline.fused_attention.LOCAL_BLOCKS_KERNEL (NSA's local blocks
through the window kernels instead of FSA's pair rows); `both` times each point with it off and on, on
the same inputs (tests/ops/test_local_blocks.py checks that the two agree); --in-place-linear likewise
sets nsa_baseline.ops.compression_grad.IN_PLACE_LINEAR (tests/ops/test_compression_inplace.py) and
--compressed-sdpa nsa_baseline.fused_attention.COMPRESSED_SDPA_MIN_TOKENS (None off, 0 on:
tests/ops/test_compressed_sdpa.py), --selection-keys32 nsa_baseline.ops.tuning.SELECTION_CONFIG's
keys (64 off, 32 on: tests/ops/test_nsa_branches.py); with several, every combination. Writes
module_vs_dense.csv (GPU, torch, Triton, commit on every row) under $OUT (else ./out).
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import sys
import time

import torch
import torch.nn.functional as F
import triton

from experiments.gpu.provenance import out_dir, print_table, require_cuda, run_meta, write_rows
from nsa_baseline.ops import tuning

HQ, D, HIDDEN = 64, 128, 2048
BF16 = torch.bfloat16
START = time.time()

# Module switches a run can set (--local-blocks, --in-place-linear, --compressed-sdpa,
# --selection-keys32): flag ->
# (module, attribute, its value off, its value on, the CSV column that records it). `both` times each
# point off and on, on the same inputs.
SWITCHES = {"local_blocks": ("nsa_baseline.fused_attention", "LOCAL_BLOCKS_KERNEL", False, True,
                             "local_blocks_kernel"),
            "in_place_linear": ("nsa_baseline.ops.compression_grad", "IN_PLACE_LINEAR", False, True,
                                "in_place_linear"),
            "compressed_sdpa": ("nsa_baseline.fused_attention", "COMPRESSED_SDPA_MIN_TOKENS", None, 0,
                                "compressed_sdpa"),
            # the selection network's sort-key width: the column holds the whole SELECTION_CONFIG
            "selection_keys32": ("nsa_baseline.ops.tuning", "SELECTION_CONFIG",
                                 {**tuning.SELECTION_CONFIG, "keys": 64},
                                 {**tuning.SELECTION_CONFIG, "keys": 32}, "selection_config")}


def parse_points(text: str) -> list[tuple[int, int]]:
    """"N:g,N:g" -> [(N, g)]; g must divide the 64 query heads."""
    points = []
    for item in text.split(","):
        n, g = (int(v) for v in item.split(":"))
        if n < 1 or g < 1 or HQ % g:
            raise SystemExit(f"--points: {item!r} needs N >= 1 and g dividing {HQ}")
        points.append((n, g))
    return points


def time_point(n: int, g: int, backend: str, device="cuda", dtype=BF16, bench=None, hq: int = HQ, d: int = D,
               **sizes) -> dict:
    """ms of module.attention and of dense SDPA, fwd and fwd+bwd, at one (N, g); `sizes` overrides the
    module's (64, 16) defaults (the CPU test shrinks everything)."""
    from nsa_baseline.module import NativeSparseAttention
    from nsa_baseline.utils.varlen import single_sequence_cu_seqlens

    bench = bench or (lambda fn: triton.testing.do_bench(fn, warmup=5, rep=60))
    h = hq // g
    module = NativeSparseAttention(HIDDEN, hq, h, d, backend=backend, **sizes).to(device, dtype)
    q = torch.randn(n, hq, d, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(n, h, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    gates = torch.rand(n, hq, 3, device=device, dtype=dtype, requires_grad=True)
    cu = single_sequence_cu_seqlens(n, device)
    do = torch.randn(n, hq, d, device=device, dtype=dtype)
    qd, kd, vd = (t.detach().transpose(0, 1)[None].requires_grad_() for t in (q, k, v))
    dod = do.transpose(0, 1)[None]

    def ours_fwd():
        with torch.no_grad():
            return module.attention(q, k, v, gates, cu)

    def ours():
        module.attention(q, k, v, gates, cu).backward(do)

    def dense_fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)

    def dense():
        F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True).backward(dod)

    row = dict(N=n, g=g, HQ=hq, H=h, D=d, backend=backend)
    for name, fn in (("ours_fwd_ms", ours_fwd), ("ours_fwdbwd_ms", ours), ("dense_fwd_ms", dense_fwd),
                     ("dense_fwdbwd_ms", dense)):
        fn()  # compiles, autotunes and picks outside the timing
        if device == "cuda":
            torch.cuda.synchronize()
        row[name] = f"{bench(fn):.3f}"
    row["dense_over_ours_fwd"] = f"{float(row['dense_fwd_ms']) / float(row['ours_fwd_ms']):.2f}"
    row["dense_over_ours_fwdbwd"] = f"{float(row['dense_fwdbwd_ms']) / float(row['ours_fwdbwd_ms']):.2f}"
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", default="8192:1,16384:1,16384:4,65536:1")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--sparsity", default="64:16", help="block_size:topk of the module (the paper's presets: "
                    "64:16, 128:8)")
    for flag, (module, name, *_) in SWITCHES.items():
        ap.add_argument(f"--{flag.replace('_', '-')}", choices=("default", "off", "on", "both"), default="default",
                        help=f"{module}.{name} for the run (default: as committed)")
    args = ap.parse_args()
    points = parse_points(args.points)
    require_cuda()
    out, meta = out_dir(), run_meta()
    print(f"module_vs_dense on {meta['gpu']}, torch {meta['torch']}, Triton {meta['triton']}, "
          f"commit {meta['git_commit']}", flush=True)
    torch.manual_seed(0)
    targets = {flag: importlib.import_module(spec[0]) for flag, spec in SWITCHES.items()}
    choices = {flag: {"default": [getattr(targets[flag], name)], "off": [off], "on": [on],
                      "both": [off, on]}[getattr(args, flag)] for flag, (_, name, off, on, _) in SWITCHES.items()}
    combos = [dict(zip(choices, values)) for values in itertools.product(*choices.values())]
    block, topk = (int(v) for v in args.sparsity.split(":"))
    rows = []
    for n, g in points:
        for combo in combos:
            for flag, on in combo.items():
                setattr(targets[flag], SWITCHES[flag][1], on)
            if len(combos) > 1:
                torch.manual_seed(n + g)  # the same inputs for every setting
            rows.append({**time_point(n, g, args.backend, block_size=block, topk=topk), "block_size": block,
                         "topk": topk, **{SWITCHES[flag][4]: on for flag, on in combo.items()}})
            print(rows[-1], f"({time.time() - START:.0f} s)", flush=True)
        write_rows(out / "module_vs_dense.csv", rows, meta)  # after every point: a cut run keeps its rows
        torch.cuda.empty_cache()
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
