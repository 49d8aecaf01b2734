#!/usr/bin/env bash
# The selection kernel's sort-key width (SELECTION_CONFIG keys 64 / 32), in one call: stage_bench's
# merge variants on the kernel alone (each checked against the insertion reference), then the module
# with 64-bit and 32-bit keys at 64K g=1 / g=2 / g=4 and 16K g=1. CSVs under
# $OUT/{stage,module}. About 6 minutes on an H100 (BUDGET caps the stage bench, default 200 s).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}
OUT="$OUT/stage" python -m experiments.gpu.stage_bench --stages selection --budget "${BUDGET:-200}" | tail -n 40
OUT="$OUT/module" python -m experiments.gpu.module_vs_dense --selection-keys32 both \
    --points 65536:1,65536:2,65536:4,16384:1 | tail -n 8
