"""Data vs FSDP vs mixed layouts: step time, tokens/s and XLA's compiled per-device memory.

    python bench/parallel.py [--devices 8] [--smoke] [--no_record] [--out FILE]

On CPU it forces `--devices` host devices. Step time is measured at a small shape (--n_layer,
--n_embd, --batch, --seq_len); the compiled memory (compile-only, nothing allocated) at the 124M
and 1558M shapes. Ratios are against the data-parallel layout in the same run.
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
    parser.add_argument("--devices", type=int, default=8, help="host devices to force on CPU")
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16, help="global batch (windows)")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--memory_sizes", default="124M,1558M", help="sizes for the compile-only memory table")
    common.add_record_flags(parser, "tiny shapes, to check the script runs")
    return parser


def main() -> None:
    """Run the benchmark, print its table and record it."""
    args = arguments().parse_args()
    if args.smoke:
        args.n_layer, args.n_embd, args.batch, args.seq_len, args.repeat = 1, 32, 8, 16, 1
        args.memory_sizes, args.no_record = "", True
    if "--xla_force_host_platform_device_count" not in __import__("os").environ.get("XLA_FLAGS", ""):
        common.force_cpu_devices(args.devices)

    import jax
    import numpy as np

    from experiments import base
    from gpt2_jax import parallel
    from gpt2_jax.steps import build_steps, use_memory_faithful_cpu_scheduler

    use_memory_faithful_cpu_scheduler()  # memory figures as an accelerator would schedule them
    from gpt2_jax.model import GPT2Config, init_params, preset

    n = len(jax.devices())
    layouts = [("data", n, 1), ("fsdp", 1, n), ("mixed", max(1, n // 2), min(2, n))]
    train = base.get_config().train

    def compiled(config: GPT2Config, data: int, fsdp: int, batch: int, seq_len: int):
        steps = build_steps(config, train, parallel.make_mesh(data, fsdp))
        return steps.compile(batch, seq_len), steps

    small = GPT2Config(n_vocab=50257, n_ctx=args.seq_len, n_embd=args.n_embd, n_head=max(1, args.n_embd // 64),
                       n_layer=args.n_layer)
    rows, base_time = [], None
    for name, data, fsdp in layouts:
        exe, steps = compiled(small, data, fsdp, args.batch, args.seq_len)
        state = steps.init_state(init_params(small, jax.random.key(0)))
        batch = parallel.global_batch(np.random.default_rng(0).integers(0, 50257, (args.batch, args.seq_len + 1),
                                                                        dtype=np.int32), steps.batch_sharding)
        key = jax.random.key(0)

        def one_step():
            nonlocal state
            state, metrics = exe(state, batch, key)
            jax.block_until_ready(metrics["loss"])

        seconds = common.median_seconds(one_step, args.repeat)
        base_time = base_time or seconds
        mem = exe.memory_analysis()
        rows.append((f"{name} ({data}x{fsdp})", f"{seconds * 1e3:.1f}", f"{args.batch * args.seq_len / seconds:.0f}",
                     f"{base_time / seconds:.2f}", f"{(mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**20:.1f}"))
    text = common.table(f"Parallel layouts: step time at L={args.n_layer}, C={args.n_embd}, batch {args.batch}, "
                        f"T={args.seq_len}, Adam", ["layout (data x fsdp)", "step ms", "tokens/s",
                                                     "speed vs data", "per-device MiB (args + temp)"], rows)
    mem_rows = []
    for size in [s for s in args.memory_sizes.split(",") if s]:
        config = preset(size, remat="full" if size != "124M" else "none")
        for name, data, fsdp in layouts:
            mem = compiled(config, data, fsdp, n, 1024)[0].memory_analysis()
            mem_rows.append((size, f"{name} ({data}x{fsdp})", config.remat,
                             f"{mem.argument_size_in_bytes / 2**30:.2f}", f"{mem.temp_size_in_bytes / 2**30:.2f}",
                             f"{(mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**30:.2f}"))
    if mem_rows:
        text += "\n" + common.table(f"Compiled per-device memory, Adam, batch {n} (1 per device), T=1024, float32",
                                    ["model", "layout", "remat", "params+opt+batch GiB", "temp GiB", "total GiB"],
                                    mem_rows)
    common.report(text, record=not args.no_record, out=args.out)


if __name__ == "__main__":
    main()
