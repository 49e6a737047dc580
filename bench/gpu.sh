#!/usr/bin/env bash
# The GPU benchmark suite in one call of at most 10 minutes (a lent device's limit per command).
# Tables go to $OUT/gpu.md (and are printed), the scaling plot to $OUT/scaling.png, a log to $OUT/log.txt.
#
#   OUT=bench_out bash bench/gpu.sh
#
# DEVICE (h100, h200, a100; default: read from nvidia-smi) sets the peak used for MFU. Packages missing
# on the GPU machine travel as wheels (on the lent machines only ml-collections; see the device tool's
# notes); a command that runs over its time share is cut, the rest go on.
source "$(dirname "$0")/gpu_common.sh"
# JAX and torch share the GPU in one process: JAX takes 45% of its memory up front instead of 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}"
python3 -c "import torch, transformers as t; print('torch', torch.__version__, 'transformers', t.__version__)" \
    2>&1 | grep -v "^W[0-9]" | tee -a "$OUT/log.txt"
# Most important first: a step that runs out of its share loses only its own table (the log says it
# was cut). What the open GPU issues still need (13: the loop's tokens/s, the custom VJP, flat Adam, XLA flags;
# 15: the remat ablation and remat=auto on the GPU); the suite of 2026-11-27 (train.py vs torch,
# decoding, the 1558M dry run, the profile) is in BENCHMARKS.md and can be rerun by hand.
# 13: the training loop's own tokens/s (launch.py's loop; dispatch_ahead off and on) vs the bare step
step 140 python3 bench/loop.py --steps 50 --warmup 5 --no_record --out "$OUT/gpu.md"
# a first step that fails (not cut) means the others would fail alike: stop, leaving device time for a fixed rerun
[ "$rc" = 0 ] || [ "$rc" = 124 ] || { echo "stopped: the first step failed (see $OUT/log.txt)"; exit 1; }
# 13: the tied logits' custom VJP (bf16 backward matmuls), then plain autodiff, then Adam over one flat
# vector, in separate processes
# 40 (and 43): with Muon's step beside Adam's in the same run, the Newton-Schulz cost on a GPU
step 55 python3 bench/train.py --device "$DEVICE" --no_torch --layouts unrolled --rounds 3 --steps 10 --jax_optimizers adam,muon --no_record --out "$OUT/gpu.md"
step 45 python3 bench/train.py --device "$DEVICE" --no_torch --layouts unrolled --rounds 3 --steps 10 --logits_backward autodiff --no_record --out "$OUT/gpu.md"
step 40 python3 bench/train.py --device "$DEVICE" --no_torch --layouts unrolled --rounds 3 --steps 10 --flat_optimizer --no_record --out "$OUT/gpu.md"
# 13: XLA GPU flags one at a time (each a process of its own, compiled cold)
step 150 python3 bench/xla_flags.py --flags=--xla_gpu_enable_latency_hiding_scheduler=true,--xla_gpu_enable_triton_gemm=false,--xla_gpu_enable_command_buffer=,--xla_gpu_enable_cublaslt=true --no_record --out "$OUT/gpu.md" -- --device "$DEVICE"
# 15: the remat ablation at 124M on the GPU (blocks scanned: 4 s compiles), then what remat=auto picks there
step 100 python3 launch.py --config=experiments/remat_ablation.py:124M --workdir "$OUT/ablation" \
    --config.model.scan_layers=True --config.model.dtype=bfloat16 --config.ablation.micro_batches=4,8,16 --config.ablation.steps=5
step 40 python3 launch.py --config=experiments/finetune.py:124M --dry_run --config.model.scan_layers=True \
    --config.model.dtype=bfloat16 --config.model.remat=auto --config.train.batch_size=16 --config.data.seq_len=1024
echo "done: $OUT/gpu.md"
