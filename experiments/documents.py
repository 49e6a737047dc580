"""Fine-tune on a folder of separate documents: each attends only to itself, the best validation step kept, early stopping."""

from __future__ import annotations

import os
from pathlib import Path

from experiments import base

VARIANTS = {"124M": "124M on --config.data.dataset=DIR (default: tinyshakespeare, one document): document_mask, "
                    "validation on the held-out last tenth every 100 steps, keep_best, stop after 5 stale validations"}


def get_config(variant: str = "124M"):
    """What it shows: document masking (the files of the dataset, joined by end-of-text ids, never see each
    other inside a window), and validation that acts: checkpoint/RUN/best holds the lowest-validation step,
    and the run ends itself once validation stops improving (docs/fine_tuning.md, "Modes")."""
    base.check_variant("documents", variant, VARIANTS)
    c = base.get_config()
    c.run_name = "documents"
    c.model.name = variant
    c.data.dataset = str(Path(os.environ.get("GPT2_JAX_SHARED", "../shared")) / "data" / "tinyshakespeare.txt")
    c.data.document_mask = True
    c.data.seq_len = 256
    c.data.val_split = 0.1
    c.data.val_every, c.data.val_batch_size, c.data.val_batch_count = 100, 8, 10
    c.checkpoint.keep_best = True
    c.train.early_stop_patience, c.train.early_stop_min_delta = 5, 0.001
    c.train.batch_size, c.train.learning_rate = 8, 1e-4
    c.train.lr_schedule, c.train.warmup_steps, c.train.total_steps = "cosine", 100, 5000
    c.sample.sample_every, c.sample.sample_length = 500, 200
    c.checkpoint.save_every = 500
    return c
