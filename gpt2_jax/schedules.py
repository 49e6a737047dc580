"""Learning-rate schedules from the `train` section, as a table: name -> (builder, check, description).

Every schedule starts with the same linear warmup from 0 to train.learning_rate over train.warmup_steps and
is a function of the step (updates applied so far, 0-based). A new schedule is one row of SCHEDULES.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
import optax

from gpt2_jax.errors import UserError

DECAY_SHAPES = ("linear", "1-sqrt")  # train.decay_shape of lr_schedule=wsd


@dataclasses.dataclass(frozen=True)
class ScheduleKind:
    """One row of SCHEDULES: how to build the schedule from the train section, and what it needs of it."""

    build: Callable[[Any], optax.Schedule]  # train section -> step -> learning rate (checked first)
    check: Callable[[Any], None]  # raises a one-line UserError naming the field for settings `build` cannot use
    description: str  # one line, for errors and docs


def _with_warmup(train: Any, after: optax.Schedule) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate over warmup_steps, then `after` (which sees steps since the warmup)."""
    lr, warmup = float(train.learning_rate), int(train.warmup_steps)
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _decay_end(train: Any) -> int:
    """The step where linear and cosine decay end: train.decay_steps, 0 meaning train.total_steps."""
    return int(train.decay_steps) or int(train.total_steps)


def _no_check(train: Any) -> None:
    """Constant: nothing beyond what every schedule needs."""


def _check_decay(train: Any) -> None:
    """Linear and cosine decay from the warmup's end to decay_steps (or total_steps): it must come after the warmup."""
    warmup, decay_end = int(train.warmup_steps), _decay_end(train)
    if decay_end <= warmup:
        raise UserError(f"train.lr_schedule={train.lr_schedule!r} needs train.decay_steps (or train.total_steps) "
                        f"> train.warmup_steps={warmup}; got {decay_end}")


def _constant(train: Any) -> optax.Schedule:
    """Warmup, then learning_rate."""
    return _with_warmup(train, optax.constant_schedule(float(train.learning_rate)))


def _linear(train: Any) -> optax.Schedule:
    """Warmup, then linear decay to learning_rate * min_lr_ratio at decay_steps (or total_steps)."""
    lr, end = float(train.learning_rate), float(train.learning_rate) * float(train.min_lr_ratio)
    return _with_warmup(train, optax.linear_schedule(lr, end, _decay_end(train) - int(train.warmup_steps)))


def _cosine(train: Any) -> optax.Schedule:
    """Warmup, then cosine decay to learning_rate * min_lr_ratio at decay_steps (or total_steps)."""
    return _with_warmup(train, optax.cosine_decay_schedule(float(train.learning_rate),
                                                           _decay_end(train) - int(train.warmup_steps),
                                                           alpha=float(train.min_lr_ratio)))


def wsd_phases(train: Any) -> tuple[int, int]:
    """(decay_start, decay_steps) of lr_schedule=wsd: the decay is the last round(decay_fraction * total_steps)
    steps (Python's round: halves to even), so it starts at total_steps - decay_steps."""
    total = int(train.total_steps)
    decay = round(float(train.get("decay_fraction", 0.2)) * total)
    return total - decay, decay


def _check_wsd(train: Any) -> None:
    """WSD needs a known end (total_steps), a decay of at least one step, and the warmup over before it begins."""
    total, warmup = int(train.total_steps), int(train.warmup_steps)
    fraction, shape = float(train.get("decay_fraction", 0.2)), train.get("decay_shape", "1-sqrt")
    if total <= 0:
        raise UserError(f"train.lr_schedule='wsd' decays over the run's last steps: set train.total_steps > 0; "
                        f"got {total}")
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"train.decay_fraction={fraction}: must be in (0, 1] (the share of total_steps spent decaying)")
    if shape not in DECAY_SHAPES:
        raise UserError(f"train.decay_shape={shape!r}: use one of {', '.join(DECAY_SHAPES)}")
    if int(train.decay_steps):
        raise UserError(f"train.decay_steps={int(train.decay_steps)} is not read by train.lr_schedule='wsd' "
                        "(its decay is the last train.decay_fraction of train.total_steps): set it to 0")
    start, decay = wsd_phases(train)
    if decay < 1:
        raise UserError(f"train.decay_fraction={fraction} of train.total_steps={total} rounds to no decay step: "
                        "raise one of them")
    if warmup > start:
        raise UserError(f"train.warmup_steps={warmup} overlaps the decay of train.lr_schedule='wsd', which starts at "
                        f"step {start} (train.total_steps={total} - round(train.decay_fraction={fraction} * {total}))")


def _wsd(train: Any) -> optax.Schedule:
    """Warmup-stable-decay (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
    Durations"): warmup, learning_rate until decay_start, then with x = (step - decay_start) / decay_steps in [0, 1]
    (wsd_phases) and end = learning_rate * min_lr_ratio:

        1-sqrt:  lr_t = end + (learning_rate - end) * (1 - sqrt(x))
        linear:  lr_t = end + (learning_rate - end) * (1 - x)

    reaching `end` at step total_steps and staying there after it. Computed as learning_rate * (1 - w) + end * w
    with w = sqrt(x) or x (the same in exact arithmetic): float32 then gives learning_rate and end exactly at
    the decay's two ends.
    """
    lr, end = float(train.learning_rate), float(train.learning_rate) * float(train.min_lr_ratio)
    start, decay = wsd_phases(train)
    sqrt_shape = train.get("decay_shape", "1-sqrt") == "1-sqrt"

    def cooldown(count):  # count: steps since decay_start (join_schedules subtracts it)
        x = jnp.clip(count / decay, 0.0, 1.0)  # float32 scalar: the fraction of the decay elapsed
        w = jnp.sqrt(x) if sqrt_shape else x
        return lr * (1.0 - w) + end * w

    warmup = int(train.warmup_steps)
    # The stable phase is learning_rate from the warmup's end to decay_start (empty when they meet).
    return _with_warmup(train, optax.join_schedules([optax.constant_schedule(lr), cooldown], [start - warmup]))


SCHEDULES: dict[str, ScheduleKind] = {
    "constant": ScheduleKind(_constant, _no_check, "warmup, then learning_rate"),
    "linear": ScheduleKind(_linear, _check_decay, "warmup, then linear decay to learning_rate * min_lr_ratio at "
                                                  "decay_steps (0: total_steps)"),
    "cosine": ScheduleKind(_cosine, _check_decay, "warmup, then cosine decay to learning_rate * min_lr_ratio at "
                                                  "decay_steps (0: total_steps)"),
    "wsd": ScheduleKind(_wsd, _check_wsd, "warmup, learning_rate, then decay_shape decay over the last "
                                          "decay_fraction of total_steps to learning_rate * min_lr_ratio"),
}


def check_schedule(train: Any) -> None:
    """One line for schedule settings learning_rate_schedule cannot build."""
    if train.lr_schedule not in SCHEDULES:
        raise UserError(f"train.lr_schedule={train.lr_schedule!r}: use one of {', '.join(SCHEDULES)}")
    lr = float(train.learning_rate)
    if lr <= 0:
        raise UserError(f"train.learning_rate={lr}: must be > 0")
    SCHEDULES[train.lr_schedule].check(train)


def learning_rate_schedule(train: Any) -> optax.Schedule:
    """The schedule train.lr_schedule names in SCHEDULES: step (int32 scalar) -> learning rate (float32 scalar)."""
    check_schedule(train)
    return SCHEDULES[train.lr_schedule].build(train)
