"""Evaluation: mean next-token loss and perplexity of a model over consecutive windows of a dataset, or the
masked loss of prompt/completion examples."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import jax
import numpy as np
from tqdm import tqdm

from gpt2_jax import dpo
from gpt2_jax.data import Examples, Pairs
from gpt2_jax.errors import UserError
from gpt2_jax.model import GPT2, GPT2Config
from gpt2_jax.train import chunked_cross_entropy


LOGITS_PER_CHUNK = 1 << 22  # float32 logits held at once (16 MiB): a chunk of positions times the vocabulary


@functools.partial(jax.jit, static_argnames="config")
def _window_loss_sum(params, inputs, targets, weights, *, config: GPT2Config):
    """The weighted summed loss of a batch, its logits made a chunk of positions at a time: whole, a batch of
    GPT-2's 50257-way logits is hundreds of MB that the CPU allocates and faults in again for every batch
    (more system time than compute)."""
    hidden, _ = GPT2(config).apply(params, inputs, method=GPT2.hidden)
    chunk = max(1, min(inputs.size, LOGITS_PER_CHUNK // config.n_vocab))
    return chunked_cross_entropy(hidden, params["params"]["wte"], targets, chunk, config.vocab_multiple, weights)


class Evaluation(NamedTuple):
    loss: float  # mean next-token cross-entropy (nats)
    perplexity: float
    tokens: int  # number of predicted tokens


def windows(tokens: np.ndarray, window: int, stride: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs, targets, weights [W, window] scoring each of tokens[1:] once; the last window zero-padded.

    Window k starts at token k * stride (default stride: the window, so windows do not overlap) and
    scores the targets no earlier window scored: the first all `window`, each later one its last
    `stride`, each of those seeing window - stride tokens or more before it (transformers' perplexity
    guide, with max_length = window + 1).
    """
    stride = stride or window
    n_targets = len(tokens) - 1
    count = 1 + max(0, math.ceil((n_targets - window) / stride))
    starts = np.arange(count) * stride
    index = starts[:, None] + np.arange(window)[None, :]  # input positions [count, window]
    padded = np.zeros(starts[-1] + window + 1, np.int32)
    padded[:len(tokens)] = tokens
    first_scored = np.concatenate([[0], starts[1:] + window - stride])  # of each window, in target positions
    weights = (index >= first_scored[:, None]) & (index < n_targets)
    return padded[index], padded[index + 1], weights.astype(np.float32)


def evaluate(config: GPT2Config, params: dict, chunks: Sequence[np.ndarray], *, window: int | None = None,
             stride: int | None = None, batch_size: int = 8, progress: bool = True) -> Evaluation:
    """Loss over every token of the concatenated chunks, each predicted once from up to `window` before it;
    with a stride below the window, windows overlap so that each scored token sees at least window -
    stride tokens before it (windows)."""
    window = _check_window(config, window)
    if stride is not None and not 1 <= stride <= window:
        raise UserError(f"--stride={stride}: must be between 1 and the window ({window})")
    tokens = np.concatenate([np.asarray(c) for c in chunks])
    if len(tokens) < 2:
        raise UserError(f"the dataset has {len(tokens)} token(s); evaluation needs at least 2")
    return _weighted_loss(config, params, *windows(tokens, window, stride), batch_size, progress)


def evaluate_examples(config: GPT2Config, params: dict, examples: Examples, *, batch_size: int = 8,
                      progress: bool = True) -> Evaluation:
    """The masked loss of prompt/completion examples laid out one a row (data.layout_examples, pack=False),
    each scored on its own: the completions' summed loss divided by their tokens, over all examples."""
    _check_window(config, examples.tokens.shape[1] - 1)
    rows, weights = examples.tokens, examples.weights
    return _weighted_loss(config, params, rows[:, :-1], rows[:, 1:], weights[:, 1:], batch_size, progress)


def _check_window(config: GPT2Config, window: int | None) -> int:
    window = window or config.n_ctx
    if not 1 <= window <= config.n_ctx:
        raise UserError(f"window={window}: must be between 1 and the model's context of {config.n_ctx}")
    return window


def _weighted_loss(config: GPT2Config, params: dict, inputs: np.ndarray, targets: np.ndarray, weights: np.ndarray,
                   batch_size: int, progress: bool) -> Evaluation:
    """The weighted targets' summed loss over their count, `batch_size` rows at a time (one shape compiled)."""
    total, pad = 0.0, (-len(inputs)) % batch_size  # pad the batch count so one shape compiles once
    width = inputs.shape[1]
    inputs, targets, weights = (np.concatenate([a, np.zeros((pad, width), a.dtype)])
                                for a in (inputs, targets, weights))
    for start in tqdm(range(0, len(inputs), batch_size), desc="evaluating", unit="batch", disable=not progress):
        batch = slice(start, start + batch_size)
        total += float(_window_loss_sum(params, inputs[batch], targets[batch], weights[batch], config=config))
    count = int(weights.sum())
    if count == 0:
        raise UserError("the dataset has no target tokens to score (every example's completion is empty)")
    loss = total / count
    return Evaluation(loss, math.exp(loss), count)


def evaluate_pairs(config: GPT2Config, params: dict, reference_config: GPT2Config, reference_params: dict,
                   pairs: Pairs, settings: dpo.DPOSettings, *, batch_size: int = 8, progress: bool = True) -> dict:
    """The DPO loss and trl's metrics (dpo.METRICS) of a policy against its reference over every pair
    (data.layout_pairs), the log-probs in float32 on the devices, the loss and metrics in float64: a policy
    equal to its reference scores ln 2 (sigmoid) exactly."""
    _check_window(config, pairs.tokens.shape[-1] - 1)
    logps = jax.jit(dpo.pair_logps, static_argnums=1)
    pad = (-pairs.count) % batch_size  # one shape compiled once
    tokens = np.concatenate([pairs.tokens, np.repeat(pairs.tokens[:1], pad, 0)])
    weights = np.concatenate([pairs.weights, np.repeat(pairs.weights[:1], pad, 0)])
    policy, reference, counts = [], [], []
    for start in tqdm(range(0, len(tokens), batch_size), desc="evaluating", unit="batch", disable=not progress):
        t, w = tokens[start:start + batch_size], weights[start:start + batch_size]
        p, c = logps(params, config, t, w)
        policy.append(np.asarray(p)), counts.append(np.asarray(c))
        reference.append(np.asarray(logps(reference_params, reference_config, t, w)[0]))
    as64 = lambda parts: np.concatenate(parts)[:pairs.count].astype(np.float64)  # noqa: E731
    loss, metrics = dpo.preference_loss(settings, as64(policy), as64(reference), as64(counts), xp=np)
    return {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}, "pairs": pairs.count}
