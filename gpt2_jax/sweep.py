"""Sweeps: one experiment run over the product of `--sweep=KEY=V1,V2,...` values, then one report.

Each point is an ordinary run with its overrides applied and run_name SWEEP/KEY=V,KEY=V, so it is
identical to launching those overrides alone under that run name. Started again, a sweep skips the
points that reached train.total_steps and resumes an interrupted one (restore_from=latest). The
report goes to WORKDIR/sweeps/SWEEP/sweep.{md,png,json} (process 0 only); WORKDIR may be a URL (gs://).
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Callable

from gpt2_jax import checkpoints, report, storage
from gpt2_jax.errors import UserError

NOT_SWEPT = ("run_name", "workdir", "mode")


def _valid_keys(config: Any, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        keys += _valid_keys(value, f"{prefix}{key}.") if hasattr(value, "items") else [f"{prefix}{key}"]
    return keys


def _typed(key: str, text: str, current: Any, flag: str) -> Any:
    """A value for `key` parsed as the type of its current value."""
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
    except ValueError:
        raise UserError(f"{flag}: {text!r} is not a valid {type(current).__name__} (the type of {key})") from None
    return text


def parse(specs: list[str], config: Any) -> list[tuple[str, list[Any]]]:
    """[(key, typed values)] from --sweep=KEY=V1,V2 flags; a bad key or value is one line, before anything runs."""
    valid = [k for k in _valid_keys(config) if k not in NOT_SWEPT]
    axes = []
    for spec in specs:
        flag = f"--sweep={spec}"
        key, sep, values = spec.partition("=")
        if not sep or not values:
            raise UserError(f"{flag}: use --sweep=SECTION.FIELD=V1,V2,...")
        if key not in valid:
            raise UserError(f"{flag}: unknown config key {key!r}; valid keys: {', '.join(valid)}")
        if key in (k for k, _ in axes):
            raise UserError(f"{flag}: {key} is swept twice; give all its values in one --sweep")
        section, _, field = key.rpartition(".")
        current = config[section][field] if section else config[field]
        axes.append((key, [_typed(key, v, current, flag) for v in values.split(",")]))
    return axes


def points(axes: list[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    """Every combination of the swept values, in the order given (the first axis slowest)."""
    keys = [k for k, _ in axes]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(values for _, values in axes))]


def point_config(config: Any, name: str, overrides: dict[str, Any]) -> Any:
    """The config of one point: the overrides applied, run_name NAME/KEY=V,KEY=V."""
    c = copy.deepcopy(config)
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        setattr(c[section] if section else c, field, value)
    c.run_name = f"{name}/" + ",".join(f"{k}={v}" for k, v in overrides.items())
    return c


def finished(config: Any) -> bool:
    """Whether a point's run reached train.total_steps (started again, a sweep skips it)."""
    run_dir = storage.path(config.workdir) / "checkpoint" / config.run_name
    if not run_dir.is_dir():
        return False
    latest = checkpoints.latest_step(run_dir)
    return latest is not None and latest >= config.train.total_steps


def run(config: Any, name: str, axes: list[tuple[str, list[Any]]], train: Callable[[Any], Any],
        is_main: Callable[[], bool]) -> storage.AnyPath:
    """Run every point with `train(config)` (skipping finished ones), then write the report; returns its folder."""
    if config.train.total_steps <= 0:
        raise UserError("a sweep needs train.total_steps > 0, so that each point ends (and a finished one is "
                        "skipped when the sweep starts again)")
    configs = [(overrides, point_config(config, name, overrides)) for overrides in points(axes)]
    for i, (overrides, c) in enumerate(configs, start=1):
        if finished(c):
            print(f"sweep {name}: point {i}/{len(configs)} {c.run_name} finished earlier, skipped", flush=True)
            continue
        print(f"sweep {name}: point {i}/{len(configs)} {c.run_name}", flush=True)
        train(c)
    workdir = storage.path(config.workdir)
    out = workdir / "sweeps" / name
    if is_main():
        runs = [{"run_name": c.run_name, "overrides": overrides,
                 "records": report.read_metrics(workdir / "logs" / c.run_name)} for overrides, c in configs]
        report.write_comparison(runs, out, f"Sweep {name}: {len(runs)} runs", "sweep")
    return out


def describe(config: Any, name: str, axes: list[tuple[str, list[Any]]]) -> str:
    """The points of a sweep, one line each (for --dry_run)."""
    lines = [f"sweep {name}: {len(points(axes))} points"]
    lines += [f"  {point_config(config, name, o).run_name}" for o in points(axes)]
    return "\n".join(lines)
