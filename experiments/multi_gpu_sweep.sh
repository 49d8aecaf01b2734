#!/usr/bin/env bash
# The sweep's multi-GPU path against one GPU, on one machine: the same grid run twice,
#   1. hydra/launcher=joblib with one job per GPU (each job holds a GPU through experiments/gpu_lease.py),
#   2. the basic launcher on GPU 0 alone,
# each with its own empty Triton cache (both compile cold) and its own results folder, then
# wall_times.csv (launcher, GPUs, jobs, seconds, status) and which GPU every job of run 1 held.
#   bash experiments/multi_gpu_sweep.sh OUT_DIR [sweep overrides...]
# Needs hydra-joblib-launcher (pip install hydra-joblib-launcher). RUN_TIMEOUT caps each run (s).
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:?usage: multi_gpu_sweep.sh OUT_DIR [sweep overrides...]}
shift
RUN_TIMEOUT=${RUN_TIMEOUT:-0}
GPUS=${GPUS:-$(python -c "import torch; print(torch.cuda.device_count())")}  # GPUS=2 to try it on CPU
if [ "$GPUS" -lt 2 ]; then
    echo "multi_gpu_sweep: needs >= 2 CUDA GPUs, found $GPUS" >&2
    exit 2
fi
mkdir -p "$OUT_DIR"
META=$(python -c "import torch, triton; from experiments.rowtools import git_commit; \
print(f'{torch.cuda.get_device_name() if torch.cuda.is_available() else \"none\"},{torch.__version__},{triton.__version__},{git_commit()}')")
echo "launcher,gpus,jobs,seconds,status,gpu,torch,triton,git_commit,overrides" > "$OUT_DIR/wall_times.csv"

one_run() {  # name gpus visible-devices [overrides...]: one sweep, its wall time appended to the CSV
    local name=$1 gpus=$2 visible=$3; shift 3
    local start status secs jobs
    start=$(date +%s.%N)
    TRITON_CACHE_DIR="$OUT_DIR/.triton_$name" CUDA_VISIBLE_DEVICES=$visible \
        timeout "$RUN_TIMEOUT" python -m experiments.sweep results_dir="$OUT_DIR/$name" "$@" \
        2>&1 | tee "$OUT_DIR/$name.log"
    status=${PIPESTATUS[0]}
    secs=$(python -c "print(f'{$(date +%s.%N) - $start:.1f}')")
    rm -rf "$OUT_DIR/.triton_$name"
    jobs=$(grep -cE "\[HYDRA\][[:space:]]+#[0-9]+ :" "$OUT_DIR/$name.log")  # Hydra's launch lines
    echo "$name,$gpus,$jobs,$secs,$status,$META,\"$*\"" >> "$OUT_DIR/wall_times.csv"
}

one_run joblib "$GPUS" "$(seq -s, 0 $((GPUS - 1)))" "$@" hydra/launcher=joblib hydra.launcher.n_jobs="$GPUS"
one_run basic 1 0 "$@"
grep -h "^job [0-9]" "$OUT_DIR/joblib.log" | sort -n -k2 > "$OUT_DIR/joblib_jobs.txt"  # job -> GPU
cat "$OUT_DIR/wall_times.csv" "$OUT_DIR/joblib_jobs.txt"
