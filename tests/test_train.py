"""The pure train step and the optax chains: accumulation, remat, freezing, noise, optimizers, schedules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import base
from gpt2_jax.errors import UserError
from gpt2_jax.model import GPT2, GPT2Config, init_params
from gpt2_jax.optim import decay_mask, make_optimizer
from gpt2_jax.schedules import learning_rate_schedule
from gpt2_jax.objectives import Examples, NextToken
from gpt2_jax.train import TrainState, add_noise, cross_entropy, global_norm, loss_fn, make_train_step

CONFIG = GPT2Config(n_vocab=97, n_ctx=16, n_embd=32, n_head=4, n_layer=2)


def _train_cfg(**overrides):
    train = base.get_config().train
    train.learning_rate = 1e-2
    for k, v in overrides.items():
        setattr(train, k, v)
    return train


def _batch(rows: int, seed: int = 0) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).integers(0, CONFIG.n_vocab, (rows, CONFIG.n_ctx + 1)), jnp.int32)


def _run(train, steps: int, batch, config=CONFIG, accumulate: int = 1):
    params = init_params(config, jax.random.key(0))
    optimizer = make_optimizer(train, params)
    objective = (Examples if isinstance(batch, tuple) else NextToken)(noise=train.noise)  # weighted: examples
    step = jax.jit(make_train_step(config, optimizer, learning_rate_schedule(train), objective, accumulate=accumulate))
    state, history = TrainState.create(params, optimizer), []
    for i in range(steps):
        state, metrics = step(state, batch, jax.random.key(i))
        history.append(metrics)
    return state, history


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_accumulating_k_micro_batches_equals_one_big_batch(optimizer):
    batch = _batch(8)
    big, big_m = _run(_train_cfg(optimizer=optimizer), 2, batch)
    acc, acc_m = _run(_train_cfg(optimizer=optimizer), 2, batch, accumulate=4)
    np.testing.assert_allclose(acc_m[0]["loss"], big_m[0]["loss"], rtol=1e-6)
    # Adam divides by sqrt(v): where a gradient is ~0 its float noise is amplified, so allow 1% of one step.
    atol = 2e-6 if optimizer == "sgd" else 1e-4
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol, rtol=1e-5), acc.params, big.params)


def test_accumulating_weighted_examples_equals_one_big_batch():
    # Prompt/completion batches: the micro-batches hold different numbers of target tokens, yet the
    # accumulated loss and update are the whole batch's mean over its targets.
    tokens = _batch(8)
    weights = (np.random.default_rng(1).random((8, CONFIG.n_ctx + 1)) < np.linspace(0.1, 0.9, 8)[:, None])
    batch = (tokens, jnp.asarray(weights, jnp.float32))
    big, big_m = _run(_train_cfg(optimizer="sgd"), 2, batch)
    acc, acc_m = _run(_train_cfg(optimizer="sgd"), 2, batch, accumulate=4)
    expected = float(loss_fn(init_params(CONFIG, jax.random.key(0)), batch, jax.random.key(0), CONFIG))
    np.testing.assert_allclose([acc_m[0]["loss"], big_m[0]["loss"]], expected, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5), acc.params, big.params)


def test_accumulation_works_together_with_remat():
    # SGD, not Adam: Adam's first steps move every weight by about the learning rate whatever the size of
    # its gradient, so the key biases (whose exact gradient is zero: softmax ignores a constant shift)
    # would move by their gradients' rounding noise, which differs with the order of the float sums.
    batch = _batch(6)
    plain, _ = _run(_train_cfg(optimizer="sgd"), 2, batch, accumulate=3)
    remat, _ = _run(_train_cfg(optimizer="sgd"), 2, batch, config=GPT2Config(**CONFIG.hparams(), remat="full"),
                    accumulate=3)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), remat.params, plain.params)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_only_train_transformer_layers_freezes_everything_else_bitwise(scan_layers):
    config = GPT2Config(**CONFIG.hparams(), scan_layers=scan_layers)
    start = init_params(config, jax.random.key(0))["params"]
    state, _ = _run(_train_cfg(only_train_transformer_layers=True, optimizer="adamw"), 3, _batch(4), config=config)
    p = state.params["params"]
    for name in ("wte", "wpe"):
        np.testing.assert_array_equal(p[name], start[name])
    jax.tree.map(np.testing.assert_array_equal, p["ln_f"], start["ln_f"])
    block = "h" if scan_layers else "h_0"
    assert not np.array_equal(p[block]["attn"]["c_attn"]["kernel"], start[block]["attn"]["c_attn"]["kernel"])


def test_noise_replaces_inputs_and_leaves_targets_alone():
    tokens = _batch(64)
    noisy = add_noise(tokens, jax.random.key(3), 0.25, CONFIG.n_vocab)
    changed = float(jnp.mean(noisy != tokens))
    assert 0.2 < changed < 0.3  # 0.25 less the 1/97 chance of drawing the same id, give or take 4 sigma
    params = init_params(CONFIG, jax.random.key(0))
    key = jax.random.key(4)
    got = loss_fn(params, tokens, key, CONFIG, noise=0.25)
    noisy_inputs = add_noise(tokens[:, :-1], key, 0.25, CONFIG.n_vocab)
    logits = GPT2(CONFIG).apply(params, noisy_inputs)
    clean_targets = jnp.mean(cross_entropy(logits, tokens[:, 1:]))
    noisy_targets = jnp.mean(cross_entropy(logits, add_noise(tokens, key, 0.25, CONFIG.n_vocab)[:, 1:]))
    np.testing.assert_allclose(got, clean_targets, rtol=1e-6)
    assert abs(float(got) - float(noisy_targets)) > 1e-3


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.5), ("adam", 1e-2), ("adamw", 1e-2)])
def test_every_optimizer_trains(optimizer, lr):
    _, history = _run(_train_cfg(optimizer=optimizer, learning_rate=lr, momentum=0.9 if optimizer == "sgd" else 0.0),
                      25, _batch(4))
    assert float(history[-1]["loss"]) < float(history[0]["loss"]) - 0.3


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])  # adamw: Adam flattened, its weight decay not
def test_a_flat_optimizer_state_trains_like_the_per_parameter_one(optimizer):
    settings = dict(optimizer=optimizer, momentum=0.9 if optimizer == "sgd" else 0.0, grad_clip=1.0,
                    lr_schedule="cosine", warmup_steps=1, total_steps=4, weight_decay=0.1)
    tree, _ = _run(_train_cfg(**settings), 3, _batch(4))
    flat, _ = _run(_train_cfg(**settings, flat_optimizer=True), 3, _batch(4))
    if optimizer == "sgd":  # the same update, element by element
        jax.tree.map(np.testing.assert_array_equal, flat.params, tree.params)
    else:  # XLA fuses Adam's sqrt and division differently over one vector: rounding, which Adam amplifies
        # where a gradient is ~0 (see the accumulation test), so allow 1% of one step there
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5), flat.params, tree.params)
    moments = [x for x in jax.tree.leaves(flat.opt_state) if x.ndim == 1 and x.size > 1000]
    n_params = sum(x.size for x in jax.tree.leaves(flat.params))
    assert moments and all(m.size == n_params for m in moments)  # one vector per moment, not one per parameter


def test_schedules_produce_the_configured_learning_rates():
    cosine = learning_rate_schedule(_train_cfg(learning_rate=1.0, lr_schedule="cosine", warmup_steps=10,
                                               total_steps=110, min_lr_ratio=0.1))
    assert [float(cosine(s)) for s in (0, 5, 10)] == pytest.approx([0.0, 0.5, 1.0])
    assert float(cosine(60)) == pytest.approx(0.55, abs=1e-6)  # halfway down the cosine
    assert float(cosine(110)) == pytest.approx(0.1) and float(cosine(500)) == pytest.approx(0.1)
    linear = learning_rate_schedule(_train_cfg(learning_rate=2.0, lr_schedule="linear", decay_steps=100))
    assert [float(linear(s)) for s in (0, 50, 100)] == pytest.approx([2.0, 1.1, 0.2])
    constant = learning_rate_schedule(_train_cfg(learning_rate=3e-4))
    assert float(constant(12345)) == pytest.approx(3e-4)
    # and the step reports the rate it used
    _, history = _run(_train_cfg(learning_rate=1.0, lr_schedule="cosine", warmup_steps=2, total_steps=4,
                                 optimizer="sgd"), 3, _batch(2))
    assert [float(m["learning_rate"]) for m in history] == pytest.approx([0.0, 0.5, 1.0])


def test_weight_decay_skips_biases_layernorm_and_embeddings():
    mask = decay_mask(init_params(CONFIG, jax.random.key(0)))["params"]
    assert mask["h_0"]["mlp"]["c_fc"]["kernel"] is True
    assert mask["h_0"]["mlp"]["c_fc"]["bias"] is False
    assert mask["h_0"]["ln_1"]["scale"] is False and mask["wte"] is False and mask["wpe"] is False


def test_gradient_clipping_bounds_the_update():
    params = init_params(CONFIG, jax.random.key(0))
    optimizer = make_optimizer(_train_cfg(optimizer="sgd", learning_rate=1.0, grad_clip=0.01), params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    assert float(global_norm(updates)) == pytest.approx(0.01, rel=1e-4)


def test_bad_optimizer_settings():
    with pytest.raises(UserError, match="train.optimizer='lion'"):
        make_optimizer(_train_cfg(optimizer="lion"), init_params(CONFIG, jax.random.key(0)))
    with pytest.raises(UserError, match="train.lr_schedule='step'"):
        learning_rate_schedule(_train_cfg(lr_schedule="step"))
    with pytest.raises(UserError, match="needs train.decay_steps"):
        learning_rate_schedule(_train_cfg(lr_schedule="cosine", warmup_steps=10, total_steps=0))


def test_mixed_precision_keeps_float32_weights_and_optimizer_state():
    bf16 = GPT2Config(**CONFIG.hparams(), dtype="bfloat16")
    state, history = _run(_train_cfg(), 3, _batch(4), config=bf16)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == {jnp.dtype("float32")}
    assert history[0]["loss"].dtype == jnp.float32
    assert float(history[-1]["loss"]) < float(history[0]["loss"])


@pytest.mark.parametrize("chunk, vocab_multiple", [(7, 1), (64, 128), (0, 128)])  # 7: a ragged last chunk
def test_chunked_and_padded_losses_equal_the_plain_loss_and_gradients(chunk, vocab_multiple):
    params = init_params(CONFIG, jax.random.key(0))
    tokens = _batch(3)
    full = jax.value_and_grad(loss_fn)(params, tokens, jax.random.key(0), CONFIG)
    # the logits matmul over 128 rows (97 real, 31 zero padding), whole or in chunks
    padded = GPT2Config(**CONFIG.hparams(), vocab_multiple=vocab_multiple)
    chunked = jax.value_and_grad(loss_fn)(params, tokens, jax.random.key(0), padded, 0.0, chunk)
    if vocab_multiple > 1:
        assert GPT2(padded).apply(params, tokens).shape[-1] == CONFIG.n_vocab
        jaxpr = str(jax.make_jaxpr(lambda p: GPT2(padded).apply(p, tokens))(params))
        assert "f32[3,17,128] = dot_general" in jaxpr  # the logits matmul really runs padded
    np.testing.assert_allclose(chunked[0], full[0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5), chunked[1], full[1])


@pytest.mark.parametrize("scan_layers, loss_chunk", [(False, 0), (True, 8)])
def test_a_packed_window_scores_each_document_as_if_it_were_alone(scan_layers, loss_chunk):
    # data.document_mask: a window [B, T+1] packing documents split at end-of-text ids. Its mean loss
    # times the T scored positions must equal the summed losses of each document run by itself from
    # position 0 (an end-of-text id opens its document, as it opens an unconditional sample).
    eot = 99
    config = GPT2Config(n_vocab=100, n_ctx=32, n_embd=32, n_head=4, n_layer=2, scan_layers=scan_layers)
    params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    window = rng.integers(0, eot, (2, 25))
    window[0, [6, 15]] = eot  # row 0: the tail of a document, then two whole ones
    window[1, 0] = eot  # row 1: one document from its start
    inputs, targets = window[:, :-1], window[:, 1:]
    packed = loss_fn(params, jnp.asarray(window), jax.random.key(1), config, loss_chunk=loss_chunk, document_eot=eot)
    alone = 0.0
    forward = jax.jit(lambda x: GPT2(config).apply(params, x))  # one shape: later padding never reaches earlier positions
    for row in range(2):
        starts = [0] + [t for t in range(1, 24) if inputs[row, t] == eot] + [24]
        for a, b in zip(starts, starts[1:]):
            document = np.zeros((1, 24), np.int32)
            document[0, :b - a] = inputs[row, a:b]
            logits = forward(jnp.asarray(document))[:, :b - a]
            alone += float(jnp.sum(cross_entropy(logits, jnp.asarray(targets[row:row + 1, a:b]))))
    np.testing.assert_allclose(float(packed) * inputs.size, alone, rtol=1e-5)
    unmasked = loss_fn(params, jnp.asarray(window), jax.random.key(1), config, loss_chunk=loss_chunk)
    assert abs(float(unmasked) * inputs.size - alone) > 1e-3  # without the mask, documents see each other


def test_the_weights_average_follows_its_formula_in_float32():
    train = _train_cfg(optimizer="sgd")
    params = init_params(CONFIG, jax.random.key(0))
    optimizer = make_optimizer(train, params)
    step = jax.jit(make_train_step(CONFIG, optimizer, learning_rate_schedule(train), NextToken(), ema_decay=0.75))
    state = TrainState.create(params, optimizer, ema=True)
    expected = jax.tree.map(lambda p: np.asarray(p, np.float32), params)  # the average starts at the weights
    for i in range(3):
        state, _ = step(state, _batch(4, seed=i), jax.random.key(i))
        expected = jax.tree.map(lambda e, p: np.float32(0.75) * e + np.float32(0.25) * np.asarray(p), expected,
                                state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-7), state.ema, expected)
    assert not np.allclose(np.asarray(state.ema["params"]["wte"]), np.asarray(state.params["params"]["wte"]))


def test_a_run_validates_its_average_and_export_and_sample_read_it(tmp_path, capsys):
    import json

    from conftest import FIXTURES
    from test_loop import read_metrics, tiny_config

    from gpt2_jax import loop
    from gpt2_jax.cli import main as cli_main
    from gpt2_jax.errors import UserError
    from gpt2_jax.rundir import load_run_params
    from gpt2_jax.weights import load_weights

    dataset = FIXTURES / "make_openai_checkpoint.py"
    loop.run(tiny_config(tmp_path, dataset, **{"train.ema_decay": 0.5, "train.total_steps": 4, "data.val_every": 2,
                                               "data.val_batch_count": 2}))
    validated = [r for r in read_metrics(tmp_path) if "val_loss" in r]
    assert [r["step"] for r in validated] == [0, 2, 4] and validated[0]["val_loss_ema"] == validated[0]["val_loss"]
    assert validated[-1]["val_loss_ema"] != validated[-1]["val_loss"]
    run = tmp_path / "checkpoint" / "run1"
    _, ema = load_run_params(run, ema=True)
    _, weights = load_run_params(run)
    assert not np.array_equal(np.asarray(ema["params"]["wte"]), np.asarray(weights["params"]["wte"]))
    cli_main(["export", "--model_dir", str(run), "--out", str(tmp_path / "ema"), "--ema"])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 load_weights(tmp_path / "ema")[1], ema)
    capsys.readouterr()
    cli_main(["sample", "--model_dir", str(run), "--ema", "--length", "3", "--seed", "0", "--json"])
    assert len(json.loads(capsys.readouterr().out.splitlines()[0])["tokens"]) <= 3
    loop.run(tiny_config(tmp_path / "plain", dataset, **{"train.total_steps": 1}))
    with pytest.raises(UserError, match="trained without train.ema_decay, so its checkpoints hold no moving average"):
        load_weights(tmp_path / "plain" / "checkpoint" / "run1", ema=True)
    with pytest.raises(UserError, match="--ema: .* is not a gpt2-jax training run"):
        load_weights(FIXTURES / "openai_tiny", ema=True)
