"""DPO's step: compiled memory for a GPU by where the reference comes from, and its speed against the LM step.

    python bench/dpo.py [--sizes 124M,355M,774M,1558M] [--target h100] [--pairs 1] [--seq_len 1024]
                        [--time_size 124M] [--time_pairs 4] [--time_seq_len 256] [--repeat 3] [--smoke]

Memory: each (size, reference) is compiled as `launch.py --config=experiments/dpo.py --dry_run --target=TARGET`
compiles it (deviceless: the target's defaults), Adam, bfloat16 compute and float32 weights, remat full,
scanned blocks, --pairs pairs of two --seq_len sequences: the reference's log-probs precomputed (carried
by the batch), a frozen copy of the weights given to every step, or LoRA (rank 16 on the four dense
layers of each block) whose reference is its own base with the adapters off; beside them the LM step on
the same number of sequences. Time: on this machine's CPU (float32, no remat, one process), the DPO step
with precomputed reference log-probs against the LM step, in tokens/s of chosen + rejected.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GiB = 2**30
# (name, DPO reference mode or None for the LM step, LoRA rank)
ROWS = (("LM step (2 x pairs sequences)", None, 0), ("DPO, reference precomputed", "batch", 0),
        ("DPO, frozen reference copy", "params", 0), ("DPO, LoRA r16, base as reference", "adapters_off", 16))


def arguments() -> argparse.ArgumentParser:
    """The command line (also parsed by tests/test_bench.py)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="124M,355M,774M,1558M")
    parser.add_argument("--target", default="h100")
    parser.add_argument("--pairs", type=int, default=1, help="pairs per step (each two sequences)")
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--time_size", default="124M")
    parser.add_argument("--time_pairs", type=int, default=4)
    parser.add_argument("--time_seq_len", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    common.add_record_flags(parser, "tiny shapes, to check the script runs")
    return parser


def memory_rows(args) -> list[tuple]:
    """Compiled peak per (size, reference mode) for the target, compiled on this machine."""
    from gpt2_jax import targets
    from gpt2_jax.dpo import DPOSettings
    from gpt2_jax.objectives import NextToken, Preferences
    from gpt2_jax.steps import compile_falling_back_to_xla_attention

    target = targets.parse_target(args.target)
    mesh = targets.make_mesh(target, -1, 1)
    rows = []
    for size in filter(None, args.sizes.split(",")):
        model = common.target_model(size, args.seq_len, args.smoke)
        lm_peak = None
        for name, reference, rank in ROWS:
            t0 = time.perf_counter()
            objective = Preferences(settings=DPOSettings(reference=reference)) if reference else NextToken()
            batch = args.pairs if reference else 2 * args.pairs  # the LM step on as many sequences
            _, stats, _ = compile_falling_back_to_xla_attention(
                targets.for_target(common.with_lora(model, rank), target), common.lora_train(rank), mesh, batch,
                args.seq_len, objective)
            lm_peak = lm_peak or stats["peak_bytes"]
            rows.append((size, name, f"{stats['argument_bytes'] / GiB:.3f}", f"{stats['temp_bytes'] / GiB:.3f}",
                         f"{stats['peak_bytes'] / GiB:.3f}", f"{stats['peak_bytes'] / lm_peak:.2f}x",
                         f"{time.perf_counter() - t0:.0f}"))
            print(" | ".join(rows[-1]), flush=True)
    return rows


def time_rows(args) -> list[tuple]:
    """Median step time on this CPU: the LM step on 2 x pairs windows, the DPO step on pairs, one process."""
    import numpy as np

    from gpt2_jax import parallel
    from gpt2_jax.objectives import NextToken, Preferences
    from gpt2_jax.steps import build_steps

    model = common.cpu_model(args.time_size, args.smoke)
    seq_len = min(args.time_seq_len, model.n_ctx)
    rng = np.random.default_rng(0)
    mesh = parallel.make_mesh(1, 1)
    windows = rng.integers(0, model.n_vocab, (2 * args.time_pairs, seq_len + 1)).astype(np.int32)
    pairs = (windows.reshape(args.time_pairs, 2, seq_len + 1), np.ones((args.time_pairs, 2, seq_len + 1), np.float32),
             rng.normal(-400, 10, (args.time_pairs, 2)).astype(np.float32))
    rows, lm_ms = [], None
    for name, objective, batch in (("LM step", NextToken(), windows),
                                   ("DPO step, reference precomputed", Preferences(), pairs)):
        ms = common.median_step_ms(build_steps(model, common.lora_train(0), mesh, objective), model, batch, args.repeat)
        lm_ms = lm_ms or ms
        tokens = 2 * args.time_pairs * seq_len
        rows.append((args.time_size if not args.smoke else "tiny", name, f"{2 * args.time_pairs} x {seq_len}",
                     f"{ms:.0f}", f"{tokens / ms * 1000:,.0f}", f"{lm_ms / ms:.2f}x"))
        print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    """Both tables, printed and recorded."""
    args = arguments().parse_args()
    if args.smoke:
        args.sizes, args.seq_len, args.repeat, args.no_record = "tiny", 64, 1, True
    from gpt2_jax import targets

    targets.prepare_host()  # before JAX starts: the CPU runs, the target is compiled for
    text = common.table(
        f"DPO step by reference: compiled for {args.target} (deviceless), Adam, bf16 compute, float32 weights and "
        f"state, remat full, scanned blocks, {args.pairs} pair(s) of 2 x {args.seq_len} tokens (the LM step: "
        f"{2 * args.pairs} windows)", ["size", "step", "arguments GiB", "temporaries GiB", "peak GiB", "of LM step",
                                       "compile s"], memory_rows(args))
    text += "\n" + common.table(
        "DPO step vs LM step: time on this CPU (float32, Adam, no remat, the same process; tokens = chosen + rejected)",
        ["size", "step", "sequences", "ms per step (median)", "tokens/s", "speed vs LM"], time_rows(args))
    common.report(text, not args.no_record, args.out)


if __name__ == "__main__":
    main()
