#!/usr/bin/env bash
# The GPU benchmark suite in one call of at most 10 minutes (a lent device's limit per command).
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
# Most important first: a step that runs out of its share loses only its own table (the log says it
# was cut). Shares are sized from the steps' times on an H200 (2026-11-27), which the log records.
# 124M, batch 16 x 1024, bf16: ours (blocks unrolled and scanned) vs transformers (autocast bf16, SDPA); MFU
step 90 python3 bench/train.py --device "$DEVICE" --rounds 3 --steps 10 --no_record --out "$OUT/gpu.md"
# a first step that fails (not cut) means the others would fail alike: stop, leaving device time for a fixed rerun
[ "$rc" = 0 ] || [ "$rc" = 124 ] || { echo "stopped: the first step failed (see $OUT/log.txt)"; exit 1; }
# decoding with the KV cache at batch 1, 8, 64 vs transformers' generate (81 s on an H200)
step 100 python3 bench/sample.py --batches 1,8,64 --new_tokens 128 --dtype bfloat16 --no_record --out "$OUT/gpu.md"
# does 1558M fine-tune with Adam on one 80 GB GPU? compiled peak memory, bf16 compute, float32 Adam state
step 45 python3 launch.py --config=experiments/finetune.py:1558M --dry_run --config.model.dtype=bfloat16 \
    --config.train.batch_size=1 --config.train.loss_chunk=1024 --config.model.scan_layers=True
# where the time goes: a profile of our step by model part and kind of op (command buffers off; 57 s)
step 70 python3 bench/train.py --device "$DEVICE" --rounds 1 --steps 5 --profile 3 --layouts unrolled --no_record --out "$OUT/gpu.md"
# torch.compile as a second peer (our unrolled step again, from the cache)
step 95 python3 bench/train.py --device "$DEVICE" --rounds 3 --steps 10 --compile --layouts unrolled --no_record --out "$OUT/gpu.md"
# the logits matmul over the unpadded vocabulary (the default pads 50257 to 50304 on a GPU): what padding gains
step 55 python3 bench/train.py --device "$DEVICE" --rounds 3 --steps 10 --vocab_multiple 1 --layouts unrolled --no_record --out "$OUT/gpu.md"
# the chunked loss (no [B, T, 50257] float32 logits)
step 55 python3 bench/train.py --device "$DEVICE" --rounds 3 --steps 10 --loss_chunk 2048 --layouts unrolled --no_record --out "$OUT/gpu.md"
# memory and step time vs batch, sequence length and model size; blocks scanned (short compiles);
# each point is printed to the log as it is measured
step 55 python3 bench/scaling.py --dtype bfloat16 --scan_layers --batches 4,16 --seq_lens 256,1024 \
    --sizes 355M,1558M --no_record --out "$OUT/gpu.md" --png "$OUT/scaling.png"
echo "done: $OUT/gpu.md"
