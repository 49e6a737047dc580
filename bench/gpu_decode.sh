#!/usr/bin/env bash
# Decoding on a GPU (issue 14) in one call of at most 10 minutes: the second script for a lent GPU,
# after bench/gpu.sh (training and remat). Same conventions as gpu.sh.
# Tables go to $OUT/gpu.md (and are printed), the scaling plot to $OUT/scaling.png, a log to $OUT/log.txt.
#
#   OUT=bench_out bash bench/gpu.sh
#
# DEVICE (h100, h200, a100; default: read from nvidia-smi) sets the peak used for MFU. Packages missing
# on the GPU machine travel as wheels (on the lent machines only ml-collections; see the device tool's
# notes); a command that runs over its time share is cut, the rest go on.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-bench_out}"
# the GPU's name picks the MFU peak unless DEVICE says
DEVICE="${DEVICE:-$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -o -i -m1 -E 'h100|h200|a100' | tr A-Z a-z)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() {  # step SECONDS COMMAND...: one benchmark, bounded in time (then SIGKILL 10 s later), logged
    local seconds=$1 started=$SECONDS; shift
    echo "### $*" | tee -a "$OUT/log.txt"
    timeout -k 10 "$seconds" "$@" 2>&1 | tee -a "$OUT/log.txt" | grep -v "^W[0-9]"
    rc=${PIPESTATUS[0]}
    echo "(step took $((SECONDS - started)) s of its $seconds)" | tee -a "$OUT/log.txt"
    [ "$rc" = 0 ] || echo "(exit $rc$([ "$rc" = 124 ] && echo ': cut at its time share'))" | tee -a "$OUT/log.txt"
}
# One compilation cache for the suite (fresh each run): a later step that compiles a step compiled before
# loads it instead (its table says so); the first step's compile times are cold.
export JAX_COMPILATION_CACHE_DIR="$(mktemp -d)" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
# JAX and torch share the GPU in one process: JAX takes 45% of its memory up front instead of 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/log.txt"
python3 -c "import jax, flax, optax, torch, transformers as t; print('jax', jax.__version__, jax.devices(), 'flax', \
flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', t.__version__)" \
    2>&1 | grep -v "^W[0-9]" | tee -a "$OUT/log.txt"
# 124M batch 1 / 8 / 64, bf16, 128 new tokens: tokens/s, the weight-read floor, top-k/top-p vs greedy
step 150 python3 bench/sample.py --batches 1,8,64 --new_tokens 128 --dtype bfloat16 --bandwidth --sampling --no_record --out "$OUT/gpu.md"
[ "$rc" = 0 ] || [ "$rc" = 124 ] || { echo "stopped: the first step failed (see $OUT/log.txt)"; exit 1; }
# several tokens per loop iteration (the loop's per-iteration cost is paid once per 4 tokens)
step 100 python3 bench/sample.py --batches 1,8 --new_tokens 128 --dtype bfloat16 --unroll 4 --no_record --out "$OUT/gpu.md"
# the larger sizes at batch 1, as a share of their weight-read floor (goal: 1558M >= 50%)
step 120 python3 bench/sample.py --size 355M --batches 1 --new_tokens 64 --dtype bfloat16 --bandwidth --repeat 2 --no_record --out "$OUT/gpu.md"
step 180 python3 bench/sample.py --size 1558M --batches 1 --new_tokens 64 --dtype bfloat16 --bandwidth --repeat 2 --no_record --out "$OUT/gpu.md"
echo "done: $OUT/gpu.md"
