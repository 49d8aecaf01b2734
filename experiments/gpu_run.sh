#!/usr/bin/env bash
# Every sweep the paper comparison needs, on one CUDA machine, then the paper figures:
#   bash experiments/gpu_run.sh                 all stages, in the order below
#   bash experiments/gpu_run.sh main fig3 paper only these stages
# Stages are resumable sweeps: a rerun skips every recorded point (retry_failed=true to retry
# error / oom rows), so a stage cut short by a time limit continues where it stopped.
# Environment: RESULTS_DIR (default results), STAGE_TIMEOUT seconds per stage (default: none),
# EXTRA (more overrides for every sweep, e.g. "timing.rep_ms=50", or "redo_before=2026-11-23T17:00" to
# measure again every point recorded before a kernel change).
set -u
cd "$(dirname "$0")/.."
RESULTS_DIR=${RESULTS_DIR:-results}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-0}
EXTRA=${EXTRA:-}

sweep() {
    echo "== $(date -u +%T) sweep $*"
    # shellcheck disable=SC2086
    timeout "$STAGE_TIMEOUT" python -m experiments.sweep results_dir="$RESULTS_DIR" "$@" $EXTRA \
        || { echo "== stage '$*' ended with status $? (rows recorded so far are kept)"; rereport; }
}

rereport() {  # plots and summary.md of every sweep folder from the rows recorded so far
    for d in "$RESULTS_DIR"/*/rows; do [ -d "$d" ] && python -m experiments.report "$(dirname "$d")"; done
}

stage() {
    case "$1" in
        main)     sweep ;;                                      # g 1,2,4,8 x N 8K..64K x both presets, 4 KV heads
        random)   sweep name=sweep_random_indices indices=random ;;  # the same grid on uniform random indices
        fig3)     sweep paper=fig3 ;;
        fig7_8)   sweep paper=fig8_selected && sweep paper=fig7_8 ;;
        table5)   sweep paper=table5 ;;
        fig4)     sweep paper=fig4 ;;
        tables67) sweep paper=tables67 ;;
        calibration)  # refit the predictions' a * roofline + b to the rows just measured (H100 only)
                  python -m experiments.calibration "$RESULTS_DIR/sweep" "$RESULTS_DIR/fig4" "$RESULTS_DIR/fig7_8" ;;
        paper)    python -m experiments.paper results_dir="$RESULTS_DIR" out_dir="$RESULTS_DIR/paper" ;;
        *)        echo "unknown stage '$1' (main random fig3 fig7_8 table5 fig4 tables67 calibration paper)"; return 2 ;;
    esac
}

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to time')" || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(main fig3 fig7_8 table5 random fig4 tables67 calibration paper)
for s in "${STAGES[@]}"; do stage "$s"; done
