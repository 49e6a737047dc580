"""Every benchmark script runs end to end at a tiny size (--smoke), so none of them can rot."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST_COMPILE_FLAG, REPO, needs_module


@pytest.mark.parametrize("script, extra", [
    ("train.py", ["--profile", "1"]),
    ("sample.py", []),
    ("tokenizer.py", []),
    ("tokenizer.py", ["--file_mb", "2"]),
    ("checkpoint.py", []),
    ("loop.py", []),
    ("xla_flags.py", []),
    ("startup.py", []),
    ("parallel.py", ["--devices", "2"]),
    ("scaling.py", ["--png", "{tmp}/scaling.png"]),
    ("targets.py", []),
    ("harness.py", []),
    ("lora.py", []),
    ("preemption.py", []),
    ("dpo.py", []),
    ("logs.py", []),
    ("shards.py", []),
    ("speedrun.py", ["--png", "{tmp}/speedrun.png"]),
])
def test_bench_smoke(script, extra, tmp_path, shared_dir):
    # the deviceless compiles: one TPU and one GPU target (targets.py), a GPU target (lora.py, dpo.py)
    deviceless = {"targets.py": ["libtpu", "jax_cuda12_plugin"], "lora.py": ["jax_cuda12_plugin"],
                  "dpo.py": ["jax_cuda12_plugin"]}
    for module in deviceless.get(script, []):
        needs_module(module, "tpu-aot,gpu-aot")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    env = {**os.environ, "GPT2_JAX_SHARED": str(shared_dir)}
    if "--profile" in extra:  # compiled as users do: a profile of an executable loaded from the tests' shared
        # compilation cache (conftest.py) names fewer of its ops, and the fast-compile flag changes them
        env = {k: v for k, v in env.items() if k not in ("JAX_COMPILATION_CACHE_DIR",
                                                         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
        env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(FAST_COMPILE_FLAG, "")
    done = subprocess.run([sys.executable, f"bench/{script}", "--smoke", "--no_record", *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| " in done.stdout and "---|" in done.stdout  # a table was printed
    if "--profile" in extra:  # the profile's ops were traced, named after the model's parts and summed
        # (which matmuls, forward or backward, rank in the top 16 varies with the load on the machine)
        assert "Where the time goes" in done.stdout and re.search(r"\| (forward|backward) [^|]+ \| matmul \|",
                                                                  done.stdout)
    spec = importlib.util.spec_from_file_location(f"bench_{Path(script).stem}", REPO / "bench" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "--smoke" in module.arguments().format_help()


def _gpu_suite_steps(script: str) -> list[tuple[int, list[str]]]:
    """A GPU script's `step SECONDS COMMAND...` lines, continuations joined, $OUT and $DEVICE filled in."""
    text = (REPO / "bench" / script).read_text().replace("\\\n", " ")
    text = text.replace("$OUT", "/tmp/out").replace("$DEVICE", "h100")
    steps = []
    for line in text.splitlines():
        if line.startswith("step "):
            words = shlex.split(line)
            steps.append((int(words[1]), words[2:]))
    return steps


@pytest.mark.parametrize("script", ["gpu.sh", "gpu_decode.sh", "gpu_ablation.sh"])
def test_gpu_suite_commands_parse_and_fit_the_device_limit(script):
    """The GPU scripts run only on a lent GPU: check here that their every command line is still valid."""
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / script)]).returncode == 0
    steps = _gpu_suite_steps(script)
    assert len(steps) >= 3 and sum(seconds + 1 for seconds, _ in steps) <= 580  # the device limit is 600 s
    for _, command in steps:
        assert command[0] == "python3", command
        target, args = command[1], command[2:]
        if target.startswith("bench/"):
            spec = importlib.util.spec_from_file_location(f"bench_{Path(target).stem}", REPO / target)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            try:
                module.arguments().parse_args(args)
            except SystemExit:
                pytest.fail(f"bench/{script}: {target} rejects {' '.join(args)}")
        else:
            assert target == "launch.py", command
            done = subprocess.run([sys.executable, "-c", "import sys, launch; c = launch.parse(sys.argv); "
                                   "print(c.model.scan_layers, c.model.dtype)", *args],
                                  cwd=REPO, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0 and done.stdout.split() == ["True", "bfloat16"], done.stderr[-2000:]
