"""Sweeps, run comparison and curves: a 2x2 sweep equals its single runs, resumes, rejects bad input; compare."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from gpt2_jax import loop, report, rundir, sweep
from gpt2_jax.cli import main as cli_main
from gpt2_jax.errors import UserError
from test_faults import DATASET
from test_loop import TINY_MODEL, read_metrics, tiny_config

FIELDS = {"train.total_steps": 3, "data.val_every": 3, "data.val_batch_count": 1, "data.val_batch_size": 2}
SWEEP = ["--sweep=train.learning_rate=0.001,0.003", "--sweep=train.optimizer=adam,sgd"]


def _launch(workdir, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "launch.py", "--config=experiments/finetune.py", f"--workdir={workdir}",
           f"--config.model.name={TINY_MODEL}", f"--config.data.dataset={DATASET}", "--config.data.seq_len=16",
           "--config.train.batch_size=2", "--config.sample.sample_every=0", "--config.checkpoint.save_every=0",
           *(f"--config.{k}={v}" for k, v in FIELDS.items()), "--sweep_name=grid", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_a_2x2_sweep_equals_its_single_runs_resumes_and_reports(tmp_path):
    base = tiny_config(tmp_path, DATASET, **FIELDS, **{"checkpoint.save_every": 0})
    axes = sweep.parse([s.split("=", 1)[1] for s in SWEEP], base)
    assert axes == [("train.learning_rate", [0.001, 0.003]), ("train.optimizer", ["adam", "sgd"])]
    first, second = (sweep.point_config(base, "grid", o) for o in sweep.points(axes)[:2])
    loop.run(first)  # point 1 already finished when the sweep starts
    second.train.total_steps = 1
    loop.run(second)  # point 2 interrupted after its first step

    done = _launch(tmp_path, *SWEEP)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "point 1/4 grid/train.learning_rate=0.001,train.optimizer=adam finished earlier, skipped" in done.stdout
    assert "restored step 1" in done.stdout + done.stderr  # point 2 resumed where it stopped
    out = tmp_path / "sweeps" / "grid"
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["overrides"] for r in runs] == [{"train.learning_rate": lr, "train.optimizer": opt}
                                              for lr in (0.001, 0.003) for opt in ("adam", "sgd")]
    for r in runs:  # the report's numbers are the runs' own metrics
        metrics = read_metrics(tmp_path, r["run_name"])
        assert r["loss"] == [m["loss"] for m in metrics if "loss" in m][-1]
        assert r["val_loss"] == [m["val_loss"] for m in metrics if "val_loss" in m][-1]
        assert f"| {r['run_name']} | train.learning_rate={r['overrides']['train.learning_rate']}" in \
            (out / "sweep.md").read_text()
        assert (tmp_path / "logs" / r["run_name"] / "curves.png").is_file()

    # a point equals launching its overrides alone, bitwise
    alone = tiny_config(tmp_path / "alone", DATASET, **FIELDS, **{"checkpoint.save_every": 0,
                                                                  "train.learning_rate": 0.003,
                                                                  "train.optimizer": "sgd"})
    loop.run(alone)
    _, a = rundir.load_run_params(tmp_path / "alone" / "checkpoint" / "run1")
    _, b = rundir.load_run_params(tmp_path / "checkpoint" / runs[3]["run_name"])
    jax.tree.map(np.testing.assert_array_equal, a, b)

    # and any finished runs compare by the fields that differ
    cli_main(["compare", runs[0]["run_name"], runs[3]["run_name"], "--workdir", str(tmp_path)])
    table = (tmp_path / "compare" / "compare.md").read_text()
    assert "train.learning_rate=0.001, train.optimizer=adam" in table
    assert "train.learning_rate=0.003, train.optimizer=sgd" in table
    compared = json.loads((tmp_path / "compare" / "compare.json").read_text())["runs"]
    assert [r["loss"] for r in compared] == [runs[0]["loss"], runs[3]["loss"]]


def test_bad_sweeps_are_one_line_before_anything_runs(tmp_path):
    base = tiny_config(tmp_path, DATASET, **FIELDS)
    with pytest.raises(UserError, match=r"--sweep=train.learnin_rate=1: unknown config key 'train.learnin_rate'; "
                                        r"valid"):
        sweep.parse(["train.learnin_rate=1"], base)
    with pytest.raises(UserError, match=r"--sweep=train.total_steps=3,x: 'x' is not a valid int \(the type of "
                                        r"train.total_steps\)"):
        sweep.parse(["train.total_steps=3,x"], base)
    with pytest.raises(UserError, match="use --sweep=SECTION.FIELD=V1,V2"):
        sweep.parse(["train.total_steps"], base)
    with pytest.raises(UserError, match="only_train_transformer_layers=maybe.*not a valid bool"):
        sweep.parse(["train.only_train_transformer_layers=maybe"], base)
    listed = sweep.describe(base, "grid", sweep.parse(["seed=1,2", "model.remat=none,full"], base))
    assert listed.splitlines() == ["sweep grid: 4 points", "  grid/seed=1,model.remat=none",
                                   "  grid/seed=1,model.remat=full", "  grid/seed=2,model.remat=none",
                                   "  grid/seed=2,model.remat=full"]
    done = _launch(tmp_path, "--sweep=train.lr=1")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("launch.py: error: --sweep=train.lr=1: unknown config key")
    assert not (tmp_path / "checkpoint").exists()


def test_curves_are_drawn_when_a_run_ends(tmp_path):
    loop.run(tiny_config(tmp_path, DATASET, **{"train.total_steps": 2}))
    assert (tmp_path / "logs" / "run1" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.read_run_config(tmp_path / "logs" / "run1")["train"]["total_steps"] == 2
