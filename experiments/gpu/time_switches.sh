#!/usr/bin/env bash
# The module's compression switches off and on in one call (same machine), to re-time them after
# kernel changes (timed at 63122c6: IN_PLACE_LINEAR on, COMPRESSED_SDPA_MIN_TOKENS = 65536;
# results/module_vs_dense/README.md):
#   fused_attention.COMPRESSED_SDPA_MIN_TOKENS  compressed_bench --sdpa (the branch alone: ours vs the
#                                               residue layout on cuDNN, 64K and 16K, G = 1 / 4 / 16)
#   compression_grad.IN_PLACE_LINEAR            compression_bench --in-place (agreement, time, memory kept)
#   both in the module                          module_vs_dense --compressed-sdpa both --in-place-linear both
# (LOCAL_BLOCKS_KERNEL and DECODE_LAUNCH.window_stream were timed at 77eac19 and stay off:
# results/module_vs_dense/README.md, results/decode_bench/README.md.)
# CSVs under $OUT/{compressed,in_place,module}. About 4 minutes on an H100.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}
OUT="$OUT/compressed" python -m experiments.gpu.compressed_bench --sdpa --budget 150 | tail -n 16
OUT="$OUT/in_place" python -m experiments.gpu.compression_bench --in-place --sizes 16384,65536 | tail -n 16
OUT="$OUT/module" python -m experiments.gpu.module_vs_dense --compressed-sdpa both --in-place-linear both \
    --points 65536:1,65536:4,16384:1 | tail -n 16
