"""Sampling: greedy parity with transformers, seeds, top-k/top-p support, stops, and the sample CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import FIXTURES, REPO, random_hf_model, save_hf_model, write_byte_vocab
from gpt2_jax.cli import main
from gpt2_jax.sampling import generate, top_k_filter, top_p_filter
from gpt2_jax.weights import load_weights


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    hf = random_hf_model(n_vocab=512, n_ctx=128, n_embd=64, n_head=4, n_layer=2, seed=7)
    directory = save_hf_model(hf, tmp_path_factory.mktemp("hf"))
    write_byte_vocab(directory, 512)
    config, params = load_weights(directory)
    return hf, config, params, directory


def test_greedy_equals_transformers_generate(hf_and_ours):
    hf, config, params, _ = hf_and_ours
    prompt = [72, 101, 108, 108, 111]
    ours = generate(config, params, prompt, length=60, top_k=1)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=60, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
    eot = config.n_vocab - 1
    expected = ref[:ref.index(eot)] if eot in ref else ref
    assert ours.tokens[0, :ours.lengths[0]].tolist() == expected
    assert len(expected) >= 50


def test_batched_greedy_rows_equal_single(hf_and_ours):
    _, config, params, _ = hf_and_ours
    one = generate(config, params, [1, 2, 3], length=20, top_k=1)
    many = generate(config, params, [1, 2, 3], length=20, top_k=1, batch_size=4)
    for row in many.tokens:
        np.testing.assert_array_equal(row, one.tokens[0])
    # three tokens per loop iteration: the same tokens, and an early stop still ends where it did
    unrolled = generate(config, params, [1, 2, 3], length=20, top_k=1, unroll=3)
    np.testing.assert_array_equal(unrolled.tokens, one.tokens)
    stop = [int(one.tokens[0, 6])]
    a = generate(config, params, [1, 2, 3], length=20, top_k=1, stop_sequences=[stop])
    b = generate(config, params, [1, 2, 3], length=20, top_k=1, stop_sequences=[stop], unroll=4)
    assert a.lengths[0] == b.lengths[0] and a.steps == b.steps
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_sampling_is_reproducible_with_a_seed(hf_and_ours):
    _, config, params, _ = hf_and_ours
    a = generate(config, params, [5], length=30, batch_size=2, rng=jax.random.key(1))
    b = generate(config, params, [5], length=30, batch_size=2, rng=jax.random.key(1))
    c = generate(config, params, [5], length=30, batch_size=2, rng=jax.random.key(2))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    assert not np.array_equal(a.tokens[0], a.tokens[1])  # rows of a batch differ


def test_top_k_and_top_p_filters_on_crafted_logits():
    probs = np.array([[0.05, 0.5, 0.15, 0.3]], np.float32)
    logits = jnp.log(jnp.asarray(probs))
    kept = lambda x: set(np.flatnonzero(np.isfinite(np.asarray(x[0]))))  # noqa: E731
    assert kept(top_k_filter(logits, 2)) == {1, 3}
    assert kept(top_k_filter(logits, 0)) == {0, 1, 2, 3}
    assert kept(top_p_filter(logits, 0.4)) == {1}  # 0.5 alone reaches 0.4
    assert kept(top_p_filter(logits, 0.7)) == {1, 3}  # 0.5 + 0.3
    assert kept(top_p_filter(logits, 0.85)) == {1, 2, 3}  # needs the 0.15 too
    assert kept(top_p_filter(logits, 0.01)) == {1}  # at least one token
    assert kept(top_p_filter(logits, 1.0)) == {0, 1, 2, 3}


def test_sampled_tokens_stay_in_the_support():
    from gpt2_jax.sampling import next_token

    logits = jnp.tile(jnp.log(jnp.asarray([0.05, 0.5, 0.15, 0.3])), (4000, 1))
    seen_k = set(np.asarray(next_token(logits, jax.random.key(0), 1.0, 2, 0.0)).tolist())
    seen_p = set(np.asarray(next_token(logits, jax.random.key(0), 1.0, 0, 0.7)).tolist())
    seen_all = set(np.asarray(next_token(logits, jax.random.key(0), 1.0, 0, 0.0)).tolist())
    assert seen_k == {1, 3} and seen_p == {1, 3} and seen_all == {0, 1, 2, 3}


def test_stop_sequence_and_end_of_text_end_samples_early(hf_and_ours):
    _, config, params, _ = hf_and_ours
    greedy = generate(config, params, [9, 9], length=40, top_k=1).tokens[0]
    stop = greedy[5:7].tolist()
    end = next(k for k in range(2, 8) if greedy[k - 2:k].tolist() == stop)  # where the pair first ends
    stopped = generate(config, params, [9, 9], length=40, top_k=1, stop_sequences=[[123456], stop])
    assert stopped.steps == end and stopped.lengths[0] == end  # the loop exited once the batch stopped
    assert (stopped.tokens[0, end:] == config.n_vocab - 1).all()
    first = next(k for k in range(40) if greedy[k] == greedy[3])
    as_eot = generate(config, params, [9, 9], length=40, top_k=1, eot=int(greedy[3]))
    assert as_eot.lengths[0] == first and as_eot.steps == first + 1


def test_bad_sampling_values(hf_and_ours):
    from gpt2_jax.errors import UserError

    _, config, params, _ = hf_and_ours
    with pytest.raises(UserError, match="exceeds the context of 128"):
        generate(config, params, [1] * 100, length=40)
    with pytest.raises(UserError, match="temperature=0"):
        generate(config, params, [1], length=4, temperature=0)


def _run_cli(args, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_greedy_and_out_file(hf_and_ours, capsys, tmp_path):
    _, config, params, directory = hf_and_ours
    out_file = tmp_path / "samples.txt"
    code, out, _ = _run_cli(["sample", "--model_dir", str(directory), "--prompt", "Hi", "--length", "12",
                             "--top_k", "1", "--json", "--nsamples", "2", "--batch_size", "2",
                             "--out", str(out_file)], capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    expected = generate(config, params, [72, 105], length=12, top_k=1)
    assert len(rows) == 2 and rows[0] == rows[1]
    assert rows[0]["tokens"] == expected.tokens[0, :expected.lengths[0]].tolist()
    assert out_file.read_text().splitlines() == out.splitlines()


def test_cli_stop_text_cuts_and_include_prompt(hf_and_ours, capsys):
    from gpt2_jax import get_encoder

    _, config, params, directory = hf_and_ours
    enc = get_encoder(directory)
    full = generate(config, params, enc.encode("Hi"), length=30, top_k=1)
    ids = full.tokens[0, :full.lengths[0]].tolist()
    text = enc.decode(ids)
    stop = enc.decode(ids[6:8])  # text the greedy sample is sure to contain
    cut = text.index(stop)
    code, out, _ = _run_cli(["sample", "--model_dir", str(directory), "--prompt", "Hi", "--length", "30",
                             "--top_k", "1", "--json", "--stop", "never-seen", "--stop", stop,
                             "--include_prompt"], capsys)
    row = json.loads(out)
    assert code == 0 and row["text"] == "Hi" + text[:cut]
    assert enc.decode(row["tokens"]) == text[:cut]  # whole tokens before the stop text


def test_cli_human_output_is_labelled_and_interactive_reads_stdin(hf_and_ours, capsys, monkeypatch):
    directory = hf_and_ours[3]
    code, out, _ = _run_cli(["sample", "--model_dir", str(directory), "--interactive", "--length", "5",
                             "--seed", "3"], capsys, stdin="first\n\nsecond\n", monkeypatch=monkeypatch)
    assert code == 0
    assert out.count("Model prompt >>> ") == 4  # first, the blank line is asked again, second, end of input
    assert out.count("SAMPLE 1 (model-generated text)") == 1 and out.count("SAMPLE 2 (model-generated text)") == 1


@pytest.mark.parametrize("args, message", [
    (["--length", "129"], "--length=129 exceeds the model's context of 128"),
    (["--top_p", "1.5"], "--top_p=1.5: must be in \\[0, 1\\]"),
    (["--top_p", "-0.1"], "--top_p=-0.1: must be in \\[0, 1\\]"),
    (["--temperature", "0"], "--temperature=0.0: must be > 0"),
    (["--temperature", "-1"], "--temperature=-1.0: must be > 0"),
    (["--nsamples", "3", "--batch_size", "2"], "--nsamples=3 must be a positive multiple of --batch_size=2"),
])
def test_cli_bad_values_exit_2(hf_and_ours, capsys, args, message):
    import re

    code, _, err = _run_cli(["sample", "--model_dir", str(hf_and_ours[3]), *args], capsys)
    assert code == 2 and re.search(message, err), err
    assert len(err.strip().splitlines()) == 1


def test_cli_bad_model_dirs_exit_2(tmp_path, capsys, hf_and_ours):
    code, _, err = _run_cli(["sample", "--model_dir", str(tmp_path / "missing")], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = _run_cli(["sample", "--model_dir", str(tmp_path)], capsys)
    assert code == 2 and "not a model directory in a known layout. Known layouts: gpt2-jax training run" in err
    no_vocab = tmp_path / "novocab"
    save_hf_model(random_hf_model(), no_vocab)
    code, _, err = _run_cli(["sample", "--model_dir", str(no_vocab)], capsys)
    assert code == 2 and "no vocabulary found" in err


def test_console_entry_points_run(tmp_path):
    # with the persistent compilation cache of the CLIs moved (GPT2_JAX_COMPILATION_CACHE), then turned off
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # cache even the tiny model's quick compiles
    for cmd, cache in ((["gpt2-jax"], tmp_path / "cache"), ([sys.executable, "-m", "gpt2_jax"], "off")):
        done = subprocess.run([*cmd, "sample", "--model_dir", str(FIXTURES / "openai_tiny"), "--length", "4",
                               "--seed", "0", "--json"], capture_output=True, text=True, cwd=REPO, timeout=120,
                              env={**env, "GPT2_JAX_COMPILATION_CACHE": str(cache)})
        assert done.returncode == 0, done.stderr
        assert len(json.loads(done.stdout)["tokens"]) <= 4
    assert list((tmp_path / "cache").iterdir())  # the first run's compiled programs, for the next launch
    assert not (REPO / "off").exists()
    bad = subprocess.run(["gpt2-jax", "sample", "--model_dir", str(FIXTURES / "openai_tiny"), "--top_p", "2"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
