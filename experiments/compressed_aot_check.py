"""Compile the compressed-attention kernels for sm_90 without a GPU and report what ptxas gives them.

    python -m experiments.compressed_aot_check [--dtype bf16] [--d 128] [--g 1,16]

Triton's ahead-of-time path (triton.compile on an ASTSource with a GPUTarget) runs the whole
pipeline (TTGIR, PTX, ptxas from the Triton wheel) on a CPU-only machine; cuobjdump then reads the
cubin's registers per thread and stack (spill) bytes. Pointer and size arguments are declared
16-aligned as Triton's launcher specialises them at run time (otherwise loads are not vectorised
and the numbers mean nothing). Used to pick nsa_baseline.ops.compressed_triton.CONFIGS: a config
with STACK > 0 spills. Timings still need the GPU (experiments/gpu/compressed_bench.py).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from nsa_baseline.ops import compressed_kernels as K  # noqa: E402
from nsa_baseline.ops.compressed_triton import CONFIGS  # noqa: E402

SCALARS = {"N": "i32", "N_CMP": "i32", "HQ": "i32", "H": "i32", "qk_scale": "fp32", "scale": "fp32"}
INT_PTRS = {"tok_seq", "cmp_seq", "cu", "cu_cmp"}
F32_PTRS = {"lse", "lse2", "delta", "dlse"}


def with_default_constexprs(fn, constexprs: dict) -> dict:
    """`constexprs` restricted to fn's arguments, plus the defaults of the constexprs it leaves out (a
    launch without them takes those; the AOT signature would otherwise type them as pointers)."""
    out = {a: val for a, val in constexprs.items() if a in fn.arg_names}
    for p in fn.params:
        if p.is_constexpr and p.has_default and p.name not in out:
            out[p.name] = p.default
    return out


def compile_sm90(fn, dtype: str, constexprs: dict, num_warps: int, num_stages: int,
                 scalars: dict = SCALARS, int_ptrs: set = INT_PTRS, f32_ptrs: set = F32_PTRS):
    """`scalars` (name -> type) and `int_ptrs` name the non-float arguments (other kernels' names);
    `constexprs` may name some that `fn` lacks (one dict for a branch's kernels): those are dropped."""
    constexprs = with_default_constexprs(fn, constexprs)
    sig = {}
    for a in fn.arg_names:
        if a in constexprs:
            sig[a] = "constexpr"
        elif a in scalars:
            sig[a] = scalars[a]
        else:
            sig[a] = "*i32" if a in int_ptrs else "*fp32" if a in f32_ptrs else "*" + dtype
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if sig[a].startswith("*") or sig[a] == "i32"}
    return triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def resources(kernel) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"regs {m.group(1):>3} spill(stack) {m.group(2):>5} B" if m else out.strip()[-120:]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--g", default="1,16")
    args = ap.parse_args()
    d_pad = max(64, triton.next_power_of_2(args.d))
    cfgs = CONFIGS[(d_pad, 4 if args.dtype == "fp32" else 2)]
    prec = "ieee" if args.dtype == "fp32" else "tf32"
    for g in map(int, args.g.split(",")):
        for varlen in (False, True):
            common = dict(G=g, D=args.d, BLOCK_D=max(16, triton.next_power_of_2(args.d)), KS=32, STRIDE=16,
                          VARLEN=varlen, PREC=prec, WHILE_LOOP=False, SPLITS=1, ACCUMULATE=False)
            for name, fn, c in (("fwd", K.compressed_fwd_kernel, cfgs.fwd),
                                ("dkdv", K.compressed_bwd_dkdv_kernel, cfgs.dkdv),
                                ("dq", K.compressed_bwd_dq_kernel, cfgs.dq)):
                ck = compile_sm90(fn, args.dtype, dict(common, BLOCK_M=c.block_m, BLOCK_N=c.block_n),
                                  c.num_warps, c.num_stages)
                print(f"{name:4s} {args.dtype} D={args.d} G={g:2d} varlen={varlen!s:5s} "
                      f"{c.block_m:3d}x{c.block_n:3d} w{c.num_warps} s{c.num_stages}: {resources(ck)}, "
                      f"shared {ck.metadata.shared} B", flush=True)


if __name__ == "__main__":
    main()
