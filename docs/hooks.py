"""mkdocs hook: pages that are generated, never hand-copied.

`<!-- generated: commands -->` becomes the `--help` of launch.py and of every `gpt2-jax` command, from
the parsers themselves; `<!-- generated: BENCHMARKS.md -->` becomes the repository's BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _commands() -> str:
    os.environ["COLUMNS"] = "110"  # argparse wraps to the terminal's width: the page's instead
    sys.path.insert(0, str(REPO))
    import launch
    from gpt2_jax.cli import build_parser

    parts = ["## launch.py", "", "```text", launch.usage(["launch.py"]).split("\nthe experiments")[0], "```", ""]
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        parts += [f"## {name}", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Fill in the generated parts of a page."""
    if "<!-- generated: commands -->" in markdown:
        markdown = markdown.replace("<!-- generated: commands -->", _commands())
    if "<!-- generated: BENCHMARKS.md -->" in markdown:
        text = (REPO / "BENCHMARKS.md").read_text(encoding="utf-8")
        body = text.split("\n", 1)[1]  # its title is the page's
        markdown = markdown.replace("<!-- generated: BENCHMARKS.md -->", body.replace("\n# ", "\n## "))
    return markdown
