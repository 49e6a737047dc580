"""LoRA against full fine-tuning: compiled memory of the step for a GPU, and step time on this CPU.

    python bench/lora.py [--sizes 774M,1558M] [--ranks 8,16] [--target h100] [--batch 1] [--seq_len 1024]
                         [--time_size 124M] [--time_batch 4] [--time_seq_len 256] [--repeat 3] [--smoke]

Memory: each (size, full or rank R) is compiled as `launch.py --dry_run --target=TARGET` compiles it
(deviceless: the target's defaults), Adam, bfloat16 compute and float32 weights, remat full, scanned
blocks, adapters on all four dense layers of each block. Time: the same step at --time_size run on
this machine's CPU (float32, no remat), full and LoRA rank 8 in one process: the ratio is the figure.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GiB = 2**30


def arguments() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="774M,1558M")
    parser.add_argument("--ranks", default="8,16")
    parser.add_argument("--target", default="h100")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--time_size", default="124M")
    parser.add_argument("--time_batch", type=int, default=4)
    parser.add_argument("--time_seq_len", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    common.add_record_flags(parser, "tiny shapes, to check the script runs")
    return parser


def memory_rows(args) -> list[tuple]:
    """Compiled peak per (size, full or LoRA rank) for the target, compiled on this machine."""
    from gpt2_jax import targets
    from gpt2_jax.steps import compile_falling_back_to_xla_attention

    target = targets.parse_target(args.target)
    mesh = targets.make_mesh(target, -1, 1)
    rows = []
    for size in filter(None, args.sizes.split(",")):
        model = common.target_model(size, args.seq_len, args.smoke)
        full_peak = None
        for rank in [0, *map(int, args.ranks.split(","))]:
            t0 = time.perf_counter()
            _, stats, _ = compile_falling_back_to_xla_attention(
                targets.for_target(common.with_lora(model, rank), target), common.lora_train(rank), mesh, args.batch,
                args.seq_len)
            full_peak = full_peak or stats["peak_bytes"]
            rows.append((size, "full" if not rank else f"LoRA r{rank}", f"{stats['argument_bytes'] / GiB:.3f}",
                         f"{stats['temp_bytes'] / GiB:.3f}", f"{stats['peak_bytes'] / GiB:.3f}",
                         f"{stats['peak_bytes'] / full_peak:.2f}x", f"{time.perf_counter() - t0:.0f}"))
            print(" | ".join(rows[-1]), flush=True)
    return rows


def time_rows(args) -> list[tuple]:
    """Median step time on this CPU, full and LoRA rank 8, in one process."""
    import numpy as np

    from gpt2_jax import parallel
    from gpt2_jax.steps import build_steps

    model = common.cpu_model(args.time_size, args.smoke)
    seq_len = min(args.time_seq_len, model.n_ctx)
    batch = np.random.default_rng(0).integers(0, model.n_vocab, (args.time_batch, seq_len + 1)).astype(np.int32)
    mesh = parallel.make_mesh(1, 1)
    rows, full_ms = [], None
    for rank in (0, 8):
        config = common.with_lora(model, rank)
        ms = common.median_step_ms(build_steps(config, common.lora_train(rank), mesh), config, batch, args.repeat)
        full_ms = full_ms or ms
        rows.append((args.time_size if not args.smoke else "tiny", "full" if not rank else f"LoRA r{rank}",
                     f"{args.time_batch} x {seq_len}", f"{ms:.0f}", f"{full_ms / ms:.2f}x"))
        print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    """Both tables, printed and recorded."""
    args = arguments().parse_args()
    if args.smoke:
        args.sizes, args.ranks, args.seq_len, args.repeat, args.no_record = "tiny", "8", 64, 1, True
    from gpt2_jax import targets

    targets.prepare_host()  # before JAX starts: the CPU runs, the target is compiled for
    text = common.table(
        f"LoRA vs full fine-tuning: compiled step for {args.target} (deviceless), Adam, bf16 compute, float32 "
        f"weights and state, remat full, scanned blocks, batch {args.batch} x {args.seq_len}, adapters on "
        "attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj",
        ["size", "training", "arguments GiB", "temporaries GiB", "peak GiB", "of full", "compile s"], memory_rows(args))
    text += "\n" + common.table(
        "LoRA vs full fine-tuning: step time on this CPU (float32, Adam, no remat, the same process)",
        ["size", "training", "batch", "ms per step (median)", "speed vs full"], time_rows(args))
    common.report(text, not args.no_record, args.out)


if __name__ == "__main__":
    main()
