# Sourced by bench/gpu.sh, gpu_decode.sh and gpu_ablation.sh: the working directory, $OUT, $DEVICE,
# `step`, one fresh compilation cache for the call, and the machine and versions at the top of the log.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
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
# One compilation cache for the call (fresh each run): a later step that compiles a step compiled before
# loads it instead (its table says so); the first step's compile times are cold.
export JAX_COMPILATION_CACHE_DIR="$(mktemp -d)" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/log.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, \
'optax', optax.__version__)" 2>&1 | grep -v "^W[0-9]" | tee -a "$OUT/log.txt"
