"""Training checkpoints with orbax: params, optimizer state and run metadata, one directory per step.

A run directory (`WORKDIR/checkpoint/RUN_NAME/`) holds the orbax step directories plus
`hparams.json`, the vocabulary files and `run_config.json`, so it is also a model directory for
`gpt2-jax sample`, `evaluate` and `export`. Orbax writes each step under a temporary name and
renames it when complete, so a run killed mid-save restores from the last complete step.

This module owns reading a run directory (is_run_dir, resolve_checkpoint, load_run_params);
weights.py lists it among the model-directory layouts it reads.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from gpt2_jax.errors import UserError
from gpt2_jax.model import GPT2Config, convert_layout, param_shapes

RUN_CONFIG = "run_config.json"


def is_run_dir(path: Path) -> bool:
    """A directory written by the training loop (it has run_config.json and hparams.json)."""
    return (path / RUN_CONFIG).is_file() and (path / "hparams.json").is_file()


def make_manager(run_dir: Path, *, keep: int = 5, keep_every_hours: float = 0.0, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
    """An orbax CheckpointManager keeping the last `keep` steps plus one every `keep_every_hours`."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep or None,
        keep_time_interval=datetime.timedelta(hours=keep_every_hours) if keep_every_hours > 0 else None,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,  # remove what a killed save left behind
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(Path(run_dir).absolute(), options=options,
                                 item_names=("params", "opt_state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, params: Any, opt_state: Any, meta: dict) -> None:
    """Start saving one step (asynchronously when the manager is async)."""
    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                               opt_state=ocp.args.StandardSave(opt_state),
                                               meta=ocp.args.JsonSave(meta)), force=True)


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def restore(manager: ocp.CheckpointManager, step: int, params: Any, opt_state: Any) -> tuple[Any, Any, dict]:
    """Params, optimizer state and metadata of `step`, laid out like the given (abstract or real) trees."""
    restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(params)),
                                                             opt_state=ocp.args.StandardRestore(_abstract(opt_state)),
                                                             meta=ocp.args.JsonRestore()))
    return restored.params, restored.opt_state, dict(restored.meta)


def read_meta(run_dir: Path, step: int) -> dict:
    """The metadata (step, seed, ...) saved with one step, without reading any array."""
    manager = make_manager(run_dir, read_only=True)
    return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)


def resolve_checkpoint(path: Path) -> tuple[Path, int]:
    """(run directory, step) of a path naming a run directory (its latest step) or one step directory."""
    path = Path(path).absolute()
    if path.name.isdigit() and path.parent.is_dir() and (path / "params").exists():
        return path.parent, int(path.name)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist")
    step = make_manager(path, read_only=True).latest_step()
    if step is None:
        raise UserError(f"{path} holds no complete checkpoint (a run directory with numbered step directories)")
    return path, step


def saved_scan_layers(run_dir: Path) -> bool:
    """Whether a run directory's checkpoints hold the blocks stacked (model.scan_layers when it trained)."""
    try:
        return bool(json.loads((Path(run_dir) / RUN_CONFIG).read_text()).get("model", {}).get("scan_layers", False))
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def load_run_params(run_dir: Path, **overrides) -> tuple[GPT2Config, Any]:
    """Config and params of a run directory's latest checkpoint (the optimizer state is not read)."""
    hparams = json.loads((run_dir / "hparams.json").read_text())
    config = GPT2Config(**hparams, **overrides)
    run_dir, step = resolve_checkpoint(run_dir)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # whatever mesh wrote it
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          param_shapes(GPT2Config(**hparams, scan_layers=saved_scan_layers(run_dir))))
    manager = make_manager(run_dir, read_only=True)
    restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(shapes)))
    return config, convert_layout(restored.params, config.scan_layers)
