"""The training loop's own tokens/s against the bare compiled step, with train.dispatch_ahead off and on.

    python bench/loop.py [--size 124M] [--batch B] [--seq_len T] [--dtype D] [--steps 50] [--warmup 5] [--smoke]

Runs gpt2_jax.loop.run (what launch.py runs: data sampling, metrics, logs, progress bar) from
scratch on random tokens at the GPT-2 vocabulary size, validation, samples and checkpoints off,
and reads the tokens/s it logged over the steps after warm-up (median). In the same process it
times the bare step as bench/train.py does (blocking on each step's loss) and queued (blocking once
at the end: what the device alone can do). Defaults: 124M, batch 16 x 1024, bfloat16 on GPU;
batch 4 x 256, float32 on CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def arguments() -> argparse.ArgumentParser:
    """The command line (also parsed by tests/test_bench.py against bench/gpu.sh)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="124M", help="model shape: 124M, 355M, 774M, 1558M")
    parser.add_argument("--batch", type=int, default=None, help="default 4 on CPU, 16 on GPU")
    parser.add_argument("--seq_len", type=int, default=None, help="default 256 on CPU, 1024 on GPU")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the median (compilation, caches)")
    common.add_record_flags(parser)
    return parser


def main() -> None:
    """Run the benchmark, print its table and record it."""
    args = arguments().parse_args()

    import jax
    import numpy as np
    from conftest import write_byte_vocab

    from experiments import base
    from gpt2_jax import loop, parallel
    from gpt2_jax.model import PRESETS, init_params
    from gpt2_jax.resolve import model_config_of
    from gpt2_jax.steps import build_steps

    on_gpu = jax.default_backend() == "gpu"
    batch = args.batch or (16 if on_gpu else 4)
    seq_len = args.seq_len or (1024 if on_gpu else 256)
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    shape = dict(n_embd=64, n_head=4, n_layer=2) if args.smoke else PRESETS[args.size]
    if args.smoke:
        batch, seq_len, args.steps, args.warmup, args.no_record = 2, 32, 4, 1, True
    n_vocab = 500 if args.smoke else 50257

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "vocab").mkdir()
        write_byte_vocab(tmp / "vocab", n_vocab)  # a vocabulary of GPT-2's size; the tokens are random anyway
        tokens = np.random.default_rng(0).integers(0, n_vocab, 1 << 21, dtype=np.uint16)
        tokens.tofile(tmp / "data.bin")
        (tmp / "data.bin.json").write_text(json.dumps({"dtype": "uint16", "n_vocab": n_vocab,
                                                       "tokens": len(tokens), "chunk_starts": [0]}))

        def config_for(run_name: str):
            c = base.get_config()
            c.workdir, c.run_name, c.data.dataset = str(tmp / "work"), run_name, str(tmp / "data.bin")
            c.model.from_scratch, c.model.vocab, c.model.dtype = True, str(tmp / "vocab"), dtype
            c.model.n_ctx = max(seq_len, 64 if args.smoke else 1024)
            c.model.n_embd, c.model.n_head, c.model.n_layer = shape["n_embd"], shape["n_head"], shape["n_layer"]
            c.data.seq_len, c.train.batch_size, c.train.learning_rate = seq_len, batch, 1e-4
            c.train.total_steps = args.warmup + args.steps
            c.sample.sample_every, c.data.val_every, c.checkpoint.save_every = 0, 0, 0
            c.checkpoint.async_save = False
            return c

        rows, tps = [], {}
        for ahead in (False, True):
            config = config_for(f"ahead_{ahead}")
            config.train.dispatch_ahead = ahead
            loop.run(config)
            logged = [json.loads(line) for line in (tmp / "work" / "logs" / config.run_name / "metrics.jsonl")
                      .read_text().splitlines()]
            tps[f"training loop, dispatch_ahead={ahead}"] = statistics.median(
                m["tokens_per_sec"] for m in logged if m["step"] > args.warmup and "tokens_per_sec" in m)

        # The bare step, compiled and called as bench/train.py does.
        config = config_for("bare")
        model_config = model_config_of(config)
        steps = build_steps(model_config, config.train, parallel.make_mesh(1, 1))
        state = steps.init_state(init_params(model_config, jax.random.key(0)))
        windows = parallel.global_batch(np.random.default_rng(1).integers(0, n_vocab, (batch, seq_len + 1),
                                                                          dtype=np.int32), steps.batch_sharding)
        key = jax.random.key(0)
        for _ in range(args.warmup):
            state, out = steps.train_step(state, windows, key)
        jax.block_until_ready(out["loss"])
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, out = steps.train_step(state, windows, key)
            float(out["loss"])
            times.append(time.perf_counter() - t0)
        tps["bare step, blocking on each loss (bench/train.py)"] = batch * seq_len / statistics.median(times)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, out = steps.train_step(state, windows, key)
        jax.block_until_ready(out["loss"])
        tps["bare step, queued (the device alone)"] = batch * seq_len * args.steps / (time.perf_counter() - t0)

    reference = tps["bare step, blocking on each loss (bench/train.py)"]
    queued = tps["bare step, queued (the device alone)"]
    for name, value in tps.items():
        rows.append((name, f"{value:,.0f}", f"{value / reference:.3f}", f"{value / queued:.3f}"))
    title = (f"Training loop vs bare step, {args.size if not args.smoke else 'smoke'} shape, "
             f"batch {batch} x {seq_len}, "
             f"{dtype}, Adam, median over {args.steps} steps after {args.warmup}")
    header = ["what", "tokens/s", "vs bare step (blocking)", "vs bare step (queued)"]
    common.report(common.table(title, header, rows), record=not args.no_record, out=args.out)


if __name__ == "__main__":
    main()
