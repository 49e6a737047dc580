"""Supervised fine-tuning on prompt/completion pairs (.jsonl): the loss on the completions only."""

from __future__ import annotations

from experiments import base

VARIANTS = {"124M": "124M on --config.data.dataset=FILE.jsonl ({\"prompt\", \"completion\"} lines): examples packed "
                    "with document masking, a held-out tenth validated, the best step kept"}


def get_config(variant: str = "124M"):
    """What it shows: a model learns to answer, not to repeat prompts (docs/fine_tuning.md, "Modes"): each
    line's completion (and its end-of-text) is the loss, packed examples never see each other."""
    base.check_variant("sft", variant, VARIANTS)
    c = base.get_config()
    c.run_name = "sft"
    c.model.name = variant
    c.data.dataset = "examples.jsonl"
    c.data.document_mask = True  # pack several examples a row, kept apart
    c.data.seq_len = 512
    c.data.val_split = 0.1
    c.data.val_every, c.data.val_batch_size, c.data.val_batch_count = 100, 8, 10
    c.checkpoint.keep_best = True
    c.train.batch_size, c.train.learning_rate = 8, 5e-5
    c.train.lr_schedule, c.train.warmup_steps, c.train.total_steps = "cosine", 50, 2000
    c.sample.sample_every = 0
    c.checkpoint.save_every = 500
    return c
