"""A training run's directory, WORKDIR/checkpoint/RUN: every file in it named once, written and read here.

    RUN/                     orbax's step directories (checkpoints.py writes and reads them)
    RUN/hparams.json         the model's shape, as OpenAI's release spells it  } with the vocabulary: a model
    RUN/encoder.json, ...    the vocabulary (encoder.save)                      } directory for `sample`,
    RUN/run_config.json      the resolved experiment config                     } `evaluate` and `export`
    RUN/dataset.json         what the run's data was (data.fingerprint), compared on resume
    RUN/remat_auto.json      model.remat=auto's choice, kept so that the run resumes exactly
    RUN/reference_logps.npz  DPO's precomputed reference log-probs (dpo.precompute_reference)
    RUN/best/                checkpoint.keep_best: the best validation step, a run directory of its own
    RUN/damaged/             steps that failed to verify, set aside by a resumed run (never deleted)
    RUN/superseded/          steps after the one restore_from=best restored, set aside
    RUN.lock                 beside it: the job training the run holds it (lock.py)

`load_run_params` reads a run as a model (its newest step that verifies, or one step directory).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jax

from gpt2_jax import checkpoints, report, storage
from gpt2_jax.errors import UserError
from gpt2_jax.model import GPT2Config, convert_layout, lora_fields, merge_lora, param_shapes


class RunDir:
    """The files of one run directory (a local path or a URL)."""

    def __init__(self, path: Any):
        self.path = storage.absolute(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and str(other.path) == str(self.path)

    def __hash__(self) -> int:
        return hash(str(self.path))

    @property
    def hparams(self) -> Any:
        return self.path / "hparams.json"

    @property
    def run_config(self) -> Any:
        return self.path / report.RUN_CONFIG

    @property
    def data_record(self) -> Any:
        return self.path / "dataset.json"

    @property
    def remat_auto(self) -> Any:
        return self.path / "remat_auto.json"

    @property
    def reference_logps(self) -> Any:
        return self.path / "reference_logps.npz"

    @property
    def best(self) -> RunDir:
        return RunDir(self.path / "best")

    @property
    def damaged(self) -> Any:
        return self.path / "damaged"

    @property
    def superseded(self) -> Any:
        return self.path / "superseded"

    @property
    def lock(self) -> Any:
        """Beside the directory, so that claiming a run creates nothing inside it."""
        return self.path.with_name(self.path.name + ".lock")

    def is_run(self) -> bool:
        """Whether the training loop wrote it (it has run_config.json and hparams.json)."""
        return self.run_config.is_file() and self.hparams.is_file()

    def write_model_files(self, model_config: GPT2Config, encoder: Any, config: Any, data_record: dict) -> None:
        """What makes the directory a model directory, and what its data was."""
        storage.mkdir(self.path)
        self.data_record.write_text(json.dumps(data_record, indent=2))
        self.hparams.write_text(json.dumps(model_config.hparams(), indent=2))
        encoder.save(self.path)
        self.run_config.write_text(config.to_json_best_effort(indent=2))

    def saved_config(self) -> dict:
        """The run's resolved config as it recorded it; {} when missing or unreadable."""
        try:
            saved = json.loads(self.run_config.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # missing, not JSON or not UTF-8
            return {}
        return saved if isinstance(saved, dict) else {}

    def scan_layers(self) -> bool:
        """Whether its checkpoints hold the blocks stacked (model.scan_layers when it trained)."""
        model = self.saved_config().get("model", {})
        return bool(model.get("scan_layers", False)) if isinstance(model, dict) else False

    def lora(self) -> dict:
        """Its LoRA settings as GPT2Config fields (train.lora_*), or {} when it trained every weight."""
        try:
            return lora_fields(self.saved_config().get("train", {}))
        except (AttributeError, KeyError, TypeError, ValueError):  # unreadable: as a full fine-tune
            return {}

    def model_config(self) -> GPT2Config:
        """The model's shape from hparams.json; a damaged file is one line."""
        try:
            hparams = json.loads(self.hparams.read_text(encoding="utf-8"))
            return GPT2Config(**{k: int(hparams[k]) for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")})
        except (ValueError, KeyError, TypeError) as e:  # JSON, UTF-8, a missing or non-integer field
            raise UserError(f"{self.hparams}: not the run's model shape ({type(e).__name__}: {str(e)[:100]}); the "
                            "file is damaged: restore it, or export the run again") from None

    def set_aside_after(self, restored: RunDir, step: int) -> list[str]:
        """After restoring `step` (from the run or its best/), move the steps after it, of a future the run no
        longer has, to superseded/ (never deleted); returns a line for each. A listing, not orbax's manager,
        which would sync every process."""
        def after(d: Any) -> list[tuple[Any, int]]:
            return sorted((d, int(x.name)) for x in d.iterdir() if x.name.isdigit() and int(x.name) > step)

        best = self.best.path
        newer = after(self.path) if restored == self.best else []
        newer += after(best) if best.is_dir() else []
        lines = []
        for where, s in newer:
            storage.mkdir(self.superseded)
            aside = self.superseded / f"{where.name}-{s}.{time.strftime('%Y%m%dT%H%M%S')}"
            storage.move(where / str(s), aside)
            lines.append(f"set aside {where / str(s)}, which is after the restored step, as {aside}")
        return lines


def is_run_dir(path: Any) -> bool:
    """A directory written by the training loop, or one step directory of it (RUN/STEP): weights.py lists both
    among the model-directory layouts."""
    return RunDir(path).is_run() or is_step_dir(path)


def is_step_dir(path: Any) -> bool:
    """One step directory of a run (RUN/STEP, holding its params)."""
    path = storage.path(path)
    return path.name.isdigit() and (path / "params").exists() and RunDir(path.parent).is_run()


def files_dir(path: Any) -> Any:
    """Where a model directory's own files are (the vocabulary, hparams.json): a step directory's run's."""
    return storage.path(path).parent if is_step_dir(path) else storage.path(path)


def resolve_checkpoint(path: Any) -> tuple[RunDir, int]:
    """(run directory, step) of a path naming a run directory (its latest step) or one step directory."""
    path = storage.absolute(path)
    if path.name.isdigit() and path.parent.is_dir() and (path / "params").exists():
        return RunDir(path.parent), int(path.name)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist")
    step = checkpoints.latest_step(path)
    if step is None:
        raise UserError(f"{path} holds no complete checkpoint (a run directory with numbered step directories)")
    return RunDir(path), step


def load_run_params(path: Any, *, keep_adapters: bool = False, ema: bool = False, **overrides
                    ) -> tuple[GPT2Config, Any]:
    """Config and params of a run directory's newest checkpoint that verifies, or of one step directory (the
    optimizer state is not read). A LoRA run's adapters are merged into the weights (a plain GPT-2) unless
    keep_adapters; with `ema`, the weights' moving average (train.ema_decay) instead of the weights."""
    path = storage.absolute(path)
    run, step = resolve_checkpoint(path)
    saved = dataclasses.replace(run.model_config(), **run.lora())
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # whatever mesh wrote it
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          param_shapes(dataclasses.replace(saved, scan_layers=run.scan_layers())))
    candidates = [step] if path != run.path else [s for s in checkpoints.steps_of(run.path) if s <= step]
    item = "ema" if ema else "params"
    if ema and not checkpoints.has_item(run.path, candidates[-1] if candidates else step, "ema"):
        raise UserError(f"{run}: trained without train.ema_decay, so its checkpoints hold no moving average of the "
                        "weights; drop --ema")
    _, trees, _ = checkpoints.restore_newest(run.path, candidates, {item: shapes})
    params = trees[item]
    if not keep_adapters:
        saved, params = merge_lora(saved, params)
    config = dataclasses.replace(saved, **overrides)
    return config, convert_layout(params, config.scan_layers)
