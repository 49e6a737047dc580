"""The small Python API the CLIs are built on: load a model directory, get logits, generate text."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax.encoder import Encoder, get_encoder
from gpt2_jax.errors import UserError
from gpt2_jax.model import GPT2, GPT2Config
from gpt2_jax.sampling import Generated, generate
from gpt2_jax.rundir import files_dir
from gpt2_jax.weights import find_model_dir, load_weights


@functools.partial(jax.jit, static_argnames="config")
def _forward(params: dict, tokens: jax.Array, *, config: GPT2Config) -> jax.Array:
    return GPT2(config).apply(params, tokens)


@dataclasses.dataclass
class Model:
    """A loaded model: its config, its parameters (a pytree) and its tokenizer."""

    config: GPT2Config
    params: dict
    encoder: Encoder

    def logits(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Next-token logits [..., T, V] (float32) for token ids [T] or [B, T]."""
        ids = np.asarray(ids, np.int32)
        batched = ids if ids.ndim == 2 else ids[None]
        if batched.shape[1] > self.config.n_ctx:
            raise UserError(f"{batched.shape[1]} tokens exceed the model's context of {self.config.n_ctx}")
        out = _forward(self.params, jnp.asarray(batched), config=self.config)
        return np.asarray(out if ids.ndim == 2 else out[0])

    def generate(self, prompt: str | Sequence[int], length: int, **kwargs) -> Generated:
        """Generated ids after `prompt` (text or ids); keyword arguments as sampling.generate."""
        ids = self.encoder.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return generate(self.config, self.params, ids or [self.encoder.eot_token], length=length,
                        eot=self.encoder.eot_token, **kwargs)

    def generate_text(self, prompt: str, length: int, **kwargs) -> list[str]:
        """Generated continuations of `prompt` as text, one per batch row, cut at end-of-text."""
        out = self.generate(prompt, length, **kwargs)
        return [self.encoder.decode(row[:n]) for row, n in zip(out.tokens, out.lengths)]


def load(model_dir: str | os.PathLike, ema: bool = False, **config_overrides) -> Model:
    """Load any supported model directory or cached hub id; overrides such as dtype='bfloat16' go to the config;
    with `ema`, a training run's moving average of its weights (train.ema_decay)."""
    model_dir = find_model_dir(model_dir)
    config, params = load_weights(model_dir, ema=ema, **config_overrides)
    encoder = get_encoder(files_dir(model_dir))  # a run's step directory: the run's vocabulary
    if encoder.n_vocab > config.n_vocab:
        raise UserError(f"{model_dir}: the vocabulary has {encoder.n_vocab} tokens but the model only "
                        f"n_vocab={config.n_vocab}; the vocabulary files belong to another model")
    return Model(config, params, encoder)
