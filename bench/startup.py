"""Start-up: the quick commands against importing JAX, and JAX's persistent compilation cache.

    python bench/startup.py [--size 124M] [--smoke]

First the whole wall time of `gpt2-jax --help`, `python launch.py --list` and `gpt2-jax sample` of 60
tokens (the cache warm), each the median of three fresh processes, against the interpreter alone and
`import jax` (the floor of any command that computes). Then, with GPT2_JAX_COMPILATION_CACHE pointing
at an empty directory: `gpt2-jax sample` of 100 tokens (wall time of the whole command) and a
from-scratch `launch.py` training run (time from the process's start to its first logged step),
each twice; then the same with the cache off, as the peer.
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


def arguments() -> argparse.ArgumentParser:
    """The command line (also parsed by tests/test_bench.py against bench/gpu.sh)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="124M", help="model shape: 124M, 355M, 774M, 1558M")
    common.add_record_flags(parser)
    return parser


def main() -> None:
    """Run the benchmark, print its table and record it."""
    args = arguments().parse_args()
    from conftest import random_hf_model, save_hf_model, write_byte_vocab

    from gpt2_jax.model import PRESETS

    shape = dict(n_embd=64, n_head=4, n_layer=2) if args.smoke else PRESETS[args.size]
    n_vocab, n_ctx = (500, 128) if args.smoke else (50257, 1024)
    if args.smoke:
        args.no_record = True
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = save_hf_model(random_hf_model(n_vocab=n_vocab, n_ctx=n_ctx, **shape), tmp / "model")
        write_byte_vocab(model, n_vocab)
        base_env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}

        def sample_command(length: int) -> list[str]:
            return [sys.executable, "-m", "gpt2_jax", "sample", "--model_dir", str(model), "--length", str(length),
                    "--top_k", "1", "--seed", "0", "--json"]

        sample = sample_command(100)

        def launch(workdir: Path) -> list[str]:
            return [sys.executable, "launch.py", "--config=experiments/finetune.py", f"--workdir={workdir}",
                    "--config.model.from_scratch=True", f"--config.model.vocab={model}",
                    f"--config.model.n_ctx={n_ctx}", *(f"--config.model.{k}={v}" for k, v in shape.items()),
                    f"--config.data.dataset={common.REPO / 'gpt2_jax'}", "--config.data.seq_len=64",
                    "--config.train.batch_size=2", "--config.train.total_steps=1", "--config.sample.sample_every=0",
                    "--config.checkpoint.save_every=0", "--config.checkpoint.async_save=False"]

        # The quick commands, each in fresh processes (median of three), against the interpreter and `import jax`.
        env = {**base_env, "GPT2_JAX_COMPILATION_CACHE": str(tmp / "quick_cache")}
        quick = {"python -c pass": [sys.executable, "-c", "pass"],
                 "python -c 'import jax'": [sys.executable, "-c", "import jax"],
                 "gpt2-jax --help": [sys.executable, "-m", "gpt2_jax", "--help"],
                 "python launch.py --list": [sys.executable, "launch.py", "--list"],
                 "gpt2-jax sample (60 tokens, cache warm)": sample_command(60)}
        if not args.smoke:  # fills the cache
            subprocess.run(quick["gpt2-jax sample (60 tokens, cache warm)"], env=env, cwd=common.REPO, check=True,
                           capture_output=True)
        seconds, repeat = {}, 1 if args.smoke else 3
        for what, command in quick.items():
            seconds[what] = common.median_seconds(
                lambda: subprocess.run(command, env=env, cwd=common.REPO, check=True, capture_output=True),
                repeat=repeat, warmup=0)
        floor = seconds["python -c 'import jax'"]
        quick_rows = [(what, f"{s:.2f}", f"{s / floor:.2f}") for what, s in seconds.items()]
        common.report(common.table(f"Start-up of the quick commands, {args.size if not args.smoke else 'smoke'} "
                                   f"shape for sample, median of {repeat} fresh processes",
                                   ["command", "wall s", "vs import jax"], quick_rows),
                      record=not args.no_record, out=args.out)

        # --smoke: launch.py once, cache on (the script's own path; tests/test_sampling.py runs sample with the cache)
        for cache in ("on",) if args.smoke else ("on", "off"):
            env = {**base_env, "GPT2_JAX_COMPILATION_CACHE": str(tmp / "cache") if cache == "on" else "off"}
            times = dict.fromkeys(("sample first", "sample repeated", "launch repeated"), float("nan"))
            for attempt in ("first",) if args.smoke else ("first", "repeated"):
                if not args.smoke:
                    t0 = time.perf_counter()
                    subprocess.run(sample, env=env, cwd=common.REPO, check=True, capture_output=True)
                    times[f"sample {attempt}"] = time.perf_counter() - t0
                workdir = tmp / f"run_{cache}_{attempt}"
                started = time.time()
                subprocess.run(launch(workdir), env=env, cwd=common.REPO, check=True, capture_output=True)
                first = json.loads((workdir / "logs" / "run1" / "metrics.jsonl").read_text().splitlines()[0])
                times[f"launch {attempt}"] = first["time"] - started
            rows.append((f"cache {cache}", f"{times['sample first']:.1f}", f"{times['sample repeated']:.1f}",
                         f"{times['launch first']:.1f}", f"{times['launch repeated']:.1f}"))
    title = (f"Start-up, {args.size if not args.smoke else 'smoke'} shape: gpt2-jax sample (100 tokens, the whole "
             "command) and launch.py (process start to the first logged step), each launched twice")
    header = ["compilation cache", "sample first s", "sample repeated s", "launch first s", "launch repeated s"]
    common.report(common.table(title, header, rows), record=not args.no_record, out=args.out)


if __name__ == "__main__":
    main()
