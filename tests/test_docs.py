"""The manual names only what exists: every `python launch.py` and `gpt2-jax` command shown in README.md and
docs/*.md parses (experiment, variant, config keys, flags), and every config field named exists."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO
from experiments import base
from gpt2_jax.cli import build_parser

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
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
    check = ("import json, sys; import launch\n"  # one process a command: absl parses flags once, from sys.argv
             "sys.argv = ['launch.py', *[a for a in json.loads(sys.argv[1]) if not a.startswith(('--workdir', "
             "'--dry_run', '--target', '--sweep'))]]\n"
             "launch.parse(sys.argv)\n")
    for args in _commands(text, "python launch.py"):
        if any(a.startswith("--config=") for a in args):
            done = subprocess.run([sys.executable, "-c", check, json.dumps(args)], cwd=REPO, capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 0, f"{page.name}: {' '.join(args)}: {done.stderr[-2000:]}"
