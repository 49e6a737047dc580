"""The classic example: fine-tune GPT-2 124M on tinyshakespeare (from $GPT2_JAX_SHARED or ../shared)."""

from __future__ import annotations

import os
from pathlib import Path

from experiments import base

VARIANTS = {"124M": "fine-tune 124M on tinyshakespeare: Adam 1e-4, batch 8 x 256 tokens, 2000 steps, "
                    "validation on the held-out last tenth"}


def get_config(variant: str = "124M"):
    """Fine-tune 124M on tinyshakespeare, validating every 200 steps on its last tenth, never trained on."""
    base.check_variant("shakespeare", variant, VARIANTS)
    shared = Path(os.environ.get("GPT2_JAX_SHARED", "../shared"))
    c = base.get_config()
    c.run_name = "shakespeare"
    c.model.name = variant
    c.data.dataset = str(shared / "data" / "tinyshakespeare.txt")
    c.data.seq_len = 256
    c.data.val_split = 0.1  # the last tenth of the text: validation only
    c.data.val_every, c.data.val_batch_size, c.data.val_batch_count = 200, 8, 10
    c.train.batch_size, c.train.learning_rate = 8, 1e-4
    c.train.lr_schedule, c.train.warmup_steps, c.train.total_steps = "cosine", 100, 2000
    c.sample.sample_every, c.sample.sample_length = 500, 200
    c.checkpoint.save_every = 500
    return c
