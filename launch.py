"""Run an experiment by config name.

    python launch.py --config=experiments/NAME.py[:VARIANT] [--config.section.field=value ...] [--workdir DIR]
    python launch.py --list
    python launch.py --config=experiments/NAME.py[:VARIANT] --dry_run [--target=v5e-8|h100x8|...]
    python launch.py --target=list
    python launch.py --config=experiments/NAME.py[:VARIANT] --sweep=section.field=V1,V2 [--sweep=...] [--sweep_name N]
"""

from __future__ import annotations

import difflib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from absl import flags
from ml_collections import config_flags

from gpt2_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/NAME.py[:VARIANT]")
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoint/, samples/ and logs/ go (sets config.workdir)")
_LIST = flags.DEFINE_bool("list", False, "list the experiments and their variants, then exit")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "print the resolved config, parameter count and the compiled "
                             "step's FLOPs and memory, then exit without training")
_SWEEP = flags.DEFINE_multi_string("sweep", [], "SECTION.FIELD=V1,V2,...: one run per value; several --sweep "
                                   "flags run every combination, then write WORKDIR/sweeps/NAME/sweep.{md,png,json}")
_TARGET = flags.DEFINE_string("target", None, "compile for an accelerator that is not attached, running nothing "
                              "(the dry run, model.remat=auto, the remat ablation): a TPU slice (v5e-8), a topology "
                              "(v5e:2x4), a GPU (h100, h100x8) or a GpuTargetConfigProto file; list: the names")
_SWEEP_NAME = flags.DEFINE_string("sweep_name", None, "the sweep's name (default: the experiment and variant)")
EXPERIMENTS = Path(__file__).resolve().parent / "experiments"


def _valid_keys(config, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        if hasattr(value, "items"):
            keys += _valid_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _module(path: Path):
    module_spec = importlib.util.spec_from_file_location(f"experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def experiments() -> dict[str, Any]:
    """The experiment modules (those with VARIANTS), by file name."""
    found = {p.name: _module(p) for p in sorted(EXPERIMENTS.glob("*.py")) if not p.name.startswith("_")}
    return {name: m for name, m in found.items() if hasattr(m, "VARIANTS")}


def list_experiments() -> str:
    """One line per experiment and per variant, with their descriptions."""
    lines = []
    for name, module in experiments().items():
        lines.append(f"experiments/{name}: {(module.__doc__ or '').strip().splitlines()[0]}")
        lines += [f"    :{variant:<8} {text}" for variant, text in module.VARIANTS.items()]
    return "\n".join(lines)


def resolve_spec(spec: str) -> str:
    """`PATH[:VARIANT]` with PATH made absolute: a file as given, else the project's experiments/ file of
    that name (`experiments/finetune.py`, `finetune.py` or `finetune` from any directory)."""
    path, sep, variant = spec.partition(":")
    name = Path(path).name if path.endswith(".py") else f"{Path(path).name}.py"
    candidates = [Path(path), EXPERIMENTS.parent / path, EXPERIMENTS / name]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise UserError(f"--config={spec}: no experiment file {path} here ({Path.cwd()}) nor {name} in "
                        f"{EXPERIMENTS}; the experiments are: {', '.join(experiments())} (python launch.py --list)")
    return f"{found.resolve()}{sep}{variant}"


def load_experiment(spec: str):
    """The config of `experiments/NAME.py[:VARIANT]` (spec resolved), loaded directly (for error messages)."""
    path, _, variant = spec.partition(":")
    module = _module(Path(path))
    try:
        return module.get_config(variant) if variant else module.get_config()
    except ValueError as e:
        raise UserError(str(e)) from None


def parse(argv: list[str]):
    """The resolved config of a command line; errors name the bad flag or key and what is valid."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        raise UserError("--config=experiments/NAME.py[:VARIANT] is required")
    resolved = resolve_spec(spec)
    argv = [f"--config={resolved}" if a == f"--config={spec}" else a for a in argv]
    valid = _valid_keys(load_experiment(resolved))  # a bad file or variant is reported here, plainly
    try:
        flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - absl and ml_collections raise several types; explain them here
        for arg in argv:
            key = arg[len("--config."):].split("=", 1)[0] if arg.startswith("--config.") else None
            if key is not None and key not in valid:
                section, _, field = key.rpartition(".")
                fields = [k.rpartition(".")[2] for k in valid if k.rpartition(".")[0] == section]
                close = [f"{section}.{f}" for f in difflib.get_close_matches(field, fields, n=3, cutoff=0.6)] or \
                    difflib.get_close_matches(key, valid, n=3, cutoff=0.8)
                hint = f"did you mean {' or '.join(close)}?" if close else \
                    f"the keys of {section}: {', '.join(fields)}" if fields else \
                    f"the sections: {', '.join(sorted({k.split('.')[0] for k in valid if '.' in k}))}"
                raise UserError(f"unknown config key {key!r} in {arg}; {hint} (python launch.py "
                                f"--config={spec} --dry_run prints every key)") from None
        raise UserError(str(e).splitlines()[0]) from None
    config = _CONFIG.value
    if _WORKDIR.value:
        config.workdir = _WORKDIR.value
    return config


def run_sweep(config, target, argv: list[str]) -> None:
    """--sweep: list the points (with --dry_run) or run them all and write the sweep's report."""
    import jax

    from gpt2_jax import sweep

    axes = sweep.parse(_SWEEP.value, config)
    spec = next(a.split("=", 1)[1] for a in argv if a.startswith("--config="))
    path, _, variant = spec.partition(":")
    name = _SWEEP_NAME.value or path.rpartition("/")[2].removesuffix(".py") + (f"-{variant}" if variant else "")
    if _DRY_RUN.value:
        print(sweep.describe(config, name, axes))
        return
    if config.mode != "train":
        raise UserError(f"mode={config.mode!r}: only training runs can be swept")
    from gpt2_jax.loop import run

    out = sweep.run(config, name, axes, run, lambda: jax.process_index() == 0)
    print(f"wrote {out}/sweep.md, sweep.png and sweep.json")


def run_dry(config, target, argv: list[str]) -> None:
    """--dry_run, or a training config compiled for --target (nothing runs on a target)."""
    from gpt2_jax.dryrun import dry_run

    dry_run(config, target)


def run_ablation(config, target, argv: list[str]) -> None:
    """mode=remat_ablation: every (policy, micro-batch) compiled, measured and reported."""
    from gpt2_jax.ablation import run_ablation as ablate
    from gpt2_jax.resolve import model_config_of

    out = f"{config.workdir.rstrip('/')}/ablation/{config.run_name}"  # a path or a URL, for storage.path
    if target is not None:
        config.ablation.compile_only = True  # nothing runs on a target
        if not any(a.startswith("--config.ablation.memory_budget_gb") for a in argv):
            config.ablation.memory_budget_gb = target.budget_bytes(config.model.memory_budget_gb) / 2**30
    ablate(config, model_config_of(config), out, target)
    print(f"wrote {out}/ablation.md, ablation.png and ablation.json")


def run_training(config, target, argv: list[str]) -> None:
    """mode=train: the run, then a line naming where everything is."""
    from gpt2_jax.loop import run

    print(_done(config, run(config)))


# What launch.py does with a parsed config: the flags' modes first, else config.mode.
MODES = {"sweep": run_sweep, "dry_run": run_dry, "remat_ablation": run_ablation, "train": run_training}
CONFIG_MODES = ("train", "remat_ablation")  # what config.mode may name


HELP_FLAGS = ("--help", "-h", "--helpfull", "-?")


def usage(argv: list[str]) -> str:
    """The commands, the flags and, with --config, that experiment's variants and every config key with its
    value (each documented once, in experiments/base.py)."""
    lines = [__doc__.strip(), "", "flags:"]
    for name in ("config", "workdir", "list", "dry_run", "sweep", "sweep_name", "target"):
        lines.append(f"  --{name}: {flags.FLAGS[name].help}")
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        lines += ["", "the experiments (python launch.py --list):", list_experiments()]
    else:
        resolved = resolve_spec(spec)
        module = _module(Path(resolved.partition(":")[0]))
        lines += ["", f"{spec}: {(module.__doc__ or '').strip().splitlines()[0]}"]
        lines += [f"    :{variant:<8} {text}" for variant, text in getattr(module, "VARIANTS", {}).items()]
        lines += ["", f"config keys (--config.KEY=VALUE; each explained in {EXPERIMENTS / 'base.py'}):",
                  str(load_experiment(resolved))]
    return "\n".join(lines)


def _done(config: Any, result: dict) -> str:
    """The last line: where the run's checkpoints, logs, curves and samples are."""
    from gpt2_jax import storage

    workdir = str(storage.absolute(config.workdir)).rstrip("/")  # absolute, as the checkpoints' path is
    logs = f"{workdir}/logs/{config.run_name}"
    line = f"done: step {result['step']}; checkpoints in {result['run_dir']}; logs in {logs} (metrics.jsonl, " \
           f"TensorBoard events, curves.png)"
    if config.sample.sample_every:
        line += f"; samples in {workdir}/samples/{config.run_name}"
    return line


def main(argv: list[str]) -> None:
    """Parse, then list, dry-run, ablate or train."""
    try:
        if len(argv) == 1 or any(a in HELP_FLAGS for a in argv[1:]):
            print(usage(argv))
            return
        if "--list" in argv:
            print(list_experiments())
            return
        if "--target=list" in argv:
            from gpt2_jax.targets import list_targets

            print(list_targets())
            return
        config = parse(argv)
        target = None
        if _TARGET.value:  # before JAX starts a backend: this host only compiles
            from gpt2_jax import targets

            target = targets.parse_target(_TARGET.value)
            targets.prepare_host()
            if _SWEEP.value:
                raise UserError(f"--target={_TARGET.value} compiles one point; drop --sweep and give each point's "
                                "values as --config overrides")
        if config.mode not in CONFIG_MODES:  # --dry_run and --sweep are flags, not modes a config names
            raise UserError(f"mode={config.mode!r}: use {' or '.join(CONFIG_MODES)}")
        mode = "sweep" if _SWEEP.value else \
            "dry_run" if _DRY_RUN.value or (target is not None and config.mode == "train") else config.mode
        if mode == "train" and config.parallel.distributed:
            from gpt2_jax import supervisor

            if not supervisor.is_supervised_child():  # JAX's C++ abort on a lost peer becomes one line
                p = config.parallel
                log = f"{config.workdir.rstrip('/')}/logs/{config.run_name}/jax-" \
                      f"{p.process_id if p.distributed == 'explicit' else supervisor.process_name()}.log"
                job = f"{p.num_processes}-process job" if p.distributed == "explicit" else "multi-process job"
                sys.exit(supervisor.supervise(argv, log, job))
        from gpt2_jax.steps import enable_compilation_cache, use_memory_faithful_cpu_scheduler

        enable_compilation_cache()  # a second launch loads what the first compiled
        if mode in ("dry_run", "remat_ablation") or config.model.remat == "auto":
            use_memory_faithful_cpu_scheduler()  # before the backend starts: memory figures that show remat
        MODES[mode](config, target, argv)
    except UserError as e:
        print(f"launch.py: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C (or SIGINT) while a stop was saving: abort, as asked
        print("launch.py: interrupted: stopped without saving this step; the last complete checkpoint resumes",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main(sys.argv)
