"""Skipping bad steps: the jitted detector against a numpy transcription of the rule, the select, the state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gpt2_jax import data, spikes
from gpt2_jax.errors import UserError

observe = jax.jit(spikes.observe)


def _detect(losses, grad_norms, window: int, sigma: float, state: spikes.SpikeState | None = None):
    """The jitted detector over a trace, one call per step: (skip decisions, consecutive counts, final state)."""
    state = spikes.init(window) if state is None else state
    skips, runs = [], []
    for loss, grad_norm in zip(np.asarray(losses, np.float32), np.asarray(grad_norms, np.float32)):
        state, skip = observe(state, loss, grad_norm, sigma)
        skips.append(bool(skip))
        runs.append(int(state.consecutive))
    return skips, runs, state


def _steady(steps: int, seed: int = 0, level: float = 3.0, noise: float = 0.01) -> np.ndarray:
    return (level + noise * np.random.default_rng(seed).standard_normal(steps)).astype(np.float32)


def _norms(steps: int, seed: int = 1) -> np.ndarray:
    return (1.0 + 0.1 * np.random.default_rng(seed).random(steps)).astype(np.float32)


def _traces() -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Named synthetic traces: (losses, gradient norms, window)."""
    traces = {}
    losses = _steady(400)
    losses[[150, 151, 230, 390]] += np.float32(0.5)  # spikes, two of them in a row
    losses[[170, 300]] -= np.float32(0.5)  # drops are not spikes: the rule is one-sided
    traces["steady with spikes"] = (losses, _norms(400), 128)
    losses, norms = _steady(300, seed=2), _norms(300)
    losses[[80, 81, 82, 200]] = [np.nan, np.inf, -np.inf, np.nan]
    norms[[120, 121, 250]] = [np.nan, np.inf, np.inf]
    losses[[10, 160]] += np.float32(1.0)  # one spike before the window holds enough losses (15), one after
    traces["non-finite losses and gradient norms"] = (losses, norms, 32)
    trend = (2.0 + 0.002 * np.arange(500) + 0.01 * np.random.default_rng(3).standard_normal(500)).astype(np.float32)
    trend[[260, 420]] += np.float32(0.3)
    traces["rising trend"] = (trend, _norms(500), 64)
    losses = _steady(100, seed=4)
    losses[[10, 62]] += np.float32(2.0)  # before min_history(128) = 63 past losses: not judged
    losses[80] += np.float32(5.0)  # judged against the 80 past losses, those two included
    losses[95] = np.nan
    traces["window not yet full"] = (losses, _norms(100), 128)
    losses = _steady(400, seed=5)
    losses[200:212] += np.float32(0.8)  # a burst of spikes, then a lasting level shift
    losses[300:] += np.float32(5.0)
    traces["consecutive spikes and a level shift"] = (losses, _norms(400), 128)
    losses = _steady(200, seed=6, noise=0.0)  # every loss the same: std 0, so any rise is a spike
    losses[[100, 150]] += np.float32(1e-3)
    traces["constant losses"] = (losses, _norms(200), 16)
    return traces


@pytest.mark.parametrize("name", list(_traces()))
def test_the_jitted_detector_equals_the_numpy_transcription_step_by_step(name):
    losses, norms, window = _traces()[name]
    skips, runs, _ = _detect(losses, norms, window, sigma=6.0)
    want = spikes.reference(losses, norms, window, sigma=6.0)
    assert skips == want, [i for i, (a, b) in enumerate(zip(skips, want)) if a != b]
    # the consecutive-skip counter: skips in a row up to each step, back to 0 at an applied step
    expected_runs, run = [], 0
    for skip in want:
        run = run + 1 if skip else 0
        expected_runs.append(run)
    assert runs == expected_runs


def test_the_traces_exercise_every_branch():
    traces = _traces()
    steady = spikes.reference(*traces["steady with spikes"][:2], 128, 6.0)
    assert [i for i, s in enumerate(steady) if s] == [150, 151, 230, 390]  # spikes in a row, not the drops
    nonfinite = spikes.reference(*traces["non-finite losses and gradient norms"][:2], 32, 6.0)
    assert [i for i, s in enumerate(nonfinite) if s] == [80, 81, 82, 120, 121, 160, 200, 250]  # not 10: too early
    early = spikes.reference(*traces["window not yet full"][:2], 128, 6.0)
    assert [i for i, s in enumerate(early) if s] == [80, 95]
    trend = spikes.reference(*traces["rising trend"][:2], 64, 6.0)
    assert [i for i, s in enumerate(trend) if s] == [260, 420]  # the trend itself is never a spike
    shift = spikes.reference(*traces["consecutive spikes and a level shift"][:2], 128, 6.0)
    burst, after = [i for i in range(200, 212) if shift[i]], [i for i in range(300, 400) if shift[i]]
    # the skipped losses enter the window, so a lasting change becomes the baseline after a few skips
    assert 1 <= len(burst) < 12 and burst == list(range(200, 200 + len(burst)))
    assert 1 <= len(after) <= 5 and after == list(range(300, 300 + len(after)))
    assert [i for i, s in enumerate(spikes.reference(*traces["constant losses"][:2], 16, 6.0)) if s] == [100, 150]


def test_a_lasting_level_shift_of_any_size_costs_about_window_over_sigma_squared_skips():
    # After k skipped losses a shift d has std ~ d * sqrt(k / W) in the window: it passes once k >= W / sigma^2,
    # 128 / 36 ~ 3.6 at the defaults, whatever d. train.max_consecutive_skips (10) sits above that.
    for shift in (0.3, 1.0, 1e3, 1e6):
        losses = _steady(300, seed=7)
        losses[150:] += np.float32(shift)
        skips = spikes.reference(losses, _norms(300), 128, 6.0)
        assert [i for i, s in enumerate(skips) if s] == [150, 151, 152, 153]


def test_the_window_is_past_losses_only_with_bessels_correction():
    # window 4: judged from 2 past losses on. Past [1, 3]: mean 2, Bessel std sqrt(2) ~ 1.414 (ddof=0: 1).
    for current, skipped in ((3.2, False), (3.45, True)):  # 1.2 < 1.414 (though > 1); 1.45 > 1.414
        skips, _, _ = _detect([1.0, 3.0, current], [1.0] * 3, window=4, sigma=1.0)
        assert skips == [False, False, skipped] == spikes.reference([1.0, 3.0, current], [1.0] * 3, 4, 1.0)
    # with the current loss in the window (1, 3, 3.45: mean 2.48, std 1.33) 3.45 would not be skipped


def test_non_finite_losses_never_enter_the_window():
    state = spikes.init(8)
    for loss in (1.0, 2.0, np.nan, np.inf, 3.0):
        state, _ = observe(state, np.float32(loss), np.float32(1.0), 6.0)
    assert int(state.count) == 3 and int(state.position) == 3
    np.testing.assert_array_equal(np.asarray(state.losses)[:3], [1.0, 2.0, 3.0])
    state, skip = observe(state, np.float32(2.0), np.float32(np.nan), 6.0)  # a finite loss with a NaN gradient
    assert bool(skip) and int(state.count) == 4  # is skipped, and its loss is measured: it enters


def test_the_ring_buffer_keeps_the_last_window_losses():
    state = spikes.init(4)
    for loss in range(1, 11):
        state, _ = observe(state, np.float32(loss), np.float32(1.0), 1e9)
    assert int(state.count) == 4 and int(state.position) == 10 % 4
    assert sorted(np.asarray(state.losses).tolist()) == [7.0, 8.0, 9.0, 10.0]


def test_observe_traces_sigma_and_runs_under_jit_with_device_scalars():
    state, skip = observe(spikes.init(4), jnp.float32(1.0), jnp.float32(1.0), jnp.float32(6.0))
    assert skip.dtype == jnp.bool_ and skip.shape == () and state.losses.dtype == jnp.float32
    assert {x.dtype for x in (state.count, state.position, state.consecutive)} == {jnp.dtype("int32")}


def _tree(seed: int, poison: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    if poison:
        w[0, 0], w[1, 1], w[2, 2] = np.nan, np.inf, -0.0
    return {"params": {"w": jnp.asarray(w), "b": jnp.asarray(rng.standard_normal(4), jnp.bfloat16)},
            "opt": {"count": jnp.asarray(seed, jnp.int32), "mu": jnp.asarray(rng.standard_normal(4), jnp.float32)}}


def _bits(tree) -> list[bytes]:
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("jit", [False, True])
def test_keep_unless_returns_the_old_tree_bitwise_where_skipped(jit):
    old, new = _tree(0), _tree(1, poison=True)
    keep = jax.jit(spikes.keep_unless) if jit else spikes.keep_unless
    assert _bits(keep(jnp.bool_(True), new, old)) == _bits(old)  # the NaNs of the skipped step go nowhere
    assert _bits(keep(jnp.bool_(False), new, old)) == _bits(new)  # NaN, inf and -0.0 kept bit for bit
    assert jax.tree.structure(keep(jnp.bool_(True), new, old)) == jax.tree.structure(old)


def test_the_state_round_trips_through_a_flat_dict_of_numpy_arrays():
    losses, norms, _ = _traces()["consecutive spikes and a level shift"]
    whole, _, _ = _detect(losses, norms, 128, 6.0)
    first, _, state = _detect(losses[:202], norms[:202], 128, 6.0)  # stopped inside the burst of skips
    saved = spikes.state_dict(state)
    assert set(saved) == {"losses", "count", "position", "consecutive"}
    assert all(type(v) is np.ndarray for v in saved.values()) and int(saved["consecutive"]) > 0
    restored = spikes.from_state_dict({k: v.copy() for k, v in saved.items()}, window=128)
    assert _bits(restored) == _bits(state)
    assert jax.tree.map(lambda x: x.dtype, restored) == jax.tree.map(lambda x: x.dtype, state)
    rest, _, _ = _detect(losses[202:], norms[202:], 128, 6.0, state=restored)
    assert first + rest == whole  # resumed across a skip, the same decisions
    with pytest.raises(UserError, match=r"train.spike_window=64, but the checkpoint's window holds 128") as raised:
        spikes.from_state_dict(saved, window=64)
    assert "\n" not in str(raised.value)


def test_min_history_is_half_the_window_counting_the_current_loss():
    assert spikes.min_history(128) == 63  # maxtext: count + 1 >= max(2, 128 // 2); OLMo-core: max(20, 64)
    assert spikes.min_history(2) == spikes.min_history(4) == spikes.min_history(6) == 2  # a Bessel std needs two
    for past, judged in ((62, False), (63, True)):  # a huge spike after 62 past losses passes; after 63 it does not
        losses = np.append(_steady(past), np.float32(100.0))
        skips, _, _ = _detect(losses, _norms(past + 1), 128, 6.0)
        assert skips[-1] is judged and not any(skips[:-1])


@pytest.mark.parametrize("field, value, message", [
    ("spike_window", 1, "train.spike_window=1"),
    ("spike_sigma", 0.0, "train.spike_sigma=0.0"),
    ("spike_sigma", float("nan"), "train.spike_sigma=nan"),
    ("max_consecutive_skips", 0, "train.max_consecutive_skips=0"),
])
def test_bad_settings_are_one_line_naming_the_field(field, value, message):
    train = ml_collections.ConfigDict({"skip_spikes": True, field: value})
    with pytest.raises(UserError, match=message) as raised:
        spikes.check_spikes(train)
    assert "\n" not in str(raised.value)
    train.skip_spikes = False  # off: the other fields are not read
    spikes.check_spikes(train)
    spikes.check_spikes(ml_collections.ConfigDict({"skip_spikes": True}))  # the defaults are valid


# --- In a real run: a poisoned batch is skipped, bitwise -----------------------------------------------------

_BATCH = data.WindowSampler.batch  # the sampler's own, which the runs below wrap

def _poisoned_run(workdir, total: int, poison_at: int | str | None, monkeypatch, **more):
    """The tiny run with skip_spikes; batch `poison_at` ("all": every one) holds an id past the vocabulary (a NaN
    loss)."""
    from conftest import FIXTURES
    from test_loop import tiny_config

    from gpt2_jax import data, loop

    def poisoned(self, index, batch_size, rows=None):
        out = _BATCH(self, index, batch_size, rows)
        if poison_at in (index, "all") and self.seed != 1:  # training batches (validation's are drawn with seed 1)
            out = out.copy()
            out[0, 3] = 10_000
        return out

    monkeypatch.setattr(data.WindowSampler, "batch", poisoned)
    fields = {"train.skip_spikes": True, "train.spike_window": 4, "train.total_steps": total,
              "checkpoint.save_every": 2, "train.ema_decay": 0.5, "train.noise": 0.1, **more}
    return loop.run(tiny_config(workdir, FIXTURES / "make_openai_checkpoint.py", **fields))


def _state_of(workdir, step: int) -> dict:
    from gpt2_jax import checkpoints, rundir, steps as steps_module
    from gpt2_jax.parallel import make_mesh

    run = rundir.RunDir(workdir / "checkpoint" / "run1")
    config = run.model_config()
    train = ml_collections.ConfigDict(run.saved_config()["train"])
    abstract = steps_module.abstract_state(config, train, make_mesh(1, 1))[1]
    return checkpoints.restore_verified(run.path, step, abstract.trees())[0]


def test_a_poisoned_batch_is_skipped_bitwise_and_resume_across_it_is_bitwise(tmp_path, monkeypatch):
    from test_loop import read_metrics

    _poisoned_run(tmp_path / "clean", 2, None, monkeypatch)
    _poisoned_run(tmp_path / "poisoned", 3, 2, monkeypatch, **{"checkpoint.save_every": 1})
    records = {r["step"]: r for r in read_metrics(tmp_path / "poisoned") if "loss" in r}
    assert [records[s]["skipped"] for s in (1, 2, 3)] == [0.0, 0.0, 1.0] and not np.isfinite(records[3]["loss"])
    before, after = _state_of(tmp_path / "clean", 2), _state_of(tmp_path / "poisoned", 3)
    for item in ("params", "opt_state", "ema"):  # the skipped step changed nothing but the detector
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), before[item],
                     after[item])
    assert int(after["spikes"].consecutive) == 1
    # resumed across the skip (stopped at 3, the skipped step) equals straight through to 6
    _poisoned_run(tmp_path / "straight", 6, 2, monkeypatch)
    _poisoned_run(tmp_path / "poisoned", 6, 2, monkeypatch, **{"checkpoint.save_every": 1})
    straight, resumed = _state_of(tmp_path / "straight", 6), _state_of(tmp_path / "poisoned", 6)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), straight, resumed)


def test_too_many_skips_in_a_row_stop_the_run_in_one_line(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"3 steps in a row were skipped .*train.max_consecutive_skips=3\) at step 3; "
                                        r"stopped without saving it"):
        _poisoned_run(tmp_path, 10, "all", monkeypatch, **{"train.max_consecutive_skips": 3})
