"""Sampling: the whole decode loop (prefill, then one token per step with the KV cache) is one jitted call."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax.errors import UserError
from gpt2_jax.model import GPT2, GPT2Config, convert_layout, init_cache

# How every printed sample is introduced: the text below it is model output, not a person's.
SAMPLE_HEADER = "=" * 20 + " SAMPLE {} (model-generated text) " + "=" * 20


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keep the k largest logits per row (ties with the k-th kept), set the rest to -inf; k=0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus: keep the smallest set of most likely tokens whose probability sums to >= p (at least one)."""
    if p <= 0.0 or p >= 1.0:
        return logits
    sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above each
    keep = jnp.maximum(jnp.sum(mass_before < p, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(sorted_logits, keep - 1, axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def greedy(logits: jax.Array) -> jax.Array:
    """argmax over the last axis (the first of equal maxima), as two plain reductions: XLA:CPU runs the
    variadic (value, index) reduce of jnp.argmax an order of magnitude slower over 50257 columns."""
    best = jnp.max(logits, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(logits == best, index, logits.shape[-1]), axis=-1)


def next_token(logits: jax.Array, rng: jax.Array, temperature: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """One token per row from logits [B, V]: greedy for top_k=1, else temperature then top-p or top-k."""
    if top_k == 1 and top_p <= 0.0:
        return greedy(logits)
    logits = logits / temperature
    logits = top_p_filter(logits, top_p) if top_p > 0.0 else top_k_filter(logits, top_k)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def check_settings(*, temperature: float, top_k: int, top_p: float, length: int | None = None,
                   prefix: str = "") -> None:
    """Reject bad sampling settings with one line naming the setting as the caller spells it
    (prefix "--" on the command line, "sample." in a config, "" in the Python API)."""
    if temperature <= 0:
        raise UserError(f"{prefix}temperature={temperature}: must be > 0 (use {prefix}top_k=1 for greedy decoding)")
    if not 0.0 <= top_p <= 1.0:
        raise UserError(f"{prefix}top_p={top_p}: must be in [0, 1] (0 turns nucleus sampling off)")
    if top_k < 0:
        raise UserError(f"{prefix}top_k={top_k}: must be >= 0 (0 turns it off)")
    if length is not None and length < 1:
        raise UserError(f"{prefix}length={length}: must be at least 1")


class Generated(NamedTuple):
    tokens: np.ndarray  # [B, length] generated ids; after a sample stops, filled with end-of-text
    lengths: np.ndarray  # [B] ids before the stop (an end-of-text id or the end of a stop sequence)
    steps: int  # loop iterations run (less than length when every sample stopped early)


def cache_lengths(prompt_bucket: int, cache_size: int) -> list[int]:
    """The key/value cache's length in each segment of the decode loop: doubling from the prompt's bucket up
    to the cache size, so a token at position p attends over at most twice the positions filled so far."""
    lengths, n = [], prompt_bucket
    while n < cache_size:
        n = min(cache_size, n * 2)
        lengths.append(n)
    return lengths or [cache_size]


def _grow(cache: Any, length: int) -> Any:
    """Each layer's cache ([B, N, S, H]) zero-padded to `length` positions."""
    return jax.tree.map(lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0))), cache)


@functools.partial(jax.jit, static_argnames=("config", "length", "cache_size", "top_k", "top_p", "unroll"))
def _decode(params, prompt, prompt_len, rng, temperature, stop_ids, eot, *, config, length, cache_size, top_k, top_p,
            unroll):
    # Decoding always runs the blocks unrolled, each layer's cache updated in place: a scan over
    # stacked blocks re-slices weights and cache every token (slower: see BENCHMARKS.md). Remat only
    # matters for gradients.
    config = dataclasses.replace(config, scan_layers=False, remat="none")
    params = convert_layout(params, False)  # once per call, before the loop
    if jnp.dtype(config.dtype).itemsize < jnp.dtype(config.param_dtype).itemsize:
        # Batch-1 decoding is bound by reading the weights each token: read them in the compute dtype
        # (every use casts them to it anyway).
        params = jax.tree.map(lambda x: x.astype(config.dtype), params)
    model = GPT2(config)
    B, padded_len = prompt.shape
    # Prefill: the prompt is right-padded to a bucket length; padded positions write cache entries
    # that the loop overwrites before any query can see them (the causal mask hides later positions).
    hidden, cache = model.apply(params, prompt, init_cache(config, B, padded_len), 0, method=GPT2.hidden)
    last = jax.lax.dynamic_index_in_dim(hidden, prompt_len - 1, axis=1, keepdims=True)  # [B, 1, C]
    logits = model.apply(params, last, method=GPT2.logits)[:, 0]  # [B, V]: only the last position's
    window = jnp.full((B, stop_ids.shape[1]), -2, jnp.int32)  # the last generated ids, for stop matching

    def segment(size: int):
        """The loop while the next position fits a cache of `size`: each step attends over `size` positions,
        not the whole final cache (the cache grows between segments, once, not every step)."""
        def cond(state):
            i, _, _, _, done, _, _ = state
            return (i < length) & ~jnp.all(done) & (prompt_len + i < size)

        def one_token(state):
            i, logits, cache, out, done, lengths, window = state
            tok = next_token(logits, jax.random.fold_in(rng, i), temperature, top_k, top_p)
            tok = jnp.where(done, eot, tok)
            window = jnp.concatenate([window[:, 1:], tok[:, None]], axis=1)
            # A stop sequence is right-aligned in stop_ids, left-padded with -1 (matches anything).
            hit = jnp.all((window[:, None, :] == stop_ids[None]) | (stop_ids[None] == -1), axis=-1).any(axis=-1)
            lengths = jnp.where(done, lengths, jnp.where(tok == eot, i, i + 1))
            done = done | (tok == eot) | hit
            out = out.at[:, i].set(tok)
            logits, cache = model.apply(params, tok[:, None], cache, prompt_len + i)
            return i + 1, logits[:, 0], cache, out, done, lengths, window

        def body(state):
            # `unroll` tokens per loop iteration: the loop's control (and on an accelerator, its round trip)
            # is paid once per `unroll` tokens; each token after the first runs only while the loop would.
            state = one_token(state)
            for _ in range(unroll - 1):
                state = jax.lax.cond(cond(state), one_token, lambda s: s, state)
            return state

        return lambda state: jax.lax.while_loop(cond, body, state)

    out = jnp.full((B, length), eot, jnp.int32)
    state = (jnp.int32(0), logits, cache, out, jnp.zeros(B, bool), jnp.zeros(B, jnp.int32), window)
    for size in cache_lengths(padded_len, cache_size):
        state = state[:2] + (_grow(state[2], size),) + state[3:]
        state = segment(size)(state)
    steps, _, _, out, _, lengths, _ = state
    return out, lengths, steps


def _bucket(n: int, cap: int) -> int:
    """Next power of two >= n (at least 8), capped: prompts of similar length share one compile."""
    return min(cap, max(8, 1 << (n - 1).bit_length()))


def generate(config: GPT2Config, params: dict, prompt: Sequence[int], *, length: int, batch_size: int = 1,
             rng: jax.Array | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
             stop_sequences: Sequence[Sequence[int]] = (), eot: int | None = None, unroll: int = 1) -> Generated:
    """Sample `length` ids after `prompt` for each of `batch_size` rows, in one compiled loop (`unroll` tokens
    per loop iteration)."""
    prompt = list(prompt)
    if not prompt:
        raise UserError("the prompt is empty; start from the end-of-text token for unconditional samples")
    check_settings(temperature=temperature, top_k=top_k, top_p=top_p, length=length)
    if len(prompt) + length > config.n_ctx:
        raise UserError(f"prompt ({len(prompt)} tokens) + length ({length}) exceeds the context of "
                        f"{config.n_ctx} tokens; shorten the prompt or lower --length")
    eot = config.n_vocab - 1 if eot is None else eot
    padded_len = _bucket(len(prompt), config.n_ctx)
    cache_size = min(config.n_ctx, padded_len + length)
    prompt_arr = np.zeros((batch_size, padded_len), np.int32)
    prompt_arr[:, :len(prompt)] = prompt
    stops = [list(s) for s in stop_sequences if len(s)]
    width = max([len(s) for s in stops], default=1)
    stop_ids = np.full((max(1, len(stops)), width), -1, np.int32)
    if not stops:
        stop_ids[:] = -3  # matches nothing: generated ids are never negative
    for row, s in enumerate(stops):
        stop_ids[row, width - len(s):] = s
    rng = jax.random.key(0) if rng is None else rng
    out, lengths, steps = _decode(params, jnp.asarray(prompt_arr), jnp.int32(len(prompt)), rng,
                                  jnp.float32(temperature), jnp.asarray(stop_ids), jnp.int32(eot),
                                  config=config, length=length, cache_size=cache_size,
                                  top_k=int(top_k), top_p=float(top_p), unroll=max(1, int(unroll)))
    return Generated(np.asarray(out), np.asarray(lengths), int(steps))
