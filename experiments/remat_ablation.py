"""Remat ablation: compile the train step once per remat policy and micro-batch; memory, FLOPs, step time.

Writes WORKDIR/ablation/RUN_NAME/ablation.{md,png,json}. Variants: tiny (CI-sized), 124M, 355M,
774M, 1558M (the last two compile-only by default: their steps do not fit a small machine).
"""

from __future__ import annotations

from experiments import base

VARIANTS = {
    "tiny": "a 2-layer, 64-wide model at T=256: every policy, micro-batches 2 and 4 (runs in CI)",
    "124M": "124M shape, micro-batches 1,2,4, timed",
    "355M": "355M shape, micro-batches 1,2, timed",
    "774M": "774M shape, compile-only",
    "1558M": "1558M shape, compile-only",
}


def get_config(variant: str = "124M"):
    """The base config with an `ablation` section; the model is randomly initialised at the variant's shape."""
    from gpt2_jax.model import PRESETS  # here, not at the top: launch.py --list imports every experiment

    base.check_variant("remat_ablation", variant, VARIANTS)
    c = base.get_config()
    c.mode = "remat_ablation"
    c.run_name = f"remat_{variant}"
    c.model.from_scratch = True
    c.model.vocab = "bytes" if variant == "tiny" else ""
    # tiny: long windows on a small model, so activations (what remat trades) dominate the memory
    tiny = dict(n_ctx=256, n_embd=64, n_head=4, n_layer=2)
    shape = tiny if variant == "tiny" else dict(n_ctx=1024, **PRESETS[variant])
    for key, value in shape.items():
        setattr(c.model, key, value)
    c.data.seq_len = 0
    c.ablation.policies = "none,full,dots,dots_no_batch,save_qkv,save_attn,save_named"
    c.ablation.micro_batches = {"tiny": "2,4", "124M": "1,2,4", "355M": "1,2"}.get(variant, "1,2")
    c.ablation.steps = 1 if variant == "tiny" else 3
    c.ablation.compile_only = variant in ("774M", "1558M")
    return c
