"""Damaged model directories: every file of the three layouts (OpenAI's release, transformers', a
training run) truncated, emptied or filled with garbage, read by `gpt2-jax sample`. Each damage either
does not matter to the command (a file it does not read) or ends in one line naming the file, exit 2:
never a traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURES, REPO
from gpt2_jax.cli import main as cli_main
from gpt2_jax.weights import export_transformers, load_weights

DAMAGES = {"truncated": lambda b: b[: len(b) // 2], "empty": lambda b: b"",
           "garbage": lambda b: b"\x00\xffnot this file" * 3}
# The files each layout cannot do without: their damage must be reported (the rest may be unread).
NEEDED = {"openai": {"hparams.json", "encoder.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001"},
          "hf": {"config.json", "model.safetensors", "vocab.json"}, "run": {"hparams.json", "encoder.json"}}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    """The tiny OpenAI fixture, its transformers export and a one-step training run of it."""
    tmp = tmp_path_factory.mktemp("layouts")
    src = FIXTURES / "openai_tiny"
    config, params = load_weights(src)
    export_transformers(config, params, src, tmp / "hf")
    subprocess.run([sys.executable, "launch.py", "--config=experiments/finetune.py", f"--workdir={tmp / 'w'}",
                    f"--config.model.name={src}", f"--config.data.dataset={FIXTURES / 'make_openai_checkpoint.py'}",
                    "--config.data.seq_len=16", "--config.train.batch_size=2", "--config.sample.sample_every=0",
                    "--config.train.total_steps=1"], cwd=REPO, capture_output=True, check=True, timeout=300)
    return {"openai": src, "hf": tmp / "hf", "run": tmp / "w" / "checkpoint" / "run1"}


@pytest.mark.parametrize("layout", ["openai", "hf", "run"])
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
