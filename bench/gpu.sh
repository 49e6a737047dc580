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
step() {  # step SECONDS COMMAND...: one benchmark, bounded in time, logged
    local seconds=$1; shift
    echo "### $*" | tee -a "$OUT/log.txt"
    timeout "$seconds" "$@" 2>&1 | tee -a "$OUT/log.txt" | grep -v "^W[0-9]" || echo "(exit or timeout: $?)" | tee -a "$OUT/log.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/log.txt"
# 124M, batch 16 x 1024, bf16: ours vs transformers (autocast bf16, SDPA) and torch.compile; MFU;
# then a profile of our step: where the time goes, by model part and kind of op.
step 170 python3 bench/train.py --device "$DEVICE" --compile --rounds 3 --steps 10 --profile 3 --no_record --out "$OUT/gpu.md"
# the same with the chunked loss (no [B, T, 50257] float32 logits)
step 80 python3 bench/train.py --device "$DEVICE" --rounds 3 --steps 10 --no_record --out "$OUT/gpu.md" --loss_chunk 2048 --layouts unrolled
# the logits matmul over the vocabulary padded to 50304 (a multiple of 128): does it help here?
step 80 python3 bench/train.py --device "$DEVICE" --rounds 3 --steps 10 --no_record --out "$OUT/gpu.md" --vocab_multiple 128 --layouts unrolled
# decoding with the KV cache at batch 1, 8, 64 vs transformers' generate
step 110 python3 bench/sample.py --batches 1,8,64 --new_tokens 256 --dtype bfloat16 --no_record --out "$OUT/gpu.md"
# does 1558M fine-tune with Adam on one 80 GB GPU? compiled peak memory, bf16 compute, float32 Adam state
step 70 python3 launch.py --config=experiments/finetune.py:1558M --dry_run --config.model.dtype=bfloat16 \
    --config.train.batch_size=1 --config.train.loss_chunk=1024 --config.model.scan_layers=True
# memory and step time vs batch, sequence length and model size
step 80 python3 bench/scaling.py --dtype bfloat16 --batches 1,4,16 --no_record --out "$OUT/gpu.md" --png "$OUT/scaling.png"
echo "done: $OUT/gpu.md"
