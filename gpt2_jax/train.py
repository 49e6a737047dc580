"""The training step: a pure function (state, batch, rng) -> (state, metrics), its loss, and the eval step.

steps.py compiles these over a mesh; evaluate.py reuses the loss.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from gpt2_jax import spikes
from gpt2_jax.model import GPT2, GPT2Config, document_segments, join_lora, split_lora, tied_logits


class TrainState(flax.struct.PyTreeNode):
    """Everything a step updates: the update count, the parameters, the optimizer state, and what the run's
    settings add (None where they add nothing)."""

    step: jax.Array  # int32 scalar: steps taken so far (a skipped step counts: batches follow the step)
    params: Any
    opt_state: Any
    ema: Any = None  # train.ema_decay > 0: the weights' exponential moving average, float32
    spikes: Any = None  # train.skip_spikes: the detector's window of past losses (spikes.SpikeState)

    def trees(self) -> dict[str, Any]:
        """The state's trees but the step, by name (a checkpoint's items), those that are present."""
        return {name: getattr(self, name) for name in ("params", "opt_state", "ema", "spikes")
                if getattr(self, name) is not None}

    @classmethod
    def create(cls, params: Any, optimizer: optax.GradientTransformation, ema: bool = False,
               spike_window: int | None = None) -> "TrainState":
        """A state at step 0 with a freshly initialised optimizer; with `ema`, the average starts at the weights;
        with `spike_window`, an empty detector."""
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                   ema=jax.tree.map(lambda p: p.astype(jnp.float32), params) if ema else None,
                   spikes=spikes.init(spike_window) if spike_window else None)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-position next-token cross-entropy in float32: logits [..., V], targets [...] -> [...]."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def global_norm(tree: Any) -> jax.Array:
    """The L2 norm of all leaves together, in float32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def add_noise(inputs: jax.Array, rng: jax.Array, p: float, n_vocab: int) -> jax.Array:
    """Replace each input id by a uniformly random one with probability p (targets are left alone)."""
    replace_key, token_key = jax.random.split(rng)
    replace = jax.random.bernoulli(replace_key, p, inputs.shape)
    return jnp.where(replace, jax.random.randint(token_key, inputs.shape, 0, n_vocab, inputs.dtype), inputs)


def chunked_cross_entropy(hidden: jax.Array, wte: jax.Array, targets: jax.Array, chunk: int,
                          vocab_multiple: int = 1, weights: jax.Array | None = None) -> jax.Array:
    """Summed cross-entropy (times `weights`, when given) of the tied-embedding logits, computed `chunk`
    positions at a time.

    Only one chunk's [chunk, V] float32 logits exist at once, in the forward and (being
    rematerialised) in the backward pass; the result equals the unchunked sum up to float rounding.
    """
    C = hidden.shape[-1]
    h, t = hidden.reshape(-1, C), targets.reshape(-1)
    pad = (-h.shape[0]) % chunk
    h = jnp.pad(h, ((0, pad), (0, 0))).reshape(-1, chunk, C)
    t = jnp.pad(t, (0, pad)).reshape(-1, chunk)
    w = jnp.ones(targets.size, jnp.float32) if weights is None else weights.reshape(-1).astype(jnp.float32)
    valid = jnp.pad(w, (0, pad)).reshape(-1, chunk)  # padding positions weigh 0

    @jax.checkpoint
    def chunk_sum(args):
        h_c, t_c, v_c = args
        logits = tied_logits(h_c, wte, vocab_multiple)  # [chunk, V] float32
        return jnp.sum(cross_entropy(logits, t_c) * v_c)

    return jnp.sum(jax.lax.map(chunk_sum, (h, t, valid)))


Batch = Any  # windows [B, T+1] int32, or (windows, weights [B, T+1] float32) of prompt/completion examples


def split_batch(batch: Batch) -> tuple[jax.Array, jax.Array | None]:
    """(windows, weights or None) of a batch."""
    return batch if isinstance(batch, (tuple, list)) else (batch, None)


def loss_fn(params: Any, batch: Batch, rng: jax.Array, config: GPT2Config, noise: float = 0.0,
            loss_chunk: int = 0, document_eot: int | None = None, normalizer: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy (float32) of windows [B, T+1]: predict tokens[:, 1:] from tokens[:, :-1].

    With weights (prompt/completion examples) only the weighted targets count: their summed loss divided
    by `normalizer` (default: their number). With loss_chunk > 0 the logits are never held whole
    (chunked_cross_entropy). With document_eot (the end-of-text id), each document of a window is
    computed as if alone (model.document_segments).
    """
    tokens, weights = split_batch(batch)
    target_weights = None if weights is None else weights[:, 1:]
    if target_weights is not None and normalizer is None:
        normalizer = jnp.maximum(jnp.sum(target_weights), 1.0)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    segments = None if document_eot is None else document_segments(inputs, document_eot)  # before any noise
    if noise > 0:
        inputs = add_noise(inputs, rng, noise, config.n_vocab)
    model = GPT2(config)
    if loss_chunk > 0:
        hidden, _ = model.apply(params, inputs, segments=segments, method=GPT2.hidden)
        total = chunked_cross_entropy(hidden, params["params"]["wte"], targets, loss_chunk, config.vocab_multiple,
                                      target_weights)
        return total / (targets.size if target_weights is None else normalizer)
    losses = cross_entropy(model.apply(params, inputs, segments=segments), targets)
    return jnp.mean(losses) if target_weights is None else jnp.sum(losses * target_weights) / normalizer


def make_train_step(config: GPT2Config, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    objective: Any, *, accumulate: int = 1, ema_decay: float = 0.0, spike_sigma: float = 6.0
                    ) -> Callable:
    """The step for a batch of `accumulate` micro-batches stacked along axis 0 ([accumulate * B, ...]), scored by
    `objective` (objectives.py: its loss and the metrics beside it); `reference` is the frozen reference's params
    where the objective takes one. With LoRA (config.lora_rank > 0) only the adapters are differentiated: the
    frozen base gets no gradient at all (the optimizer, optim.make_optimizer, keeps no state for it either).

    Where the state holds a spike detector (train.skip_spikes), a step whose loss is more than `spike_sigma`
    standard deviations above the recent losses, or not finite, is not applied: params, optimizer state and
    the average stay bitwise as they were (a skipped step does not advance the optimizer's schedule either), the
    step counter advances, and `skipped` says so. Where it holds an average (train.ema_decay), it follows the
    applied weights: ema = decay * ema + (1 - decay) * params, in float32.
    """
    def objective_loss(params, batch, rng, normalizer, reference):  # (loss, metrics beside it)
        return objective.loss(params, batch, rng, config, normalizer, reference)

    if config.lora_rank:
        def grad_fn(params, *args):  # ((loss, metrics), gradients of the adapters only)
            adapters, base = split_lora(params)
            return jax.value_and_grad(lambda a: objective_loss(join_lora(a, base), *args), has_aux=True)(adapters)
    else:
        grad_fn = jax.value_and_grad(objective_loss, has_aux=True)

    def train_step(state: TrainState, batch: Batch, rng: jax.Array, reference: Any = None
                   ) -> tuple[TrainState, dict]:
        # Micro-batch i takes rows i, k+i, 2k+i, ...: with rows split over devices, every micro-batch
        # is spread over all of them (a plain [k, B] reshape would leave each on a few devices).
        micro = jax.tree.map(lambda x: x.reshape(-1, accumulate, *x.shape[1:]).swapaxes(0, 1), batch)  # [k, B, ...]
        keys = jax.random.split(rng, accumulate)
        # Weighted targets (examples): every micro-batch's sum is divided by the whole batch's count, so
        # the summed micro-batch losses are the batch's mean however the targets fall between them.
        normalizer = objective.normalizer(batch)
        if accumulate == 1:
            (loss, extra), grads = grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), keys[0], normalizer,
                                           reference)
        else:
            # Sum the micro-batch gradients in a scan (one micro-batch's activations alive at a time).
            def accumulate_one(carry, xs):
                loss_sum, extra_sum, grad_sum = carry
                (loss, extra), grads = grad_fn(state.params, xs[0], xs[1], normalizer, reference)
                return (loss_sum + loss, jax.tree.map(jnp.add, extra_sum, extra),
                        jax.tree.map(jnp.add, grad_sum, grads)), None

            zeros = jax.tree.map(jnp.zeros_like, split_lora(state.params)[0] if config.lora_rank else state.params)
            no_extra = {name: jnp.zeros((), jnp.float32) for name in objective.metrics}
            (loss, extra, grads), _ = jax.lax.scan(accumulate_one, (jnp.zeros((), jnp.float32), no_extra, zeros),
                                                   (micro, keys))
            extra = jax.tree.map(lambda m: m / accumulate, extra)  # equal micro-batches: the mean of their means
            if normalizer is None:  # each micro-batch's loss was its own mean
                loss, grads = loss / accumulate, jax.tree.map(lambda g: g / accumulate, grads)
        grad_norm = global_norm(grads)  # of what trains
        if config.lora_rank:  # the base's gradient: zeros, which the optimizer's frozen branch never reads
            grads = join_lora(grads, jax.tree.map(jnp.zeros_like, split_lora(state.params)[1]))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step), **extra}
        ema = None if state.ema is None else jax.tree.map(
            lambda e, p: ema_decay * e + (1 - ema_decay) * p.astype(jnp.float32), state.ema, params)
        detector = state.spikes
        if detector is not None:
            detector, skip = spikes.observe(detector, loss, grad_norm, spike_sigma)
            params, opt_state, ema = spikes.keep_unless(skip, (params, opt_state, ema),
                                                        (state.params, state.opt_state, state.ema))
            metrics.update(skipped=skip.astype(jnp.float32), skips_in_a_row=detector.consecutive.astype(jnp.float32))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema, spikes=detector), \
            metrics

    return train_step


def make_eval_step(config: GPT2Config, objective: Any) -> Callable:
    """The objective's {"loss", *metrics} of one validation batch (no noise)."""
    def eval_step(params: Any, batch: Batch, reference: Any = None) -> dict:
        return objective.evaluate(params, batch, config, reference)

    return eval_step
