"""What agreeing on a stop costs per step in a multi-process job: the training loop's combined stop flag
(a tiny jitted all-reduce dispatched after each step, read with the step's metrics) against JAX's
preemption sync point (`multihost_utils.reached_preemption_sync_point`, asked after each step) and
against nothing.

    python bench/preemption.py [--processes 2] [--devices 4] [--steps 60] [--repeat 3] [--smoke] [--no_record]

Starts --processes processes of --devices forced CPU devices each on 127.0.0.1 (2 x 4 = 8 devices), each
running the same small data-parallel train step; the three ways are timed in turns, --repeat times each,
and the medians compared in one table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WAYS = ("nothing", "stop flag all-reduce (the loop's)", "reached_preemption_sync_point")


def arguments() -> argparse.ArgumentParser:
    """The command line (also parsed by tests/test_bench.py)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices", type=int, default=4, help="forced CPU devices per process")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per way and repeat")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--n_layer", type=int, default=2)
    parser.add_argument("--n_embd", type=int, default=64)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    common.add_record_flags(parser, "few steps, to check the script runs")
    return parser


def worker(args: argparse.Namespace) -> None:
    """One process of the job: time the three ways, print the medians (process 0) as JSON."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_preemption_service", True)
    jax.distributed.initialize(f"127.0.0.1:{args.port}", args.processes, args.worker)
    import numpy as np
    from jax.experimental import multihost_utils

    from experiments import base
    from gpt2_jax import faults, parallel
    from gpt2_jax.model import GPT2Config, init_params
    from gpt2_jax.steps import build_steps

    config = GPT2Config(n_vocab=256, n_ctx=args.seq_len, n_embd=args.n_embd, n_head=max(1, args.n_embd // 32),
                        n_layer=args.n_layer)
    mesh = parallel.make_mesh(-1, 1)
    steps = build_steps(config, base.get_config().train, mesh)
    state = steps.init_state(init_params(config, jax.random.key(0)))
    rows = 2 * mesh.devices.size
    batch = parallel.global_batch(np.random.default_rng(0).integers(0, 256, (rows, args.seq_len + 1), dtype=np.int32),
                                  steps.batch_sharding)
    agree, key = faults.JobAgreement(mesh, faults.StopRequest(), lambda e: None).combine, jax.random.key(0)
    step_number = 0

    def run(way: str) -> float:
        """Seconds per step over args.steps steps, each step's metrics read while the next one runs."""
        nonlocal state, step_number
        pending = None
        start = time.perf_counter()
        for _ in range(args.steps):
            state, out = steps.train_step(state, batch, key)
            step_number += 1
            if way == WAYS[1]:
                out = {**out, "stop": agree(faults.NOTHING)}
            elif way == WAYS[2]:
                multihost_utils.reached_preemption_sync_point(step_number)
            if pending is not None:
                float(pending["loss"]) + float(pending.get("stop", 0))
            pending = out
        float(pending["loss"])
        return (time.perf_counter() - start) / args.steps

    for way in WAYS:  # compile and warm each way
        args_steps, args.steps = args.steps, 2
        run(way)
        args.steps = args_steps
    times = {way: [] for way in WAYS}
    for _ in range(args.repeat):
        for way in WAYS:
            times[way].append(run(way))
    if args.worker == 0:
        print(json.dumps({way: sorted(t)[len(t) // 2] for way, t in times.items()}), flush=True)


def main() -> None:
    """Start the processes, print the table and record it."""
    args = arguments().parse_args()
    if args.worker is not None:
        return worker(args)
    if args.smoke:
        args.steps, args.repeat, args.no_record = 3, 1, True
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"}
    passed = [a for a in sys.argv[1:] if a not in ("--smoke", "--no_record")]
    smoke = ["--steps", str(args.steps), "--repeat", str(args.repeat)]
    procs = [subprocess.Popen([sys.executable, __file__, *passed, *smoke, "--worker", str(i), "--port", str(port)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(args.processes)]
    outputs = [p.communicate(timeout=900) for p in procs]
    if any(p.returncode for p in procs):
        sys.exit("\n".join(err[-3000:] for _, err in outputs))
    medians = json.loads(outputs[0][0].strip().splitlines()[-1])
    nothing = medians[WAYS[0]]
    rows = [(way, f"{seconds * 1e3:.2f}", f"{(seconds - nothing) * 1e3:+.2f}", f"{seconds / nothing:.3f}")
            for way, seconds in medians.items()]
    text = common.table(f"Agreeing on a stop: {args.processes} processes x {args.devices} CPU devices, "
                        f"L={args.n_layer}, C={args.n_embd}, T={args.seq_len}, batch {2 * args.processes * args.devices}, Adam; median "
                        f"of {args.repeat} x {args.steps} steps", ["after each step", "ms per step", "cost ms",
                                                                    "vs nothing"], rows)
    common.report(text, record=not args.no_record, out=args.out)


if __name__ == "__main__":
    main()
