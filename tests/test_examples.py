"""Prompt/completion examples (.jsonl): the loss on the completions only, exact against transformers with
labels -100 outside them; packing, truncation, bad lines, training and `gpt2-jax evaluate` on them."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import tiny_hf_dir
from gpt2_jax import loop, rundir
from gpt2_jax.cli import main as cli_main
from gpt2_jax.data import read_examples, layout_examples
from gpt2_jax.encoder import get_encoder
from gpt2_jax.errors import UserError
from gpt2_jax.evaluate import evaluate_examples
from gpt2_jax.train import loss_fn
from gpt2_jax.weights import load_weights
from test_loop import read_metrics, tiny_config

EXAMPLES = [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}, {"prompt": "Say hi:", "completion": " hi there"},
            {"text": "plain text, every token a target"}, {"prompt": "", "completion": "no prompt at all"},
            {"prompt": "a long prompt " * 4, "completion": " short"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """transformers' random GPT-2 with a byte-level vocabulary (end-of-text id 299), and its weights."""
    return tiny_hf_dir(tmp_path_factory.mktemp("model"))


def _write(path, lines) -> None:
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))


def _hf_masked_sum(model, ids: list[int], n_ignored: int) -> tuple[float, int]:
    """transformers' summed loss of one example: labels -100 on its first n_ignored tokens."""
    labels = torch.tensor([[-100] * n_ignored + ids[n_ignored:]])
    with torch.no_grad():
        out = model(torch.tensor([ids]), labels=labels)
    count = int((labels[0, 1:] != -100).sum())
    return float(out.loss) * count, count


def test_the_masked_loss_equals_transformers_with_labels_outside_the_completion(model_dir, tmp_path):
    from transformers import GPT2LMHeadModel

    _write(tmp_path / "ex.jsonl", EXAMPLES)
    encoder = get_encoder(model_dir)
    hf = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    for example in EXAMPLES:  # each example: end-of-text, prompt, completion, end-of-text
        prompt = encoder.encode(example.get("prompt", ""))
        rest = encoder.encode(example.get("completion", example.get("text", "")))
        ids = [299] + prompt + rest + [299]
        s, n = _hf_masked_sum(hf, ids, 1 + len(prompt))
        total, count = total + s, count + n
    reference = total / count
    config, params = load_weights(model_dir)
    rows = layout_examples(read_examples(tmp_path / "ex.jsonl", encoder), 64, encoder.eot_token, pack=False)
    assert rows.count == 5 and rows.truncated == 0 and int(rows.weights.sum()) == count
    np.testing.assert_allclose(evaluate_examples(config, params, rows, progress=False).loss, reference, rtol=1e-5)
    # what training computes from a batch of the rows, and packed rows with document masking: the same
    batch = (jnp.asarray(rows.tokens), jnp.asarray(rows.weights))
    np.testing.assert_allclose(float(loss_fn(params, batch, jax.random.key(0), config)), reference, rtol=1e-5)
    packed = layout_examples(read_examples(tmp_path / "ex.jsonl", encoder), 64, encoder.eot_token, pack=True)
    assert len(packed.tokens) < len(rows.tokens) and int(packed.weights.sum()) == count
    batch = (jnp.asarray(packed.tokens), jnp.asarray(packed.weights))
    np.testing.assert_allclose(float(loss_fn(params, batch, jax.random.key(0), config, document_eot=299)), reference,
                               rtol=1e-5)


def test_evaluate_prints_the_masked_loss(model_dir, tmp_path, capsys):
    _write(tmp_path / "ex.jsonl", EXAMPLES[:2])
    config, params = load_weights(model_dir)
    encoder = get_encoder(model_dir)
    rows = layout_examples(read_examples(tmp_path / "ex.jsonl", encoder), 65, encoder.eot_token, pack=False)
    expected = evaluate_examples(config, params, rows, progress=False)
    capsys.readouterr()
    cli_main(["evaluate", "--model_dir", str(model_dir), "--dataset", str(tmp_path / "ex.jsonl"), "--json"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["tokens"] == expected.tokens and printed["loss"] == pytest.approx(expected.loss, rel=1e-6)


def test_an_example_longer_than_a_row_loses_its_prompts_left_first():
    ids, flags = list(range(10)) + [99], [0] * 6 + [1] * 5  # a 6-token prompt, a 4-token completion, the end
    rows = layout_examples([(ids, flags)], 8, 99, pack=False)
    assert rows.truncated == 1
    assert rows.tokens[0].tolist() == [99, 4, 5, 6, 7, 8, 9, 99] and rows.weights[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    rows = layout_examples([(ids, [0] + [1] * 10)], 6, 99, pack=False)  # the completion alone is too long: its end
    assert rows.tokens[0].tolist() == [99, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("line, message", [
    ("not json", r"ex.jsonl:2: not JSON \(Expecting value at column 1\)"),
    ('["a list"]', r"ex.jsonl:2: a JSON list, not an object"),
    ('{"prompt": "p"}', r'ex.jsonl:2: "completion" is missing'),
    ('{"prompt": 3, "completion": "c"}', r'ex.jsonl:2: "prompt" is not a string'),
    ('{"txt": "typo"}', r'ex.jsonl:2: no "prompt"/"completion" or "text" string'),
])
def test_a_bad_line_is_one_error_naming_the_file_and_line_before_anything_compiles(line, message, tmp_path,
                                                                                    model_dir, monkeypatch):
    _write(tmp_path / "ex.jsonl", [EXAMPLES[0], line, EXAMPLES[1]])
    monkeypatch.setattr(loop.jax, "jit", lambda *a, **k: pytest.fail("compiled before reporting bad input"))
    with pytest.raises(UserError, match=message) as e:
        loop.run(tiny_config(tmp_path / "w", tmp_path / "ex.jsonl", **{"model.name": str(model_dir)}))
    assert "\n" not in str(e.value)


def test_training_on_examples_lowers_the_completion_loss_and_resumes_bitwise(model_dir, tmp_path):
    _write(tmp_path / "train.jsonl", [{"prompt": f"{i} plus one is", "completion": f" {i + 1}"} for i in range(40)])
    fields = {"model.name": str(model_dir), "data.seq_len": 32, "data.val_split": 0.2, "data.val_every": 10, "data.val_batch_count": 2,
              "data.document_mask": True, "train.learning_rate": 3e-3, "checkpoint.save_every": 10}
    loop.run(tiny_config(tmp_path / "a", tmp_path / "train.jsonl", **fields, **{"train.total_steps": 30}))
    val = [m["val_loss"] for m in read_metrics(tmp_path / "a") if "val_loss" in m]
    assert len(val) == 4 and val[-1] < val[0]
    loop.run(tiny_config(tmp_path / "b", tmp_path / "train.jsonl", **fields, **{"train.total_steps": 10}))
    loop.run(tiny_config(tmp_path / "b", tmp_path / "train.jsonl", **fields, **{"train.total_steps": 30}))

    a = rundir.load_run_params(tmp_path / "a" / "checkpoint" / "run1")[1]
    b = rundir.load_run_params(tmp_path / "b" / "checkpoint" / "run1")[1]
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
