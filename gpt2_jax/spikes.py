"""Skipping bad steps (train.skip_spikes): a pure detector of loss spikes and non-finite steps, and the select
that keeps the old state where a step is skipped.

The rule, per step, with the window holding the last finite losses of the steps before this one:

- a step whose loss or gradient norm is not finite is skipped;
- once the window holds at least `min_history(window)` past losses, a step whose loss is more than `sigma`
  Bessel-corrected standard deviations above their mean is skipped: loss - mean > sigma * std (one-sided,
  strict). The current loss is not in the window it is judged against.

This is maxtext's `skip_step_on_spikes` (src/maxtext/optimizers/optimizers.py), itself after OLMo-core's
SkipStepOptimizer (src/olmo_core/optim/skip_step_optimizer.py), on the loss (both also apply the sigma rule to
the gradient norm; here the gradient norm only has to be finite). Where it differs from them, on purpose:

- when a decision starts: maxtext decides once `count + 1 >= max(2, window // 2)` (the past losses plus the
  current one fill half the window), OLMo-core once they number max(20, window // 2); neither waits for a full
  window. We follow maxtext, except that at least 2 past losses are required (a Bessel std needs two; maxtext
  takes the std of a single past loss as 0): `min_history(window) = max(2, window // 2 - 1)` past losses, 63
  for the default window of 128, as in both;
- what enters the window: both append every step's loss, skipped or not, so that a lasting change of level
  becomes the new baseline instead of being skipped forever (maxtext: "append even if skipped so spikes can
  become the new baseline"); a shift of any size then costs about window / sigma^2 skips (4 at the defaults).
  We do too, but never a non-finite loss: in theirs a NaN makes the window's mean NaN and every comparison
  with it false, so the next `window` steps are all skipped. A finite loss whose gradient norm is not finite
  does enter: the loss itself was measured.

`consecutive` counts the skips in a row, non-finite ones included: the loop stops the run when it reaches
train.max_consecutive_skips.

Everything here is a pure function of arrays (jit-able, no side effects); `reference` is a plain numpy
transcription of the same rule for the tests.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax.errors import UserError


class SpikeState(flax.struct.PyTreeNode):
    """The detector's memory, saved in the checkpoint so that resume across a skip is bitwise."""

    losses: jax.Array  # float32 [window]: a ring buffer of the last finite losses; slots >= count are unused zeros
    count: jax.Array  # int32 scalar: losses held, <= window; the held ones are slots [0, count)
    position: jax.Array  # int32 scalar: the slot the next finite loss is written to (the oldest once full)
    consecutive: jax.Array  # int32 scalar: skips in a row up to now (0 after an applied step)


def min_history(window: int) -> int:
    """Past losses the window must hold before a loss can be judged a spike (see the module's docstring)."""
    return max(2, window // 2 - 1)


def check_spikes(train: Any) -> None:
    """One line for a skip_spikes setting `observe` cannot use (only when train.skip_spikes is on)."""
    if not train.get("skip_spikes", False):
        return
    window, sigma = int(train.get("spike_window", 128)), float(train.get("spike_sigma", 6.0))
    max_skips = int(train.get("max_consecutive_skips", 10))
    if window < 2:
        raise UserError(f"train.spike_window={window}: must be >= 2 (a standard deviation needs two past losses)")
    if not (math.isfinite(sigma) and sigma > 0):
        raise UserError(f"train.spike_sigma={sigma}: must be > 0 (standard deviations above the window's mean)")
    if max_skips < 1:
        raise UserError(f"train.max_consecutive_skips={max_skips}: must be >= 1")


def init(window: int) -> SpikeState:
    """An empty window of `window` losses."""
    zero = jnp.zeros((), jnp.int32)
    return SpikeState(losses=jnp.zeros((window,), jnp.float32), count=zero, position=zero, consecutive=zero)


def observe(state: SpikeState, loss: jax.Array, grad_norm: jax.Array, sigma: float | jax.Array
            ) -> tuple[SpikeState, jax.Array]:
    """Judge one step from its loss and gradient norm (float scalars): (the state after it, skip: bool scalar).

    Pure and jit-able; `sigma` may be traced. The window's size is static (state.losses.shape).
    """
    window = state.losses.shape[0]
    loss = jnp.asarray(loss, jnp.float32)
    held = jnp.arange(window) < state.count  # [window]: the slots holding past losses
    n = state.count.astype(jnp.float32)
    mean = jnp.sum(jnp.where(held, state.losses, 0.0)) / jnp.maximum(n, 1.0)
    # Two passes (mean, then squared deviations) keep float32 exact enough where the spread is small against
    # the mean (a loss of ~3 moving by ~1e-3).
    var = jnp.sum(jnp.where(held, jnp.square(state.losses - mean), 0.0)) / jnp.maximum(n - 1.0, 1.0)
    spike = (state.count >= min_history(window)) & (loss - mean > sigma * jnp.sqrt(var))
    finite = jnp.isfinite(loss) & jnp.isfinite(jnp.asarray(grad_norm, jnp.float32))
    skip = ~finite | spike
    enters = jnp.isfinite(loss)  # skipped or not, but never a NaN or inf
    new_state = SpikeState(
        losses=jnp.where(enters, state.losses.at[state.position].set(loss), state.losses),
        count=jnp.where(enters, jnp.minimum(state.count + 1, window), state.count),
        position=jnp.where(enters, (state.position + 1) % window, state.position),
        consecutive=jnp.where(skip, state.consecutive + 1, 0),
    )
    return new_state, skip


def keep_unless(skip: jax.Array, new_tree: Any, old_tree: Any) -> Any:
    """`new_tree`, or `old_tree` bitwise where `skip` (a bool scalar): a select per leaf, so NaNs in the new
    values never reach the result. The trees have the same structure, shapes and dtypes."""
    return jax.tree.map(lambda new, old: jnp.where(skip, old, new), new_tree, old_tree)


def state_dict(state: SpikeState) -> dict[str, np.ndarray]:
    """The state as a flat dict of numpy arrays, for the checkpoint."""
    return {field: np.asarray(getattr(state, field)) for field in ("losses", "count", "position", "consecutive")}


def from_state_dict(saved: dict[str, np.ndarray], window: int) -> SpikeState:
    """The state `state_dict` saved, for a run whose train.spike_window is `window` (one line if it changed)."""
    losses = np.asarray(saved["losses"], np.float32)
    if losses.shape != (window,):
        raise UserError(f"train.spike_window={window}, but the checkpoint's window holds {losses.size} losses: "
                        f"resume with train.spike_window={losses.size}")
    ints = {k: jnp.asarray(np.asarray(saved[k], np.int32)) for k in ("count", "position", "consecutive")}
    return SpikeState(losses=jnp.asarray(losses), **ints)


def reference(losses: Any, grad_norms: Any, window: int, sigma: float) -> list[bool]:
    """The rule in plain numpy, independent of `observe`, for the tests: one skip decision per step."""
    past = collections.deque(maxlen=window)  # the last finite losses, oldest first
    enough = max(2, window // 2 - 1)  # past losses before any judgement: half the window with the current one
    decisions = []
    for loss, grad_norm in zip(np.asarray(losses, np.float64), np.asarray(grad_norms, np.float64)):
        skip = not (np.isfinite(loss) and np.isfinite(grad_norm))
        if not skip and len(past) >= enough:
            values = np.array(past)
            skip = bool(loss - values.mean() > sigma * values.std(ddof=1))
        decisions.append(skip)
        if np.isfinite(loss):
            past.append(loss)
    return decisions
