"""gpt2-jax hellaswag: llm.c's HellaSwag scorer on a tiny random GPT-2, against transformers (every ending's summed
and mean loss, and so acc and acc_norm) and against lm-eval's own `hellaswag` task run through gpt2-jax's lm-eval
adapter on the same items (every choice's log-likelihood, acc, and lm-eval's acc_norm)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, random_hf_model, save_hf_model, write_byte_vocab
from gpt2_jax.cli import main as cli_main

# Items in HellaSwag's format (the fields of hellaswag_val.jsonl), written as its two sources look: ActivityNet
# (ctx_b a lower-case noun phrase) and WikiHow (bracketed [header]/[title]/[step] artifacts, ctx_b empty); one
# non-ASCII; the last longer than the model's 256-token context, so its context is cut from the left.
DOCS = [
    ("Roof shingle removal", "A man is sitting on a roof.", "he",
     ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
      "starts pulling up roofing on a roof."], 3),
    ("Home and Garden", "[header] How to grow tomatoes [title] Choose a sunny spot.", "",
     ["[step] Water the plant every day.", "[title] Dig a hole. [step] Put the seedling in it.",
      "The cat sat on the mat.", "[substeps] Buy a car."], 1),
    ("Making a cake", "A woman mixes flour in a bowl at the café.", "the woman",
     ["pours the batter into a pan.", "drives away.", "sings a song loudly.", "eats the bowl."], 0),
    ("Playing piano", "A boy sits at a piano.", "he",
     ["plays a few notes.", "jumps into a pool.", "reads the news", "paints the wall blue."], 0),
    ("Skiing", "People ski down a snowy hill. A skier", "",
     ["falls in the snow.", "swims.", "bakes bread in an oven and then eats it slowly.", "flies."], 2),
    ("Personal Care and Style", "[header] How to braid hair [title] Brush your hair. "
     "[step] Remove every knot so the strands separate cleanly. " * 3, "",
     ["[title] Split it into three parts.", "Cook pasta.", "[step] Pull the strands tight.", "Wash the car."], 2),
]


def _doc(i: int, label: str, ctx_a: str, ctx_b: str, endings: list[str], gold: int) -> dict:
    return {"ind": i, "activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b,
            "ctx": f"{ctx_a} {ctx_b}" if ctx_b else ctx_a, "split": "val", "split_type": "indomain",
            "label": gold, "endings": endings, "source_id": f"test~{i}"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random 300-token GPT-2 with a 256-token context and a byte-level vocabulary (transformers' layout), and a
    hellaswag_val.jsonl of DOCS."""
    model_dir = tmp_path_factory.mktemp("model")
    save_hf_model(random_hf_model(n_vocab=300, n_ctx=256, seed=5), model_dir)
    write_byte_vocab(model_dir, 300)
    shutil.copyfile(model_dir / "encoder.json", model_dir / "vocab.json")
    shutil.copyfile(model_dir / "vocab.bpe", model_dir / "merges.txt")
    file = tmp_path_factory.mktemp("data") / "hellaswag_val.jsonl"
    file.write_text("".join(json.dumps(_doc(i, *d)) + "\n" for i, d in enumerate(DOCS)), encoding="utf-8")
    return model_dir, file


def _transformers_losses(model_dir, encoder, items) -> tuple[np.ndarray, np.ndarray]:
    """Each ending's summed loss and token count by transformers, rows as llm.c renders them (the context's tokens,
    then the ending's with a leading space; cut to the last n_ctx + 1 tokens, as the scorer and lm-eval do)."""
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    sums, counts = [], []
    for item in items:
        context = encoder.encode(item.ctx)
        for ending in (encoder.encode(" " + e) for e in item.endings):
            whole = (context + ending)[-(model.config.n_positions + 1):]
            with torch.no_grad():
                logits = model(torch.tensor([whole[:-1]])).logits[0].double()
            losses = -torch.log_softmax(logits, -1)[torch.arange(len(whole) - 1), torch.tensor(whole[1:])]
            n = min(len(ending), len(whole) - 1)
            sums.append(float(losses[-n:].sum())), counts.append(n)
    return np.reshape(sums, (-1, 4)), np.reshape(counts, (-1, 4))


def test_every_endings_loss_and_the_metrics_equal_transformers(setup):
    from gpt2_jax.api import load
    from gpt2_jax.hellaswag import ending_losses, read_items, score

    model_dir, file = setup
    model, items = load(model_dir), read_items(file)
    assert [it.ctx for it in items] == [_doc(i, *d)["ctx"] for i, d in enumerate(DOCS)]
    ref_sums, ref_counts = _transformers_losses(model_dir, model.encoder, items)
    assert len(model.encoder.encode(items[-1].ctx)) > model.config.n_ctx  # its rows are cut from the left
    sums, counts = ending_losses(model.config, model.params, model.encoder, items, batch_size=8)
    np.testing.assert_array_equal(counts, ref_counts)
    np.testing.assert_allclose(sums, ref_sums, rtol=1e-6, atol=1e-5)  # float32 sums of up to ~400 nats
    np.testing.assert_allclose(sums / counts, ref_sums / ref_counts, rtol=0, atol=1e-5)
    labels = np.asarray([it.label for it in items])
    expected = {"acc": float(np.mean(ref_sums.argmin(1) == labels)),
                "acc_norm": float(np.mean((ref_sums / ref_counts).argmin(1) == labels)), "n": len(items)}
    assert score(model.config, model.params, model.encoder, items) == expected  # one batch, compiled once
    assert expected["acc"] != expected["acc_norm"]  # the items tell the two metrics apart


def test_render_is_llm_cs_tiktoken_rendering(real_encoder, tiktoken_gpt2):
    from gpt2_jax.hellaswag import Item, render

    for i, d in enumerate(DOCS):
        doc = _doc(i, *d)
        context, endings = render(real_encoder, Item(doc["ctx"], tuple(doc["endings"]), doc["label"]))
        assert context == tiktoken_gpt2.encode(doc["ctx"])
        assert endings == [tiktoken_gpt2.encode(" " + e) for e in doc["endings"]]


def _local_hellaswag(directory, file) -> None:
    """lm-eval's own hellaswag task (its YAML included: process_docs, doc_to_text, doc_to_choice, metrics) on the
    local file instead of the hub's dataset."""
    import lm_eval

    included = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "hellaswag", "hellaswag.yaml")
    (directory / "hellaswag_local.yaml").write_text(
        f"include: {included}\ntask: hellaswag_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {file}\ntraining_split: null\n")


def test_lm_evals_own_hellaswag_through_the_adapter_scores_the_same(setup, tmp_path, monkeypatch):
    """lm-eval renders an item differently (its preprocess(): the activity label before the context, ctx_b
    capitalised, WikiHow's brackets removed; acc_norm by the choice's characters), so its rendered strings are
    scored by both: every choice's log-likelihood is minus the scorer's summed loss, and acc and lm-eval's
    acc_norm follow from those sums exactly."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from gpt2_jax.api import load
    from gpt2_jax.harness import GPT2JaxLM
    from gpt2_jax.hellaswag import Item, ending_losses, read_items, score

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model_dir, file = setup
    _local_hellaswag(tmp_path, file)
    model = load(model_dir)
    results = lm_eval.simple_evaluate(bootstrap_iters=0, model=GPT2JaxLM(model, batch_size=32),
                                      tasks=["hellaswag_local"],
                                      task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                                      log_samples=True)
    samples = sorted(results["samples"]["hellaswag_local"], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    docs = [s["doc"] for s in samples]
    rendered = [Item(d["query"], tuple(d["choices"]), d["gold"]) for d in docs]
    for sample, item in zip(samples, rendered):  # lm-eval's requests: its context, each choice after a space
        assert [tuple(a) for a in sample["arguments"]] == [(item.ctx, " " + e) for e in item.endings]
    raw = read_items(file)
    assert [r.ctx for r in raw] != [r.ctx for r in rendered]  # the renderings differ on every item

    sums, _ = ending_losses(model.config, model.params, model.encoder, rendered)
    theirs = np.asarray([[r[0][0] for r in s["resps"]] for s in samples])
    np.testing.assert_allclose(-sums, theirs, rtol=1e-6, atol=1e-5)
    ours = score(model.config, model.params, model.encoder, rendered)
    assert ours["acc"] == results["results"]["hellaswag_local"]["acc,none"]
    assert [float(s.argmin() == it.label) for s, it in zip(sums, rendered)] == [s["acc"] for s in samples]
    characters = np.asarray([[len(e) for e in it.endings] for it in rendered])  # lm-eval's acc_norm divisor
    by_characters = [float((s / n).argmin() == it.label) for s, n, it in zip(sums, characters, rendered)]
    assert by_characters == [s["acc_norm"] for s in samples]
    assert np.mean(by_characters) == results["results"]["hellaswag_local"]["acc_norm,none"]


def test_the_command_prints_the_metrics(setup, capsys):
    from gpt2_jax.api import load
    from gpt2_jax.hellaswag import read_items, score

    model_dir, file = setup
    cli_main(["hellaswag", "--model_dir", str(model_dir), "--file", str(file), "--limit", "3", "--batch_size", "2",
              "--json"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model = load(model_dir)
    assert printed == score(model.config, model.params, model.encoder, read_items(file, 3)) and printed["n"] == 3
    cli_main(["hellaswag", "--model_dir", str(model_dir), "--file", str(file)])
    out = capsys.readouterr().out
    assert f"over {len(DOCS)} items" in out and "acc_norm" in out


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: Expecting property name"),
    ('{"ctx": "a", "endings": ["b", "c", "d"], "label": 0}', 'line 2: "endings" must be a list of 4 strings'),
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 4}', 'line 2: "label" must be an integer from 0 to 3'),
    ('{"endings": ["b", "c", "d", "e"], "label": 1}', 'line 2: "ctx" must be a non-empty string'),
    ("[1, 2]", "line 2: not a JSON object"),
    (b'{"ctx": "caf\xe9"}', "line 2: 'utf-8' codec can't decode byte 0xe9"),
])
def test_a_bad_line_is_one_line_naming_the_file_and_line(line, message, setup, tmp_path, capsys):
    model_dir, file = setup
    bad = tmp_path / "bad.jsonl"
    first = file.read_bytes().splitlines()[0]
    bad.write_bytes(first + b"\n" + (line if isinstance(line, bytes) else line.encode()) + b"\n")
    with pytest.raises(SystemExit) as e:
        cli_main(["hellaswag", "--model_dir", str(model_dir), "--file", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"gpt2-jax hellaswag: error: {bad}, {message}"), err


@pytest.mark.parametrize("args, message", [
    (["--file", "/nonexistent/hellaswag_val.jsonl"], "HellaSwag file /nonexistent/hellaswag_val.jsonl is not a file"),
    (["--limit", "0"], "--limit=0: must be at least 1"),
    (["--batch_size", "0"], "--batch_size=0: must be at least 1"),
])
def test_bad_flags_are_one_line(args, message, setup, capsys):
    model_dir, file = setup
    with pytest.raises(SystemExit) as e:
        cli_main(["hellaswag", "--model_dir", str(model_dir), "--file", str(file), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err


MESH_CHECK = """
import sys
import jax, numpy as np
from gpt2_jax import parallel
from gpt2_jax.api import load
from gpt2_jax.hellaswag import ending_losses, read_items
model, items = load(sys.argv[1]), read_items(sys.argv[2])
one = ending_losses(model.config, model.params, model.encoder, items, batch_size=3)[0]
mesh = parallel.make_mesh(2, 2)
params = parallel.put_tree(model.params, parallel.state_shardings(mesh, model.params))
assert len(params["params"]["wte"].sharding.device_set) == 4
four = ending_losses(model.config, params, model.encoder, items, batch_size=3)[0]
np.testing.assert_allclose(four, one, rtol=1e-5, atol=1e-4)
print("same on 4 devices")
"""


def test_params_sharded_over_a_mesh_score_as_on_one_device(setup):
    # FSDP-sharded params as a training run holds them: rows split over the 4 devices, nothing asked of the caller
    model_dir, file = setup
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", MESH_CHECK, str(model_dir), str(file)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "same on 4 devices" in done.stdout, done.stderr[-3000:]


def test_hellaswag_while_training_equals_the_command_on_that_steps_checkpoint(setup, tmp_path, capsys):
    from test_loop import read_metrics, tiny_config

    from gpt2_jax import loop

    model_dir, file = setup
    data = tmp_path / "text.txt"
    data.write_text("A man is sitting on a roof. He starts pulling up roofing on a roof. " * 30)
    loop.run(tiny_config(tmp_path, data, **{"model.name": str(model_dir), "eval.hellaswag": str(file),
                                            "eval.every": 2, "eval.limit": 3, "train.total_steps": 3,
                                            "checkpoint.save_every": 2, "train.learning_rate": 1e-2}))
    logged = {r["step"]: r for r in read_metrics(tmp_path) if "eval/hellaswag_llmc/acc" in r}
    assert sorted(logged) == [2, 3]  # every 2 steps and at the last
    for step in (2, 3):
        capsys.readouterr()
        cli_main(["hellaswag", "--model_dir", str(tmp_path / "checkpoint" / "run1" / str(step)), "--file", str(file),
                  "--limit", "3", "--json"])
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (logged[step]["eval/hellaswag_llmc/acc"], logged[step]["eval/hellaswag_llmc/acc_norm"]) == \
            (printed["acc"], printed["acc_norm"])


@pytest.mark.parametrize("limit, count", [(0.0, 6), (3.0, 3), (0.5, 3), (0.4, 3), (0.1, 1)])
def test_eval_limit_takes_items_as_lm_eval_takes_them(limit, count, setup):
    # 0: every item; N >= 1: the first N; a share below 1: the first ceil(share x items), as lm-eval's limit
    from gpt2_jax.eval_tasks import hellaswag_items

    _, file = setup
    items = hellaswag_items(str(file), limit)
    assert [item.label for item in items] == [d[-1] for d in DOCS[:count]]
