"""What checkpoint checksums cost: a 124M save and restore (params + Adam state) with and without them.

    python bench/checkpoint.py [--size 124M] [--repeat 3] [--smoke]

Both peers run in one process on the same state and disk, alternating: plain orbax (what the loop
did before checksums) against CheckpointWriter.save (checksums computed on the devices, recorded in
the step's metadata) and restore_verified (every array checked). Synchronous saves, so the time is
the whole write.
"""

from __future__ import annotations

import argparse
import shutil
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
    parser.add_argument("--repeat", type=int, default=3, help="rounds (median reported)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    common.add_record_flags(parser)
    return parser


def main() -> None:
    """Run the benchmark, print its table and record it."""
    args = arguments().parse_args()

    import jax
    import orbax.checkpoint as ocp

    from experiments import base
    from gpt2_jax import checkpoints, parallel
    from gpt2_jax.model import GPT2Config, init_params, preset
    from gpt2_jax.steps import build_steps

    config = GPT2Config(n_vocab=500, n_ctx=64, n_embd=64, n_head=4, n_layer=2) if args.smoke else preset(args.size)
    if args.smoke:
        args.repeat, args.no_record = 1, True
    steps = build_steps(config, base.get_config().train, parallel.make_mesh(1, 1))
    state = steps.init_state(init_params(config, jax.random.key(0)))
    target = steps.abstract_state
    nbytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
    root = Path(tempfile.mkdtemp(dir=args.dir))
    times: dict[str, list[float]] = {k: [] for k in ("save plain", "save checked", "restore plain", "restore checked")}
    try:
        for r in range(args.repeat):
            plain_dir, checked_dir = root / f"plain{r}", root / f"checked{r}"
            manager = checkpoints.make_manager(plain_dir, async_save=False)
            t0 = time.perf_counter()
            manager.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(state.params),
                                                    opt_state=ocp.args.StandardSave(state.opt_state),
                                                    meta=ocp.args.JsonSave({"step": 1})), force=True)
            manager.wait_until_finished()
            times["save plain"].append(time.perf_counter() - t0)
            manager.close()
            writer = checkpoints.CheckpointWriter(checked_dir, async_save=False)
            t0 = time.perf_counter()
            writer.save(1, state.trees(), {"step": 1})
            writer.wait()
            times["save checked"].append(time.perf_counter() - t0)
            writer.close()
            t0 = time.perf_counter()
            restored = checkpoints.make_manager(plain_dir, read_only=True).restore(1, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(target.params), opt_state=ocp.args.StandardRestore(target.opt_state)))
            jax.block_until_ready((restored.params, restored.opt_state))
            times["restore plain"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            jax.block_until_ready(checkpoints.restore_verified(checked_dir, 1, target.trees())[0])
            times["restore checked"].append(time.perf_counter() - t0)
            shutil.rmtree(plain_dir)
            shutil.rmtree(checked_dir)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = []
    for what in ("save", "restore"):
        plain, checked = statistics.median(times[f"{what} plain"]), statistics.median(times[f"{what} checked"])
        rows.append((what, f"{plain:.2f}", f"{checked:.2f}", f"{checked - plain:+.2f}", f"{checked / plain - 1:+.1%}"))
    title = (f"Checkpoint checksums, {args.size if not args.smoke else 'smoke'} params + Adam state "
             f"({nbytes / 2**30:.2f} GiB), synchronous orbax save/restore, median of {args.repeat}")
    header = ["operation", "plain orbax s", "with checksums s", "added s", "added"]
    common.report(common.table(title, header, rows), record=not args.no_record, out=args.out)


if __name__ == "__main__":
    main()
