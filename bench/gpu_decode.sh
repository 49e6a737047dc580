#!/usr/bin/env bash
# Decoding on a GPU (issue 14) in one call of at most 10 minutes: the second script for a lent GPU,
# after bench/gpu.sh (training and remat). Same conventions as gpu.sh.
# Tables go to $OUT/gpu.md (and are printed), a log to $OUT/log.txt.
#
#   OUT=bench_out bash bench/gpu_decode.sh
source "$(dirname "$0")/gpu_common.sh"
# JAX and torch share the GPU in one process: JAX takes 45% of its memory up front instead of 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}"
python3 -c "import torch, transformers as t; print('torch', torch.__version__, 'transformers', t.__version__)" \
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
