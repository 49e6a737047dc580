"""gpt2-jax: fine-tune and sample OpenAI's GPT-2 with JAX/Flax."""

from gpt2_jax.api import Model, load
from gpt2_jax.encoder import Encoder, get_encoder
from gpt2_jax.errors import UserError
from gpt2_jax.model import GPT2, GPT2Config, preset

__all__ = ["GPT2", "GPT2Config", "Encoder", "Model", "UserError", "get_encoder", "load", "preset"]
