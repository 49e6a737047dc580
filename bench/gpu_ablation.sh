#!/usr/bin/env bash
# The remat ablation at the sizes bench/gpu.sh leaves out (issue 15), in one call of at most 10 minutes:
# 355M timed at micro-batches 1-8, 774M and 1558M timed at micro-batch 1 (every policy compiled; those
# whose compiled peak exceeds ablation.memory_budget_gb, 80 GB here, are not run). Reports under
# $OUT/ablation/remat_SIZE/ablation.{md,png,json}, a log in $OUT/log.txt.
#
#   OUT=bench_out bash bench/gpu_ablation.sh
source "$(dirname "$0")/gpu_common.sh"
# blocks scanned (a block's compile, not 24-48 of them), bf16 compute, 5 timed steps per row
step 230 python3 launch.py --config=experiments/remat_ablation.py:355M --workdir "$OUT/ablation" \
    --config.model.scan_layers=True --config.model.dtype=bfloat16 --config.ablation.micro_batches=1,2,4,8 \
    --config.ablation.steps=5
step 140 python3 launch.py --config=experiments/remat_ablation.py:774M --workdir "$OUT/ablation" \
    --config.model.scan_layers=True --config.model.dtype=bfloat16 --config.ablation.micro_batches=1 \
    --config.ablation.compile_only=False --config.ablation.steps=5
step 190 python3 launch.py --config=experiments/remat_ablation.py:1558M --workdir "$OUT/ablation" \
    --config.model.scan_layers=True --config.model.dtype=bfloat16 --config.ablation.micro_batches=1 \
    --config.ablation.compile_only=False --config.ablation.steps=5
echo "done: $OUT/ablation"
