"""The training loop's own tokens/s against the bare compiled step, with train.dispatch_ahead on and off.

    python bench/loop.py [--size 124M | --shape LxCxN --vocab V] [--optimizer adam|adamw] [--grad_clip G]
                         [--batch B] [--seq_len T] [--dtype D] [--steps 50] [--warmup 5] [--val_every N] [--smoke]

Runs gpt2_jax.loop.run (what launch.py runs: data sampling, metrics, logs, progress bar) from
scratch on random tokens, samples and checkpoints off, validation every --val_every steps (on 4
batches), and times the steps after warm-up by the wall clock of the log's records, less the time
validation took. In the same process it times the bare step as bench/train.py does (blocking on each
step's loss) and queued (blocking once at the end: what the device alone can do). Defaults: 124M,
batch 16 x 1024, bfloat16 on GPU; batch 4 x 256, float32 on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def arguments() -> argparse.ArgumentParser:
    """The command line (also parsed by tests/test_bench.py against bench/gpu.sh)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_flags(parser)
    parser.add_argument("--batch", type=int, default=None, help="default 4 on CPU, 16 on GPU")
    parser.add_argument("--seq_len", type=int, default=None, help="default 256 on CPU, 1024 on GPU")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing (compilation, caches)")
    parser.add_argument("--val_every", type=int, default=0, help="the loop validates every N steps (0: never)")
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
    from gpt2_jax import start as run_start
    from gpt2_jax.model import init_params
    from gpt2_jax.resolve import model_config_of
    from gpt2_jax.steps import build_steps

    on_gpu = jax.default_backend() == "gpu"
    batch = args.batch or (16 if on_gpu else 4)
    seq_len = args.seq_len or (1024 if on_gpu else 256)
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    name, shape = common.model_shape(args)
    n_vocab = args.vocab
    if args.smoke:
        name, shape, n_vocab = "smoke", dict(n_embd=64, n_head=4, n_layer=2), 500
        batch, seq_len, args.steps, args.warmup, args.val_every, args.no_record = 2, 32, 4, 1, 2, True

    # Validation's own time is not the loop's: the eval step is timed (blocking) and taken off the wall clock.
    validating = [0.0]
    build = run_start.build_steps

    def build_timing_validation(*a, **kw):
        steps = build(*a, **kw)

        def timed(params, batch):
            t0 = time.perf_counter()
            out = jax.block_until_ready(steps.eval_step(params, batch))
            validating[0] += time.perf_counter() - t0
            return out
        return dataclasses.replace(steps, eval_step=timed)

    run_start.build_steps = build_timing_validation
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "vocab").mkdir()
        write_byte_vocab(tmp / "vocab", n_vocab)  # a vocabulary of the asked size; the tokens are random anyway
        tokens = np.random.default_rng(0).integers(0, n_vocab, 1 << 21, dtype=np.uint16)
        tokens.tofile(tmp / "data.bin")
        (tmp / "data.bin.json").write_text(json.dumps({"dtype": "uint16", "n_vocab": n_vocab,
                                                       "tokens": len(tokens), "chunk_starts": [0]}))

        def config_for(run_name: str):
            c = base.get_config()
            c.workdir, c.run_name, c.data.dataset = str(tmp / "work"), run_name, str(tmp / "data.bin")
            c.model.from_scratch, c.model.vocab, c.model.dtype = True, str(tmp / "vocab"), dtype
            c.model.n_ctx = seq_len if args.shape else max(seq_len, 64 if args.smoke else 1024)
            c.model.n_embd, c.model.n_head, c.model.n_layer = shape["n_embd"], shape["n_head"], shape["n_layer"]
            c.data.seq_len, c.train.batch_size, c.train.learning_rate = seq_len, batch, 1e-4
            c.train.optimizer, c.train.grad_clip = args.optimizer, args.grad_clip
            c.train.total_steps = args.warmup + args.steps
            c.data.val_every, c.data.val_batch_size, c.data.val_batch_count = args.val_every, batch, 4
            c.sample.sample_every, c.checkpoint.save_every = 0, 0
            c.checkpoint.async_save = False
            return c

        rows, tps = [], {}
        for ahead in (True, False):
            config = config_for(f"ahead_{ahead}")
            config.train.dispatch_ahead = ahead
            marks: dict[int, tuple[float, float]] = {}
            loop.run(config, on_step=lambda n, _: marks.__setitem__(n, (time.perf_counter(), validating[0])))
            (t0, v0), (t1, v1) = marks[args.warmup], marks[args.warmup + args.steps]
            default = " (the default)" if ahead == base.get_config().train.dispatch_ahead else ""
            training_s = t1 - t0 - (v1 - v0)
            tps[f"training loop, dispatch_ahead={ahead}{default}"] = batch * seq_len * args.steps / training_s

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
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, out = steps.train_step(state, windows, key)
            float(out["loss"])
        blocking_s = time.perf_counter() - t0
        tps["bare step, blocking on each loss (bench/train.py)"] = batch * seq_len * args.steps / blocking_s
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, out = steps.train_step(state, windows, key)
        jax.block_until_ready(out["loss"])
        tps["bare step, queued (the device alone)"] = batch * seq_len * args.steps / (time.perf_counter() - t0)

    reference = tps["bare step, blocking on each loss (bench/train.py)"]
    queued = tps["bare step, queued (the device alone)"]
    for what, value in tps.items():
        rows.append((what, f"{value:,.0f}", f"{value / reference:.3f}", f"{value / queued:.3f}"))
    validation = f", validation every {args.val_every} steps (its time left out)" if args.val_every else ""
    vocab = f", vocabulary {n_vocab}" if n_vocab != 50257 else ""
    title = (f"Training loop vs bare step, {name} shape, batch {batch} x {seq_len}, {dtype}, "
             f"{common.optimizer_words(args)}{vocab}, {args.steps} steps after {args.warmup}{validation}")
    header = ["what", "tokens/s", "vs bare step (blocking)", "vs bare step (queued)"]
    common.report(common.table(title, header, rows), record=not args.no_record, out=args.out)


if __name__ == "__main__":
    main()
