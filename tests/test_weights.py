"""Weights in and out: export to transformers, and clear errors for broken model directories."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES, hf_logits, random_hf_model, save_hf_model, write_byte_vocab
from gpt2_jax import load
from gpt2_jax.errors import UserError
from gpt2_jax.model import GPT2, GPT2Config, init_params
from gpt2_jax.weights import export_transformers, load_weights


def test_export_loads_in_transformers_with_the_same_logits(tmp_path, gpt2_vocab_dir):
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

    config = GPT2Config(n_vocab=50257, n_ctx=64, n_embd=32, n_head=4, n_layer=2, scan_layers=True)  # stacked blocks
    params = init_params(config, jax.random.key(1))
    # Move every tensor off its init value (LayerNorm ones, zero biases) so a dropped one shows.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    out = export_transformers(config, params, gpt2_vocab_dir, tmp_path / "export")
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert len(set(modes.values())) == 1, modes  # the weights as readable as the other files (safetensors: 0600)
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    tokens = np.random.default_rng(0).integers(0, 50257, (2, 40))
    np.testing.assert_allclose(hf_logits(hf, tokens), GPT2(config).apply(params, jnp.asarray(tokens)), atol=1e-4, rtol=0)
    tokenizer = GPT2TokenizerFast.from_pretrained(out)
    assert tokenizer.encode("Hello world") == [15496, 995]
    # and the exported directory is itself a model directory here
    jax.tree.map(np.testing.assert_array_equal, load(out, scan_layers=True).params, params)
    unrolled = load(out)
    assert "h_1" in unrolled.params["params"] and not unrolled.config.scan_layers


def test_export_cli_from_openai_layout(tmp_path, capsys):
    from gpt2_jax.cli import main

    main(["export", "--model_dir", str(FIXTURES / "openai_tiny"), "--out", str(tmp_path / "hf")])
    assert "GPT2LMHeadModel.from_pretrained" in capsys.readouterr().out
    _, a = load_weights(FIXTURES / "openai_tiny")
    _, b = load_weights(tmp_path / "hf")
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture
def hf_dir(tmp_path):
    directory = save_hf_model(random_hf_model(), tmp_path / "model")
    write_byte_vocab(directory, 300)
    return directory


def test_missing_tensor_is_named(hf_dir):
    tensors = load_file(hf_dir / "model.safetensors")
    key = next(k for k in tensors if k.endswith("h.1.mlp.c_fc.weight"))
    del tensors[key]
    save_file(tensors, hf_dir / "model.safetensors")
    with pytest.raises(UserError, match="tensor model/h1/mlp/c_fc/w / h.1.mlp.c_fc.weight is missing"):
        load_weights(hf_dir)


def test_wrong_shape_names_tensor_and_both_shapes(hf_dir):
    tensors = load_file(hf_dir / "model.safetensors")
    key = next(k for k in tensors if k.endswith("h.0.attn.c_proj.weight"))
    tensors[key] = np.zeros((32, 31), np.float32)
    save_file(tensors, hf_dir / "model.safetensors")
    with pytest.raises(UserError, match=r"h.0.attn.c_proj.weight has shape \[32, 31\] .* needs \[32, 32\]"):
        load_weights(hf_dir)


def test_vocab_size_mismatch_with_config(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    config["vocab_size"] = 50257
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"wte.weight has shape \[300, 32\] .*n_vocab=50257.* needs \[50257, 32\]"):
        load_weights(hf_dir)


def test_vocabulary_larger_than_the_model(hf_dir, gpt2_vocab_dir):
    shutil.copyfile(gpt2_vocab_dir / "encoder.json", hf_dir / "encoder.json")
    shutil.copyfile(gpt2_vocab_dir / "vocab.bpe", hf_dir / "vocab.bpe")
    with pytest.raises(UserError, match="the vocabulary has 50257 tokens but the model only n_vocab=300"):
        load(hf_dir)


def test_openai_layout_errors(tmp_path):
    shutil.copytree(FIXTURES / "openai_tiny", tmp_path / "m")
    hparams = json.loads((tmp_path / "m" / "hparams.json").read_text())
    del hparams["n_head"]
    (tmp_path / "m" / "hparams.json").write_text(json.dumps(hparams))
    with pytest.raises(UserError, match="hparams.json: missing key\\(s\\) n_head"):
        load_weights(tmp_path / "m")
    shutil.copyfile(FIXTURES / "openai_tiny" / "hparams.json", tmp_path / "m" / "hparams.json")
    data = tmp_path / "m" / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:1000])  # a cut download
    with pytest.raises(UserError, match="the file is truncated or corrupt"):
        load_weights(tmp_path / "m")
    data.unlink()
    with pytest.raises(UserError, match="missing checkpoint data file"):
        load_weights(tmp_path / "m")


def test_unknown_directory_lists_layouts(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="Known layouts: gpt2-jax training run .*; OpenAI release .*; transformers"):
        load_weights(tmp_path)


def _cache_as_the_hub_writes_it(cache, repo: str, source) -> None:
    """models--ORG--NAME/{blobs/<sha>, snapshots/<commit>/<file> -> ../../blobs/<sha>, refs/main}."""
    import hashlib

    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    (folder / "blobs").mkdir(parents=True)
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    names = {"encoder.json": "vocab.json", "vocab.bpe": "merges.txt"}  # transformers' names for the vocabulary
    for f in source.iterdir():
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, folder / "blobs" / blob)
        (folder / "snapshots" / commit / names.get(f.name, f.name)).symlink_to(f"../../blobs/{blob}")


def test_hub_ids_resolve_through_the_local_hub_cache_only(hf_dir, tmp_path, monkeypatch):
    from gpt2_jax.cli import main

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _cache_as_the_hub_writes_it(tmp_path / "hub", "gpt2", hf_dir)  # the short cache name
    _cache_as_the_hub_writes_it(tmp_path / "hub", "openai-community/gpt2-medium", hf_dir)  # the long one
    reference = load(hf_dir)
    tokens = np.arange(10)
    for name in ("gpt2", "openai-community/gpt2", "gpt2-medium", "openai-community/gpt2-medium"):
        model = load(name)
        np.testing.assert_array_equal(model.logits(tokens), reference.logits(tokens))
        assert model.encoder.encode("hub") == reference.encoder.encode("hub")
    with pytest.raises(UserError, match=r"gpt2-large: not in the local Hugging Face cache \(.*hub\); get it with "
                                        r"`huggingface-cli download openai-community/gpt2-large` \(or "
                                        r"`gpt2-jax download 774M`"):
        load("gpt2-large")
    with pytest.raises(SystemExit) as exit_info:  # the command line too: one line, exit 2
        main(["sample", "--model_dir", "openai-community/gpt2-xl", "--length", "2"])
    assert exit_info.value.code == 2
    from experiments import base
    from gpt2_jax.resolve import model_config_of

    c = base.get_config()
    c.model.name = "gpt2"  # model.name takes hub ids as well
    assert model_config_of(c).n_layer == reference.config.n_layer
