"""Memory and bytes read of training on token shards in a bucket: the peak RSS of the same short run reading a
~2 GB and a ~200 MB shard set (memory bounded by the batch, not the data), and the bytes read, counted
(gpt2_jax.shards.bytes_read) against rows x window x 2, for the run and for each process's rows.

    python bench/shards.py [--big_mb 2000] [--small_mb 200] [--shard_mb 20] [--steps 20] [--batch 8]
                           [--seq_len 256] [--smoke] [--no_record]

Starts the GCS emulator as the tests do (tests/gcs_emulator.py, its objects on disk), writes llm.c shards of random
byte-level tokens into it, and runs gpt2_jax.loop.run (a 2-layer model from scratch, no validation or samples) in a
fresh process per set: its peak RSS is that process's getrusage ru_maxrss. Then, in this process, batches of the
big set are read with the rows of one of 1, 2 and 4 processes (sampler.batch(..., rows=...)).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

N_VOCAB = 257  # the byte-level vocabulary: the model is small, the data large
# The emulator's server queues 5 connections; more range requests at once wait a second for the client's retry
# (a store such as GCS takes shards.CONCURRENT_REQUESTS, 16).
EMULATOR_REQUESTS = 4


def arguments() -> argparse.ArgumentParser:
    """The command line (also parsed by tests/test_bench.py)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big_mb", type=int, default=2000, help="the large shard set, MB")
    parser.add_argument("--small_mb", type=int, default=200, help="the small shard set, MB")
    parser.add_argument("--shard_mb", type=int, default=20, help="MB per shard (the emulator reads a whole object "
                        "for each range request, so small shards keep it quick; GCS does not)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per run")
    parser.add_argument("--batch", type=int, default=8, help="rows per step")
    parser.add_argument("--seq_len", type=int, default=256, help="tokens per row (a window is seq_len + 1)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # DATASET: run the loop, print JSON
    common.add_record_flags(parser, "tiny shard sets and runs, to check the script runs")
    return parser


def worker(args: argparse.Namespace) -> None:
    """One training run on args.worker (a glob in the bucket): print peak RSS, bytes and rows read as JSON."""
    import resource

    from experiments import base
    from gpt2_jax import data, loop, shards

    shards.CONCURRENT_REQUESTS = EMULATOR_REQUESTS
    asked = [0]
    batch = data.WindowSampler.batch

    def counted(self, index, batch_size, rows=None):  # the rows the run asked for, to compare bytes against
        out = batch(self, index, batch_size, rows)
        asked[0] += len(out)
        return out

    data.WindowSampler.batch = counted
    with tempfile.TemporaryDirectory() as tmp:
        c = base.get_config()
        c.workdir, c.run_name, c.data.dataset = tmp, "shards", args.worker
        c.model.from_scratch, c.model.vocab, c.model.n_ctx = True, "bytes", args.seq_len
        c.model.n_embd, c.model.n_head, c.model.n_layer = 64, 2, 2
        c.data.seq_len, c.train.batch_size, c.train.total_steps = args.seq_len, args.batch, args.steps
        c.train.learning_rate, c.sample.sample_every, c.checkpoint.save_every = 1e-3, 0, 0
        c.checkpoint.async_save = False
        loop.run(c)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "bytes_read": shards.bytes_read(), "rows": asked[0]}), flush=True)


def write_set(fs, prefix: str, total_mb: int, shard_mb: int, seed: int) -> tuple[int, int]:
    """llm.c shards of random byte-level tokens under gs://PREFIX: (shards, bytes of their header-and-ends samples)."""
    import numpy as np

    from gpt2_jax import shards

    count = max(1, round(total_mb / shard_mb))
    tokens = shard_mb * (1 << 20) // 2
    sample = sum(min(shards.HEADER_BYTES + 2 * tokens, shards.HEADER_BYTES + 2 * shards.SAMPLE_BYTES)
                 for _ in range(count))
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "shard.bin"
        for i in range(count):
            local.write_bytes(shards.header(tokens) + rng.integers(0, N_VOCAB, tokens, dtype=np.uint16).tobytes())
            fs.put_file(str(local), f"{prefix}/s_{i:06d}.bin")
    return count, sample


def main() -> None:
    """Write both sets, run one training per set, read batches by process rows, print the tables and record them."""
    args = arguments().parse_args()
    if args.worker:
        return worker(args)
    if args.smoke:
        args.big_mb, args.small_mb, args.shard_mb, args.steps, args.batch, args.seq_len = 8, 2, 1, 2, 4, 32
        args.no_record = True
    import fsspec

    from conftest import GCS

    from gpt2_jax import data, shards
    from gpt2_jax.encoder import byte_level_encoder

    shards.CONCURRENT_REQUESTS = EMULATOR_REQUESTS

    window = args.seq_len + 1
    with tempfile.TemporaryDirectory() as tmp:
        store = GCS(data=Path(tmp) / "store")
        os.environ.update(store.env)  # before gcsfs is imported: it reads some of it then
        try:
            with store.active():
                fs, _ = fsspec.core.url_to_fs(store.url("x"))
                sets = {}
                for name, mb, seed in (("big", args.big_mb, 0), ("small", args.small_mb, 1)):
                    t0 = time.perf_counter()
                    count, sample = write_set(fs, f"{store.bucket}/{name}", mb, args.shard_mb, seed)
                    sets[name] = (store.url(name, "s_*.bin"), count, sample)
                    print(f"wrote {name}: {count} shards of {args.shard_mb} MB in {time.perf_counter() - t0:.0f} s",
                          flush=True)
                runs = {}
                passed = [a for a in sys.argv[1:] if a not in ("--smoke", "--no_record")]
                sizes = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq_len", str(args.seq_len)]
                for name, (url, _, _) in sets.items():
                    done = subprocess.run([sys.executable, __file__, *passed, *sizes, "--worker", url],
                                          capture_output=True, text=True, env={**os.environ, **store.env},
                                          cwd=common.REPO, timeout=1800)
                    if done.returncode:
                        raise SystemExit(f"the {name} run failed:\n{done.stderr[-3000:]}")
                    runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
                per_process = []
                chunks = data.load_dataset(sets["big"][0], byte_level_encoder(), progress=False)
                sampler, batches = data.WindowSampler(chunks, window, seed=0), 5
                sampler.batch(batches, args.batch)  # the store's connections opened before the timing
                for processes in (1, 2, 4):
                    per = args.batch // processes
                    before, t0 = shards.bytes_read(), time.perf_counter()
                    for index in range(batches):
                        sampler.batch(index, args.batch, rows=slice(0, per))  # process 0's rows
                    seconds = (time.perf_counter() - t0) / batches
                    counted = (shards.bytes_read() - before) // batches
                    per_process.append((processes, per, counted, per * window * 2, seconds * 1000))
        finally:
            store.stop()

    rows = []
    for name, (_, count, sample) in sets.items():
        run = runs[name]
        windows = run["rows"] * window * 2
        rows.append((f"{count * args.shard_mb} MB ({count} shards)", f"{run['peak_rss_mb']:.0f}",
                     run["bytes_read"], windows, sample, run["bytes_read"] - windows - sample))
    difference = runs["big"]["peak_rss_mb"] - runs["small"]["peak_rss_mb"]
    title = (f"Training on llm.c shards in a bucket (the GCS emulator): {args.steps} steps of {args.batch} x "
             f"{args.seq_len}, a 2-layer model; peak RSS {difference:+.0f} MB from the small set to the big one")
    common.report(common.table(title, ["shard set", "peak RSS (MB)", "bytes read (counted)",
                                       "rows x window x 2", "headers and ends sampled", "other"], rows),
                  not args.no_record, args.out)
    title = f"Bytes one process reads per batch of {args.batch} x {window} tokens (its rows only), the big set"
    common.report(common.table(title, ["processes", "its rows", "bytes read (counted)", "rows x window x 2",
                                       "ms per batch (range requests to the emulator)"], per_process),
                  not args.no_record, args.out)


if __name__ == "__main__":
    main()
