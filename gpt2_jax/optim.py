"""Optax chains from the `train` section (and an optimizer's own section, such as `muon`), as a table.

`OPTIMIZERS` maps train.optimizer to its row: the builder (the config's sections and the learning-rate
schedule -> an optax transformation), the section it reads beside `train`, the settings that decide its
state's layout (what resuming with other settings would not fit: `state_layout`), and its checks.
`make_optimizer` wraps the row's transformation in what every optimizer shares: clipping first, freezing
around it. A new optimizer is one module and a row here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import optax

from gpt2_jax import muon as muon_module
from gpt2_jax.errors import UserError
from gpt2_jax.model import is_lora_path
from gpt2_jax.schedules import check_schedule, learning_rate_schedule  # noqa: F401 - check_schedule re-exported


def decay_mask(params: Any) -> Any:
    """True for the dense-layer weight matrices; biases, LayerNorm and the embeddings are not decayed."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def _flat(train: Any) -> Callable[[optax.GradientTransformation], optax.GradientTransformation]:
    """optax.flatten under train.flat_optimizer: the elementwise update on all parameters raveled into one vector
    (one array per moment instead of one per parameter; the same update up to float rounding, SGD bitwise)."""
    return optax.flatten if train.flat_optimizer else (lambda transform: transform)


def _adam(train: Any, section: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    return _flat(train)(optax.adam(schedule, b1=train.b1, b2=train.b2, eps=train.eps))


def _adamw(train: Any, section: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    if train.flat_optimizer:  # optax.adamw spelled out: the weight decay outside the flattening, its mask sees names
        return optax.chain(optax.flatten(optax.scale_by_adam(b1=train.b1, b2=train.b2, eps=train.eps)),
                           optax.add_decayed_weights(train.weight_decay, mask=decay_mask),
                           optax.scale_by_learning_rate(schedule))
    return optax.adamw(schedule, b1=train.b1, b2=train.b2, eps=train.eps, weight_decay=train.weight_decay,
                       mask=decay_mask)


def _sgd(train: Any, section: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    return _flat(train)(optax.sgd(schedule, momentum=train.momentum or None))


def _muon(train: Any, section: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Muon on the blocks' matrices at its own peak (muon.learning_rate, the run's schedule shape); AdamW with the
    run's learning rate, betas, eps and decay mask on the rest (muon.py)."""
    own = _Section({**{k: train[k] for k in train.keys()}, "learning_rate": float(section.learning_rate)})
    return muon_module.muon_with_adamw(
        muon_lr=learning_rate_schedule(own), adamw_lr=schedule, b1=train.b1, b2=train.b2, eps=train.eps,
        adamw_weight_decay=train.weight_decay, decay_mask=decay_mask, momentum=float(section.momentum),
        nesterov=bool(section.nesterov), ns_steps=int(section.ns_steps), ns_dtype=str(section.ns_dtype),
        adjust_lr=str(section.adjust_lr), weight_decay=float(section.weight_decay), split_qkv=bool(section.split_qkv))


class _Section(dict):
    """A config section (or its defaults) as a dict read by attribute, as the builders read sections."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _check_muon(train: Any, section: Any) -> None:
    if train.flat_optimizer:
        raise UserError("train.optimizer=muon orthogonalizes each weight matrix, whose shape train.flat_optimizer "
                        "ravels away; set train.flat_optimizer=False")
    if train.get("lora_rank", 0):
        raise UserError("train.optimizer=muon with LoRA (train.lora_rank > 0) is not defined here: Muon is for the "
                        "blocks' full matrices; train LoRA adapters with adam or adamw")
    if not float(section.learning_rate) > 0:
        raise UserError(f"muon.learning_rate={section.learning_rate}: must be > 0")
    muon_module.check(momentum=float(section.momentum), ns_steps=int(section.ns_steps), ns_dtype=str(section.ns_dtype),
                      adjust_lr=str(section.adjust_lr), weight_decay=float(section.weight_decay))


@dataclasses.dataclass(frozen=True)
class OptimizerKind:
    """One row of OPTIMIZERS."""

    build: Callable[[Any, Any, optax.Schedule], optax.GradientTransformation]  # (train, section, schedule)
    description: str
    section: str | None = None  # the config section it reads beside train (muon), passed as `section`
    layout: Callable[[Mapping[str, Any], Mapping[str, Any]], dict] = lambda train, section: {}  # state-shaping settings
    check: Callable[[Any, Any], None] = lambda train, section: None  # one-line errors for settings it cannot take


OPTIMIZERS: dict[str, OptimizerKind] = {
    "adam": OptimizerKind(_adam, "Adam (the original fork's), optax.adam"),
    "adamw": OptimizerKind(_adamw, "AdamW, decoupled weight decay on the dense kernels (train.weight_decay)"),
    "sgd": OptimizerKind(_sgd, "SGD, with train.momentum > 0 heavy-ball momentum",
                         layout=lambda train, section: {"train.momentum > 0": bool(train.get("momentum"))}),
    "muon": OptimizerKind(_muon, "Muon on the blocks' matrices, AdamW on the rest (the muon section)", section="muon",
                          layout=lambda train, section: {"muon.split_qkv": bool(section.get("split_qkv", False))},
                          check=_check_muon),
}


SECTION_DEFAULTS = {"muon": muon_module.DEFAULTS}  # an optimizer's section when a caller gives none


def kind_of(train: Any) -> OptimizerKind:
    """The row of train.optimizer; an unknown name is one line naming the valid ones."""
    if train.optimizer not in OPTIMIZERS:
        raise UserError(f"train.optimizer={train.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[train.optimizer]


def check_optimizer(train: Any, sections: Mapping[str, Any]) -> None:
    """One line for optimizer settings the row cannot take (config checks call this)."""
    kind = kind_of(train)
    kind.check(train, sections.get(kind.section) if kind.section else None)


def state_layout(train: Mapping[str, Any], sections: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that decide the optimizer state's layout (not its values), read from a config or a saved
    run_config.json: the optimizer's own (its row's `layout`) and what every chain shares."""
    name = train.get("optimizer")
    kind = OPTIMIZERS.get(name)
    own = kind.layout(train, (sections.get(kind.section) if kind.section else None) or {}) if kind else {}
    return {"train.optimizer": name, **own, "train.grad_clip > 0": bool(train.get("grad_clip")),
            "train.flat_optimizer": bool(train.get("flat_optimizer")),
            "train.only_train_transformer_layers": bool(train.get("only_train_transformer_layers")),
            "train.lora_rank": int(train.get("lora_rank") or 0),
            "train.lora_targets": train.get("lora_targets") if train.get("lora_rank") else None,
            "train.ema_decay > 0": bool(train.get("ema_decay")), "train.skip_spikes": bool(train.get("skip_spikes")),
            "train.spike_window": train.get("spike_window") if train.get("skip_spikes") else None}


def _trainable_labels(params: Any, only_blocks: bool, lora: bool = False) -> Any:
    """'train' or 'frozen' per parameter; with only_blocks, everything outside the blocks (h_i, or h
    when stacked) is frozen; with lora, everything but the LoRA adapters."""
    def label(path, _):
        if lora:
            return "train" if is_lora_path(path) else "frozen"
        top = str(next((getattr(p, "key", None) for p in path if getattr(p, "key", "params") != "params"), None))
        return "train" if not only_blocks or top == "h" or top.startswith("h_") else "frozen"
    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(train: Any, params: Any, sections: Mapping[str, Any] | None = None) -> optax.GradientTransformation:
    """clip -> the optimizer of train.optimizer (its row of OPTIMIZERS, with the schedule) -> freezing, as one
    optax chain. `sections`: the config's sections an optimizer reads beside train, by name (muon); a missing
    one takes experiments/base.py's defaults."""
    kind = kind_of(train)
    section = (sections or {}).get(kind.section) if kind.section else None
    if kind.section and section is None:  # the section's documented defaults
        section = _Section(SECTION_DEFAULTS[kind.section])
    kind.check(train, section)
    parts = [optax.clip_by_global_norm(train.grad_clip)] if train.grad_clip > 0 else []
    chain = optax.chain(*parts, kind.build(train, section, learning_rate_schedule(train)))
    lora = bool(train.get("lora_rank", 0))
    if train.only_train_transformer_layers or lora:  # the frozen part keeps no optimizer state
        chain = optax.multi_transform({"train": chain, "frozen": optax.set_to_zero()},
                                      _trainable_labels(params, True, lora))
    return chain
