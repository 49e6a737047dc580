"""The README's main job: a small GPT-2 trained from scratch on the Python standard library's sources.

Runs offline on any machine, in a few minutes on 2 CPU cores (BENCHMARKS.md): with the GPT-2
vocabulary when one is found locally (models/*/, $GPT2_JAX_SHARED/gpt2, ../shared/gpt2), else with a
byte-level one (a fresh machine), the model sized for each. Validation is on the last fifth of the modules in
name order (about t-z), held out: never trained on, so its falling loss is real generalisation; a dataset of your
own (--config.data.dataset=...) is split the same way. It ends with two samples continuing an indented `def`
(a method), at temperature 0.6 among the 20 likeliest tokens.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from experiments import base

VARIANTS = {"default": "a small GPT-2 from scratch on the stdlib's *.py files (2-4 minutes on 2 CPU cores), "
                       "then samples of methods ('    def ...')"}


def get_config(variant: str = "default"):
    """Small model, AdamW with warmup and cosine decay, five validations, samples at the end."""
    from gpt2_jax.resolve import find_vocab_dir  # here, not at the top: launch.py --list imports every experiment

    base.check_variant("demo", variant, VARIANTS)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    c = base.get_config()
    c.run_name = "demo"
    c.model.from_scratch = True
    if find_vocab_dir(c) is not None:  # GPT-2's vocabulary: the 50257-way softmax is most of the work
        c.model.n_ctx, c.model.n_embd, c.model.n_head, c.model.n_layer = 64, 64, 4, 4
        c.train.total_steps, c.train.learning_rate, c.sample.sample_length = 600, 3e-3, 48
        c.sample.prompt = "    def"  # BPE tokens carry their leading space: a trailing one would be a rare token
    else:  # bytes: cheap logits, so a wider model and a longer context (a token is a character)
        c.model.n_ctx, c.model.n_embd, c.model.n_head, c.model.n_layer = 128, 128, 4, 4
        c.train.total_steps, c.train.learning_rate, c.sample.sample_length = 1500, 2e-3, 120
        c.sample.prompt = "    def "
    c.data.dataset = str(stdlib / "*.py")
    c.data.val_split = 0.2  # the last fifth: about the modules named t-z
    c.data.val_batch_size, c.data.val_batch_count = 16, 4
    c.train.batch_size = 8
    c.train.optimizer = "adamw"
    c.train.lr_schedule, c.train.warmup_steps = "cosine", 30
    c.train.grad_clip = 1.0
    c.sample.sample_num = 2
    c.sample.temperature, c.sample.top_k = 0.6, 20
    # Intervals follow train.total_steps, also when it is overridden (--config.train.total_steps=60):
    # five validations (and one at the last step), four checkpoints, samples at the end.
    total = c.train.get_ref("total_steps")
    c.data.val_every = (total + 4) // 5
    c.checkpoint.save_every = (total + 3) // 4
    c.sample.sample_every = total
    c.checkpoint.keep = 2  # a checkpoint holds the weights and Adam's two moments: the last two
    return c
