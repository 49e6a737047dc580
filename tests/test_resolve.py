"""resolve.py: the resume decision for every restore_from case, and configs resolved without weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES
from experiments import base
from gpt2_jax import checkpoints
from gpt2_jax.errors import UserError
from gpt2_jax.resolve import Resume, decide_resume, initial_model, model_config_of
from gpt2_jax.rundir import RunDir


def _run_with_steps(run_dir: Path, *steps: int) -> RunDir:
    """A run directory holding complete (tiny) checkpoints at the given steps."""
    writer = checkpoints.CheckpointWriter(run_dir, async_save=False)
    for step in steps:
        writer.save(step, {"params": {"w": np.full(3, step, np.float32)}, "opt_state": {"m": np.zeros(3, np.float32)}},
                    {"step": step, "seed": 0})
    writer.close()
    return RunDir(run_dir)


def test_latest_without_checkpoints_starts_anew(tmp_path):
    assert decide_resume("latest", RunDir(tmp_path / "missing")) is None
    (tmp_path / "empty").mkdir()
    assert decide_resume("latest", RunDir(tmp_path / "empty")) is None


def test_latest_resumes_the_newest_step(tmp_path):
    run = _run_with_steps(tmp_path / "run", 2, 5)
    assert decide_resume("latest", run) == Resume(run, 5, latest=True)
    assert decide_resume("latest", run).candidates() == [5, 2]


def test_fresh_refuses_a_run_with_checkpoints_and_deletes_nothing(tmp_path):
    assert decide_resume("fresh", RunDir(tmp_path / "new")) is None
    run = _run_with_steps(tmp_path / "run", 3)
    with pytest.raises(UserError, match=r"restore_from=fresh but .* already holds checkpoints up to step 3"):
        decide_resume("fresh", run)
    assert checkpoints.steps_of(run.path) == [3]


def test_a_path_restores_a_run_or_one_step(tmp_path):
    other = _run_with_steps(tmp_path / "other", 1, 4)
    new = RunDir(tmp_path / "new")
    assert decide_resume(str(other), new) == Resume(other, 4)
    assert decide_resume(str(other), new).candidates() == [4]  # an explicit path: no fallback
    assert decide_resume(str(other.path / "1"), new) == Resume(other, 1)
    with pytest.raises(UserError, match="does not exist"):
        decide_resume(str(tmp_path / "nowhere"), new)


def test_a_path_into_another_run_refuses_a_run_with_checkpoints(tmp_path):
    other = _run_with_steps(tmp_path / "other", 4)
    mine = _run_with_steps(tmp_path / "mine", 2)
    with pytest.raises(UserError, match="already holds checkpoints; restore .* under a new run_name"):
        decide_resume(str(other), mine)
    assert decide_resume(str(mine.path / "2"), mine) == Resume(mine, 2)  # its own checkpoint is fine


def test_configs_resolve_without_weights(tmp_path):
    c = base.get_config()
    c.model.models_dir = str(tmp_path)  # 355M not downloaded: its released shape
    c.model.name, c.model.dtype = "355M", "bfloat16"
    config = model_config_of(c)
    assert (config.n_layer, config.n_embd, config.dtype) == (24, 1024, "bfloat16")
    c.model.name = str(FIXTURES / "openai_tiny")
    assert model_config_of(c).n_vocab == 257
    c.model.from_scratch, c.model.vocab, c.model.n_layer, c.model.n_ctx = True, "bytes", 1, 8
    scratch, params, encoder = initial_model(c, None)
    assert scratch == model_config_of(c) and encoder.n_vocab == scratch.n_vocab
    assert params["params"]["wpe"].shape == (8, scratch.n_embd)


def test_resuming_with_settings_that_change_the_optimizer_state_is_one_line(tmp_path):
    import json as json_module

    from gpt2_jax.resolve import check_resumable

    run = _run_with_steps(tmp_path / "run", 2)
    saved = base.get_config()
    saved.train.optimizer = "sgd"
    run.run_config.write_text(saved.to_json())
    now = base.get_config()
    now.train.learning_rate, now.train.weight_decay = 1.0, 0.5  # values only: fine
    now.train.optimizer = "sgd"
    check_resumable(now, Resume(run, 2))
    now.train.optimizer, now.train.grad_clip = "adam", 1.0
    with pytest.raises(UserError, match=r"trained with train.optimizer: sgd \(now adam\); train.grad_clip > 0: False "
                                        r"\(now True\), so its optimizer state has another layout"):
        check_resumable(now, Resume(run, 2))
    assert json_module.loads(run.run_config.read_text())["train"]["optimizer"] == "sgd"
