"""The manual names only what exists: every `python launch.py` and `gpt2-jax` command shown in README.md and
docs/*.md parses (experiment, variant, config keys, flags), and every config field named exists; the docs
site builds with `mkdocs build --strict` (no broken link or anchor), and the beginner's notebook runs."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import launch
from conftest import REPO, environment, needs_module
from experiments import base
from gpt2_jax.cli import build_parser

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LAUNCH_FLAGS = {"--workdir", "--list", "--dry_run", "--sweep", "--target", "--sweep_name", "--help"}
SECTIONS = ("model", "data", "train", "muon", "eval", "log", "profile", "sample", "checkpoint", "mesh", "parallel",
            "ablation", "dpo")


FILE_SUFFIXES = ("py", "md", "png", "json", "jsonl", "bin", "npz", "txt", "safetensors", "sbatch")


def _commands(text: str, program: str) -> list[list[str]]:
    """Every command line starting with `program` in a page (continued lines joined; inside a quoted
    --command="..." of gcloud too); optional parts in [brackets] taken as given."""
    code = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)  # fenced blocks, indented blocks, inline code
    code += re.findall(r"((?:^    .*\n)+)", text, re.M)
    code += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    joined = re.sub(r"\\\n\s*", " ", "\n".join(code))
    found = []
    for match in re.finditer(r"(?<![\w/-])" + re.escape(program) + r" [^\n`|#]*", joined):
        line = match.group(0).replace("[", "").replace("]", "")
        try:
            words = shlex.split(line)
        except ValueError:  # the end of an enclosing quoted string
            words = shlex.split(line[:max(line.rfind('"'), line.rfind("'"))])
        found.append(words[len(program.split()):])
    return found


def _named_fields(text: str) -> set[str]:
    """Config fields a page names: `section.field` or `section.field=value` in backticks, --config.section.field."""
    sections = "|".join(SECTIONS)
    named = set(re.findall(r"--config\.((?:%s)\.[a-z_0-9]+)" % sections, text))
    named |= set(re.findall(r"`((?:%s)\.[a-z_0-9]+)(?:=[^`]*)?`" % sections, text))
    return {n for n in named if n.rpartition(".")[2] not in FILE_SUFFIXES}


def _config_keys(config, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in config.items():
        keys |= _config_keys(value, f"{prefix}{key}.") if hasattr(value, "items") else {f"{prefix}{key}"}
    return keys


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_and_config_field_a_page_shows_exists(page):
    text = page.read_text(encoding="utf-8")
    keys = _config_keys(base.get_config())
    assert _named_fields(text) - keys == set(), f"{page.name} names config fields that do not exist"
    parser = build_parser()
    for args in _commands(text, "gpt2-jax"):
        if len(args) > 1 and args[0] in parser._subparsers._group_actions[0].choices and "..." not in args:
            # placeholders (N, FILE) stand for a value; a flag the command does not take exits (fails the test)
            parser.parse_args([re.sub(r"^[A-Z][A-Z_0-9]*$", "1", a) for a in args])
    for args in _commands(text, "python launch.py"):
        spec = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
        if spec is None:
            continue
        config = launch.load_experiment(launch.resolve_spec(spec))  # the file and its variant exist
        overrides = {a[len("--config."):].split("=", 1)[0] for a in args if a.startswith("--config.")}
        assert overrides <= _config_keys(config), f"{page.name}: {' '.join(args)}: {overrides - _config_keys(config)}"
        flags = {a.split("=", 1)[0] for a in args if a.startswith("--") and not a.startswith("--config")}
        assert flags <= LAUNCH_FLAGS, f"{page.name}: {' '.join(args)}: {flags - LAUNCH_FLAGS}"


def test_the_docs_site_builds_strictly_with_the_generated_command_reference(tmp_path):
    needs_module("mkdocs", "docs")
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    commands = (site / "commands" / "index.html").read_text(encoding="utf-8")
    parser = build_parser()
    for name in parser._subparsers._group_actions[0].choices:  # every command's --help, from its parser
        assert f"usage: gpt2-jax {name}" in commands, name
    assert "--dry_run" in commands and "GPT2Config" in (site / "api" / "index.html").read_text(encoding="utf-8")


def test_the_beginners_notebook_runs_top_to_bottom_offline_on_a_tiny_model(tmp_path):
    """docs/getting_started.ipynb as Colab runs it, but with GPT2_JAX_NOTEBOOK_TINY: a model on disk for the
    download, short runs."""
    needs_module("nbclient", "test")
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(REPO / "docs" / "getting_started.ipynb", as_version=4)
    env = {"GPT2_JAX_NOTEBOOK_TINY": "1", "GPT2_JAX_NOTEBOOK_WORKDIR": str(tmp_path / "runs"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    with environment(env):  # the kernel inherits this environment
        NotebookClient(notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
                       ).execute()
    outputs = "\n".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                        for o in cell.get("outputs", []))
    assert "Traceback" not in outputs and "error:" not in outputs, outputs[-3000:]
    assert "done: step 20" in outputs and "done: step 10" in outputs, outputs[-3000:]  # fine-tune, then the demo
    assert (tmp_path / "runs" / "checkpoint" / "notebook" / "20").is_dir()
    assert "vocabulary:" in outputs and "logits" in outputs
    assert "; logs in " in outputs and "curves.png" in outputs  # the last line says where everything is


def test_every_commands_help_states_each_default():
    import argparse

    commands = build_parser()._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        formatter = sub.formatter_class(prog=name)
        for action in sub._actions:  # `is`, not `in`: 0 == False, and a default of 0 is still one to state
            unset = action.default is None or action.default is False or action.default in ([], argparse.SUPPRESS)
            if action.option_strings and not unset:
                assert "default" in formatter._get_help_string(action), f"{name} {action.option_strings[0]}"
    sample = " ".join(commands["sample"].format_help().split())
    assert "(default: 1.0)" in sample and "(default: models/124M)" in sample  # --temperature, --model_dir
    assert "1 = greedy) (default: 0)" in sample and "overrides --top_k (default: 0.0)" in sample  # --top_k, --top_p
