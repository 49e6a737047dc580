"""LoRA (train.lora_rank > 0): exact against peft itself on a tiny random GPT-2, the base frozen with no
gradient or optimizer state, bitwise resume, the merged and the adapter-only exports, the smaller step."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES, hf_logits, tiny_hf_dir
from experiments import base as base_config
from gpt2_jax import loop, parallel, rundir
from gpt2_jax.cli import main as cli_main
from gpt2_jax.errors import UserError
from gpt2_jax.model import GPT2, LORA_TARGETS, add_lora, join_lora, merge_lora, split_lora
from gpt2_jax.steps import build_steps, compile_with_stats
from gpt2_jax.weights import export_peft, export_transformers, load_weights
from test_loop import read_metrics, tiny_config

TOKENS = np.random.default_rng(0).integers(0, 300, (2, 24))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return tiny_hf_dir(tmp_path_factory.mktemp("base"))


def _adapted(hf_dir, targets=LORA_TARGETS, rank=4, alpha=8.0):
    """Our config and params with adapters on `targets`, moved off their init (b is zero there)."""
    config, params = load_weights(hf_dir)
    config = dataclasses.replace(config, lora_rank=rank, lora_alpha=alpha, lora_targets=tuple(targets))
    fresh = add_lora(config, params, jax.random.key(1))
    adapters, frozen = split_lora(fresh)
    keys = iter(jax.random.split(jax.random.key(2), len(jax.tree.leaves(adapters))))
    adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), adapters)
    return config, params, fresh, join_lora(adapters, frozen)


@pytest.mark.parametrize("targets", [("attn.c_attn",), LORA_TARGETS])
def test_our_adapters_and_peft_loading_them_give_the_same_logits_and_merge(targets, hf_dir, tmp_path):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    config, base, fresh, params = _adapted(hf_dir, targets)
    ours = np.asarray(GPT2(config).apply(params, jnp.asarray(TOKENS)))
    # fresh adapters (b = 0, as peft initialises them): exactly the base model
    base_logits = np.asarray(GPT2(dataclasses.replace(config, lora_rank=0)).apply(base, jnp.asarray(TOKENS)))
    np.testing.assert_array_equal(GPT2(config).apply(fresh, jnp.asarray(TOKENS)), base_logits)
    assert np.abs(ours - base_logits).max() > 1e-2  # the moved adapters matter: the comparisons below can fail
    export_peft(config, params, tmp_path / "adapter", str(hf_dir))
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(hf_dir), tmp_path / "adapter").eval()
    np.testing.assert_allclose(hf_logits(peft_model, TOKENS), ours, atol=1e-4, rtol=0)
    # our merge equals peft's merge_and_unload, tensor by tensor
    merged_config, merged = merge_lora(config, params)
    export_transformers(merged_config, merged, hf_dir, tmp_path / "merged")
    theirs = peft_model.merge_and_unload().state_dict()
    from safetensors.numpy import load_file

    exported = load_file(tmp_path / "merged" / "model.safetensors")
    for key, value in exported.items():
        np.testing.assert_allclose(value, theirs[key].numpy(), atol=1e-6, err_msg=key)
    np.testing.assert_allclose(GPT2(merged_config).apply(merged, jnp.asarray(TOKENS)), ours, atol=1e-4, rtol=0)


def _lora_fields(**more):
    return {"train.lora_rank": 4, "train.lora_alpha": 8.0, "train.lora_targets": "attn.c_attn,mlp.c_proj",
            "train.learning_rate": 1e-2, "checkpoint.save_every": 4, "sample.sample_every": 4,
            "sample.sample_length": 4, **more}  # samples during training come from the adapted model


def test_training_moves_only_the_adapters_and_resumes_bitwise(tmp_path):
    dataset = FIXTURES / "make_openai_checkpoint.py"
    loop.run(tiny_config(tmp_path / "straight", dataset, **_lora_fields(**{"train.total_steps": 8})))
    loop.run(tiny_config(tmp_path / "resumed", dataset, **_lora_fields(**{"train.total_steps": 4})))
    loop.run(tiny_config(tmp_path / "resumed", dataset, **_lora_fields(**{"train.total_steps": 8})))
    run = tmp_path / "straight" / "checkpoint" / "run1"
    config, trained = rundir.load_run_params(run, keep_adapters=True)
    _, resumed = rundir.load_run_params(tmp_path / "resumed" / "checkpoint" / "run1", keep_adapters=True)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), trained, resumed)
    assert config.lora_rank == 4 and config.lora_targets == ("attn.c_attn", "mlp.c_proj")
    adapters, frozen = split_lora(trained)
    _, pretrained = load_weights(FIXTURES / "openai_tiny")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), frozen, pretrained)
    assert all(float(jnp.abs(b).max()) > 0 for b in jax.tree.leaves(adapters))  # b started at zero and moved
    assert read_metrics(tmp_path / "straight")[-1]["loss"] < read_metrics(tmp_path / "straight")[0]["loss"]
    assert len(list((tmp_path / "straight" / "samples" / "run1").iterdir())) == 2  # steps 4 and 8


def test_the_exports_of_a_lora_run_are_the_merged_model_and_peft_adapters(tmp_path, capsys):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    loop.run(tiny_config(tmp_path / "w", FIXTURES / "make_openai_checkpoint.py",
                         **_lora_fields(**{"train.total_steps": 3})))
    run = tmp_path / "w" / "checkpoint" / "run1"
    config, params = rundir.load_run_params(run, keep_adapters=True)
    ours = np.asarray(GPT2(config).apply(params, jnp.asarray(TOKENS % 257)))
    cli_main(["export", "--model_dir", str(run), "--out", str(tmp_path / "merged")])
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(hf_logits(merged, TOKENS % 257), ours, atol=1e-4, rtol=0)
    cli_main(["export", "--model_dir", str(run), "--out", str(tmp_path / "adapter"), "--adapter_only"])
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    export_transformers(*load_weights(FIXTURES / "openai_tiny"), FIXTURES / "openai_tiny", tmp_path / "base")
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                                           tmp_path / "adapter").eval()
    np.testing.assert_allclose(hf_logits(peft_model, TOKENS % 257), ours, atol=1e-4, rtol=0)
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a model without adapters
        cli_main(["export", "--model_dir", str(FIXTURES / "openai_tiny"), "--out", str(tmp_path / "x"),
                  "--adapter_only"])
    assert "--adapter_only: " in capsys.readouterr().err


def test_the_lora_step_needs_less_memory_and_keeps_no_state_for_the_base():
    config, _ = load_weights(FIXTURES / "openai_tiny")
    config = dataclasses.replace(config, n_embd=128, n_head=4)  # wide enough that the weights dominate
    train = base_config.get_config().train
    mesh = parallel.make_mesh(1, 1)
    full = build_steps(config, train, mesh)
    lora_config = dataclasses.replace(config, lora_rank=4, lora_targets=LORA_TARGETS)
    train.lora_rank = 4
    lora = build_steps(lora_config, train, mesh)
    state_bytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    adapters = state_bytes(split_lora(lora.abstract_state.params)[0])
    assert state_bytes(lora.abstract_state.opt_state) <= 2 * adapters + 64  # Adam's two moments of the adapters
    assert compile_with_stats(lora, 4, 16)[1]["peak_bytes"] < 0.7 * compile_with_stats(full, 4, 16)[1]["peak_bytes"]


def test_bad_lora_settings_are_one_line_before_anything_compiles(tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text("some text " * 100)
    monkeypatch.setattr(loop.jax, "jit", lambda *a, **k: pytest.fail("compiled before reporting bad input"))
    with pytest.raises(UserError, match="lora_targets=attn.qkv: name one or more of attn.c_attn, "):
        loop.run(tiny_config(tmp_path, tmp_path / "t.txt", **_lora_fields(**{"train.lora_targets": "attn.qkv"})))
    with pytest.raises(UserError, match="lora_rank=-1: must be >= 0"):
        loop.run(tiny_config(tmp_path, tmp_path / "t.txt", **_lora_fields(**{"train.lora_rank": -1})))
