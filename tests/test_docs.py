"""The manual names only what exists: every `python launch.py` and `gpt2-jax` command shown in README.md and
docs/*.md parses (experiment, variant, config keys, flags), and every config field named exists."""

from __future__ import annotations

import re
import shlex

import pytest

import launch
from conftest import REPO
from experiments import base
from gpt2_jax.cli import build_parser

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LAUNCH_FLAGS = {"--workdir", "--list", "--dry_run", "--sweep", "--target", "--sweep_name"}
SECTIONS = ("model", "data", "train", "sample", "checkpoint", "mesh", "parallel", "ablation")


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
