"""XLA flags, one at a time: our training step's tokens/s with each, against none, in one table.

    python bench/xla_flags.py [--flags F1,F2,...] [--steps 10] [--smoke] [train.py options after --]

Each variant is `bench/train.py --no_torch --layouts unrolled` in a process of its own with
XLA_FLAGS set to that one flag (a flag is read when the backend starts). Defaults are the GPU flags
issue 13 asks about; a winner becomes a default in code only with this table in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GPU_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true", "--xla_gpu_enable_triton_gemm=false",
             "--xla_gpu_enable_command_buffer=", "--xla_gpu_enable_cublaslt=true",
             "--xla_gpu_enable_while_loop_double_buffering=true")
CPU_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false", "--xla_cpu_use_thunk_runtime=false")


def arguments() -> argparse.ArgumentParser:
    """The command line (also parsed by tests/test_bench.py against bench/gpu.sh)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flags", default="", help="comma-separated XLA flags (default: the GPU or CPU list)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round (train.py --steps)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (train.py --rounds)")
    common.add_record_flags(parser, "tiny model and one flag, to check the script runs")
    parser.add_argument("train_args", nargs="*", help="passed to bench/train.py (after --)")
    return parser


def main() -> None:
    """Run every variant, print the table and record it."""
    args = arguments().parse_args()
    import jax

    on_gpu = jax.default_backend() == "gpu"
    flags = [f for f in args.flags.split(",") if f] or list(GPU_FLAGS if on_gpu else CPU_FLAGS)
    if args.smoke:
        flags, args.no_record = flags[:1], True
    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for flag in ["", *flags]:
            out = Path(tmp) / "row.md"
            out.unlink(missing_ok=True)
            env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()}
            cmd = [sys.executable, str(common.REPO / "bench" / "train.py"), "--no_torch", "--layouts", "unrolled",
                   "--rounds", str(args.rounds), "--steps", str(args.steps), "--no_record", "--out", str(out),
                   *(["--smoke"] if args.smoke else []), *args.train_args]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            row = re.search(r"^\| gpt2_jax \(unrolled\) \| ([^|]+) \| ([\d.]+) \| ([\d,]+) \|", out.read_text(), re.M) \
                if done.returncode == 0 and out.is_file() else None
            if row is None:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:120]
                rows.append((flag or "(none)", "failed", "", "", tail))
                continue
            tokens = float(row.group(3).replace(",", ""))
            base = base or tokens
            rows.append((flag or "(none)", row.group(1).strip(), row.group(2), f"{tokens:,.0f}",
                         f"{tokens / base:.3f}"))
    title = f"XLA flags one at a time, our step (train.py --no_torch --layouts unrolled {' '.join(args.train_args)})"
    header = ["XLA_FLAGS", "compile s + first call s", "median step ms", "tokens/s", "vs no flag"]
    common.report(common.table(title, header, rows), record=not args.no_record, out=args.out)


if __name__ == "__main__":
    main()
