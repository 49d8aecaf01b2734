#!/usr/bin/env bash
# The experimental switches (off: measured no faster on the H100 at 77eac19), each off and on in one call:
#   fused_attention.LOCAL_BLOCKS_KERNEL   module_vs_dense --local-blocks both (8K-64K, g = 1 / 4)
#   DECODE_LAUNCH.window_stream           decode_bench --window-stream 0 then 1 (B = 8 / 32, 64K / 128K)
# CSVs under $OUT/local_blocks and $OUT/window_stream_{0,1}. About 5 minutes on an H100.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}
OUT="$OUT/local_blocks" python -m experiments.gpu.module_vs_dense --local-blocks both \
    --points 8192:1,16384:1,16384:4,65536:1,65536:4
for w in 0 1; do
    OUT="$OUT/window_stream_$w" python -m experiments.gpu.decode_bench --batches 8,32 --lengths 65536,131072 \
        --window-stream "$w" | tail -n 12
done
