"""Runs with 8 forced CPU devices (see tests/test_parallel.py): mesh steps equal the single-device step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FAST_COMPILE_FLAG, FIXTURES, REPO
from experiments import base
from gpt2_jax import loop, parallel, rundir
from gpt2_jax.errors import UserError
from gpt2_jax.model import GPT2Config, init_params
from gpt2_jax.objectives import Preferences
from gpt2_jax.steps import build_steps, bytes_per_device
from gpt2_jax.train import TrainState

CONFIG = GPT2Config(n_vocab=96, n_ctx=16, n_embd=32, n_head=4, n_layer=1)


def test_eight_devices():
    assert len(jax.devices()) == 8


def _steps(config, accumulate, mesh, optimizer="sgd", donate=True):
    """The builder's steps on a mesh, and a step-0 state on one device."""
    train = base.get_config().train
    train.learning_rate, train.optimizer, train.accumulate_gradients = 1e-2, optimizer, accumulate
    train.lora_rank = config.lora_rank
    steps = build_steps(config, train, mesh, donate=donate)
    return steps, TrainState.create(init_params(config, jax.random.key(0)), steps.optimizer)


@pytest.mark.parametrize("data, fsdp, accumulate, remat, dtype, optimizer, lora", [
    (8, 1, 1, "none", "float32", "sgd", 0),
    (1, 8, 1, "none", "float32", "sgd", 0),
    (4, 2, 2, "full", "bfloat16", "adam", 0),  # mixed mesh, accumulation, remat, bf16, Adam and scanned blocks
    (2, 4, 2, "none", "float32", "adam", 4),  # LoRA adapters under FSDP, with accumulation and scanned blocks
])
def test_mesh_step_equals_single_device_step(data, fsdp, accumulate, remat, dtype, optimizer, lora):
    scan = optimizer == "adam"
    config = GPT2Config(**CONFIG.hparams(), remat=remat, dtype=dtype, scan_layers=scan, lora_rank=lora,
                        lora_targets=("attn.c_attn", "mlp.c_fc"))
    mesh = parallel.make_mesh(data, fsdp)
    steps, state = _steps(config, accumulate, mesh, optimizer, donate=False)
    batch = np.random.default_rng(0).integers(0, CONFIG.n_vocab, (16 * accumulate, CONFIG.n_ctx + 1)).astype(np.int32)
    key = jax.random.key(1)
    single = jax.device_put(state, jax.devices()[0])
    ref_state, ref_metrics = jax.jit(steps.step_fn)(single, jax.device_put(batch, jax.devices()[0]), key)

    sharded = parallel.put_tree(state, steps.state_sharding)
    new_state, metrics = steps.train_step(sharded, parallel.global_batch(batch, steps.batch_sharding),
                                          jax.device_put(key, parallel.replicated(mesh)))
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=tol)
    # Adam's first step is lr * g / |g|: float noise in a ~0 gradient moves it, so allow 1% of a step
    # (in bfloat16, a whole step: rounding can flip the sign of a tiny gradient).
    atol = (1e-4 if dtype == "float32" else 2e-2) if optimizer == "adam" else tol
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol, rtol=tol), new_state.params, ref_state.params)
    kernel = new_state.params["params"]["h" if scan else "h_0"]["mlp"]["c_fc"]["kernel"]
    assert ("fsdp" in kernel.sharding.spec) == (fsdp > 1)
    if scan:  # stacked [n_layer, C, 4C]: never split by layer, so the scan gathers one layer at a time
        assert kernel.sharding.spec[0] is None


@pytest.mark.parametrize("data, fsdp, accumulate, reference, lora", [
    (8, 1, 1, "batch", 0), (1, 8, 2, "params", 0), (2, 4, 1, "adapters_off", 4)])
def test_dpo_mesh_step_equals_single_device_step(data, fsdp, accumulate, reference, lora):
    from gpt2_jax.dpo import DPOSettings

    config = GPT2Config(**CONFIG.hparams(), lora_rank=lora)
    mesh = parallel.make_mesh(data, fsdp)
    train = base.get_config().train
    train.learning_rate, train.optimizer, train.accumulate_gradients, train.lora_rank = 1e-2, "adam", accumulate, lora
    steps = build_steps(config, train, mesh, Preferences(settings=DPOSettings(beta=0.5, reference=reference)),
                        donate=False)
    params = init_params(config, jax.random.key(0))
    state = TrainState.create(params, steps.optimizer)
    rng = np.random.default_rng(0)
    rows = 8 * accumulate
    batch = (rng.integers(0, CONFIG.n_vocab, (rows, 2, CONFIG.n_ctx + 1)).astype(np.int32),
             (rng.random((rows, 2, CONFIG.n_ctx + 1)) < 0.5).astype(np.float32),
             rng.normal(-40, 3, (rows, 2)).astype(np.float32))
    frozen = init_params(CONFIG, jax.random.key(2))  # a plain reference of the same shape
    extra = (frozen,) if reference == "params" else ()
    key = jax.random.key(1)
    one = jax.devices()[0]
    ref_state, ref_metrics = jax.jit(steps.step_fn)(jax.device_put(state, one), jax.device_put(batch, one), key,
                                                    *jax.device_put(extra, one))
    extra = (parallel.put_tree(frozen, jax.tree.map(lambda a: a.sharding, steps.reference)),) if extra else ()
    new_state, metrics = steps.train_step(parallel.put_tree(state, steps.state_sharding),
                                          parallel.global_batch(batch, steps.batch_sharding),
                                          jax.device_put(key, parallel.replicated(mesh)), *extra)
    for name in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5, atol=1e-6, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5), new_state.params,
                 ref_state.params)


def test_fsdp_really_shards_params_and_optimizer_state():
    steps, state = _steps(CONFIG, 1, parallel.make_mesh(1, 8), "adam")
    sharded = parallel.put_tree(state, steps.state_sharding)
    total = sum(x.nbytes for x in jax.tree.leaves(state.params))
    per_device = bytes_per_device(sharded.params)
    assert per_device <= total / 8 * 1.1  # every leaf here has an axis 8 divides
    assert bytes_per_device(sharded.opt_state) <= sum(
        x.nbytes for x in jax.tree.leaves(state.opt_state)) / 8 * 1.1
    wte = sharded.params["params"]["wte"]
    assert wte.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)  # 96 x 32: the larger axis
    assert {s.data.shape for s in wte.addressable_shards} == {(12, 32)}
    replicated = parallel.put_tree(state, _steps(CONFIG, 1, parallel.make_mesh(8, 1), "adam")[0].state_sharding)
    assert bytes_per_device(replicated.params) == total


def test_bad_mesh_and_batch_are_clear_errors():
    with pytest.raises(UserError, match="mesh data=3 x fsdp=2 does not match the 8 available devices"):
        parallel.make_mesh(3, 2)
    with pytest.raises(UserError, match="mesh data=0 x fsdp=3 does not match the 8"):
        parallel.make_mesh(-1, 3)
    with pytest.raises(UserError, match="train.batch_size=6 must be divisible by the 8 data shards"):
        parallel.check_batch(6, parallel.make_mesh(4, 2))


def _config(workdir, **fields):
    c = base.get_config()
    c.workdir = str(workdir)
    c.model.name = str(FIXTURES / "openai_tiny")
    c.data.dataset = str(FIXTURES / "make_openai_checkpoint.py")
    c.data.seq_len, c.train.batch_size = 16, 8
    # SGD with momentum: strict float comparisons (Adam amplifies noise in ~0 gradients), and a
    # momentum buffer in the optimizer state that must be resharded too.
    c.train.optimizer, c.train.learning_rate, c.train.momentum = "sgd", 0.05, 0.9
    c.sample.sample_every, c.checkpoint.save_every = 0, 0
    c.mesh.data, c.mesh.fsdp = 1, 8
    for key, value in fields.items():
        section, name = key.split(".")
        setattr(c[section], name, value)
    return c


def test_checkpoint_from_8_devices_restores_on_1_and_continues_identically(tmp_path):
    loop.run(_config(tmp_path / "eight", **{"train.total_steps": 4}))  # reference: 4 steps on 8 devices
    loop.run(_config(tmp_path / "moved", **{"train.total_steps": 2}))  # 2 steps on 8 devices (FSDP), saved
    env = {k: v for k, v in os.environ.items() if k != "GPT2_JAX_MULTIDEVICE"}
    env["XLA_FLAGS"] = FAST_COMPILE_FLAG  # one device
    done = subprocess.run([sys.executable, "launch.py", "--config=experiments/finetune.py",
                           f"--workdir={tmp_path / 'moved'}", f"--config.model.name={FIXTURES / 'openai_tiny'}",
                           f"--config.data.dataset={FIXTURES / 'make_openai_checkpoint.py'}", "--config.data.seq_len=16",
                           "--config.train.batch_size=8", "--config.train.optimizer=sgd",
                           "--config.train.learning_rate=0.05", "--config.train.momentum=0.9",
                           "--config.sample.sample_every=0", "--config.train.total_steps=4"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "restored step 2" in done.stderr + done.stdout
    losses = lambda d: [json.loads(x)["loss"] for x in (d / "logs" / "run1" / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    np.testing.assert_allclose(losses(tmp_path / "moved"), losses(tmp_path / "eight"), rtol=1e-5)
    _, moved = rundir.load_run_params(tmp_path / "moved" / "checkpoint" / "run1")
    _, eight = rundir.load_run_params(tmp_path / "eight" / "checkpoint" / "run1")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), moved, eight)
    assert int(jnp.asarray(moved["params"]["wte"]).shape[0]) == 257


def test_lm_eval_requests_split_over_8_devices_score_as_on_one():
    # gpt2-jax lm-eval: a batch's rows split over the data-parallel mesh (rounded up to a multiple of 8)
    from gpt2_jax.api import load
    from gpt2_jax.harness import GPT2JaxLM, _score

    model = load(FIXTURES / "openai_tiny")
    lm = GPT2JaxLM(model, batch_size=3)
    assert lm.batch_size == 8 and lm.mesh.devices.size == 8
    rng = np.random.default_rng(0)
    requests = [(None, rng.integers(0, 256, 3 + i).tolist(), rng.integers(0, 256, 1 + i % 3).tolist()) for i in range(11)]
    got = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    for (_, context, continuation), (logprob, greedy) in zip(requests, got):
        whole = context + continuation
        tokens, targets = np.asarray([whole[:-1]]), np.asarray([whole[1:]])
        weights = np.zeros(targets.shape, np.float32)
        weights[0, -len(continuation):] = 1
        one = jax.devices()[0]
        lengths = np.asarray([tokens.shape[1]], np.int32)
        ref, ref_greedy = _score(jax.device_put(model.params, one), *(jax.device_put(a, one) for a in
                                                                      (tokens, lengths, targets, weights)),
                                 config=model.config)
        assert logprob == pytest.approx(float(ref[0]), abs=1e-4) and greedy == bool(ref_greedy[0])
