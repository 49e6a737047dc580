"""model.remat=auto on CPU: it picks a policy and split that fit, trains exactly as that choice set by hand,
keeps its choice on resume, says plainly when nothing fits, and the dry run prints the line scripts read."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from gpt2_jax import autoremat, loop, parallel, rundir
from gpt2_jax.errors import UserError
from gpt2_jax.model import REMAT_POLICIES
from gpt2_jax.objectives import NextToken
from gpt2_jax.resolve import model_config_of
from test_loop import TINY_MODEL, read_metrics, tiny_config
from test_faults import DATASET

AUTO = {"model.remat": "auto", "train.batch_size": 4, "data.seq_len": 32, "train.total_steps": 2,
        "model.remat_auto_steps": 1}


def test_every_policy_is_searched():
    assert sorted(autoremat.POLICY_ORDER) == sorted(REMAT_POLICIES)


def test_auto_fits_the_budget_and_trains_bitwise_like_its_choice_set_by_hand(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(autoremat, "POLICY_ORDER", ("none", "full"))  # all 7 work alike; 2 keep it short
    config = tiny_config(tmp_path / "probe", DATASET, **AUTO)
    mesh = parallel.make_mesh(1, 1)
    whole, _ = autoremat.choose(model_config_of(config), config.train, mesh, 32, float("inf"), objective=NextToken(),
                                timed_steps=0)
    assert (whole.policy, whole.micro_batch) == ("none", 4)  # everything fits: no remat, no accumulation
    budget_gb = (whole.peak_bytes - 1) / autoremat.GiB  # now the whole batch without remat does not fit
    auto = tiny_config(tmp_path / "auto", DATASET, **AUTO, **{"model.memory_budget_gb": budget_gb})
    loop.run(auto)
    record = json.loads((tmp_path / "auto" / "checkpoint" / "run1" / "remat_auto.json").read_text())
    chosen = record["chosen"]
    assert chosen["fits"] and chosen["peak_bytes"] <= budget_gb * autoremat.GiB
    assert (chosen["policy"], chosen["micro_batch"]) != ("none", 4)
    assert chosen["micro_batch"] * chosen["accumulate"] == 4
    out = capsys.readouterr().out
    assert "| policy | micro-batch | accumulate | peak GiB | fits | step ms | chosen |" in out
    assert (tmp_path / "auto" / "logs" / "run1" / "remat_auto.md").is_file()
    by_hand = tiny_config(tmp_path / "hand", DATASET, **{**AUTO, "model.remat": chosen["policy"],
                                                         "train.batch_size": chosen["micro_batch"],
                                                         "train.accumulate_gradients": chosen["accumulate"]})
    loop.run(by_hand)
    _, a = rundir.load_run_params(tmp_path / "auto" / "checkpoint" / "run1")
    _, b = rundir.load_run_params(tmp_path / "hand" / "checkpoint" / "run1")
    jax.tree.map(np.testing.assert_array_equal, a, b)  # bitwise
    assert [m["loss"] for m in read_metrics(tmp_path / "auto")] == [m["loss"] for m in read_metrics(tmp_path / "hand")]
    # resuming keeps the recorded choice (a new search could time differently), so the run stays exact
    loop.run(tiny_config(tmp_path / "auto", DATASET, **{**AUTO, "train.total_steps": 3,
                                                         "model.memory_budget_gb": budget_gb}))
    assert "(as chosen when the run started)" in capsys.readouterr().out


def test_an_impossible_budget_is_one_line_with_the_smallest_peak(tmp_path, monkeypatch):
    monkeypatch.setattr(autoremat, "POLICY_ORDER", ("none", "full"))  # every policy is tried: two keep it short
    with pytest.raises(UserError, match=r"model.remat=auto: nothing fits the memory budget of 0.000 GiB; the smallest "
                                        r"compiled peak found is \d+\.\d{3} GiB \(\w+, micro-batch 1\); raise "
                                        r"model.memory_budget_gb"):
        loop.run(tiny_config(tmp_path, DATASET, **AUTO, **{"model.memory_budget_gb": 1e-6}))


def test_dry_run_prints_the_candidates_and_the_line(tmp_path):
    done = subprocess.run([sys.executable, "launch.py", "--config=experiments/finetune.py", "--dry_run",
                           f"--workdir={tmp_path}", f"--config.model.name={TINY_MODEL}", "--config.data.seq_len=32",
                           "--config.train.batch_size=8", "--config.model.remat=auto",
                           "--config.model.memory_budget_gb=0.002", "--config.model.remat_auto_steps=0"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = re.findall(r"^remat auto: (\w+), micro-batch (\d+) x accumulate (\d+), peak (\d+\.\d{3}) GiB of budget "
                       r"(\d+\.\d{3}) GiB$", done.stdout, re.M)
    assert len(lines) == 1, done.stdout[-3000:]
    policy, m, a, peak, budget = lines[0]
    assert policy in REMAT_POLICIES and int(m) * int(a) == 8 and float(peak) <= float(budget) == 0.002
    assert "| policy | micro-batch |" in done.stdout and not list(tmp_path.iterdir())
