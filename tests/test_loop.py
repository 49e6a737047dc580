"""The training loop and launch.py: fine-tuning works, exact resume, kill-safety, NaN, outputs, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES, REPO
from experiments import base
from gpt2_jax import checkpoints, data, loop, rundir
from gpt2_jax.cli import main as cli_main
from gpt2_jax.errors import UserError
from gpt2_jax.rundir import RunDir
from gpt2_jax.weights import load_weights

TINY_MODEL = str(FIXTURES / "openai_tiny")  # n_ctx 32, byte-level vocabulary, written by TensorFlow


@pytest.fixture(scope="module")
def shakespeare(shared_dir, tmp_path_factory) -> tuple[Path, Path]:
    """tinyshakespeare split 90/10 into train and validation files."""
    text = (shared_dir / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    d = tmp_path_factory.mktemp("shakespeare")
    (d / "train.txt").write_text(text[:cut], encoding="utf-8")
    (d / "val.txt").write_text(text[cut:], encoding="utf-8")
    return d / "train.txt", d / "val.txt"


def tiny_config(workdir: Path, dataset: Path, **fields):
    """The base config on the tiny fixture model; `fields` are 'section.field' overrides."""
    c = base.get_config()
    c.workdir = str(workdir)
    c.model.name = TINY_MODEL
    c.data.dataset = str(dataset)
    c.data.seq_len = 16
    c.train.batch_size = 2
    c.train.learning_rate = 1e-3
    c.sample.sample_every = 0
    c.checkpoint.save_every = 0
    for key, value in fields.items():
        section, _, name = key.rpartition(".")
        setattr(c[section] if section else c, name, value)
    return c


def read_metrics(workdir: Path, run: str = "run1") -> list[dict]:
    return [json.loads(line) for line in (workdir / "logs" / run / "metrics.jsonl").read_text().splitlines()]


def test_finetuning_on_tinyshakespeare_lowers_validation_loss(tmp_path, shakespeare):
    train, val = shakespeare
    config = tiny_config(tmp_path, train, **{"data.val_dataset": str(val), "data.val_every": 150,
                                             "data.val_batch_count": 4, "data.val_batch_size": 16,
                                             "data.seq_len": 32, "train.batch_size": 16,
                                             "train.learning_rate": 3e-3, "train.total_steps": 300})
    loop.run(config)
    val_losses = [m["val_loss"] for m in read_metrics(tmp_path) if "val_loss" in m]
    assert len(val_losses) == 3  # before training, at 150, at 300
    assert val_losses[0] - val_losses[-1] > 1.0, val_losses
    assert val_losses[1] > val_losses[2]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, shakespeare):
    """8 uninterrupted steps with accumulation and noise: the reference for resuming."""
    workdir = tmp_path_factory.mktemp("straight")
    loop.run(tiny_config(workdir, shakespeare[0], **RESUME_FIELDS))
    return workdir


RESUME_FIELDS = {"train.total_steps": 8, "train.accumulate_gradients": 2, "train.noise": 0.1, "train.optimizer": "adam",
                 "sample.sample_every": 4, "sample.sample_length": 8}


def test_stop_and_resume_is_exact(tmp_path, straight_run, shakespeare):
    def ctrl_c_at_4(step, metrics):
        if step == 4:
            signal.raise_signal(signal.SIGINT)  # the same path a real Ctrl-C takes

    stopped = loop.run(tiny_config(tmp_path, shakespeare[0], **RESUME_FIELDS), on_step=ctrl_c_at_4)
    assert stopped["step"] == 4
    run_dir = tmp_path / "checkpoint" / "run1"
    assert checkpoints.make_manager(run_dir, read_only=True).all_steps() == [4]
    # a different seed on the command line does not change a resumed run: the checkpoint's is used
    resumed = loop.run(tiny_config(tmp_path, shakespeare[0], **{**RESUME_FIELDS, "seed": 12345}))
    assert resumed["step"] == 8
    losses = [m["loss"] for m in read_metrics(tmp_path)]
    assert losses == [m["loss"] for m in read_metrics(straight_run)]  # bitwise equal floats
    _, params = rundir.load_run_params(run_dir)
    _, reference = rundir.load_run_params(straight_run / "checkpoint" / "run1")
    jax.tree.map(np.testing.assert_array_equal, params, reference)
    assert (tmp_path / "samples" / "run1" / "samples-4").is_file() and (tmp_path / "samples" / "run1" / "samples-8").is_file()


def test_dispatch_ahead_trains_bitwise_alike_and_stops_after_the_step_in_flight(tmp_path, straight_run, shakespeare):
    ahead = {**RESUME_FIELDS, "train.dispatch_ahead": True}

    def ctrl_c_at_5(step, metrics):
        if step == 5:  # step 5's metrics are read while step 6 runs (4 and 8, sampling steps, are in step)
            signal.raise_signal(signal.SIGINT)

    assert loop.run(tiny_config(tmp_path, shakespeare[0], **ahead), on_step=ctrl_c_at_5)["step"] == 6
    assert loop.run(tiny_config(tmp_path, shakespeare[0], **ahead))["step"] == 8
    assert [m["loss"] for m in read_metrics(tmp_path)] == [m["loss"] for m in read_metrics(straight_run)]
    _, params = rundir.load_run_params(tmp_path / "checkpoint" / "run1")
    _, reference = rundir.load_run_params(straight_run / "checkpoint" / "run1")
    jax.tree.map(np.testing.assert_array_equal, params, reference)
    assert sorted(p.name for p in (tmp_path / "samples" / "run1").iterdir()) == ["samples-4", "samples-8"]


@pytest.mark.parametrize("dispatch_ahead, last", [(False, 2), (True, 3)])  # ahead: step 3 was in flight
def test_sigterm_saves_and_stops_cleanly(tmp_path, shakespeare, dispatch_ahead, last):
    def terminate_at_2(step, metrics):
        if step == 2:
            signal.raise_signal(signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    result = loop.run(tiny_config(tmp_path, shakespeare[0], **{"train.total_steps": 50,
                                                               "train.dispatch_ahead": dispatch_ahead}),
                      on_step=terminate_at_2)
    assert result["step"] == last
    assert checkpoints.make_manager(tmp_path / "checkpoint" / "run1", read_only=True).all_steps() == [last]
    assert signal.getsignal(signal.SIGTERM) == before  # the loop's handler is gone again


def test_a_second_ctrl_c_aborts_at_once_without_saving(tmp_path, shakespeare):
    def interrupt_twice_at_2(step, metrics):
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # asks for a checkpoint after this step...
            signal.raise_signal(signal.SIGINT)  # ... and the second aborts before it is written

    with pytest.raises(KeyboardInterrupt):
        loop.run(tiny_config(tmp_path, shakespeare[0], **{"train.total_steps": 50, "train.dispatch_ahead": False}),
                 on_step=interrupt_twice_at_2)
    assert checkpoints.make_manager(tmp_path / "checkpoint" / "run1", read_only=True).all_steps() == []


def test_run_directory_is_a_model_directory(straight_run, tmp_path, capsys):
    from transformers import GPT2LMHeadModel

    run_dir = straight_run / "checkpoint" / "run1"
    assert list((straight_run / "logs" / "run1").glob("events.out.tfevents.*"))
    assert json.loads((run_dir / "run_config.json").read_text())["train"]["total_steps"] == 8
    cli_main(["sample", "--model_dir", str(run_dir), "--length", "6", "--top_k", "1", "--json"])
    assert len(json.loads(capsys.readouterr().out)["tokens"]) <= 6
    cli_main(["evaluate", "--model_dir", str(run_dir), "--dataset", str(FIXTURES / "make_openai_checkpoint.py"), "--json"])
    assert json.loads(capsys.readouterr().out)["tokens"] > 1000
    cli_main(["export", "--model_dir", str(run_dir), "--out", str(tmp_path / "hf")])
    assert GPT2LMHeadModel.from_pretrained(tmp_path / "hf").config.n_layer == 2


def test_restore_from_fresh_never_overwrites_and_a_path_restores(straight_run, tmp_path, shakespeare):
    with pytest.raises(UserError, match="restore_from=fresh but .* already holds checkpoints up to step 8"):
        loop.run(tiny_config(straight_run, shakespeare[0], **{**RESUME_FIELDS, "checkpoint.restore_from": "fresh"}))
    assert checkpoints.make_manager(straight_run / "checkpoint" / "run1", read_only=True).latest_step() == 8
    restore = {**RESUME_FIELDS, "train.total_steps": 9, "checkpoint.restore_from": str(straight_run / "checkpoint" / "run1")}
    result = loop.run(tiny_config(tmp_path, shakespeare[0], **restore))
    assert result["step"] == 9 and [m["step"] for m in read_metrics(tmp_path)] == [9]
    # The same checkpoint resumed with stacked blocks: params and Adam's moments are converted.
    scanned = loop.run(tiny_config(tmp_path / "scan", shakespeare[0], **{**restore, "model.scan_layers": True}))
    np.testing.assert_allclose(scanned["loss"], result["loss"], rtol=1e-5)
    config, params = rundir.load_run_params(tmp_path / "scan" / "checkpoint" / "run1")
    assert RunDir(tmp_path / "scan" / "checkpoint" / "run1").scan_layers() and not config.scan_layers
    _, reference = rundir.load_run_params(tmp_path / "checkpoint" / "run1")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), params, reference)


@pytest.mark.parametrize("dispatch_ahead", [False, True])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, shakespeare, dispatch_ahead):
    loop.run(tiny_config(tmp_path, shakespeare[0], **{"train.total_steps": 2}))
    with pytest.raises(UserError, match=r"the loss became (nan|inf) at step \d+; stopped without saving it.*step 2"):
        loop.run(tiny_config(tmp_path, shakespeare[0], **{"train.total_steps": 20, "train.learning_rate": 1e30,
                                                         "checkpoint.save_every": 2,
                                                         "train.dispatch_ahead": dispatch_ahead}))
    assert checkpoints.make_manager(tmp_path / "checkpoint" / "run1", read_only=True).all_steps() == [2]


def test_sigkill_while_saving_resumes_from_the_last_complete_checkpoint(tmp_path, shakespeare):
    train = shakespeare[0]
    data_before = train.read_bytes()
    run_dir = tmp_path / "checkpoint" / "run1"
    cmd = [sys.executable, "launch.py", "--config=experiments/finetune.py", f"--workdir={tmp_path}",
           f"--config.model.name={TINY_MODEL}", f"--config.data.dataset={train}", "--config.data.seq_len=16",
           "--config.train.batch_size=2", "--config.sample.sample_every=0", "--config.checkpoint.save_every=1",
           "--config.checkpoint.keep=3", "--config.train.total_steps=100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    caught_mid_write = False
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            saved = [d for d in run_dir.glob("*") if d.name.isdigit()] if run_dir.is_dir() else []
            if saved and list(run_dir.glob("*tmp*")):  # orbax writes a step under a temporary name first
                caught_mid_write = True
                break
            time.sleep(0.002)
        assert proc.poll() is None, "training exited early"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert caught_mid_write, "never observed a checkpoint being written"
    complete = checkpoints.make_manager(run_dir, read_only=True).latest_step()
    assert complete is not None
    assert (RunDir(run_dir).lock).is_file()  # left behind by kill -9, but no longer locked:
    result = loop.run(tiny_config(tmp_path, train, **{"train.total_steps": complete + 2}))
    assert result["step"] == complete + 2
    assert not list(run_dir.glob("*tmp*"))  # the partial step was cleaned up
    assert train.read_bytes() == data_before


@pytest.fixture
def no_compile(monkeypatch):
    """Fail the test if the loop reaches jax.jit: bad input must be reported before any compile."""
    def refuse(*args, **kwargs):
        raise AssertionError("compiled before reporting bad input")
    monkeypatch.setattr(loop.jax, "jit", refuse)


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "none*.txt", "no file matches"),
    (lambda d: (d / "e.txt").write_text("") and None or d / "e.txt", "is empty"),
    (lambda d: (d / "b.txt").write_bytes(b"ok\xff\xfe") and None or d / "b.txt", "b.txt: not valid utf-8 text at byte offset 2"),
    (lambda d: (d / "s.txt").write_text("tiny") and None or d / "s.txt",
     "is too small: its largest chunk has 4 tokens .* needs 17"),
    (lambda d: np.savez(d / "v.npz", np.arange(250, 300)) or d / "v.npz", "token id 299, outside the vocabulary"),
])
def test_bad_datasets_fail_before_any_compile(tmp_path, no_compile, make, message):
    data = make(tmp_path)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(UserError, match=message):
        loop.run(tiny_config(tmp_path / "w", data, **{"train.total_steps": 1}))
    assert sorted(tmp_path.iterdir()) == before  # a launch that did nothing leaves nothing: no lock, no checkpoint/


def test_bad_settings_fail_before_any_compile(tmp_path, no_compile):
    (tmp_path / "t.txt").write_text("some text " * 100)
    with pytest.raises(UserError, match="data.seq_len=64: must be between 1 and the model's n_ctx=32"):
        loop.run(tiny_config(tmp_path, tmp_path / "t.txt", **{"data.seq_len": 64}))
    with pytest.raises(UserError, match="data.dataset is empty"):
        loop.run(tiny_config(tmp_path, "", **{"data.dataset": ""}))
    with pytest.raises(UserError, match="data.val_split and data.val_dataset are both set"):
        loop.run(tiny_config(tmp_path, tmp_path / "t.txt", **{"data.val_split": 0.1,
                                                              "data.val_dataset": str(tmp_path / "t.txt")}))
    with pytest.raises(UserError, match="sample.top_p=2.0: must be in"):
        loop.run(tiny_config(tmp_path, tmp_path / "t.txt", **{"sample.sample_every": 5, "sample.top_p": 2.0}))
    with pytest.raises(UserError, match="model.name='355M': no model directory at .*gpt2-jax download 355M"):
        loop.run(tiny_config(tmp_path, tmp_path / "t.txt", **{"model.name": "355M", "model.models_dir": str(tmp_path)}))
    with pytest.raises(UserError, match="checkpoint.keep_best acts on validation: set data.val_every > 0"):
        loop.run(tiny_config(tmp_path, tmp_path / "t.txt", **{"checkpoint.keep_best": True}))
    with pytest.raises(UserError, match="train.early_stop_patience=-1 and .* must be >= 0"):
        loop.run(tiny_config(tmp_path, tmp_path / "t.txt", **{"train.early_stop_patience": -1, "data.val_every": 2}))
    with pytest.raises(UserError, match="restore_from=best but .*best holds no checkpoint"):
        loop.run(tiny_config(tmp_path, tmp_path / "t.txt", **{"checkpoint.restore_from": "best"}))


def test_val_split_validates_on_the_end_of_the_data_and_never_trains_on_it(tmp_path):
    from gpt2_jax.encoder import get_encoder

    (tmp_path / "t.txt").write_text("a" * 1800 + "b" * 200)  # byte-level: one token per character
    encoder = get_encoder(TINY_MODEL)
    config = tiny_config(tmp_path, tmp_path / "t.txt", **{"data.val_split": 0.1, "data.val_every": 1,
                                                         "data.val_batch_count": 3})
    sampler, val_batches, _ = data.datasets(config, encoder, 16, 0, is_main=False)
    a, b = encoder.encode("a")[0], encoder.encode("b")[0]
    trained = np.concatenate([sampler.batch(i, 64) for i in range(20)])
    assert (trained == a).all()  # no window reaches the held-out tenth
    assert len(val_batches) == 3 and all((v == b).all() for v in val_batches)


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_launch_rejects_a_mistyped_key_with_the_valid_ones():
    done = _launch("--config=experiments/finetune.py:124M", "--config.train.learnin_rate=1e-4")
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert "unknown config key 'train.learnin_rate'" in line and "did you mean train.learning_rate" in line, line
    assert len(line) < 300 and "model.name" not in line  # the closest keys, not all of them
    done = _launch("--config=experiments/finetune.py:124M", "--config.optim.lr=1e-4")
    assert done.returncode == 2 and "the sections: ablation, checkpoint, data, " in done.stderr
    assert "Traceback" not in done.stderr
    done = _launch("--config=experiments/finetune.py:125M")
    assert done.returncode == 2 and "use one of 124M, 355M, 774M, 1558M" in done.stderr


def test_an_experiment_name_resolves_from_any_directory_or_says_where_it_looked(tmp_path):
    parse = ("import sys; sys.path.insert(0, sys.argv[1]); import launch; "
             "c = launch.parse(sys.argv[1:]); print(c.model.name, c.train.learning_rate)")
    for spec in ("experiments/finetune.py:355M", "finetune.py:355M", "finetune:355M"):
        done = subprocess.run([sys.executable, "-c", parse, str(REPO), f"--config={spec}",
                               "--config.train.learning_rate=0.001"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0 and done.stdout.split() == ["355M", "0.001"], (spec, done.stderr[-2000:])
    done = subprocess.run([sys.executable, str(REPO / "launch.py"), "--config=experiments/finetun.py"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    line = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and f"here ({tmp_path}) nor finetun.py in {REPO / 'experiments'}" in line, line
    assert "finetune.py" in line and "Traceback" not in done.stderr


def test_demo_on_a_fresh_machine_uses_bytes_and_continues_its_prompt(tmp_path):
    # no ../shared beside the working directory, no models/, GPT2_JAX_SHARED empty: the byte-level vocabulary
    (tmp_path / "empty").mkdir()
    env = {**os.environ, "GPT2_JAX_SHARED": str(tmp_path / "empty")}
    done = subprocess.run([sys.executable, str(REPO / "launch.py"), f"--config={REPO / 'experiments' / 'demo.py'}",
                           f"--workdir={tmp_path / 'w'}", "--config.train.total_steps=2",
                           "--config.train.warmup_steps=1", "--config.train.batch_size=2", "--config.data.val_batch_size=2",
                           "--config.data.val_every=2", "--config.data.val_batch_count=1",
                           "--config.sample.sample_every=2", "--config.sample.sample_length=8"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "w" / "checkpoint" / "demo" / "hparams.json").read_text())["n_vocab"] == 257
    samples = (tmp_path / "w" / "samples" / "demo" / "samples-2").read_text().split("\n", 1)[1]
    assert samples.startswith("    def ")


def test_demo_writes_every_output_at_intervals_that_follow_its_total_steps(tmp_path, shared_dir):
    # Only total_steps is overridden: validation every ceil(7/5) = 2 steps and at the last, checkpoints
    # every ceil(7/4) = 2 (the last two kept), samples at the end.
    env = {**os.environ, "GPT2_JAX_SHARED": str(shared_dir)}
    done = subprocess.run([sys.executable, "launch.py", "--config=experiments/demo.py", f"--workdir={tmp_path}",
                           "--config.train.total_steps=7", "--config.train.warmup_steps=1",
                           "--config.train.batch_size=2", "--config.data.val_batch_size=2",
                           "--config.data.val_batch_count=1", "--config.sample.sample_length=8"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "SAMPLE 1 (model-generated text)" in done.stdout + done.stderr
    assert json.loads((tmp_path / "checkpoint" / "demo" / "hparams.json").read_text())["n_vocab"] == 50257
    assert [m["step"] for m in read_metrics(tmp_path, "demo") if "val_loss" in m] == [0, 2, 4, 6, 7]
    assert [p.name for p in (tmp_path / "samples" / "demo").iterdir()] == ["samples-7"]
    assert checkpoints.make_manager(tmp_path / "checkpoint" / "demo", read_only=True).all_steps() == [6, 7]


def test_document_mask_trains_the_masked_loss(tmp_path):
    # data.document_mask reaches the step: the first step's logged loss is the masked loss of the
    # first batch (tests/test_train.py checks that loss against each document run alone).
    from gpt2_jax.data import WindowSampler, load_dataset
    from gpt2_jax.encoder import get_encoder
    from gpt2_jax.train import loss_fn
    from gpt2_jax.weights import load_weights

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):  # short files: each window holds several documents, joined by end-of-text ids
        (docs / f"{i:02d}.txt").write_text(f"doc {i}{'!' * (i % 3)}\n")
    fields = {"data.document_mask": True, "train.total_steps": 1}  # the loss of step 1 is before its update
    loop.run(tiny_config(tmp_path / "w", docs, **fields))
    logged = read_metrics(tmp_path / "w")[-1]["loss"]
    encoder = get_encoder(TINY_MODEL)
    config, params = load_weights(TINY_MODEL)
    batch = jnp.asarray(WindowSampler(load_dataset(docs, encoder, progress=False), 17, base.get_config().seed).batch(0, 2))
    assert int(jnp.sum(batch == encoder.eot_token)) >= 2
    masked = float(loss_fn(params, batch, jax.random.key(0), config, document_eot=encoder.eot_token))
    unmasked = float(loss_fn(params, batch, jax.random.key(0), config))
    assert logged == pytest.approx(masked, rel=1e-5) and abs(masked - unmasked) > 1e-4


def _params_equal(a, b) -> None:
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_early_stopping_keeps_the_best_step_and_survives_resume(tmp_path, shakespeare, capsys):
    # min_delta 10: no validation after step 0 improves on it, so the patience runs out after two.
    train, val = shakespeare
    fields = {"data.val_dataset": str(val), "data.val_every": 2, "data.val_batch_count": 2, "train.total_steps": 20,
              "train.early_stop_patience": 2, "train.early_stop_min_delta": 10.0, "checkpoint.keep_best": True}
    assert loop.run(tiny_config(tmp_path, train, **fields))["step"] == 4
    out = capsys.readouterr()
    assert "early stop at step 4: validation loss has not improved by more than train.early_stop_min_delta=10 for " \
        "2 validations (train.early_stop_patience=2); the best" in out.out + out.err
    run_dir = tmp_path / "checkpoint" / "run1"
    assert checkpoints.steps_of(RunDir(run_dir).best.path) == [0] and checkpoints.steps_of(run_dir) == [4]
    _params_equal(rundir.load_run_params(RunDir(run_dir).best.path)[1], load_weights(TINY_MODEL)[1])
    # The count is in the checkpoint: the same command stops at once, a larger patience goes one more.
    assert loop.run(tiny_config(tmp_path, train, **fields))["step"] == 4
    assert loop.run(tiny_config(tmp_path, train, **{**fields, "train.early_stop_patience": 3}))["step"] == 6


def test_keep_best_keeps_the_lowest_validation_step_and_restore_from_best_trains_on_bitwise(tmp_path, shakespeare):
    train, val = shakespeare
    fields = {"data.val_dataset": str(val), "data.val_every": 2, "data.val_batch_count": 2, "train.total_steps": 12,
              "checkpoint.save_every": 2, "checkpoint.keep": 10, "checkpoint.keep_best": True,
              "train.learning_rate": 0.03}  # high enough that validation loss rises again
    loop.run(tiny_config(tmp_path, train, **fields))
    run_dir = tmp_path / "checkpoint" / "run1"
    val_losses = {m["step"]: m["val_loss"] for m in read_metrics(tmp_path) if "val_loss" in m}
    best = min(val_losses, key=lambda s: (val_losses[s], s))
    assert checkpoints.steps_of(RunDir(run_dir).best.path) == [best] and 0 < best < 12, val_losses
    _params_equal(rundir.load_run_params(RunDir(run_dir).best.path)[1],
                  rundir.load_run_params(run_dir / str(best))[1])
    final = rundir.load_run_params(run_dir)[1]
    # restore_from=best: on from the best step; the steps after it set aside; batches are a function
    # of the step, so the run ends where it ended before.
    assert loop.run(tiny_config(tmp_path, train, **{**fields, "checkpoint.restore_from": "best"}))["step"] == 12
    assert len(list(RunDir(run_dir).superseded.iterdir())) == len([s for s in val_losses if s > best])
    _params_equal(rundir.load_run_params(run_dir)[1], final)
