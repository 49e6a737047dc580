"""Every path a URL: sweeps, the remat ablation, `export --out`, `sample --out`, `download --models_dir` and the
models-dir search with gs:// paths, against the local GCS emulator (conftest.gcs): each output in the bucket and
nothing in the current directory (no local folder named `gs:`). A scan that no pathlib.Path is made outside
storage.py, but where a path is local by nature; GPT2_JAX_SHARED, when set, decides where the vocabulary is.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors

from conftest import FIXTURES, REPO, write_byte_vocab
from experiments import base
from gpt2_jax import download as dl
from gpt2_jax import report, resolve, storage, sweep
from gpt2_jax.cli import main as cli_main
from gpt2_jax.encoder import get_encoder
from gpt2_jax.errors import UserError
from gpt2_jax.model import add_lora
from gpt2_jax.weights import export_peft, load_weights
from test_download import server  # noqa: F401, F811 - a fixture: OpenAI's release files served on 127.0.0.1
from test_loop import TINY_MODEL, tiny_config

DATASET = FIXTURES / "make_openai_checkpoint.py"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    """An empty current directory, where nothing may appear."""
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    return here


def _names(url: str) -> set[str]:
    """The files under a URL, relative to it."""
    return {str(p)[len(url) + 1:] for p in storage.files_of(url)}


def _launch(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """launch.py run from `cwd` (the emulator's address inherited from this process's environment)."""
    return subprocess.run([sys.executable, str(REPO / "launch.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_a_sweep_in_a_bucket_reports_there_and_skips_its_finished_points_when_started_again(gcs, cwd):
    workdir = gcs.url("sweep")
    done = _launch(cwd, "--config=experiments/finetune.py", f"--workdir={workdir}", f"--config.model.name={TINY_MODEL}",
                   f"--config.data.dataset={DATASET}", "--config.data.seq_len=16", "--config.train.batch_size=2",
                   "--config.sample.sample_every=0", "--config.train.total_steps=2",
                   "--sweep=train.learning_rate=0.001,0.003")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {workdir}/sweeps/finetune/sweep.md" in done.stdout  # named after the experiment's file
    assert not list(cwd.iterdir())
    runs = ["finetune/train.learning_rate=0.001", "finetune/train.learning_rate=0.003"]
    names = _names(workdir)
    assert {"sweeps/finetune/sweep.md", "sweeps/finetune/sweep.png", "sweeps/finetune/sweep.json"} <= names
    for run in runs:
        assert f"logs/{run}/curves.png" in names and f"checkpoint/{run}/2/commit_success.txt" in names, run
    out = storage.path(workdir) / "sweeps" / "finetune"
    assert (out / "sweep.png").read_bytes()[:8] == PNG
    reported = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["run_name"] for r in reported] == runs
    for r in reported:  # the report's numbers are the runs' own, read from the bucket
        records = report.read_metrics(storage.path(workdir) / "logs" / r["run_name"])
        assert r["loss"] == [m["loss"] for m in records if "loss" in m][-1] and r["steps"] == 2
    (out / "sweep.md").unlink()

    # started again: both points are found finished in the bucket, none trains, the report is written again
    config = tiny_config(workdir, DATASET, **{"train.total_steps": 2})
    axes = sweep.parse(["train.learning_rate=0.001,0.003"], config)
    trained = []
    assert str(sweep.run(config, "finetune", axes, trained.append, lambda: True)) == str(out)
    assert trained == [] and (out / "sweep.md").read_text().count("| finetune/train.learning_rate=") == 2
    assert not list(cwd.iterdir())

    # compared by their log directories in the bucket (metrics.jsonl's parts there), the output there too
    cli_main(["compare", *(f"{workdir}/logs/{run}" for run in runs), "--out", f"{workdir}/compared"])
    compared = json.loads(storage.path(f"{workdir}/compared/compare.json").read_text())["runs"]
    assert [r["overrides"] for r in compared] == [{"train.learning_rate": 0.001}, {"train.learning_rate": 0.003}]
    assert not list(cwd.iterdir())


def test_the_remat_ablation_writes_its_report_into_a_bucket(gcs, cwd):
    workdir = gcs.url("ablation-run")
    done = _launch(cwd, "--config=experiments/remat_ablation.py:tiny", f"--workdir={workdir}",
                   "--config.ablation.policies=none,full", "--config.ablation.micro_batches=2",
                   "--config.ablation.compile_only=True", "--config.model.n_ctx=64")
    assert done.returncode == 0, done.stderr[-3000:]
    out = f"{workdir}/ablation/remat_tiny"
    assert f"wrote {out}/ablation.md" in done.stdout
    assert _names(out) == {"ablation.json", "ablation.md", "ablation.png"}
    rows = json.loads(storage.path(f"{out}/ablation.json").read_text())["rows"]
    assert [r["policy"] for r in rows] == ["none", "full"] and all(r["flops"] > 0 for r in rows)
    assert "| full | 2 |" in storage.path(f"{out}/ablation.md").read_text()
    assert storage.path(f"{out}/ablation.png").read_bytes()[:8] == PNG
    assert not list(cwd.iterdir())


def test_export_and_sample_write_into_a_bucket(gcs, cwd, capsys):
    out = gcs.url("exported", "tiny")
    cli_main(["export", "--model_dir", TINY_MODEL, "--out", out])
    assert f"exported to {out} (transformers: " in capsys.readouterr().out
    assert _names(out) == {"config.json", "model.safetensors", "vocab.json", "merges.txt"}
    (_, exported), (_, original) = load_weights(out), load_weights(TINY_MODEL)  # read back from the bucket
    jax.tree.map(np.testing.assert_array_equal, exported, original)

    config, params = load_weights(TINY_MODEL, lora_rank=2, lora_targets=("attn.c_attn",))
    params = add_lora(config, params, jax.random.key(0))
    adapters = gcs.url("exported", "adapters")
    export_peft(config, params, adapters, "gpt2")
    assert _names(adapters) == {"adapter_config.json", "adapter_model.safetensors"}
    tensors = load_safetensors(storage.path(f"{adapters}/adapter_model.safetensors").read_bytes())
    a = np.asarray(params["params"]["h_1"]["attn"]["c_attn_lora"]["a"])
    np.testing.assert_array_equal(tensors["base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"], a.T)

    samples = gcs.url("samples", "tiny.jsonl")
    cli_main(["sample", "--model_dir", TINY_MODEL, "--length", "4", "--seed", "0", "--nsamples", "2", "--json",
              "--out", samples])
    printed = capsys.readouterr().out
    assert storage.path(samples).read_text() == printed and len(printed.splitlines()) == 2
    assert all(json.loads(line)["tokens"] for line in printed.splitlines())

    for command in (["export", "--model_dir", TINY_MODEL], ["sample", "--model_dir", TINY_MODEL, "--length", "2"]):
        with pytest.raises(SystemExit) as e:  # a missing bucket: one line, before the model loads
            cli_main([*command, "--out", "gs://no-such-bucket/x"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--out gs://no-such-bucket" in err and "does not exist" in err, err
    assert not list(cwd.iterdir())


def test_download_into_a_bucket_stages_locally_resumes_and_is_found_there(gcs, cwd, server, tmp_path, monkeypatch,
                                                                          capsys):
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the staging directory is, observed
    models = gcs.url("models")
    meta = "/124M/model.ckpt.meta"
    server.cut_once.add(meta)
    with pytest.raises(UserError, match=r"model.ckpt.meta: download failed after 1 attempts .* resume from "
                                        rf"{re.escape(str(tmp_path))}/tmp/gpt2_jax_download/\w+/model.ckpt.meta.part"):
        dl.download_model("124M", models, base_url=server.url, retries=0, progress=False)
    before = dl.FILES[:dl.FILES.index("model.ckpt.meta")]
    assert _names(f"{models}/124M") == set(before)  # each uploaded once verified, nothing partial in the bucket
    staged = [p.name for p in (tmp_path / "tmp" / "gpt2_jax_download").rglob("*") if p.is_file()]
    assert staged == ["model.ckpt.meta.part"]  # the uploaded files removed locally, the partial one kept
    first = len(server.requests)

    cli_main(["download", "124M", "--models_dir", models, "--base_url", server.url])
    assert f"downloaded 124M to {models}/124M" in capsys.readouterr().out
    for name in dl.FILES:
        assert storage.path(f"{models}/124M/{name}").read_bytes() == server.files[f"/124M/{name}"], name
    again = server.requests[first:]
    assert (meta, f"bytes={len(server.files[meta]) // 2}-") in again  # resumed from the local part file
    assert not {path for path, _ in again} & {f"/124M/{name}" for name in before}  # uploaded ones not fetched
    assert not list((tmp_path / "tmp" / "gpt2_jax_download").iterdir())  # the staging directory removed
    count = len(server.requests)
    dl.download_model("124M", models, base_url=server.url, progress=False)
    assert len(server.requests) == count  # complete in the bucket: nothing fetched

    config = base.get_config()  # the models-dir search, in the bucket
    config.model.models_dir, config.model.name = models, "124M"
    assert str(resolve.find_vocab_dir(config)) == f"{models}/124M"
    assert str(resolve.model_dir_of(config)) == f"{models}/124M"
    assert get_encoder(resolve.find_vocab_dir(config)).encode("Hello world") == [15496, 995]
    assert not list(cwd.iterdir())


def test_gpt2_jax_shared_when_set_decides_where_the_vocabulary_is(tmp_path, monkeypatch):
    for d in ("shared/gpt2", "other/gpt2", "models/124M", "work"):
        (tmp_path / d).mkdir(parents=True)
    for d in ("shared/gpt2", "other/gpt2"):
        write_byte_vocab(tmp_path / d, 300)
    monkeypatch.chdir(tmp_path / "work")  # ../shared/gpt2 holds a vocabulary
    config = base.get_config()
    config.model.models_dir = str(tmp_path / "models")
    monkeypatch.delenv("GPT2_JAX_SHARED", raising=False)
    assert resolve.find_vocab_dir(config).resolve() == tmp_path / "shared" / "gpt2"
    monkeypatch.setenv("GPT2_JAX_SHARED", str(tmp_path / "other"))
    assert resolve.find_vocab_dir(config) == tmp_path / "other" / "gpt2"
    monkeypatch.setenv("GPT2_JAX_SHARED", "/nonexistent")
    assert resolve.find_vocab_dir(config) is None  # no fallback to ../shared
    write_byte_vocab(tmp_path / "models" / "124M", 300)
    assert resolve.find_vocab_dir(config) == tmp_path / "models" / "124M"  # a downloaded model's comes first


# Where a pathlib.Path may be made outside storage.py: places that are local by nature, as (file, function).
LOCAL_BY_NATURE = {
    ("launch.py", "<module>"): "the experiments/ folder beside launch.py (__file__)",
    ("launch.py", "resolve_spec"): "experiment files, imported as Python modules from this host",
    ("launch.py", "load_experiment"): "an experiment file, imported",
    ("launch.py", "usage"): "an experiment file, imported",
    ("gpt2_jax/data.py", "encode_to_file"): "a temporary directory, and the local branch once a URL has returned",
    ("gpt2_jax/data.py", "_encode_locally"): "the sidecar of a local output",
    ("gpt2_jax/data.py", "encode_to_shards"): "a temporary directory, the shards uploaded from it",
    ("gpt2_jax/download.py", "_staging_dir"): "the temporary directory a download into a URL goes through",
    ("gpt2_jax/parallel.py", "peer_lost"): "argv[0]'s name",
    ("gpt2_jax/steps.py", "enable_compilation_cache"): "JAX's compilation cache",
    ("gpt2_jax/supervisor.py", "supervise"): "the supervisor's local copy of the JAX log",
    ("gpt2_jax/supervisor.py", "_supervise"): "argv[0]'s name",
    ("gpt2_jax/tf_checkpoint.py", "checkpoint_prefix"): "the base name of a path recorded in TF's checkpoint file",
    ("gpt2_jax/weights.py", "hub_cache_dir"): "the Hugging Face hub cache",
    ("gpt2_jax/weights.py", "from_hub_cache"): "the Hugging Face hub cache",
    ("gpt2_jax/profiling.py", "open"): "the temporary directory jax.profiler writes a store's trace into",
}
PATH_CLASSES = {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}


def path_calls(source: str) -> list[tuple[str, int]]:
    """(innermost enclosing function or '<module>', line) of every call making a pathlib path in a module's source:
    `Path(...)`, `pathlib.Path(...)`, or an alias of either."""
    tree = ast.parse(source)
    names, modules = set(), set()  # what pathlib's classes and pathlib itself are called here
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "pathlib":
            names |= {a.asname or a.name for a in node.names if a.name in PATH_CLASSES}
        elif isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name == "pathlib"}
    found = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Name) and f.id in names) or (
                    isinstance(f, ast.Attribute) and f.attr in PATH_CLASSES and isinstance(f.value, ast.Name)
                    and f.value.id in modules):
                found.append((function, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "<module>")
    return found


def test_no_pathlib_path_is_made_of_what_may_be_a_url():
    files = [REPO / "launch.py", *sorted((REPO / "gpt2_jax").glob("*.py"))]
    seen, wrong = set(), []
    for f in files:
        name = str(f.relative_to(REPO))
        if name == "gpt2_jax/storage.py":  # the one helper: storage.path
            continue
        for function, line in path_calls(f.read_text(encoding="utf-8")):
            seen.add((name, function))
            if (name, function) not in LOCAL_BY_NATURE:
                wrong.append(f"{name}:{line} in {function}")
    assert not wrong, f"a pathlib.Path made where the path may be a URL (use storage.path): {wrong}"
    assert not set(LOCAL_BY_NATURE) - seen, f"allowed but no longer there: {set(LOCAL_BY_NATURE) - seen}"
    # the scan sees each spelling (so that it can fail)
    source = ("import pathlib\nimport pathlib as pl\nfrom pathlib import Path, PurePath as P\n"
              "x = Path('a')\ndef f(u):\n    return pathlib.Path(u), pl.Path(u), P(u), Path.home(), storage.path(u)\n")
    assert path_calls(source) == [("<module>", 4), ("f", 6), ("f", 6), ("f", 6)]
