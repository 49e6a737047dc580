"""gpt2-jax: fine-tune and sample OpenAI's GPT-2 with JAX/Flax."""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use (PEP 562), so `import gpt2_jax.encoder` or the CLI's help do not start JAX.
_EXPORTS = {"Model": "api", "load": "api", "Encoder": "encoder", "get_encoder": "encoder", "UserError": "errors",
            "GPT2": "model", "GPT2Config": "model", "preset": "model"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gpt2_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(f"gpt2_jax.{_EXPORTS[name]}"), name)
