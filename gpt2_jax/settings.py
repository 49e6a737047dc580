"""The run's settings: what a run derives from its config and model, computed and checked in one place.

`check_config` holds every check of the config alone (each a one-line UserError); `settings_of` adds what
needs the model and the mesh and returns a frozen RunSettings that the loop, `launch.py --dry_run`, the
ablation and remat=auto read instead of recomputing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gpt2_jax import eval_tasks, mixture, parallel
from gpt2_jax.errors import UserError
from gpt2_jax.model import GPT2Config
from gpt2_jax.objectives import Objective, objective_of
from gpt2_jax.optim import OPTIMIZERS, check_optimizer, check_schedule
from gpt2_jax.profiling import check_profile
from gpt2_jax.sampling import check_settings as check_sampling
from gpt2_jax.spikes import check_spikes
from gpt2_jax.wandb_sink import check as check_wandb


def seq_len_of(config: Any, model_config: GPT2Config) -> int:
    """Tokens a row trains on: data.seq_len, else the model's n_ctx (checked against it)."""
    seq_len = config.data.seq_len or model_config.n_ctx
    if not 1 <= seq_len <= model_config.n_ctx:
        raise UserError(f"data.seq_len={seq_len}: must be between 1 and the model's n_ctx={model_config.n_ctx}")
    return seq_len


def rows_of(train: Any) -> int:
    """Sequences (DPO: pairs) per optimizer step: train.batch_size * train.accumulate_gradients."""
    return train.batch_size * train.accumulate_gradients


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What a run derives from its config and model (settings_of)."""

    seq_len: int  # tokens a row trains on: data.seq_len, else the model's n_ctx
    rows: int  # rows (DPO: pairs) per optimizer step: train.batch_size * train.accumulate_gradients
    tokens_per_step: int  # tokens an optimizer step trains on (DPO: the chosen and the rejected sequence both)
    objective: Objective  # train.objective: what a step trains on and how it scores it
    sections: dict  # the config sections the optimizer reads beside train (optim.OPTIMIZERS: muon)
    validates: bool  # data.val_every > 0
    patience: int  # train.early_stop_patience (0: no early stop)
    min_delta: float  # train.early_stop_min_delta
    keep_best: bool  # checkpoint.keep_best


def optimizer_sections(config: Any) -> dict:
    """The config's sections an optimizer may read beside train, by name (optim.OPTIMIZERS' `section`)."""
    names = {kind.section for kind in OPTIMIZERS.values() if kind.section}
    return {name: config[name] for name in sorted(names) if name in config}


def check_config(config: Any) -> None:
    """Every check of the config alone, each one line naming the field."""
    train, data = config.train, config.data
    if train.batch_size < 1 or train.accumulate_gradients < 1:
        raise UserError("train.batch_size and train.accumulate_gradients must be >= 1")
    check_schedule(train)
    check_optimizer(train, optimizer_sections(config))
    check_spikes(train)
    check_wandb(config.log)  # log.wandb without wandb installed
    eval_tasks.check(config)
    if not 0.0 <= train.ema_decay < 1.0:
        raise UserError(f"train.ema_decay={train.ema_decay}: must be in [0, 1) (0 = no average of the weights)")
    if not 0.0 <= train.noise < 1.0:
        raise UserError(f"train.noise={train.noise}: must be in [0, 1)")
    if config.sample.sample_every:
        s = config.sample
        check_sampling(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, prefix="sample.")
    patience, min_delta = train.early_stop_patience, train.early_stop_min_delta
    if patience < 0 or min_delta < 0:
        raise UserError(f"train.early_stop_patience={patience} and train.early_stop_min_delta={min_delta} must be >= 0")
    if (patience or config.checkpoint.keep_best) and data.val_every <= 0:
        raise UserError(f"{'train.early_stop_patience' if patience else 'checkpoint.keep_best'} acts on validation: "
                        "set data.val_every > 0 (and data.val_dataset or data.val_split)")
    if not 0.0 <= data.val_split < 1.0:
        raise UserError(f"data.val_split={data.val_split}: must be in [0, 1) (0 = no held-out split)")
    ck = config.checkpoint
    if not (ck.lock_lease_s >= 1 and ck.store_timeout_s >= 1):
        raise UserError(f"checkpoint.lock_lease_s={ck.lock_lease_s} and checkpoint.store_timeout_s="
                        f"{ck.store_timeout_s}: both must be >= 1 (seconds)")
    if data.mixture:  # a mixture string that cannot be read: one line before anything loads (--dry_run too)
        mixture.parse_stages(data.mixture_stages, mixture.parse_mixture(data.mixture))
    if data.val_split and data.val_dataset:
        raise UserError("data.val_split and data.val_dataset are both set: use one (val_dataset, or a split of the "
                        "training data)")
    check_profile(config)


def settings_of(config: Any, model_config: GPT2Config, mesh: Any, eot_token: int | None = None) -> RunSettings:
    """The run's settings for this model on this mesh (after check_config), checked; `eot_token` (default: the
    vocabulary's last id, as in GPT-2's and the byte-level vocabulary) ends documents under data.document_mask."""
    eot = model_config.n_vocab - 1 if eot_token is None else eot_token
    objective, seq_len = objective_of(config, eot), seq_len_of(config, model_config)
    train, data = config.train, config.data
    parallel.check_batch(train.batch_size, mesh)
    if data.val_every > 0:
        parallel.check_batch(data.val_batch_size, mesh)
    rows = rows_of(train)
    return RunSettings(seq_len=seq_len, rows=rows, tokens_per_step=rows * seq_len * objective.sequences_per_row,
                       objective=objective, sections=optimizer_sections(config), validates=data.val_every > 0,
                       patience=train.early_stop_patience, min_delta=train.early_stop_min_delta,
                       keep_best=bool(config.checkpoint.keep_best))
