#!/usr/bin/env bash
# The switch that is off until a GPU has timed it, off and on in one call (same machine):
#   compression_grad.IN_PLACE_LINEAR   compression_bench --in-place (the compression alone: agreement,
#                                      time, memory kept) and module_vs_dense --in-place-linear both
# (LOCAL_BLOCKS_KERNEL and DECODE_LAUNCH.window_stream were timed at 77eac19 and stay off:
# results/module_vs_dense/README.md, results/decode_bench/README.md.)
# CSVs under $OUT/in_place and $OUT/module. About 4 minutes on an H100.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}
OUT="$OUT/in_place" python -m experiments.gpu.compression_bench --in-place --sizes 16384,65536 | tail -n 16
OUT="$OUT/module" python -m experiments.gpu.module_vs_dense --in-place-linear both \
    --points 8192:1,16384:1,16384:16,65536:1 | tail -n 10
