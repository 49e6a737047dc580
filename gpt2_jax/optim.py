"""Optax chains built from the `train` section of an experiment config."""

from __future__ import annotations

from typing import Any

import jax
import optax

from gpt2_jax.errors import UserError
from gpt2_jax.model import is_lora_path

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "linear", "cosine")


def check_schedule(train: Any) -> None:
    """One line for schedule settings learning_rate_schedule cannot build."""
    lr, warmup = float(train.learning_rate), int(train.warmup_steps)
    if train.lr_schedule not in SCHEDULES:
        raise UserError(f"train.lr_schedule={train.lr_schedule!r}: use one of {', '.join(SCHEDULES)}")
    if lr <= 0:
        raise UserError(f"train.learning_rate={lr}: must be > 0")
    decay_steps = int(train.decay_steps) or int(train.total_steps)
    if train.lr_schedule != "constant" and decay_steps <= warmup:
        raise UserError(f"train.lr_schedule={train.lr_schedule!r} needs train.decay_steps (or train.total_steps) "
                        f"> train.warmup_steps={warmup}; got {decay_steps}")


def learning_rate_schedule(train: Any) -> optax.Schedule:
    """Linear warmup over `warmup_steps`, then constant, linear decay or cosine decay to lr * min_lr_ratio."""
    check_schedule(train)
    lr, warmup = float(train.learning_rate), int(train.warmup_steps)
    decay_steps = int(train.decay_steps) or int(train.total_steps)
    if train.lr_schedule == "constant":
        after = optax.constant_schedule(lr)
    else:
        end = lr * float(train.min_lr_ratio)
        if train.lr_schedule == "linear":
            after = optax.linear_schedule(lr, end, decay_steps - warmup)
        else:
            after = optax.cosine_decay_schedule(lr, decay_steps - warmup, alpha=float(train.min_lr_ratio))
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _decay_mask(params: Any) -> Any:
    """True for the dense-layer weight matrices; biases, LayerNorm and the embeddings are not decayed."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def _trainable_labels(params: Any, only_blocks: bool, lora: bool = False) -> Any:
    """'train' or 'frozen' per parameter; with only_blocks, everything outside the blocks (h_i, or h
    when stacked) is frozen; with lora, everything but the LoRA adapters."""
    def label(path, _):
        if lora:
            return "train" if is_lora_path(path) else "frozen"
        top = str(next((getattr(p, "key", None) for p in path if getattr(p, "key", "params") != "params"), None))
        return "train" if not only_blocks or top == "h" or top.startswith("h_") else "frozen"
    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(train: Any, params: Any) -> optax.GradientTransformation:
    """clip -> optimizer (adam | adamw | sgd) with the schedule -> freezing, as one optax chain.

    With train.flat_optimizer the optimizer's elementwise update runs on all parameters raveled into one
    vector (optax.flatten): one array per moment instead of one per parameter, the same update up to
    float rounding (SGD bitwise). AdamW's weight decay stays outside it, where its mask sees the names.
    """
    schedule = learning_rate_schedule(train)
    name = train.optimizer
    flat = optax.flatten if train.flat_optimizer else (lambda transform: transform)
    if name == "adam":
        opt = flat(optax.adam(schedule, b1=train.b1, b2=train.b2, eps=train.eps))
    elif name == "adamw" and train.flat_optimizer:  # optax.adamw, spelled out
        opt = optax.chain(flat(optax.scale_by_adam(b1=train.b1, b2=train.b2, eps=train.eps)),
                          optax.add_decayed_weights(train.weight_decay, mask=_decay_mask),
                          optax.scale_by_learning_rate(schedule))
    elif name == "adamw":
        opt = optax.adamw(schedule, b1=train.b1, b2=train.b2, eps=train.eps, weight_decay=train.weight_decay,
                          mask=_decay_mask)
    elif name == "sgd":
        opt = flat(optax.sgd(schedule, momentum=train.momentum or None))
    else:
        raise UserError(f"train.optimizer={name!r}: use one of {', '.join(OPTIMIZERS)}")
    parts = []
    if train.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(train.grad_clip))
    parts.append(opt)
    chain = optax.chain(*parts)
    lora = bool(train.get("lora_rank", 0))
    if train.only_train_transformer_layers or lora:  # the frozen part keeps no optimizer state
        chain = optax.multi_transform({"train": chain, "frozen": optax.set_to_zero()},
                                      _trainable_labels(params, True, lora))
    return chain
