"""Reports from training logs: a run's curves, and one table and plot comparing runs (sweeps, `gpt2-jax compare`).

Everything here reads what the loop wrote: WORKDIR/logs/RUN/metrics.jsonl (one JSON object per step:
loss, learning_rate, tokens_per_sec, val_loss, time, ...; in a store, also its parts, metrics.jsonl.parts/)
and run_config.json beside it.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from gpt2_jax import storage
from gpt2_jax.errors import UserError

IGNORED_FIELDS = ("run_name", "workdir")  # never what tells runs apart


def read_metrics(log_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl, in order: the file, then the parts a run in a store wrote
    (storage.read_log); a line cut short by a kill is skipped."""
    try:
        lines = storage.read_log(storage.path(log_dir) / "metrics.jsonl")
    except FileNotFoundError:
        raise UserError(f"{log_dir}: no metrics.jsonl (give a WORKDIR/logs/RUN directory or a run name)") from None
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


RUN_CONFIG = "run_config.json"  # the resolved config a run records, in logs/RUN/ and in checkpoint/RUN/


def read_run_config(log_dir: Path) -> dict:
    """The resolved config a run recorded (logs/RUN/run_config.json, else checkpoint/RUN/run_config.json)."""
    log_dir = storage.path(log_dir)
    for path in (log_dir / RUN_CONFIG, log_dir.parent.parent / "checkpoint" / log_dir.name / RUN_CONFIG):
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
    return {}


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differing_fields(configs: list[dict]) -> list[str]:
    """The config fields ('section.field') whose values differ between runs."""
    flat = [_flatten(c) for c in configs]
    keys = sorted({k for f in flat for k in f})
    return [k for k in keys if k not in IGNORED_FIELDS and len({json.dumps(f.get(k)) for f in flat}) > 1]


def summarize(records: list[dict]) -> dict[str, Any]:
    """Last training loss, best and last validation loss, median tokens/s and wall time of one run's records."""
    losses = [r["loss"] for r in records if "loss" in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    speeds = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r]
    times = [r["time"] for r in records if "time" in r]
    summary = {"steps": max((r["step"] for r in records), default=0), "loss": losses[-1] if losses else None,
               "val_loss": vals[-1] if vals else None, "best_val_loss": min(vals) if vals else None,
               "tokens_per_sec": statistics.median(speeds) if speeds else None,
               "wall_s": times[-1] - times[0] if len(times) > 1 else None}
    for name in [*DPO_COLUMNS, *eval_keys(records)]:  # the last of DPO's metrics, and of the benchmarks
        last = [r[name] for r in records if name in r]
        if last:
            summary[name] = last[-1]
    return summary


def eval_keys(records: list[dict]) -> list[str]:
    """The benchmarks a run logged while training (eval/TASK/METRIC), in the order they first appear."""
    return list(dict.fromkeys(k for r in records for k in r if k.startswith("eval/")))


# The DPO metrics the comparison tables show, when the runs logged them.
DPO_COLUMNS = ("rewards/accuracies", "rewards/margins", "val_rewards/accuracies", "val_rewards/margins")


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        avg, norm = weight * avg + (1 - weight) * v, weight * norm + (1 - weight)
        out.append(avg / norm)
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, path: Path) -> None:
    """A matplotlib figure as a PNG file (written whole, so that a store's object is too)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    storage.path(path).write_bytes(buffer.getvalue())


def plot_run(records: list[dict], path: Path, title: str) -> None:
    """curves.png of one run: training loss (raw and smoothed), validation loss and the learning rate, by step."""
    plt = _pyplot()
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    lr = [(r["step"], r["learning_rate"]) for r in records if "learning_rate" in r]
    benchmarks = eval_keys(records)
    rows = 3 if benchmarks else 2  # the benchmarks watched while training, in a panel of their own
    fig, axes = plt.subplots(rows, 1, figsize=(7, 5.5 + 2 * (rows - 2)), sharex=True,
                             height_ratios=(3, 1, 2)[:rows])
    ax, ax_lr = axes[0], axes[1]
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(steps, smoothed(list(losses)), color="tab:blue", label="training loss (smoothed)")
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", label="validation loss")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if lr:
        ax_lr.plot(*zip(*lr), color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)
    if benchmarks:
        ax_eval = axes[2]
        for key in benchmarks:
            ax_eval.plot(*zip(*[(r["step"], r[key]) for r in records if key in r]), "o-", label=key[len("eval/"):])
        ax_eval.set_ylabel("benchmarks")
        ax_eval.grid(alpha=0.3)
        ax_eval.legend(fontsize=7)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _label(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "(defaults)"


def write_comparison(runs: list[dict], out_dir: Path, title: str, stem: str) -> None:
    """STEM.md, STEM.png and STEM.json for runs given as {run_name, overrides, records}."""
    storage.mkdir(out_dir)
    rows = [{"run_name": r["run_name"], "overrides": r["overrides"], **summarize(r["records"])} for r in runs]
    (out_dir / f"{stem}.json").write_text(json.dumps({"runs": rows}, indent=2))
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    extra = [c for c in DPO_COLUMNS if any(c in r for r in rows)]  # and the benchmarks watched while training
    extra += list(dict.fromkeys(k for r in runs for k in eval_keys(r["records"])))
    lines = [f"# {title}", "", "| run | settings | last loss | best val loss | last val loss | tokens/s | wall s |"
             + "".join(f" {c} |" for c in extra), "|---|---|---|---|---|---|---|" + "---|" * len(extra)]
    for r in rows:
        lines.append(f"| {r['run_name']} | {_label(r['overrides'])} | {fmt(r['loss'], '.4f')} | "
                     f"{fmt(r['best_val_loss'], '.4f')} | {fmt(r['val_loss'], '.4f')} | "
                     f"{fmt(r['tokens_per_sec'], ',.0f')} | {fmt(r['wall_s'], '.1f')} |"
                     + "".join(f" {fmt(r.get(c), '.3f')} |" for c in extra))
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    plt = _pyplot()
    fig, (ax, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(runs):
        color = f"C{i % 10}"
        train = [(m["step"], m["loss"]) for m in r["records"] if "loss" in m]
        val = [(m["step"], m["val_loss"]) for m in r["records"] if "val_loss" in m]
        if train:
            steps, losses = zip(*train)
            ax.plot(steps, smoothed(list(losses)), color=color, label=_label(r["overrides"]))
        if val:
            ax_val.plot(*zip(*val), "o-", color=color, label=_label(r["overrides"]))
    for axis, what in ((ax, "training loss (smoothed)"), (ax_val, "validation loss")):
        axis.set_xlabel("step")
        axis.set_ylabel(what)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    _save_figure(fig, out_dir / f"{stem}.png")
    plt.close(fig)


def compare(log_dirs: list[Path], out_dir: Path) -> Path:
    """compare.md/png/json of existing runs, labelled by the config fields that differ between them."""
    configs = [read_run_config(d) for d in log_dirs]
    fields = differing_fields(configs)
    flat = [_flatten(c) for c in configs]
    runs = [{"run_name": storage.path(d).name, "overrides": {k: f.get(k) for k in fields}, "records": read_metrics(d)}
            for d, f in zip(log_dirs, flat)]
    write_comparison(runs, out_dir, f"{len(runs)} runs compared", "compare")
    return out_dir
