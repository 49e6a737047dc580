"""Shared by the bench scripts: the machine line, markdown tables, timing, recording to bench/results/."""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def force_cpu_devices(n: int) -> None:
    """Ask XLA for n host devices; must run before jax is imported."""
    if "jax" in sys.modules:
        raise RuntimeError("force_cpu_devices must be called before importing jax")
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def machine() -> str:
    """What ran the benchmark: CPU cores or the accelerator, and the JAX version."""
    import jax

    device = jax.devices()[0]
    kind = device.device_kind if device.platform != "cpu" else f"CPU {platform.machine()}, {os.cpu_count()} cores"
    return f"{kind}, {len(jax.devices())} device(s), jax {jax.__version__}"


def median_seconds(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    """Median wall time of fn() over `repeat` runs after `warmup` runs (fn must block until done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table under a dated title that names the machine."""
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"### {title} ({time.strftime('%Y-%m-%d')}, {machine()})", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--size or --shape, --vocab, --optimizer and --grad_clip: the model and optimizer a benchmark trains."""
    parser.add_argument("--size", default="124M", help="model shape: 124M, 355M, 774M, 1558M")
    parser.add_argument("--shape", type=_shape, default=None,
                        help="LAYERSxWIDTHxHEADS instead of --size (e.g. 4x128x4, nanoGPT's small CPU model)")
    parser.add_argument("--vocab", type=int, default=50257, help="vocabulary size (257: bytes)")
    parser.add_argument("--optimizer", choices=("adam", "adamw"), default="adam", help="both peers")
    parser.add_argument("--grad_clip", type=float, default=0.0, help="clip to this global norm (0: off)")


def _shape(text: str) -> dict[str, int]:
    """--shape: LAYERSxWIDTHxHEADS."""
    try:
        n_layer, n_embd, n_head = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use LAYERSxWIDTHxHEADS, e.g. 4x128x4") from None
    return dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head)


def model_shape(args: argparse.Namespace) -> tuple[str, dict[str, int]]:
    """The name and (n_layer, n_embd, n_head) of the model --size or --shape asks for."""
    from gpt2_jax.model import PRESETS

    if args.shape:
        return "x".join(str(args.shape[k]) for k in ("n_layer", "n_embd", "n_head")), args.shape
    return args.size, PRESETS[args.size]


def optimizer_words(args: argparse.Namespace) -> str:
    """'Adam', 'AdamW, clipped to 1', ... for a table's title."""
    words = "AdamW" if args.optimizer == "adamw" else "Adam"
    return words + (f", clipped to {args.grad_clip:g}" if args.grad_clip else "")


def add_record_flags(parser: argparse.ArgumentParser, smoke: str = "a tiny model, to check the script runs") -> None:
    """--smoke, --no_record and --out, which every benchmark script takes."""
    parser.add_argument("--smoke", action="store_true", help=smoke)
    parser.add_argument("--no_record", action="store_true", help="do not append to bench/results/DATE.md")
    parser.add_argument("--out", type=Path, default=None, help="also append the table(s) to this file")


RESULTS = REPO / "bench" / "results"  # every recorded table, by date; BENCHMARKS.md keeps the current one per question


def report(text: str, record: bool, out: Path | None = None) -> None:
    """Print a table; append it to bench/results/DATE.md when recording; also write it to `out` if given."""
    print(text)
    if record:
        RESULTS.mkdir(parents=True, exist_ok=True)
        with open(RESULTS / f"{time.strftime('%Y-%m-%d')}.md", "a", encoding="utf-8") as f:
            f.write("\n" + text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8") as f:
            f.write(text + "\n")


# --- What the LoRA and DPO benchmarks share -------------------------------------------------------

LORA_TARGETS = "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"  # every dense layer of a block


def lora_train(rank: int) -> Any:
    """The base experiment's train section with LoRA adapters of `rank` on LORA_TARGETS (0: none)."""
    from experiments import base

    train = base.get_config().train
    train.lora_rank, train.lora_targets = rank, LORA_TARGETS
    return train


def with_lora(model: Any, rank: int) -> Any:
    """A GPT2Config with LoRA adapters of `rank` (alpha 2 x rank) on LORA_TARGETS; unchanged for rank 0."""
    return model if not rank else dataclasses.replace(model, lora_rank=rank, lora_alpha=2.0 * rank,
                                                      lora_targets=tuple(LORA_TARGETS.split(",")))


def target_model(size: str, seq_len: int, smoke: bool) -> Any:
    """A released size (a tiny model under --smoke) as compiled for a target: bf16 compute, remat full,
    scanned blocks."""
    from gpt2_jax.model import GPT2Config, preset

    if smoke:
        return GPT2Config(n_vocab=509, n_ctx=seq_len, n_embd=128, n_head=4, n_layer=2, dtype="bfloat16",
                          remat="full", scan_layers=True)
    return preset(size, dtype="bfloat16", remat="full", scan_layers=True)


def cpu_model(size: str, smoke: bool) -> Any:
    """A released size (a tiny model under --smoke) as timed on this CPU: float32, no remat."""
    from gpt2_jax.model import GPT2Config, preset

    return GPT2Config(n_vocab=509, n_ctx=64, n_embd=64, n_head=4, n_layer=2) if smoke else preset(size)


def median_step_ms(steps: Any, model: Any, batch: Any, repeat: int) -> float:
    """Median ms of steps.train_step from freshly initialised params on `batch` (host arrays), each step
    waited for."""
    import jax

    from gpt2_jax import parallel
    from gpt2_jax.model import init_params

    state = steps.init_state(init_params(model, jax.random.key(0)))
    on_device = parallel.global_batch(batch, steps.batch_sharding)
    key = jax.random.key(1)

    def step():
        nonlocal state
        state, out = steps.train_step(state, on_device, key)
        out["loss"].block_until_ready()
    return 1000 * median_seconds(step, repeat)
