"""How cost grows: compiled memory, FLOPs and (where it runs) step time vs batch, sequence length, model size.

    python bench/scaling.py [--batches 1,2,4] [--seq_lens 128,256,512,1024] [--sizes 124M,355M,774M,1558M]
                            [--time_size 124M] [--dtype float32] [--remat none] [--smoke] [--png FILE]

Batch and sequence sweeps use --time_size and are timed; the size sweep is compile-only (nothing is
allocated), so 1558M works on a small machine. Writes a table and a PNG (default bench/scaling.png).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def arguments() -> argparse.ArgumentParser:
    """The command line (also parsed by tests/test_bench.py against bench/gpu.sh)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,2,4")
    parser.add_argument("--seq_lens", default="128,256,512,1024")
    parser.add_argument("--sizes", default="124M,355M,774M,1558M")
    parser.add_argument("--time_size", default="124M")
    parser.add_argument("--base_seq_len", type=int, default=256, help="sequence length of the batch sweep")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--remat", default="none")
    parser.add_argument("--scan_layers", action="store_true", help="scan the blocks (compiles in about a block's time)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--png", type=Path, default=None)
    common.add_record_flags(parser, "tiny shapes, to check the script runs")
    return parser


def main() -> None:
    """Run the benchmark, print its table and record it."""
    args = arguments().parse_args()

    from gpt2_jax import parallel
    from gpt2_jax.steps import build_steps, compiled_stats, use_memory_faithful_cpu_scheduler

    use_memory_faithful_cpu_scheduler()
    import jax
    import numpy as np

    from experiments import base
    from gpt2_jax.model import GPT2Config, init_params, preset

    def config_of(size: str) -> GPT2Config:
        if args.smoke:
            return GPT2Config(n_vocab=512, n_ctx=1024, n_embd=32 * (1 + ["124M", "355M"].index(size)), n_head=2,
                              n_layer=1, dtype=args.dtype, remat=args.remat, scan_layers=args.scan_layers)
        return preset(size, dtype=args.dtype, remat=args.remat, scan_layers=args.scan_layers)

    if args.smoke:
        args.batches, args.seq_lens, args.sizes, args.repeat, args.no_record = "1,2", "32", "124M,355M", 1, True
        args.base_seq_len = 32
    train = base.get_config().train
    mesh = parallel.make_mesh(1, 1)

    measured: dict[tuple, dict] = {}  # a point two sweeps share is measured once

    def measure(config: GPT2Config, batch: int, seq_len: int, timed: bool) -> dict:
        if (config, batch, seq_len, timed) in measured:
            return measured[config, batch, seq_len, timed]
        steps = build_steps(config, train, mesh)
        compiled = steps.compile(batch, seq_len)
        row = compiled_stats(compiled)
        if timed:
            state = steps.init_state(init_params(config, jax.random.key(0)))
            tokens = parallel.global_batch(np.zeros((batch, seq_len + 1), np.int32), steps.batch_sharding)
            key = jax.device_put(jax.random.key(0), parallel.replicated(mesh))

            def step():
                nonlocal state
                state, metrics = compiled(state, tokens, key)
                metrics["loss"].block_until_ready()

            row["step_s"] = common.median_seconds(step, args.repeat)
        timed_text = f", step {row['step_s'] * 1e3:.0f} ms" if timed else ""
        print(f"{config.num_params() / 1e6:.0f}M params, batch {batch} x {seq_len}: peak "
              f"{row['peak_bytes'] / 2**30:.3f} GiB{timed_text}", flush=True)  # kept in the log if the run is cut
        measured[config, batch, seq_len, timed] = row
        return row

    rows, points = [], {"batch": [], "seq_len": [], "size": []}
    base_config = config_of(args.time_size)
    for b in [int(x) for x in args.batches.split(",")]:
        r = measure(base_config, b, args.base_seq_len, True)
        rows.append(("batch", args.time_size, b, args.base_seq_len, r))
        points["batch"].append((b, r))
    for t in [int(x) for x in args.seq_lens.split(",")]:
        r = measure(base_config, 1, t, True)
        rows.append(("seq_len", args.time_size, 1, t, r))
        points["seq_len"].append((t, r))
    for size in args.sizes.split(","):
        config = config_of(size)
        r = measure(config, 1, max(int(x) for x in args.seq_lens.split(",")), False)
        rows.append(("size", size, 1, max(int(x) for x in args.seq_lens.split(",")), r))
        points["size"].append((config.num_params() / 1e6, r))
    table_rows = [(sweep, size, b, t, f"{r['peak_bytes'] / 2**30:.3f}", f"{r['flops'] / 1e9:,.0f}",
                   f"{r['step_s'] * 1e3:.0f}" if "step_s" in r else "compile-only",
                   f"{b * t / r['step_s']:,.0f}" if "step_s" in r else "") for sweep, size, b, t, r in rows]
    layout = ", blocks scanned" if args.scan_layers else ""
    common.report(common.table(f"Scaling, {args.dtype}, remat {args.remat}{layout}, Adam",
                               ["sweep", "model", "batch", "seq len", "peak GiB", "GFLOP", "step ms", "tokens/s"],
                               table_rows), record=not args.no_record, out=args.out)
    _plot(points, args.png or common.REPO / "bench" / "scaling.png")


def _plot(points: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (sweep, label) in zip(axes, (("batch", "batch size"), ("seq_len", "sequence length"),
                                         ("size", "parameters (M)"))):
        xs = [x for x, _ in points[sweep]]
        ax.plot(xs, [r["peak_bytes"] / 2**30 for _, r in points[sweep]], "o-", label="peak memory (GiB)")
        if all("step_s" in r for _, r in points[sweep]):
            twin = ax.twinx()
            twin.plot(xs, [r["step_s"] * 1e3 for _, r in points[sweep]], "s--", color="tab:red")
            twin.set_ylabel("step time (ms)", color="tab:red")
        ax.set_xlabel(label)
        ax.set_ylabel("compiled peak memory (GiB)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
