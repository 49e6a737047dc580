"""Preference fine-tuning (DPO) on prompt/chosen/rejected pairs (.jsonl), as trl's DPOTrainer does it."""

from __future__ import annotations

from experiments import base

VARIANTS = {
    "124M": "DPO on 124M (or model.name=WORKDIR/checkpoint/sft): beta 0.1, sigmoid loss, batch 8 pairs x 512 tokens, "
            "reference log-probs precomputed",
    "355M": "the same on 355M, remat 'full'",
    "774M": "the same on 774M, remat 'full'",
    "1558M": "the same on 1558M in bfloat16, remat 'full', scanned blocks, 2 pairs x 4 micro-batches",
    "lora": "DPO through LoRA adapters (rank 16) on 124M: the reference is the base itself, adapters off",
}


def get_config(variant: str = "124M"):
    """What it shows: the policy learns to prefer the chosen completions over the rejected ones
    (rewards/accuracies rises, the DPO loss falls from ln 2) while staying near its reference."""
    base.check_variant("dpo", variant, VARIANTS)
    c = base.get_config()
    c.run_name = f"dpo-{variant}"
    c.model.name = "124M" if variant == "lora" else variant
    c.train.objective = "dpo"
    c.data.dataset = "pairs.jsonl"
    c.data.seq_len = 512
    c.data.val_split = 0.1
    c.data.val_every, c.data.val_batch_size, c.data.val_batch_count = 100, 8, 10
    c.checkpoint.keep_best = True
    c.train.batch_size, c.train.learning_rate = 8, 5e-6
    c.train.lr_schedule, c.train.warmup_steps, c.train.total_steps = "linear", 50, 1000
    c.sample.sample_every = 0
    c.checkpoint.save_every = 250
    if variant in ("355M", "774M", "1558M"):
        c.model.remat = "full"
    if variant == "1558M":
        c.model.dtype, c.model.scan_layers = "bfloat16", True
        c.train.batch_size, c.train.accumulate_gradients = 2, 4
    if variant == "lora":
        c.train.lora_rank, c.train.lora_alpha = 16, 32.0
        c.train.lora_targets = "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"
        c.train.learning_rate = 5e-5
    return c
