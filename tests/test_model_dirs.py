"""Damaged model directories: every file of the four layouts (OpenAI's release, transformers' with one
weights file or sharded under an index, a training run) truncated, emptied or filled with garbage, read
by `gpt2-jax sample`; the files each command cannot do without, read by `evaluate`, `export`, `encode
--model_dir` and training's model.name too. Each damage either does not matter to the command (a file it
does not read) or ends in one line naming the file, exit 2: never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURES, REPO
from gpt2_jax import loop
from gpt2_jax.cli import main as cli_main
from gpt2_jax.errors import UserError
from gpt2_jax.weights import export_transformers, load_weights
from test_loop import tiny_config

DAMAGES = {"truncated": lambda b: b[: len(b) // 2], "empty": lambda b: b"",
           "garbage": lambda b: b"\x00\xffnot this file" * 3}
# The files each layout cannot do without: their damage must be reported (the rest may be unread).
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
NEEDED = {"openai": {"hparams.json", "encoder.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001"},
          "hf": {"config.json", "model.safetensors", "vocab.json"},
          "sharded": {"config.json", "model.safetensors.index.json", *SHARDS, "vocab.json"},
          "run": {"hparams.json", "encoder.json"}}
VOCABULARY = {"openai": {"encoder.json"}, "hf": {"vocab.json"}, "sharded": {"vocab.json"}, "run": {"encoder.json"}}


def _shard(hf: Path, out: Path) -> None:
    """transformers' sharded layout: the weights split over two files named by model.safetensors.index.json."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(hf, out)
    tensors = load_file(out / "model.safetensors")
    (out / "model.safetensors").unlink()
    keys = sorted(tensors)
    weight_map = {}
    for shard, part in zip(SHARDS, (keys[: len(keys) // 2], keys[len(keys) // 2:])):
        save_file({k: tensors[k] for k in part}, str(out / shard))
        weight_map |= {k: shard for k in part}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    """The tiny OpenAI fixture, its transformers export and a one-step training run of it."""
    tmp = tmp_path_factory.mktemp("layouts")
    src = FIXTURES / "openai_tiny"
    config, params = load_weights(src)
    export_transformers(config, params, src, tmp / "hf")
    _shard(tmp / "hf", tmp / "sharded")
    subprocess.run([sys.executable, "launch.py", "--config=experiments/finetune.py", f"--workdir={tmp / 'w'}",
                    f"--config.model.name={src}", f"--config.data.dataset={FIXTURES / 'make_openai_checkpoint.py'}",
                    "--config.data.seq_len=16", "--config.train.batch_size=2", "--config.sample.sample_every=0",
                    "--config.train.total_steps=1"], cwd=REPO, capture_output=True, check=True, timeout=300)
    return {"openai": src, "hf": tmp / "hf", "sharded": tmp / "sharded", "run": tmp / "w" / "checkpoint" / "run1"}


@pytest.mark.parametrize("layout", ["openai", "hf", "sharded", "run"])
def test_every_damaged_file_is_one_line_or_unread(layout, layouts, tmp_path, capsys):
    base = layouts[layout]
    reported = set()
    for name in sorted(p.name for p in base.iterdir() if p.is_file()):
        for how, damage in DAMAGES.items():
            d = tmp_path / f"{name}-{how}"
            shutil.copytree(base, d)
            (d / name).write_bytes(damage((d / name).read_bytes()))
            capsys.readouterr()
            try:
                cli_main(["sample", "--model_dir", str(d), "--length", "2", "--nsamples", "1"])
                code = 0
            except SystemExit as e:
                code = e.code
            err = capsys.readouterr().err
            lines = [line for line in err.splitlines() if line.strip()]
            if code == 0:
                continue  # a file sampling does not need (a TF `checkpoint` state file, run metadata, ...)
            assert code == 2 and "Traceback" not in err, (name, how, err[-2000:])
            assert lines[-1].startswith(f"gpt2-jax sample: error: {d / name}"), (name, how, lines[-1])
            reported.add(name)
            shutil.rmtree(d)
    assert NEEDED[layout] <= reported, NEEDED[layout] - reported


def _train(model_dir: Path, tmp: Path) -> None:
    """Fine-tuning from model_dir (model.name), as launch.py runs it: a UserError is its one line, exit 2."""
    try:
        loop.run(tiny_config(tmp / "train", FIXTURES / "make_openai_checkpoint.py",
                             **{"model.name": str(model_dir), "train.total_steps": 1}))
    except UserError as e:
        print(f"launch.py: error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None


COMMANDS = {  # how each command reads a model directory, and the files it cannot do without
    "evaluate": (lambda d, tmp: cli_main(["evaluate", "--model_dir", str(d), "--dataset", str(tmp / "text.txt")]),
                 NEEDED),
    "export": (lambda d, tmp: cli_main(["export", "--model_dir", str(d), "--out", str(tmp / "out")]), NEEDED),
    "encode": (lambda d, tmp: cli_main(["encode", str(tmp / "text.txt"), str(tmp / "out.npz"), "--model_dir", str(d)]),
               VOCABULARY),
    "model.name": (_train, NEEDED),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_the_files_each_command_needs_are_one_line_when_damaged(command, layouts, tmp_path, capsys):
    run, needed = COMMANDS[command]
    (tmp_path / "text.txt").write_text("To be, or not to be, that is the question. " * 8)
    prefix = "launch.py" if command == "model.name" else f"gpt2-jax {command}"
    for layout, base in layouts.items():
        for name in sorted(needed[layout]):
            for how, damage in DAMAGES.items():
                d = tmp_path / layout / f"{name}-{how}"
                shutil.copytree(base, d)
                (d / name).write_bytes(damage((d / name).read_bytes()))
                capsys.readouterr()
                try:
                    run(d, tmp_path)
                    code = 0
                except SystemExit as e:
                    code = e.code
                err = capsys.readouterr().err
                lines = [line for line in err.splitlines() if line.strip()]
                assert code == 2 and "Traceback" not in err, (layout, name, how, err[-2000:])
                assert lines[-1].startswith(f"{prefix}: error: ") and str(d / name) in lines[-1], \
                    (layout, name, how, lines[-1])
                shutil.rmtree(d)
