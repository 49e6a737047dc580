"""Shared by the bench scripts: the machine line, markdown tables, timing, recording to BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

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


def report(text: str, record: bool, out: Path | None = None) -> None:
    """Print a table; append it to BENCHMARKS.md when recording; also write it to `out` if given."""
    print(text)
    if record:
        with open(REPO / "BENCHMARKS.md", "a", encoding="utf-8") as f:
            f.write("\n" + text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8") as f:
            f.write(text + "\n")
