"""Compile the decode kernels for sm_90 without a GPU, in every layout they serve, and report what
ptxas gives them.

    python -m experiments.decode_aot_check [--only "attend PAGE=64 SLOTS=True,select SLOTS=True"]

Triton's ahead-of-time path (experiments/compressed_aot_check.py) on a CPU-only machine: each kernel
of a decode step (append, compressed select one-program and split, selected + window one-program and
split + combine) at the Llama3-8B decode shape (32 q / 8 kv heads, d = 128, (64, 16), bf16), for a
contiguous and a paged cache (PAGE) and with and without a slot map (SLOTS: chunked prefill). It
catches what the interpreter cannot (the compiler's typing, constexpr branches, register spills);
timings and results still need the GPU (tests -m gpu, experiments/gpu/decode_bench.py). Run as its own
process: importing it switches the Triton interpreter off for everything imported after it.
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from experiments.compressed_aot_check import resources, with_default_constexprs  # noqa: E402
from nsa_baseline.ops import decode_append, decode_attend, decode_attend_split, decode_select, decode_split  # noqa: E402

SCALARS = {"MAX_SEQLEN": "i32", "MAX_CMP": "i32", "MAX_PAGES": "i32", "qk_scale": "fp32", "stride_slot": "i32",
           "stride_row": "i32", "stride_head": "i32"}
I32_PTRS = {"len_ptr", "pos_ptr", "idx_ptr", "tbl_ptr", "slot_ptr"}
I64_PTRS = {"keys_part_ptr"}
F32_PTRS = {"o_cmp_ptr", "cmp_lse_ptr", "o_part_ptr", "lse_part_ptr", "logit_ptr", "o_ptr"}
# The decode step's shape: G = 4 query heads per KV head, H = 8, d = 128, BS 64, T 16, window 512.
SHAPE = dict(HQ=32, H=8, G=4, G_PAD=16, D=128, BLOCK_D=128, BS=64, TOPK=16, T_PAD=16, WINDOW=512, BN=64,
             KS=32, STRIDE=16, R=4, C=2, BJ=32, INIT=1, LOCAL=2, IEEE=False, WHILE_LOOP=False, ADVANCE=True)


def compile_sm90(fn, constexprs: dict, num_warps: int = 4, num_stages: int = 2):
    constexprs = with_default_constexprs(fn, constexprs)
    sig = {}
    i64 = I64_PTRS | ({"idx_ptr"} if constexprs.get("CANDS") else set())  # candidate keys instead of indices
    for a in fn.arg_names:
        sig[a] = ("constexpr" if a in constexprs else SCALARS.get(a) or
                  ("*i64" if a in i64 else "*i32" if a in I32_PTRS else "*fp32" if a in F32_PTRS else "*bf16"))
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if sig[a].startswith("*") or sig[a] == "i32"}
    return triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def kernels():
    """(name, kernel, constexprs) of every decode kernel in every layout."""
    for page in (0, 64):
        yield (f"append PAGE={page}", decode_append._append_kernel,
               dict(SHAPE, H_PAD=16, BN=16, J=8, LINEAR=True, PAGE=page))
        for slots in (False, True):
            lay = dict(SHAPE, PAGE=page, SLOTS=slots)
            yield f"attend PAGE={page} SLOTS={slots}", decode_attend._decode_attend_kernel, lay
            yield (f"split keys PAGE={page} SLOTS={slots}", decode_attend_split._split_keys_kernel,
                   dict(lay, S=4, C=7, SHARES=True, CS=4, CW=2))
        yield (f"split keys PAGE={page} CANDS=16", decode_attend_split._split_keys_kernel,
               dict(SHAPE, PAGE=page, SLOTS=False, S=5, C=5, SHARES=True, CS=4, CW=2, CANDS=16, CANDS_PAD=16))
        for branch in (1, 2):  # the decode step's early window branch, then its selected branch
            yield (f"split keys PAGE={page} BRANCH={branch}", decode_attend_split._split_keys_kernel,
                   dict(SHAPE, PAGE=page, SLOTS=False, S=4, C=7, SHARES=True, CS=4, CW=2, BRANCH=branch))
    for slots in (False, True):
        yield f"select SLOTS={slots}", decode_select._decode_select_kernel, dict(SHAPE, SLOTS=slots)
        yield f"split summaries SLOTS={slots}", decode_split._split_summaries_kernel, dict(SHAPE, S=8, SLOTS=slots)
    yield "split select", decode_split._split_select_kernel, dict(SHAPE, S=8, S_PAD=8)
    yield "split merge", decode_split._split_merge_kernel, dict(SHAPE, S=8, S_PAD=8)
    yield "split combine", decode_attend_split._split_combine_kernel, dict(SHAPE, S=4, S_PAD=4)
    yield ("split combine CMP_S=16", decode_attend_split._split_combine_kernel,
           dict(SHAPE, S=4, S_PAD=4, CMP_S=16, CMP_S_PAD=16))


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated kernel names as printed (default: all)")
    only = {n.strip() for n in ap.parse_args().only.split(",") if n.strip()}
    failed = 0
    todo = [k for k in kernels() if not only or k[0] in only]
    if only - {k[0] for k in todo}:
        print(f"unknown kernel names: {sorted(only - {k[0] for k in todo})}")
        return 2
    for name, fn, constexprs in todo:
        try:
            print(f"{name:<34} {resources(compile_sm90(fn, constexprs))}", flush=True)
        except Exception as err:  # report every kernel, then fail
            failed += 1
            print(f"{name:<34} FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
