"""From an experiment config to what a run starts from: the model config, its params and tokenizer,
whether (and from where) to resume, and a DPO run's reference model. Used by the run's start, the dry run,
the ablation and `gpt2-jax evaluate`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import jax

from gpt2_jax import checkpoints, storage
from gpt2_jax.encoder import Encoder, byte_level_encoder, get_encoder
from gpt2_jax.errors import UserError
from gpt2_jax.model import PRESETS, GPT2Config, add_lora, init_params, lora_fields, preset, split_lora
from gpt2_jax.optim import state_layout
from gpt2_jax.rundir import RunDir, resolve_checkpoint
from gpt2_jax.settings import optimizer_sections
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


def initial_model(config: Any, resume_dir: RunDir | None) -> tuple[GPT2Config, Any, Encoder]:
    """Model config, starting params (None when resuming: the checkpoint supplies them) and tokenizer."""
    if resume_dir is not None:
        shape = resume_dir.model_config()
        return dataclasses.replace(shape, **compute_settings(config)), None, get_encoder(resume_dir.path)
    if config.model.from_scratch:
        encoder = _scratch_encoder(config)
        model_config = _scratch_config(config, encoder.n_vocab)
        return model_config, init_params(model_config, jax.random.key(config.seed)), encoder
    model_dir = model_dir_of(config)
    model_config, params = load_weights(model_dir, **compute_settings(config))
    if model_config.lora_rank:  # fresh adapters beside the pretrained weights
        params = add_lora(model_config, params, jax.random.key(config.seed))
    return model_config, params, get_encoder(model_dir)


def dpo_reference(config: Any, dtype: str | None = None) -> tuple[GPT2Config, Any]:
    """A DPO run's reference as a plain GPT-2 (config, host params): dpo.reference's model, else the weights the
    run started from, loaded again (a LoRA run's: its base, adapters off). Training and `gpt2-jax evaluate` on
    pairs both ask here; `dtype` overrides the run's compute dtype."""
    plain = {k: v for k, v in compute_settings(config).items() if not k.startswith("lora")}
    plain.update({"dtype": dtype} if dtype else {})
    if config.dpo.reference:
        return load_weights(config.dpo.reference, **plain)
    start_config, params, _ = initial_model(config, None)
    if start_config.lora_rank:
        params = split_lora(params)[1]
    return dataclasses.replace(start_config, lora_rank=0, **plain), params


class Resume(NamedTuple):
    """Where a run resumes from: a run directory and one of its steps."""

    run_dir: RunDir
    step: int
    latest: bool = False  # restore_from=latest: a step that fails to verify gives way to an older one

    def candidates(self) -> list[int]:
        """The steps to try, newest first: this one, then (latest) every older complete one."""
        older = [s for s in checkpoints.steps_of(self.run_dir.path) if s < self.step] if self.latest else []
        return [self.step, *sorted(older, reverse=True)]


def decide_resume(restore_from: str, run: RunDir) -> Resume | None:
    """checkpoint.restore_from for a run writing to run_dir: what to restore, or None to start anew.

    "latest": the run's newest checkpoint, if it has one; "fresh": start anew, refusing a run
    directory that already holds checkpoints; "best": the run's best validation step (keep_best),
    training on from it in the run (the loop sets the steps after it aside); a path: that run
    directory (its newest step) or step directory, refusing to write its continuation into another
    run's directory.
    """
    existing = checkpoints.latest_step(run.path) if run.path.is_dir() else None
    if restore_from == "best":
        best = run.best
        step = checkpoints.latest_step(best.path) if best.path.is_dir() else None
        if step is None:
            raise UserError(f"checkpoint.restore_from=best but {best} holds no checkpoint; the run must have "
                            "validated with checkpoint.keep_best=True (data.val_every > 0)")
        return Resume(best, step)
    if restore_from == "latest":
        return Resume(run, existing, latest=True) if existing is not None else None
    if restore_from == "fresh":
        if existing is not None:
            raise UserError(f"checkpoint.restore_from=fresh but {run} already holds checkpoints up to step "
                            f"{existing}; pick another run_name, or restore_from=latest to resume "
                            "(nothing was deleted)")
        return None
    resume = Resume(*resolve_checkpoint(restore_from))
    if existing is not None and resume.run_dir != run:
        raise UserError(f"{run} already holds checkpoints; restore {restore_from} under a new run_name")
    return resume


def check_resumable(config: Any, resume: Resume) -> None:
    """One line when the checkpoint's run was trained with settings that lay its optimizer state out differently
    (the model's shape comes from the run directory itself)."""
    saved = resume.run_dir.saved_config()
    if not isinstance(saved.get("train"), dict):
        return  # no record: the restore itself says what does not fit
    before = state_layout(saved["train"], {k: v for k, v in saved.items() if isinstance(v, dict)})
    now = state_layout(config.train, optimizer_sections(config))
    changed = [f"{k}: {before[k]} (now {now[k]})" for k in now  # an optimizer's own settings once both are it
               if k in before and before[k] != now[k] and None not in (before[k], now[k])]
    if changed:
        raise UserError(f"{resume.run_dir} was trained with {'; '.join(changed)}, so its optimizer state has another "
                        "layout; resume with the settings it was trained with, or start anew under another run_name")
