"""LoRA: fine-tune a released GPT-2 through low-rank adapters, the base frozen (fits 1558M on one 24 GB GPU)."""

from __future__ import annotations

from experiments import base

VARIANTS = {"124M": "LoRA rank 16 on attention and MLP, Adam 2e-4, batch 8 x 512 tokens",
            "1558M": "the same on 1558M in bfloat16 with remat 'full': for one 24 GB GPU (BENCHMARKS.md, LoRA)"}


def get_config(variant: str = "124M"):
    """What it shows: adapters of rank 16 on every dense layer of the blocks train while the base weights get
    no gradient and no optimizer state; `gpt2-jax export` merges them, `--adapter_only` writes peft's format."""
    base.check_variant("lora", variant, VARIANTS)
    c = base.get_config()
    c.run_name = f"lora-{variant}"
    c.model.name = variant
    c.data.dataset = "data.txt"
    c.data.seq_len = 512
    c.train.lora_rank, c.train.lora_alpha = 16, 32.0
    c.train.lora_targets = "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"
    c.train.batch_size, c.train.learning_rate = 8, 2e-4
    c.train.lr_schedule, c.train.warmup_steps, c.train.total_steps = "cosine", 100, 2000
    if variant == "1558M":
        c.model.dtype, c.model.remat, c.model.scan_layers = "bfloat16", "full", True
        c.train.batch_size, c.train.accumulate_gradients = 2, 4
    c.checkpoint.save_every = 500
    return c
