"""From an experiment config to what a run starts from: the model config, its params and tokenizer,
and whether (and from where) to resume. Used by the loop, `launch.py --dry_run` and the ablation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax

from gpt2_jax import checkpoints, storage
from gpt2_jax.encoder import Encoder, byte_level_encoder, get_encoder
from gpt2_jax.errors import UserError
from gpt2_jax.model import PRESETS, GPT2Config, add_lora, init_params, preset
from gpt2_jax.settings import lora_fields
from gpt2_jax.weights import find_model_dir, load_weights, read_config


def find_vocab_dir(config: Any) -> storage.AnyPath | None:
    """For training from scratch: the configured vocabulary, else a GPT-2 vocabulary found in model.models_dir
    (a directory or a URL), else in $GPT2_JAX_SHARED/gpt2 (when set: nowhere else), else in ../shared/gpt2."""
    if config.model.vocab:
        return None if config.model.vocab == "bytes" else storage.path(config.model.vocab)
    models_dir = storage.path(config.model.models_dir)
    candidates = sorted(models_dir.iterdir()) if models_dir.is_dir() else []
    candidates.append(storage.path(os.environ.get("GPT2_JAX_SHARED") or "../shared") / "gpt2")
    return next((d for d in candidates if (d / "encoder.json").is_file() and (d / "vocab.bpe").is_file()), None)


def model_dir_of(config: Any) -> storage.AnyPath:
    """The pretrained model directory named by model.name: a size under model.models_dir, a path, or a
    Hugging Face hub id in the local hub cache."""
    name = config.model.name
    if name in PRESETS and not storage.path(name).is_dir():
        path = storage.path(config.model.models_dir) / name
        if not path.is_dir():
            raise UserError(f"model.name={name!r}: no model directory at {path}; run "
                            f"`gpt2-jax download {name} --models_dir {config.model.models_dir}`")
        return path
    try:
        return find_model_dir(name)
    except UserError as e:
        raise UserError(f"model.name={name!r}: {e}") from None


def compute_settings(config: Any) -> dict[str, Any]:
    """The GPT2Config fields that say how to compute, not what the model is."""
    m, t = config.model, config.train
    remat = "none" if m.remat == "auto" else m.remat  # auto is resolved later, by autoremat, per device
    return dict(dtype=m.dtype, remat=remat, scan_layers=m.scan_layers, vocab_multiple=m.vocab_multiple,
                attention=m.attention, **lora_fields(t))


def _scratch_encoder(config: Any) -> Encoder:
    vocab_dir = find_vocab_dir(config)
    return get_encoder(vocab_dir) if vocab_dir else byte_level_encoder()


def _scratch_config(config: Any, n_vocab: int) -> GPT2Config:
    m = config.model
    return GPT2Config(n_vocab=n_vocab, n_ctx=m.n_ctx, n_embd=m.n_embd, n_head=m.n_head, n_layer=m.n_layer,
                      **compute_settings(config))


def model_config_of(config: Any) -> GPT2Config:
    """The model's config as the experiment would train it, without loading any weights."""
    if config.model.from_scratch:
        return _scratch_config(config, _scratch_encoder(config).n_vocab)
    name = config.model.name
    if name in PRESETS and not (storage.path(config.model.models_dir) / name).is_dir() and \
            not storage.path(name).is_dir():
        return preset(name, **compute_settings(config))  # the released shape, before it is downloaded
    return read_config(model_dir_of(config), **compute_settings(config))


def initial_model(config: Any, resume_dir: Path | None) -> tuple[GPT2Config, Any, Encoder]:
    """Model config, starting params (None when resuming: the checkpoint supplies them) and tokenizer."""
    if resume_dir is not None:
        hparams = json.loads((resume_dir / "hparams.json").read_text())
        return GPT2Config(**hparams, **compute_settings(config)), None, get_encoder(resume_dir)
    if config.model.from_scratch:
        encoder = _scratch_encoder(config)
        model_config = _scratch_config(config, encoder.n_vocab)
        return model_config, init_params(model_config, jax.random.key(config.seed)), encoder
    model_dir = model_dir_of(config)
    model_config, params = load_weights(model_dir, **compute_settings(config))
    if model_config.lora_rank:  # fresh adapters beside the pretrained weights
        params = add_lora(model_config, params, jax.random.key(config.seed))
    return model_config, params, get_encoder(model_dir)


class Resume(NamedTuple):
    """Where a run resumes from: a run directory and one of its steps."""

    run_dir: Path
    step: int
    latest: bool = False  # restore_from=latest: a step that fails to verify gives way to an older one

    def candidates(self) -> list[int]:
        """The steps to try, newest first: this one, then (latest) every older complete one."""
        older = [s for s in checkpoints.steps_of(self.run_dir) if s < self.step] if self.latest else []
        return [self.step, *sorted(older, reverse=True)]


def decide_resume(restore_from: str, run_dir: Path) -> Resume | None:
    """checkpoint.restore_from for a run writing to run_dir: what to restore, or None to start anew.

    "latest": the run's newest checkpoint, if it has one; "fresh": start anew, refusing a run
    directory that already holds checkpoints; "best": the run's best validation step (keep_best),
    training on from it in the run (the loop sets the steps after it aside); a path: that run
    directory (its newest step) or step directory, refusing to write its continuation into another
    run's directory.
    """
    run_dir = storage.absolute(run_dir)
    existing = checkpoints.make_manager(run_dir, read_only=True).latest_step() if run_dir.is_dir() else None
    if restore_from == "best":
        best = run_dir / checkpoints.BEST
        step = checkpoints.make_manager(best, read_only=True).latest_step() if best.is_dir() else None
        if step is None:
            raise UserError(f"checkpoint.restore_from=best but {best} holds no checkpoint; the run must have "
                            "validated with checkpoint.keep_best=True (data.val_every > 0)")
        return Resume(best, step)
    if restore_from == "latest":
        return Resume(run_dir, existing, latest=True) if existing is not None else None
    if restore_from == "fresh":
        if existing is not None:
            raise UserError(f"checkpoint.restore_from=fresh but {run_dir} already holds checkpoints up to step "
                            f"{existing}; pick another run_name, or restore_from=latest to resume "
                            "(nothing was deleted)")
        return None
    resume = Resume(*checkpoints.resolve_checkpoint(storage.path(restore_from)))
    if existing is not None and resume.run_dir != run_dir:
        raise UserError(f"{run_dir} already holds checkpoints; restore {restore_from} under a new run_name")
    return resume


def _state_layout(train: Any) -> dict[str, Any]:
    """The train settings that decide the optimizer state's layout (not its values)."""
    return {"train.optimizer": train.get("optimizer"), "train.grad_clip > 0": bool(train.get("grad_clip")),
            "train.momentum > 0": bool(train.get("momentum")) if train.get("optimizer") == "sgd" else None,
            "train.only_train_transformer_layers": bool(train.get("only_train_transformer_layers")),
            "train.lora_rank": int(train.get("lora_rank") or 0), "train.lora_targets": train.get("lora_targets")
            if train.get("lora_rank") else None}


def check_resumable(config: Any, resume: Resume) -> None:
    """One line when the checkpoint's run was trained with settings that lay its optimizer state out differently
    (the model's shape comes from the run directory itself)."""
    try:
        saved = json.loads((resume.run_dir / checkpoints.RUN_CONFIG).read_text()).get("train", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return  # no record: the restore itself says what does not fit
    before, now = _state_layout(saved), _state_layout(config.train)
    changed = [f"{k}: {before[k]} (now {now[k]})" for k in now
               if before[k] != now[k] and None not in (before[k], now[k])]
    if changed:
        raise UserError(f"{resume.run_dir} was trained with {'; '.join(changed)}, so its optimizer state has another "
                        "layout; resume with the settings it was trained with, or start anew under another run_name")
