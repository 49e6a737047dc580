"""gpt2-jax lm-eval: our lm-evaluation-harness model against lm-eval's own transformers backend (`hf`) on a
tiny random GPT-2, over four local tasks (a last-word task, multiple choice, rolling perplexity and
generate-until) written by the test: per-request log-likelihoods, greedy flags and generations, and the
reported metrics."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_hf_dir
from gpt2_jax.cli import main as cli_main

WORDS = "the cat sat on a mat and the dog ran to the park where birds sang all day long".split()


def _task(path, name: str, data: list[dict], body: str) -> None:
    (path / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in data))
    (path / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                       f"    test: {path / (name + '.jsonl')}\ntest_split: test\n{body}")


@pytest.fixture(scope="module")
def tasks_and_model(tmp_path_factory):
    """A folder of four task YAMLs over small JSONL files, and a tiny random GPT-2 in transformers' layout."""
    tasks = tmp_path_factory.mktemp("tasks")
    lines = [" ".join(WORDS[i:i + 6 + i % 4]) for i in range(8)]
    _task(tasks, "tiny_lastword", [{"context": ln.rsplit(" ", 1)[0], "target": ln.rsplit(" ", 1)[1]} for ln in lines],
          "output_type: loglikelihood\ndoc_to_text: '{{context}}'\ndoc_to_target: \"{{' ' + target}}\"\n"
          "metric_list:\n  - metric: perplexity\n  - metric: acc\n")
    _task(tasks, "tiny_choice", [{"question": f"{ln}?", "choices": WORDS[i:i + 3], "label": i % 3}
                                 for i, ln in enumerate(lines)],
          "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
          "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    _task(tasks, "tiny_rolling", [{"text": " ".join(WORDS * (1 + i))} for i in range(3)],  # up to 3 windows of 64
          "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
          "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    _task(tasks, "tiny_generate", [{"prompt": ln, "answer": " the"} for ln in lines],
          "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
          "generation_kwargs:\n  until: ['\\n', '.']\n  max_gen_toks: 8\n  do_sample: false\n"
          "metric_list:\n  - metric: exact_match\n")
    return tasks, tiny_hf_dir(tmp_path_factory.mktemp("model"), seed=3)


NAMES = ["tiny_lastword", "tiny_choice", "tiny_rolling", "tiny_generate"]


def _evaluate(model, tasks) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(bootstrap_iters=0, model=model, tasks=NAMES,
                                   task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                   log_samples=True)


def test_every_request_and_metric_equals_lm_evals_hf_backend(tasks_and_model, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from gpt2_jax.api import load
    from gpt2_jax.harness import GPT2JaxLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks, model_dir = tasks_and_model
    theirs = _evaluate(HFLM(pretrained=str(model_dir), batch_size=4, device="cpu"), tasks)
    ours = _evaluate(GPT2JaxLM(load(model_dir), batch_size=4), tasks)
    for name in NAMES:
        a, b = ours["samples"][name], theirs["samples"][name]
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            for mine, ref in zip(x["resps"], y["resps"]):
                mine, ref = mine[0], ref[0]
                if isinstance(ref, str):  # generate_until: the same greedy text
                    assert mine == ref, (name, x["doc"])
                elif isinstance(ref, (tuple, list)):  # (log-likelihood, is_greedy)
                    assert mine[0] == pytest.approx(ref[0], abs=1e-4) and bool(mine[1]) == bool(ref[1]), (name, x["doc"])
                else:  # rolling: a log-likelihood
                    assert mine == pytest.approx(ref, abs=1e-4), (name, x["doc"])
        for metric, value in theirs["results"][name].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert ours["results"][name][metric] == pytest.approx(value, rel=1e-4), (name, metric)
    assert any(r[0] for x in ours["samples"]["tiny_generate"] for r in x["resps"])  # something was generated


def test_the_command_prints_the_table_and_writes_results(tasks_and_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks, model_dir = tasks_and_model
    cli_main(["lm-eval", "--model_dir", str(model_dir), "--tasks", "tiny_choice", "--include_path", str(tasks),
              "--limit", "2", "--batch_size", "3", "--output", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "tiny_choice" in out and "|acc" in out.replace(" ", "")
    written = list((tmp_path / "out").rglob("results_*.json"))
    assert written and "tiny_choice" in json.loads(written[0].read_text())["results"]


@pytest.mark.parametrize("args, message", [
    (["--tasks", "no_such_task"], "--tasks: unknown task(s) no_such_task"),
    (["--tasks", "tiny_choice", "--model_dir", "/nonexistent/model"], "model directory /nonexistent/model does not exist"),
])
def test_bad_input_is_one_line(args, message, tasks_and_model, capsys):
    tasks, model_dir = tasks_and_model
    with pytest.raises(SystemExit) as e:
        cli_main(["lm-eval", "--model_dir", str(model_dir), "--include_path", str(tasks), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and message in err[-1] and "Traceback" not in "\n".join(err), err[-3:]


def test_without_lm_eval_the_command_says_what_to_install(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(SystemExit) as e:
        cli_main(["lm-eval", "--tasks", "lambada_openai"])
    assert e.value.code == 2 and 'pip install -e ".[eval]"' in capsys.readouterr().err


@pytest.mark.parametrize("total, batch_size, shards, expected", [
    (37, 16, 1, [16, 16, 4, 1]),  # full batches, then the rest in power-of-two pieces: no padding row
    (6, 16, 1, [4, 2]),
    (16, 16, 1, [16]),
    (7, 12, 1, [4, 2, 1]),
    (13, 16, 8, [8, 8]),  # over 8 devices, pieces are multiples of 8: only the last is padded (5 of 8 rows)
    (3, 16, 8, [8]),
    (0, 16, 1, []),
])
def test_batches_pad_no_row_the_devices_do_not_need(total, batch_size, shards, expected):
    from gpt2_jax.harness import batch_rows

    assert batch_rows(total, batch_size, shards) == expected


def test_tasks_while_training_equal_gpt2_jax_lm_eval_on_that_steps_checkpoint(tasks_and_model, tmp_path, capsys):
    from test_loop import read_metrics, tiny_config

    from gpt2_jax import loop, report

    tasks, model_dir = tasks_and_model
    data = tmp_path / "text.txt"
    data.write_text(" ".join(WORDS * 40))
    loop.run(tiny_config(tmp_path, data, **{"model.name": str(model_dir), "eval.tasks": "tiny_choice,tiny_lastword",
                                            "eval.include_path": str(tasks), "eval.every": 2,
                                            "train.total_steps": 2, "checkpoint.save_every": 2,
                                            "train.learning_rate": 1e-2}))
    logged = [r for r in read_metrics(tmp_path) if "eval/tiny_choice/acc" in r]
    assert [r["step"] for r in logged] == [2]
    assert {"eval/tiny_choice/acc", "eval/tiny_choice/acc_norm", "eval/tiny_lastword/acc",
            "eval/tiny_lastword/perplexity"} <= set(logged[0])
    capsys.readouterr()
    cli_main(["lm-eval", "--model_dir", str(tmp_path / "checkpoint" / "run1" / "2"), "--tasks",
              "tiny_choice,tiny_lastword", "--include_path", str(tasks), "--output", str(tmp_path / "out")])
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    for task, metric in (("tiny_choice", "acc"), ("tiny_choice", "acc_norm"), ("tiny_lastword", "acc"),
                         ("tiny_lastword", "perplexity")):
        assert logged[0][f"eval/{task}/{metric}"] == results[task][f"{metric},none"], (task, metric)
    summary = report.summarize(read_metrics(tmp_path))  # report and compare show them
    assert summary["eval/tiny_choice/acc"] == logged[0]["eval/tiny_choice/acc"]


def test_an_unknown_task_while_training_is_one_line_naming_the_field(tasks_and_model, tmp_path):
    from test_loop import tiny_config

    from gpt2_jax import loop
    from gpt2_jax.errors import UserError

    tasks, model_dir = tasks_and_model
    data = tmp_path / "text.txt"
    data.write_text(" ".join(WORDS * 40))
    with pytest.raises(UserError, match=r"^eval\.tasks: unknown task\(s\) no_such_task; lm-eval --tasks list shows "
                                        r"them$"):
        loop.run(tiny_config(tmp_path, data, **{"model.name": str(model_dir), "eval.tasks": "tiny_choice,no_such_task",
                                                "eval.include_path": str(tasks), "eval.every": 1,
                                                "train.total_steps": 1}))
