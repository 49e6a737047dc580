"""Learning-rate schedules: the table, constant/linear/cosine unchanged, warmup-stable-decay against its formula."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import base
from gpt2_jax import optim, schedules
from gpt2_jax.errors import UserError
from gpt2_jax.schedules import SCHEDULES, check_schedule, learning_rate_schedule, wsd_phases


def _train(**overrides):
    train = base.get_config().train
    for k, v in overrides.items():
        setattr(train, k, v)
    return train


def _values(schedule, steps) -> np.ndarray:
    """The schedule at each step, as the train step calls it: on an int32 step under jit (float32)."""
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(steps, jnp.int32)))


def _old_learning_rate_schedule(train) -> optax.Schedule:
    """gpt2_jax/optim.py's learning_rate_schedule before the table (commit 83c2ee2), verbatim but for the check."""
    lr, warmup = float(train.learning_rate), int(train.warmup_steps)
    decay_steps = int(train.decay_steps) or int(train.total_steps)
    if train.lr_schedule == "constant":
        after = optax.constant_schedule(lr)
    else:
        end = lr * float(train.min_lr_ratio)
        if train.lr_schedule == "linear":
            after = optax.linear_schedule(lr, end, decay_steps - warmup)
        else:
            after = optax.cosine_decay_schedule(lr, decay_steps - warmup, alpha=float(train.min_lr_ratio))
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def test_the_table_names_every_schedule_with_a_description():
    assert list(SCHEDULES) == ["constant", "linear", "cosine", "wsd"]
    for kind in SCHEDULES.values():
        assert kind.description and "\n" not in kind.description
    # optim.py keeps exposing the names other modules import from it
    assert optim.learning_rate_schedule is learning_rate_schedule and optim.check_schedule is check_schedule


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup, decay_steps, total_steps", [(0, 0, 100), (10, 0, 110), (7, 50, 0), (1, 3, 500)])
def test_constant_linear_and_cosine_are_bitwise_what_they_were(name, warmup, decay_steps, total_steps):
    train = _train(lr_schedule=name, learning_rate=6e-4, warmup_steps=warmup, decay_steps=decay_steps,
                   total_steps=total_steps, min_lr_ratio=0.1)
    steps = np.arange(0, 130)
    new, old = _values(learning_rate_schedule(train), steps), _values(_old_learning_rate_schedule(train), steps)
    np.testing.assert_array_equal(new.view(np.uint32), old.view(np.uint32))
    # and called eagerly on a Python int, as the tests and tools do
    for step in (0, warmup, max(warmup - 1, 0), 49, 50, 129):
        assert np.asarray(learning_rate_schedule(train)(step)).tobytes() == \
            np.asarray(_old_learning_rate_schedule(train)(step)).tobytes()


def _wsd_formula(step: int, lr: float, warmup: int, total: int, fraction: float, shape: str, ratio: float) -> float:
    """Warmup-stable-decay in float64, from its definition (Hägele et al. 2024, scaled to end at lr * ratio)."""
    decay = round(fraction * total)
    start, end = total - decay, lr * ratio
    if step < warmup:
        return lr * step / warmup
    if step < start:
        return lr
    x = min((step - start) / decay, 1.0)
    return end + (lr - end) * (1.0 - (math.sqrt(x) if shape == "1-sqrt" else x))


@pytest.mark.parametrize("shape", ["1-sqrt", "linear"])
@pytest.mark.parametrize("lr, warmup, total, fraction, ratio", [
    (6e-4, 100, 1000, 0.2, 0.1),  # decay over steps 800..1000
    (1.0, 0, 50, 0.3, 0.0),  # no warmup, decay to 0 over steps 35..50
    (3e-4, 10, 40, 0.75, 0.5),  # the warmup ends where the decay starts: no stable phase
    (2e-5, 0, 7, 1.0, 0.1),  # the decay is the whole run
])
def test_wsd_follows_its_formula_at_every_boundary(shape, lr, warmup, total, fraction, ratio):
    train = _train(lr_schedule="wsd", learning_rate=lr, warmup_steps=warmup, total_steps=total, min_lr_ratio=ratio,
                   decay_fraction=fraction, decay_shape=shape)
    start, decay = wsd_phases(train)
    assert (start, decay) == (total - round(fraction * total), round(fraction * total))
    boundaries = {0, 1, warmup - 1, warmup, warmup + 1, start - 1, start, start + 1, start + decay // 2,
                  start + decay // 4, total - 1, total, total + 1, 10 * total}
    steps = sorted(s for s in boundaries if s >= 0)
    got = _values(learning_rate_schedule(train), steps)
    want = np.array([_wsd_formula(s, lr, warmup, total, fraction, shape, ratio) for s in steps])
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=3e-7 * lr)  # float32 against float64
    by_step = dict(zip(steps, got))
    assert by_step[start] == np.float32(lr)  # the decay starts from the peak exactly
    assert by_step[total] == by_step[10 * total] == np.float32(lr * ratio)  # and ends at lr * min_lr_ratio
    assert by_step[0] == (0.0 if warmup else np.float32(lr))
    # warmup up, stable flat, decay down: monotone pieces over every step
    every = _values(learning_rate_schedule(train), np.arange(total + 2))
    assert np.all(np.diff(every[:warmup + 1]) > 0) and np.all(every[warmup:start + 1] == np.float32(lr))
    assert np.all(np.diff(every[start:]) <= 0)


def test_wsd_decay_shapes_differ_as_defined():
    common = dict(lr_schedule="wsd", learning_rate=1.0, warmup_steps=0, total_steps=100, min_lr_ratio=0.0,
                  decay_fraction=0.4)
    sqrt_ = learning_rate_schedule(_train(decay_shape="1-sqrt", **common))
    linear = learning_rate_schedule(_train(decay_shape="linear", **common))
    # a quarter of the way into the decay over steps 60..100: 1 - sqrt(1/4) = 0.5 against 1 - 1/4 = 0.75
    assert float(sqrt_(70)) == 0.5 and float(linear(70)) == 0.75


def test_wsd_defaults_are_a_fifth_of_the_run_and_1_sqrt():
    train = _train(lr_schedule="wsd", learning_rate=1.0, total_steps=100)  # whatever base.py holds, or nothing
    explicit = _train(lr_schedule="wsd", learning_rate=1.0, total_steps=100, decay_fraction=0.2,
                      decay_shape="1-sqrt")
    steps = np.arange(0, 102)
    np.testing.assert_array_equal(_values(learning_rate_schedule(train), steps),
                                  _values(learning_rate_schedule(explicit), steps))
    assert wsd_phases(train) == (80, 20)


def test_wsd_decay_length_rounds_as_python_does():
    # Python's round takes halves to even: 2.5 -> 2 and 7.5 -> 8 decay steps
    assert wsd_phases(_train(total_steps=10, decay_fraction=0.25)) == (8, 2)
    assert wsd_phases(_train(total_steps=10, decay_fraction=0.75)) == (2, 8)


BAD = [
    (dict(lr_schedule="step"), "train.lr_schedule='step'"),
    (dict(learning_rate=0.0), "train.learning_rate=0.0"),
    (dict(lr_schedule="cosine", warmup_steps=10, total_steps=0), "needs train.decay_steps"),
    (dict(lr_schedule="linear", warmup_steps=10, decay_steps=10), "needs train.decay_steps"),
    (dict(lr_schedule="wsd", total_steps=0), "set train.total_steps > 0"),
    (dict(lr_schedule="wsd", total_steps=100, decay_fraction=0.0), "train.decay_fraction=0.0"),
    (dict(lr_schedule="wsd", total_steps=100, decay_fraction=1.5), "train.decay_fraction=1.5"),
    (dict(lr_schedule="wsd", total_steps=100, decay_shape="cosine"), "train.decay_shape='cosine'"),
    (dict(lr_schedule="wsd", total_steps=100, decay_steps=50), "train.decay_steps=50 is not read"),
    (dict(lr_schedule="wsd", total_steps=100, decay_fraction=0.004), "rounds to no decay step"),
    (dict(lr_schedule="wsd", total_steps=100, warmup_steps=81), "train.warmup_steps=81 overlaps"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[m for _, m in BAD])
def test_bad_settings_are_one_line_naming_the_field(overrides, message):
    train = _train(**{"learning_rate": 1e-3, **overrides})
    with pytest.raises(UserError, match=re.escape(message)) as raised:
        learning_rate_schedule(train)
    assert "\n" not in str(raised.value)
    with pytest.raises(UserError, match=re.escape(message)):
        check_schedule(train)


def test_the_warmup_may_end_exactly_where_the_decay_starts():
    schedules.check_schedule(_train(lr_schedule="wsd", learning_rate=1e-3, total_steps=100, warmup_steps=80))


def test_a_wsd_run_logs_the_formulas_learning_rate_at_every_step(tmp_path):
    from conftest import FIXTURES
    from test_loop import read_metrics, tiny_config

    from gpt2_jax import loop

    config = tiny_config(tmp_path, FIXTURES / "make_openai_checkpoint.py",
                         **{"train.lr_schedule": "wsd", "train.total_steps": 10, "train.warmup_steps": 2,
                            "train.decay_fraction": 0.4, "train.decay_shape": "1-sqrt", "train.min_lr_ratio": 0.1})
    loop.run(config)
    logged = {r["step"]: r["learning_rate"] for r in read_metrics(tmp_path) if "learning_rate" in r}
    lr, end = 1e-3, 1e-4  # warmup over steps 0-1, constant, then 1-sqrt over the last 4 of 10
    expected = [lr * s / 2 for s in (0, 1)] + [lr] * 4 + [end + (lr - end) * (1 - math.sqrt(k / 4)) for k in range(4)]
    # the record of step n holds the rate its update used: the schedule's at n - 1
    np.testing.assert_allclose([logged[n] for n in range(1, 11)], expected, rtol=1e-6)
