"""The speedrun's claim at CPU scale: AdamW against Muon + AdamW (and with warmup-stable-decay) on nanoGPT's CPU
recipe (experiments/shakespeare_char.py: 4 layers x 128, T=64, batch 12, 2,000 steps), as one sweep.

    python bench/speedrun.py [--optimizers adamw,muon] [--schedules cosine,wsd] [--muon_lrs 0.02]
                             [--steps 2000] [--workdir DIR] [--png bench/speedrun.png] [--smoke]

Runs the sweep (sweep.run, what `launch.py --sweep` runs), then reads each run's validation losses: their
curves on one plot, and for each run its final validation loss and the first step at which it reached the
final validation loss of the first run (AdamW with nanoGPT's cosine schedule). Needs tinyshakespeare
($GPT2_JAX_SHARED/data, else ../shared/data).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def arguments() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizers", default="adamw,muon")
    parser.add_argument("--schedules", default="cosine,wsd")
    parser.add_argument("--muon_lrs", default="0.02", help="Muon's peak learning rates to sweep")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs there (default: a temporary dir)")
    parser.add_argument("--png", type=Path, default=common.REPO / "bench" / "speedrun.png")
    common.add_record_flags(parser, "40 steps on 2 layers x 32, to check the script runs")
    return parser


def _label(overrides: dict) -> str:
    """A run's settings in a few words (Muon's learning rate only where Muon runs)."""
    words = {"train.optimizer": "optimizer", "train.lr_schedule": "schedule", "muon.learning_rate": "muon lr"}
    return ", ".join(f"{words[k]}={v}" for k, v in overrides.items()
                     if k != "muon.learning_rate" or overrides["train.optimizer"] == "muon")


def first_step_reaching(records: list[dict], target: float) -> int | None:
    """The first validated step whose validation loss is at or below target."""
    return next((r["step"] for r in records if "val_loss" in r and r["val_loss"] <= target), None)


def main() -> None:
    """Run the sweep, print and record the table, draw the plot."""
    args = arguments().parse_args()
    import jax

    from experiments import shakespeare_char
    from gpt2_jax import loop, report, storage, sweep

    config = shakespeare_char.get_config()
    config.train.total_steps = args.steps
    if args.smoke:
        config.model.n_embd, config.model.n_head, config.model.n_layer = 32, 2, 2
        config.train.total_steps, config.train.warmup_steps = 40, 5
        config.data.val_every, config.data.val_batch_count = 20, 2
        args.no_record, args.png = True, None
    axes = [("train.optimizer", args.optimizers.split(",")), ("train.lr_schedule", args.schedules.split(","))]
    lrs = [float(v) for v in args.muon_lrs.split(",")]
    if len(lrs) > 1:
        axes.append(("muon.learning_rate", lrs))
    else:
        config.muon.learning_rate = lrs[0]
    with tempfile.TemporaryDirectory() as tmp:
        config.workdir = str(args.workdir or tmp)
        points = sweep.points(axes)
        if len(lrs) > 1:  # AdamW's points do not read muon.learning_rate: one of each is enough
            points = [p for p in points if p["train.optimizer"] == "muon" or p["muon.learning_rate"] == lrs[0]]
        runs = []
        for overrides in points:
            c = sweep.point_config(config, "speedrun", overrides)
            if not sweep.finished(c):
                loop.run(c)
            runs.append((overrides, report.read_metrics(storage.path(c.workdir) / "logs" / c.run_name)))
    baseline = min(r["val_loss"] for r in runs[0][1] if "val_loss" in r and r["step"] == config.train.total_steps)
    rows = []
    for overrides, records in runs:
        final = [r["val_loss"] for r in records if "val_loss" in r][-1]
        reached = first_step_reaching(records, baseline)
        times = [r["time"] for r in records if "time" in r]
        rows.append((_label(overrides), f"{final:.4f}",
                     reached if reached is not None else "not reached",
                     f"{config.train.total_steps / reached:.2f}x" if reached else "n/a",
                     f"{times[-1] - times[0]:.0f}"))
    text = common.table(f"Validation loss of nanoGPT's CPU recipe (shakespeare_char, {config.model.n_layer} x "
                        f"{config.model.n_embd}, T={config.model.n_ctx}, batch {config.train.batch_size}, "
                        f"{config.train.total_steps} steps); the target is the first run's final validation loss, "
                        f"{baseline:.4f}",
                        ["run", "final val loss", "first step at the target", "steps saved", "wall s"], rows)
    common.report(text, not args.no_record)
    if args.png:
        plt = report._pyplot()
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (overrides, records), row in zip(runs, rows):
            val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
            ax.plot(*zip(*val), "o-", markersize=3, label=row[0])
        ax.axhline(baseline, color="gray", linestyle=":", label="the first run's final validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats per character)")
        ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
        ax.set_title("AdamW against Muon on nanoGPT's CPU recipe")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        print(f"wrote {args.png}")
    print(f"(jax {jax.__version__})")


if __name__ == "__main__":
    main()
