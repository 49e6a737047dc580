"""Multi-device and multi-process training on CPU: 8 forced devices, and two processes over gloo."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import FAST_COMPILE_FLAG, FIXTURES, REPO
from gpt2_jax import checkpoints


@pytest.mark.parametrize("selection", ["mesh_step", "not mesh_step"])
def test_multidevice_suite_on_8_forced_cpu_devices(selection):
    # tests/multidevice in a process of its own (the device count is fixed when JAX starts), in two
    # parts so that parallel test workers can share them out.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "GPT2_JAX_MULTIDEVICE": "1",
           "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "tests/multidevice", "-k", selection],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_cmd(workdir, *extra: str) -> list[str]:
    return [sys.executable, "launch.py", "--config=experiments/finetune.py", f"--workdir={workdir}",
            f"--config.model.name={FIXTURES / 'openai_tiny'}",
            f"--config.data.dataset={FIXTURES / 'make_openai_checkpoint.py'}", "--config.data.seq_len=16",
            "--config.train.batch_size=4", "--config.train.optimizer=sgd", "--config.train.learning_rate=0.05",
            "--config.train.momentum=0.9", "--config.sample.sample_every=0",
            "--config.train.total_steps=3", *extra]


def test_two_processes_train_like_one(tmp_path):
    env = os.environ | {"XLA_FLAGS": FAST_COMPILE_FLAG, "JAX_PLATFORMS": "cpu"}  # one CPU device each
    port = _free_port()
    procs = [subprocess.Popen(_train_cmd(tmp_path / "two", "--config.parallel.distributed=explicit",
                                         f"--config.parallel.coordinator_address=127.0.0.1:{port}",
                                         "--config.parallel.num_processes=2", f"--config.parallel.process_id={i}",
                                         "--config.parallel.timeout_s=60"),
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    one = subprocess.run(_train_cmd(tmp_path / "one"), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    _, two_params = checkpoints.load_run_params(tmp_path / "two" / "checkpoint" / "run1")
    _, one_params = checkpoints.load_run_params(tmp_path / "one" / "checkpoint" / "run1")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), two_params, one_params)
    assert (tmp_path / "two" / "logs" / "run1" / "metrics.jsonl").read_text().count("\n") == 3  # process 0 only


def test_a_coordinator_that_does_not_answer_is_a_clear_error_in_bounded_time(tmp_path):
    env = os.environ | {"XLA_FLAGS": FAST_COMPILE_FLAG, "JAX_PLATFORMS": "cpu"}  # one CPU device each
    start = time.monotonic()
    done = subprocess.run(_train_cmd(tmp_path, "--config.parallel.distributed=explicit",
                                     f"--config.parallel.coordinator_address=127.0.0.1:{_free_port()}",
                                     "--config.parallel.num_processes=2", "--config.parallel.process_id=1",
                                     "--config.parallel.timeout_s=5"),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "could not join the distributed job at 127.0.0.1:" in done.stderr
    assert time.monotonic() - start < 200
