"""nanoGPT's CPU recipe (shakespeare_char, 4 layers x 128, T=64, batch 12, 2,000 steps): AdamW against Muon.

nanoGPT's README trains a baby GPT on a laptop with `train_shakespeare_char.py --device=cpu --compile=False
--eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
--max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`: AdamW at 1e-3 (betas 0.9, 0.99), 100 warmup steps, cosine
to 1e-4, weight decay 0.1, gradients clipped at 1. Here the same model on tinyshakespeare (from
$GPT2_JAX_SHARED, else ../shared) with the byte-level vocabulary (the text is ASCII: a byte is a character),
the last tenth held out for validation. Compare the optimizers in one sweep (BENCHMARKS.md):

    python launch.py --config=experiments/shakespeare_char.py --sweep=train.optimizer=adamw,muon \\
        --sweep=train.lr_schedule=cosine,wsd
"""

from __future__ import annotations

import os
from pathlib import Path

from experiments import base

VARIANTS = {
    "adamw": "nanoGPT's recipe: AdamW 1e-3, cosine to 1e-4, 2,000 steps",
    "muon": "Muon on the blocks' matrices + AdamW on the rest, cosine",
    "muon_wsd": "Muon + AdamW, warmup-stable-decay (the last fifth decays, 1-sqrt)",
}


def get_config(variant: str = "adamw"):
    """The baby GPT on characters, validated every 100 steps on 20 batches of 12 x 64 held-out tokens."""
    base.check_variant("shakespeare_char", variant, VARIANTS)
    c = base.get_config()
    c.run_name = f"shakespeare_char_{variant}"
    c.model.from_scratch, c.model.vocab = True, "bytes"
    c.model.n_ctx, c.model.n_embd, c.model.n_head, c.model.n_layer = 64, 128, 4, 4
    c.data.dataset = str(Path(os.environ.get("GPT2_JAX_SHARED", "../shared")) / "data" / "tinyshakespeare.txt")
    c.data.val_split = 0.1
    c.data.val_every, c.data.val_batch_size, c.data.val_batch_count = 100, 12, 20
    c.train.batch_size, c.train.total_steps = 12, 2000
    c.train.optimizer, c.train.learning_rate, c.train.b1, c.train.b2 = "adamw", 1e-3, 0.9, 0.99
    c.train.weight_decay, c.train.grad_clip = 0.1, 1.0
    c.train.lr_schedule, c.train.warmup_steps, c.train.min_lr_ratio = "cosine", 100, 0.1
    if variant.startswith("muon"):
        c.train.optimizer = "muon"
    if variant == "muon_wsd":
        c.train.lr_schedule = "wsd"
    c.sample.sample_every, c.checkpoint.save_every = 0, 1000
    return c
