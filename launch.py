"""Run an experiment by config name.

    python launch.py --config=experiments/NAME.py[:VARIANT] [--config.section.field=value ...] [--workdir DIR]
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from gpt2_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/NAME.py[:VARIANT]")
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoint/, samples/ and logs/ go (sets config.workdir)")


def _valid_keys(config, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        if hasattr(value, "items"):
            keys += _valid_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def load_experiment(spec: str):
    """The config of `experiments/NAME.py[:VARIANT]`, loaded directly (for error messages)."""
    path, _, variant = spec.partition(":")
    if not Path(path).is_file():
        names = ", ".join(sorted(p.name for p in Path("experiments").glob("*.py") if not p.name.startswith("_")))
        raise UserError(f"--config={spec}: no experiment file {path}; the experiments are: {names}")
    module_spec = importlib.util.spec_from_file_location(f"experiment_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    try:
        return module.get_config(variant) if variant else module.get_config()
    except ValueError as e:
        raise UserError(str(e)) from None


def parse(argv: list[str]):
    """The resolved config of a command line; errors name the bad flag or key and what is valid."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        raise UserError("--config=experiments/NAME.py[:VARIANT] is required")
    valid = _valid_keys(load_experiment(spec))  # a bad file or variant is reported here, plainly
    try:
        flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - absl and ml_collections raise several types; explain them here
        for arg in argv:
            key = arg[len("--config."):].split("=", 1)[0] if arg.startswith("--config.") else None
            if key is not None and key not in valid:
                raise UserError(f"unknown config key {key!r} in {arg}; valid keys: {', '.join(valid)}") from None
        raise UserError(str(e).splitlines()[0]) from None
    config = _CONFIG.value
    if _WORKDIR.value:
        config.workdir = _WORKDIR.value
    return config


def main(argv: list[str]) -> None:
    """Parse, then train."""
    from gpt2_jax.loop import run

    try:
        config = parse(argv)
        result = run(config)
    except UserError as e:
        print(f"launch.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"done: step {result['step']}, checkpoints in {result['run_dir']}")


if __name__ == "__main__":
    main(sys.argv)
