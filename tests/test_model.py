"""The Flax model against transformers' GPT2LMHeadModel and OpenAI's TensorFlow checkpoint."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import FIXTURES, hf_logits, random_hf_model, save_hf_model, write_byte_vocab
from gpt2_jax import model as model_module
from gpt2_jax.errors import UserError
from gpt2_jax.model import (GPT2, REMAT_POLICIES, GPT2Config, attention_implementation, convert_layout, init_cache,
                            init_params, preset, tied_logits, vocab_padding)
from gpt2_jax.train import cross_entropy
from gpt2_jax.weights import load_weights


def _hf_loss(model, tokens: np.ndarray) -> float:
    with torch.no_grad():
        t = torch.tensor(tokens, dtype=torch.long)
        return float(model(t, labels=t).loss)


def _our_loss(config, params, tokens: np.ndarray) -> float:
    logits = GPT2(config).apply(params, jnp.asarray(tokens[:, :-1]))
    return float(jnp.mean(cross_entropy(logits, jnp.asarray(tokens[:, 1:]))))


@pytest.mark.parametrize("size, attention_block", [("tiny", 256), ("tiny", 16), ("124M", 256)])
def test_logits_and_loss_match_transformers(tmp_path, size, attention_block, monkeypatch):
    monkeypatch.setattr(model_module, "ATTENTION_BLOCK", attention_block)  # 16: three blocks of queries
    shape = dict(n_vocab=300, n_ctx=64, n_embd=32, n_head=4, n_layer=2) if size == "tiny" else dict(
        n_vocab=50257, n_ctx=1024, **{k: v for k, v in preset("124M").hparams().items() if k in ("n_embd", "n_head", "n_layer")})
    hf = random_hf_model(**shape)
    config, params = load_weights(save_hf_model(hf, tmp_path))
    assert config.hparams() == shape
    tokens = np.random.default_rng(1).integers(0, shape["n_vocab"], (2, 48))
    ours = np.asarray(GPT2(config).apply(params, jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, hf_logits(hf, tokens), atol=1e-4, rtol=0)
    assert abs(_our_loss(config, params, tokens) - _hf_loss(hf, tokens)) <= 1e-5


@pytest.mark.parametrize("documents", [False, True])
def test_blockwise_attention_equals_jax_attention_and_its_gradients(documents):
    # Blocks of 4 queries over 11 positions: the last block is short, and each meets only the keys
    # up to its own last position; with documents, the mask cuts across the blocks.
    rng = np.random.default_rng(9)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 11, 3, 8)), jnp.float32) for _ in range(3))
    mask = None
    if documents:
        segments = jnp.asarray([[0] * 3 + [1] * 6 + [2] * 2, [0] * 11])
        mask = segments[:, None, :, None] == segments[:, None, None, :]

    def outputs_and_grads(attention, *qkv):
        weighted = lambda *qkv: jnp.sum(attention(*qkv) * jnp.arange(8.0))  # noqa: E731
        return [np.asarray(x) for x in (attention(*qkv), *jax.grad(weighted, argnums=(0, 1, 2))(*qkv))]

    def ours(*qkv, block):
        return model_module.blockwise_attention(*qkv, mask, block=block)

    def jax_attention(*qkv):
        return jax.nn.dot_product_attention(*qkv, mask=mask, is_causal=True, implementation="xla")

    reference = outputs_and_grads(jax_attention, q, k, v)
    for block in (4, 64):  # three blocks; one
        for mine, theirs in zip(outputs_and_grads(functools.partial(ours, block=block), q, k, v), reference):
            np.testing.assert_allclose(mine, theirs, atol=2e-6, rtol=2e-6)


def test_pytorch_bin_layout_loads_the_same(tmp_path):
    hf = random_hf_model(seed=3)
    _, from_bin = load_weights(save_hf_model(hf, tmp_path / "bin", safe=False))
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file()
    _, from_st = load_weights(save_hf_model(hf, tmp_path / "st"))
    jax.tree.map(np.testing.assert_array_equal, from_bin, from_st)


def _hf_from_openai_reference(ref) -> torch.nn.Module:
    """transformers' model filled from the fixture's reference values, mapped here independently."""
    n_layer = 1 + max(int(k.split("/")[1][1:]) for k in ref.files if k.startswith("model/h"))
    n_vocab, n_embd = ref["model/wte"].shape
    hf = random_hf_model(n_vocab=n_vocab, n_ctx=ref["model/wpe"].shape[0], n_embd=n_embd, n_head=2, n_layer=n_layer)
    state = {"transformer.wte.weight": ref["model/wte"], "transformer.wpe.weight": ref["model/wpe"],
             "transformer.ln_f.weight": ref["model/ln_f/g"], "transformer.ln_f.bias": ref["model/ln_f/b"]}
    for i in range(n_layer):
        for ln in ("ln_1", "ln_2"):
            state[f"transformer.h.{i}.{ln}.weight"] = ref[f"model/h{i}/{ln}/g"]
            state[f"transformer.h.{i}.{ln}.bias"] = ref[f"model/h{i}/{ln}/b"]
        for part in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            key = part.replace("/", ".")
            state[f"transformer.h.{i}.{key}.weight"] = ref[f"model/h{i}/{part}/w"][0]
            state[f"transformer.h.{i}.{key}.bias"] = ref[f"model/h{i}/{part}/b"]
    state["lm_head.weight"] = ref["model/wte"]
    missing, _ = hf.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=False)
    assert not [m for m in missing if not m.endswith("attn.bias")]
    return hf


def test_openai_tensorflow_checkpoint_fixture():
    ref = np.load(FIXTURES / "openai_tiny_reference.npz")
    config, params = load_weights(FIXTURES / "openai_tiny")
    p = params["params"]
    np.testing.assert_array_equal(p["h_1"]["attn"]["c_attn"]["kernel"], ref["model/h1/attn/c_attn/w"][0])
    np.testing.assert_array_equal(p["ln_f"]["scale"], ref["model/ln_f/g"])
    hf = _hf_from_openai_reference(ref)
    tokens = np.random.default_rng(2).integers(0, config.n_vocab, (2, config.n_ctx))
    ours = np.asarray(GPT2(config).apply(params, jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, hf_logits(hf, tokens), atol=1e-4, rtol=0)
    assert abs(_our_loss(config, params, tokens) - _hf_loss(hf, tokens)) <= 1e-5


def test_kv_cache_decoding_equals_full_forward():
    config, params = load_weights(FIXTURES / "openai_tiny")
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, config.n_vocab, (3, 20)))
    full = GPT2(config).apply(params, tokens)
    step = jax.jit(lambda p, t, c, s: GPT2(config).apply(p, t, c, s))
    cache = init_cache(config, 3, config.n_ctx)
    logits, cache = step(params, tokens[:, :7], cache, 0)  # prefill a prompt of 7
    rows = [logits]
    for t in range(7, 20):  # then one position at a time
        logits, cache = step(params, tokens[:, t:t + 1], cache, jnp.int32(t))
        rows.append(logits)
    np.testing.assert_allclose(np.concatenate(rows, axis=1), full, atol=1e-5, rtol=0)


def test_bfloat16_compute_runs_close_to_float32():
    config, params = load_weights(FIXTURES / "openai_tiny")
    bf16 = GPT2Config(**config.hparams(), dtype="bfloat16")
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, config.n_vocab, (2, 16)))
    lo = GPT2(bf16).apply(params, tokens)
    hi = GPT2(config).apply(params, tokens)
    assert lo.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(lo)))
    assert float(jnp.max(jnp.abs(lo - hi))) < 0.15 * float(jnp.max(jnp.abs(hi)))
    assert float(jnp.max(jnp.abs(lo - hi))) > 0  # really computed in bfloat16


@pytest.mark.parametrize("policy", sorted(set(REMAT_POLICIES) - {"none"}))
def test_remat_policy_keeps_loss_and_gradients(policy):
    base = GPT2Config(n_vocab=300, n_ctx=32, n_embd=32, n_head=4, n_layer=1)  # remat is per block: one suffices
    params = GPT2(base).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, 300, (2, 17)))

    def loss_and_grads(config):
        def loss(p):
            return jnp.mean(cross_entropy(GPT2(config).apply(p, tokens[:, :-1]), tokens[:, 1:]))
        return jax.jit(jax.value_and_grad(loss))(params)

    ref_loss, ref_grads = loss_and_grads(base)
    loss, grads = loss_and_grads(GPT2Config(**base.hparams(), remat=policy))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads, ref_grads)
    # The policy really is applied: the jaxpr of the gradient holds a checkpoint (remat) primitive.
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(GPT2(GPT2Config(**base.hparams(), remat=policy))
                                                        .apply(p, tokens))))(params))
    assert "remat" in jaxpr or "checkpoint" in jaxpr


def test_scan_layers_matches_unrolled_blocks():
    unrolled = GPT2Config(n_vocab=300, n_ctx=32, n_embd=32, n_head=4, n_layer=3)
    scanned = GPT2Config(**unrolled.hparams(), scan_layers=True, remat="save_attn")
    params, stacked = init_params(unrolled, jax.random.key(0)), init_params(scanned, jax.random.key(0))
    assert stacked["params"]["h"]["attn"]["c_attn"]["kernel"].shape == (3, 32, 96) and "h_0" not in stacked["params"]
    jax.tree.map(np.testing.assert_array_equal, convert_layout(stacked, False), params)  # same draw, either layout
    jax.tree.map(np.testing.assert_array_equal, convert_layout(params, True), stacked)
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, 300, (2, 17)))
    full = jax.jit(GPT2(unrolled).apply)(params, tokens)
    np.testing.assert_allclose(jax.jit(GPT2(scanned).apply)(stacked, tokens), full, atol=1e-5, rtol=0)
    # the stacked cache: prefill 9 positions, then one at a time
    cache = init_cache(scanned, 2, 32)
    assert cache["k"].shape == (3, 2, 4, 32, 8)  # [n_layer, B, N, S, H]
    step = jax.jit(GPT2(scanned).apply)
    logits, cache = step(stacked, tokens[:, :9], cache, jnp.int32(0))
    rows = [logits]
    for t in range(9, 17):
        logits, cache = step(stacked, tokens[:, t:t + 1], cache, jnp.int32(t))
        rows.append(logits)
    np.testing.assert_allclose(np.concatenate(rows, axis=1), full, atol=1e-5, rtol=0)

    def grads(config, p):
        loss = lambda p: jnp.mean(cross_entropy(GPT2(config).apply(p, tokens[:, :-1]), tokens[:, 1:]))  # noqa: E731
        return jax.jit(jax.grad(loss))(p)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
                 convert_layout(grads(scanned, stacked), False), grads(unrolled, params))


def test_vocab_padding_auto_pads_only_on_accelerators():
    assert [vocab_padding(0, backend) for backend in ("cpu", "gpu", "tpu")] == [1, 128, 128]
    assert vocab_padding(1, "gpu") == 1 and vocab_padding(64, "cpu") == 64
    assert GPT2Config().vocab_multiple == 0  # auto by default


def test_attention_setting_picks_cudnn_only_where_it_runs():
    assert attention_implementation("auto", jnp.bfloat16, "gpu") == "cudnn"
    assert attention_implementation("auto", jnp.float32, "gpu") == "xla"  # cuDNN's kernel has no float32
    assert attention_implementation("auto", jnp.bfloat16, "cpu") == "xla"
    assert attention_implementation("xla", jnp.bfloat16, "gpu") == "xla"
    config = GPT2Config(n_vocab=300, n_ctx=32, n_embd=64, n_head=1, n_layer=1, dtype="bfloat16")
    params = init_params(config, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(8).integers(0, 300, (2, 32)))
    cudnn = GPT2Config(**config.hparams(), dtype="bfloat16", attention="cudnn")
    if jax.default_backend() == "gpu":  # the fused kernel gives XLA's logits
        xla = GPT2(GPT2Config(**config.hparams(), dtype="bfloat16", attention="xla")).apply(params, tokens)
        np.testing.assert_allclose(GPT2(cudnn).apply(params, tokens), xla, atol=5e-2, rtol=0)
    else:
        with pytest.raises(UserError, match="model.attention=cudnn: cuDNN's fused attention is not available here"):
            GPT2(cudnn).apply(params, tokens)


def test_presets_match_released_sizes():
    counts = {name: preset(name).num_params() for name in ("124M", "355M", "774M", "1558M")}
    assert counts == {"124M": 124_439_808, "355M": 354_823_168, "774M": 774_030_080, "1558M": 1_557_611_200}
    config = preset("124M")
    shapes = jax.eval_shape(lambda: GPT2(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == counts["124M"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tied_logits_backward_matmuls_run_in_the_compute_dtype(dtype):
    # Autodiff of the float32-accumulated logits would make the backward matmuls float32 x bf16; ours
    # rounds the cotangent first, so every matmul takes two operands of the compute dtype, and the
    # gradients are autodiff's (exactly in float32, to bf16 rounding in bf16).
    rng = np.random.default_rng(0)
    hidden32 = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    wte = jnp.asarray(rng.normal(size=(40, 16)) * 0.2, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 40, (2, 5)))

    def loss(hidden, w, logits_of):
        return jnp.mean(cross_entropy(logits_of(hidden, w), labels))

    def autodiff_logits(hidden, w):
        return jnp.einsum("btc,vc->btv", hidden.astype(jnp.float32), w)

    hidden = hidden32.astype(dtype)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    lowered = grad.lower(hidden, wte, lambda h, w: tied_logits(h, w, 8)).as_text()
    operands = re.findall(r"dot_general.*: \(tensor<[0-9x]*x(\w+)>, tensor<[0-9x]*x(\w+)>\)", lowered)
    short = {"float32": "f32", "bfloat16": "bf16"}[dtype]
    assert len(operands) == 3 and all(a == b == short for a, b in operands), operands
    ours = grad(hidden, wte, lambda h, w: tied_logits(h, w, 8))
    reference = grad(hidden32, wte, autodiff_logits)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == "float32" else dict(rtol=0.05, atol=2e-3)
    np.testing.assert_allclose(np.asarray(ours[0], np.float32), reference[0], **tol)
    np.testing.assert_allclose(ours[1], reference[1], **tol)


def test_bad_config_values_are_clear():
    with pytest.raises(UserError, match="remat='bogus'.*full"):
        GPT2Config(remat="bogus")
    with pytest.raises(UserError, match="n_embd=30 is not divisible by n_head=4"):
        GPT2Config(n_embd=30, n_head=4)
    with pytest.raises(UserError, match="attention='flash': use one of auto, xla, cudnn"):
        GPT2Config(attention="flash")
    with pytest.raises(UserError, match="vocab_multiple=-1: must be >= 0"):
        GPT2Config(vocab_multiple=-1)
    with pytest.raises(UserError, match="unknown model size '2B'"):
        preset("2B")


def test_write_byte_vocab_helper_makes_a_loadable_dir(tmp_path):
    # The helper other tests use to turn a saved transformers model into a full model directory.
    from gpt2_jax import load

    save_hf_model(random_hf_model(), tmp_path)
    write_byte_vocab(tmp_path, 300)
    model = load(tmp_path)
    assert model.encoder.eot_token == 299 and model.config.n_vocab == 300
