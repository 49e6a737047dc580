"""Evaluation: loss and perplexity over consecutive windows, against transformers' loss."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import FIXTURES, random_hf_model, save_hf_model, write_byte_vocab
from gpt2_jax import load
from gpt2_jax.cli import main
from gpt2_jax.data import load_dataset
from gpt2_jax.evaluate import evaluate, windows


def test_windows_predict_every_token_once():
    tokens = np.arange(1, 12)
    inputs, targets, weights = windows(tokens, 4)
    assert inputs.shape == (3, 4)
    predicted = targets[weights > 0]
    np.testing.assert_array_equal(predicted, tokens[1:])
    np.testing.assert_array_equal(inputs[weights > 0], tokens[:-1])


def test_evaluate_equals_transformers_loss(tmp_path):
    hf = random_hf_model(n_vocab=300, n_ctx=16, seed=11)
    directory = save_hf_model(hf, tmp_path / "m")
    write_byte_vocab(directory, 300)
    (tmp_path / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 3)
    (tmp_path / "b.txt").write_text("Pack my box with five dozen liquor jugs.")
    model = load(directory)
    chunks = load_dataset(tmp_path / "*.txt", model.encoder, progress=False)
    tokens = np.concatenate(chunks)
    assert 299 in tokens.tolist()  # files are joined by the end-of-text id
    result = evaluate(model.config, model.params, chunks, batch_size=3, progress=False)
    # Reference: transformers' summed loss over the same consecutive windows of 16.
    total, count = 0.0, 0
    for start in range(0, len(tokens) - 1, 16):
        piece = torch.tensor(tokens[start:start + 17].astype(np.int64))[None]
        with torch.no_grad():
            logits = hf(piece[:, :-1]).logits[0]
        total += torch.nn.functional.cross_entropy(logits, piece[0, 1:], reduction="sum").item()
        count += piece.shape[1] - 1
    assert result.tokens == count == len(tokens) - 1
    assert result.loss == pytest.approx(total / count, abs=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))


@pytest.mark.parametrize("stride", [4, 7, 12])
def test_a_stride_scores_as_transformers_sliding_window_guide(stride, tmp_path):
    # transformers' perplexity guide: windows of max_length tokens every `stride`, labels -100 on all but
    # the targets no earlier window scored. Ours with window W is the guide with max_length W + 1.
    hf = random_hf_model(n_vocab=300, n_ctx=16, seed=12)
    directory = save_hf_model(hf, tmp_path / "m")
    write_byte_vocab(directory, 300)
    (tmp_path / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 3)
    model = load(directory)
    chunks = load_dataset(tmp_path / "a.txt", model.encoder, progress=False)
    tokens = torch.tensor(np.concatenate(chunks).astype(np.int64))[None]
    result = evaluate(model.config, model.params, chunks, window=12, stride=stride, batch_size=4, progress=False)
    total, count, previous_end = 0.0, 0, 0
    for begin in range(0, tokens.shape[1], stride):
        end = min(begin + 13, tokens.shape[1])
        ids = tokens[:, begin:end]
        labels = ids.clone()
        labels[:, :-(end - previous_end)] = -100
        with torch.no_grad():
            loss = hf(ids, labels=labels).loss.item()
        n = int((labels[0, 1:] != -100).sum())
        total, count, previous_end = total + loss * n, count + n, end
        if end == tokens.shape[1]:
            break
    assert result.tokens == count == tokens.shape[1] - 1
    assert result.loss == pytest.approx(total / count, abs=1e-5)
    if stride < 12:  # overlapping windows: more context, another (here: a different) figure
        assert result.loss != pytest.approx(evaluate(model.config, model.params, chunks, window=12,
                                                     progress=False).loss, abs=1e-6)


def test_evaluate_cli_bad_stride_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--model_dir", str(FIXTURES / "openai_tiny"), "--dataset",
              str(FIXTURES / "make_openai_checkpoint.py"), "--window", "8", "--stride", "9"])
    assert e.value.code == 2 and "--stride=9: must be between 1 and the window (8)" in capsys.readouterr().err


def test_evaluate_cli_json(capsys):
    main(["evaluate", "--model_dir", str(FIXTURES / "openai_tiny"), "--dataset", str(FIXTURES / "make_openai_checkpoint.py"),
          "--json", "--batch_size", "4"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == {"loss", "perplexity", "tokens"}
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["tokens"] == len((FIXTURES / "make_openai_checkpoint.py").read_bytes()) - 1


def test_evaluate_cli_bad_dataset_exit_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--model_dir", str(FIXTURES / "openai_tiny"), "--dataset", str(tmp_path / "none*.txt")])
    assert e.value.code == 2 and "no file matches" in capsys.readouterr().err
