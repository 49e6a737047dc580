#!/usr/bin/env bash
# The GPU benchmark suite in one call of at most 10 minutes (a lent device's limit per command).
# Tables go to $OUT/gpu.md (and are printed), the scaling plot to $OUT/scaling.png, a log to $OUT/log.txt.
#
#   OUT=bench_out DEVICE=h100 bash bench/gpu.sh
#
# DEVICE (h100, h200, a100) sets the peak used for MFU. Packages missing on the GPU machine travel as
# wheels (see the device tool's notes); a command that runs over its time share is cut, the rest go on.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-bench_out}"
DEVICE="${DEVICE:-h100}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() {  # step SECONDS COMMAND...: one benchmark, bounded in time (then SIGKILL 10 s later), logged
    local seconds=$1; shift
    echo "### $*" | tee -a "$OUT/log.txt"
    timeout -k 10 "$seconds" "$@" 2>&1 | tee -a "$OUT/log.txt" | grep -v "^W[0-9]"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || echo "(exit $rc$([ "$rc" = 124 ] && echo ': cut at its time share'))" | tee -a "$OUT/log.txt"
}
# One compilation cache for the suite (fresh each run): a later step that compiles a step compiled before
# loads it instead (its table says so); the first step's compile times are cold.
export JAX_COMPILATION_CACHE_DIR="$(mktemp -d)" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/log.txt"
# Most important first: a step that runs out of its share loses only its own table. The shares are
# estimates for an H100 (never yet measured: no GPU has run this suite); a cut step says so in the log.
# 124M, batch 16 x 1024, bf16: ours (blocks unrolled and scanned) vs transformers (autocast bf16, SDPA);
# MFU; then a profile of our step: where the time goes, by model part and kind of op.
step 130 python3 bench/train.py --device "$DEVICE" --rounds 3 --steps 10 --profile 3 --no_record --out "$OUT/gpu.md"
# decoding with the KV cache at batch 1, 8, 64 vs transformers' generate
step 90 python3 bench/sample.py --batches 1,8,64 --new_tokens 128 --dtype bfloat16 --no_record --out "$OUT/gpu.md"
# does 1558M fine-tune with Adam on one 80 GB GPU? compiled peak memory, bf16 compute, float32 Adam state
step 50 python3 launch.py --config=experiments/finetune.py:1558M --dry_run --config.model.dtype=bfloat16 \
    --config.train.batch_size=1 --config.train.loss_chunk=1024 --config.model.scan_layers=True
# torch.compile as a second peer (our unrolled step again, from the cache)
step 100 python3 bench/train.py --device "$DEVICE" --rounds 3 --steps 10 --compile --layouts unrolled --no_record --out "$OUT/gpu.md"
# the logits matmul over the vocabulary padded to 50304 (a multiple of 128): does it help here?
step 60 python3 bench/train.py --device "$DEVICE" --rounds 3 --steps 10 --vocab_multiple 128 --layouts unrolled --no_record --out "$OUT/gpu.md"
# the chunked loss (no [B, T, 50257] float32 logits)
step 60 python3 bench/train.py --device "$DEVICE" --rounds 3 --steps 10 --loss_chunk 2048 --layouts unrolled --no_record --out "$OUT/gpu.md"
# memory and step time vs batch, sequence length and model size; blocks scanned (short compiles);
# each point is printed to the log as it is measured
step 80 python3 bench/scaling.py --dtype bfloat16 --scan_layers --batches 4,16 --seq_lens 256,1024 \
    --sizes 355M,774M,1558M --no_record --out "$OUT/gpu.md" --png "$OUT/scaling.png"
echo "done: $OUT/gpu.md"
