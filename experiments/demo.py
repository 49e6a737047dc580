"""The README's main job: a small GPT-2 trained from scratch on the Python standard library's sources.

Runs offline on any machine in a few minutes on 2 CPU cores: uses the GPT-2 vocabulary when one
is found locally (models/*/, $GPT2_JAX_SHARED/gpt2, ../shared/gpt2), else a byte-level vocabulary.
Validation is on held-out modules (names t-z), so its falling loss is real generalisation.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from experiments import base

VARIANTS = {"default": "4-layer, 128-wide GPT-2 (context 64) from scratch, 300 steps on the stdlib's *.py files"}


def get_config(variant: str = "default"):
    """Small model, Adam with warmup and cosine decay, validation every 50 steps, a sample at the end."""
    base.check_variant("demo", variant, VARIANTS)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    c = base.get_config()
    c.run_name = "demo"
    c.workdir = "runs"
    c.model.from_scratch = True
    c.model.n_ctx, c.model.n_embd, c.model.n_head, c.model.n_layer = 64, 128, 4, 4
    c.data.dataset = str(stdlib / "[!t-z]*.py")
    c.data.val_dataset = str(stdlib / "[t-z]*.py")
    c.data.val_every, c.data.val_batch_size, c.data.val_batch_count = 50, 16, 4
    c.train.batch_size = 8
    c.train.optimizer = "adamw"
    c.train.learning_rate = 2e-3
    c.train.lr_schedule, c.train.warmup_steps = "cosine", 30
    c.train.grad_clip = 1.0
    c.train.total_steps = 300
    c.sample.sample_every, c.sample.sample_length = 300, 96
    c.checkpoint.save_every = 100
    return c
