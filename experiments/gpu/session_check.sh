#!/usr/bin/env bash
# One GPU call that checks and measures what a session changed: the GPU tests, then the benches, each
# stage with its own time limit, its full output in $OUT/<stage>.txt and its CSVs in $OUT/<stage>/
# (the device tool returns only the last 12,000 characters of output, so the summary printed at the
# end is short: each stage's status and last lines).
#   bash experiments/gpu/session_check.sh                    decode chunk module (about 3 minutes)
#   bash experiments/gpu/session_check.sh tests              the GPU tests (about 9 minutes: a call of its own;
#                                                            carry .whl for pytest-xdist, see run_gpu_tests.sh)
# Stages: tests (pytest -m gpu), decode (decode_bench, Llama3-8B heads, B 1/8/32 x 64K/128K), chunk
# (chunk_bench), module (module_vs_dense at 8K-64K), profile (module_profile at 64K g=1), compress
# (compression_bench --fused-grad: the module backward's compression share, GEMM + add vs one kernel),
# switches (time_switches.sh: module_vs_dense with the compression switches both ways), selection
# (time_selection.sh: the selection kernel's merge variants alone, then the module with
# SELECTION_CONFIG keys 64 / 32).
# STAGE_TIMEOUT (s, default 240; tests: TESTS_TIMEOUT, default 570) caps each stage. Set NSA_GIT_COMMIT:
# the lent machine's .git may be stale. One device call runs 600 s at most.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-240}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-570}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

stage_command() {
    case "$1" in
        tests)   echo "bash experiments/gpu/run_gpu_tests.sh" ;;
        decode)  echo "python -m experiments.gpu.decode_bench --batches 1,8,32 --lengths 65536,131072" ;;
        chunk)   echo "python -m experiments.gpu.chunk_bench" ;;
        module)  echo "python -m experiments.gpu.module_vs_dense" ;;
        profile) echo "python -m experiments.gpu.module_profile --points 65536:1 --budget $((STAGE_TIMEOUT - 30))" ;;
        compress) echo "python -m experiments.gpu.compression_bench --fused-grad --sizes 16384,65536" ;;
        switches) echo "bash experiments/gpu/time_switches.sh" ;;
        selection) echo "bash experiments/gpu/time_selection.sh" ;;
        *)       return 1 ;;
    esac
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(decode chunk module)
summary=()
for s in "${stages[@]}"; do
    cmd=$(stage_command "$s") || { echo "unknown stage '$s' (tests decode chunk module profile compress switches selection)"; exit 2; }
    mkdir -p "$OUT/$s"
    start=$(date +%s)
    # shellcheck disable=SC2086
    limit=$STAGE_TIMEOUT
    [ "$s" = tests ] && limit=$TESTS_TIMEOUT
    OUT="$OUT/$s" timeout "$limit" $cmd > "$OUT/$s.txt" 2>&1
    status=$?
    summary+=("== $s: status $status in $(( $(date +%s) - start )) s ($cmd)")
done
nvidia-smi -L 2>/dev/null | head -2
for line in "${summary[@]}"; do echo "$line"; done
for s in "${stages[@]}"; do
    echo "== $s: last lines"
    tail -n 6 "$OUT/$s.txt" | cut -c1-200
done
