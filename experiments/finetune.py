"""Fine-tune a released GPT-2 on your data, as the original train.py does. Variants: 124M, 355M, 774M, 1558M."""

from __future__ import annotations

from experiments import base

VARIANTS = {
    "124M": "fine-tune 124M with Adam at 2e-5, batch 1 (the original's defaults)",
    "355M": "fine-tune 355M; remat 'full', as the original forced memory-saving gradients for 345M",
    "774M": "fine-tune 774M with remat 'full'",
    "1558M": "fine-tune 1558M with remat 'full' (bfloat16 compute recommended on GPU)",
}


def get_config(variant: str = "124M"):
    """The base config pointed at one released size."""
    base.check_variant("finetune", variant, VARIANTS)
    c = base.get_config()
    c.model.name = variant
    if variant != "124M":
        c.model.remat = "full"
    return c
