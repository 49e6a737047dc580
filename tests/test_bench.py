"""Every benchmark script runs end to end at a tiny size (--smoke), so none of them can rot."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.parametrize("script, extra", [
    ("train.py", []),
    ("sample.py", []),
    ("tokenizer.py", []),
    ("parallel.py", ["--devices", "2"]),
    ("scaling.py", ["--png", "{tmp}/scaling.png"]),
])
def test_bench_smoke(script, extra, tmp_path, shared_dir):
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    done = subprocess.run([sys.executable, f"bench/{script}", "--smoke", "--no_record", *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "GPT2_JAX_SHARED": str(shared_dir)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| " in done.stdout and "---|" in done.stdout  # a table was printed
    help_text = subprocess.run([sys.executable, f"bench/{script}", "--help"], cwd=REPO, capture_output=True, text=True)
    assert help_text.returncode == 0 and "--smoke" in help_text.stdout
