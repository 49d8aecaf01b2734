"""Compile the sliding-window kernels for sm_90 without a GPU and report what ptxas gives them.

    python -m experiments.window_aot_check [--dtype bf16] [--d 128] [--g 1,16] [--configs default,m64]

As experiments/compressed_aot_check.py (whose compile_sm90 and resources it uses): the whole Triton
pipeline down to the cubin runs on a CPU-only machine, so compile errors of the GPU path (which the
interpreter's tests never run: it takes while loops where the GPU takes range loops) show here, and
cuobjdump's STACK > 0 marks a config that spills. Timings still need the GPU
(experiments/gpu/window_bench.py).
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402

from experiments.compressed_aot_check import SCALARS, compile_sm90, resources  # noqa: E402
from nsa_baseline.ops import window_kernels as K  # noqa: E402
from nsa_baseline.ops.window_triton import CHOICES, CONFIGS  # noqa: E402

WINDOW_SCALARS = dict(SCALARS, W="i32")
WINDOW_INT_PTRS = {"tok_start", "tok_end"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--g", default="1,16")
    ap.add_argument("--block-local", default="0",
                    help="BLOCK_LOCAL values (0: sliding window; BS: the module's local blocks), comma-separated")
    ap.add_argument("--configs", default="default",
                    help="names of window_triton.CHOICES (D = 128, 16-bit), or 'table' for CONFIGS[D, dtype]")
    args = ap.parse_args()
    d_pad = max(64, triton.next_power_of_2(args.d))
    prec = "ieee" if args.dtype == "fp32" else "tf32"
    names = args.configs.split(",")
    for g in map(int, args.g.split(",")):
        for cname in names:
            cfgs = CONFIGS[(d_pad, 4 if args.dtype == "fp32" else 2)] if cname == "table" else CHOICES[cname]
            for varlen, local in ((v, b) for v in (False, True) for b in map(int, args.block_local.split(","))):
                common = dict(G=g, D=args.d, BLOCK_D=max(16, triton.next_power_of_2(args.d)), VARLEN=varlen,
                              PREC=prec, WHILE_LOOP=False, ACCUMULATE=local > 0, BLOCK_LOCAL=local)
                for name, fn, c in (("fwd", K.window_fwd_kernel, cfgs.fwd),
                                    ("dkdv", K.window_bwd_dkdv_kernel, cfgs.dkdv),
                                    ("dq", K.window_bwd_dq_kernel, cfgs.dq)):
                    t0 = time.time()
                    ck = compile_sm90(fn, args.dtype, dict(common, BLOCK_M=c.block_m, BLOCK_N=c.block_n),
                                      c.num_warps, c.num_stages, WINDOW_SCALARS, WINDOW_INT_PTRS)
                    print(f"{name:4s} {args.dtype} D={args.d} G={g:2d} {cname:8s} varlen={varlen!s:5s} local={local} "
                          f"{c.block_m:3d}x{c.block_n:3d} w{c.num_warps} s{c.num_stages}: {resources(ck)}, "
                          f"shared {ck.metadata.shared} B ({time.time() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
