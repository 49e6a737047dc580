"""Multi-device and multi-process training on CPU: 8 forced devices, and two processes over gloo."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import FAST_COMPILE_FLAG, FIXTURES, REPO
from gpt2_jax import checkpoints
from gpt2_jax.parallel import PEER_LOST_EXIT


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


ENV = os.environ | {"XLA_FLAGS": FAST_COMPILE_FLAG, "JAX_PLATFORMS": "cpu"}  # one CPU device each


def _start_pair(workdir, *extra: str) -> list[subprocess.Popen]:
    """Processes 0 and 1 of a two-process job on 127.0.0.1; each one's stderr goes to a file beside workdir."""
    port = _free_port()
    procs = []
    for i in range(2):
        err = Path(f"{workdir}-{len(list(Path(workdir).parent.glob(f'{Path(workdir).name}-*.err')))}.err")
        procs.append(subprocess.Popen(_train_cmd(workdir, "--config.parallel.distributed=explicit",
                                                 f"--config.parallel.coordinator_address=127.0.0.1:{port}",
                                                 "--config.parallel.num_processes=2",
                                                 f"--config.parallel.process_id={i}", "--config.parallel.timeout_s=60",
                                                 *extra),
                                      cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=err.open("w")))
        procs[-1].err_path = err
    return procs


def _finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    """Each process's stderr once it ended (killed on timeout)."""
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.err_path.read_text(errors="replace") for p in procs]


# Long enough to kill mid-way: checkpoints every 10 steps, a process killed after step 30.
LONG = ("--config.train.total_steps=60", "--config.checkpoint.save_every=10")


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory):
    """The workdir of the long two-process run, never interrupted."""
    workdir = tmp_path_factory.mktemp("pair") / "w"
    procs = _start_pair(workdir, *LONG)
    errors = _finish(procs)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-3000:] for e in errors)
    return workdir


def test_two_processes_train_like_one(pair_run, tmp_path):
    one = subprocess.run(_train_cmd(tmp_path / "one", *LONG), cwd=REPO, env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    _, two_params = checkpoints.load_run_params(pair_run / "checkpoint" / "run1")
    _, one_params = checkpoints.load_run_params(tmp_path / "one" / "checkpoint" / "run1")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), two_params, one_params)
    assert (pair_run / "logs" / "run1" / "metrics.jsonl").read_text().count("\n") == 60  # process 0 only


def test_a_lost_coordinator_ends_the_survivor_in_one_line_and_a_restart_resumes_bitwise(pair_run, tmp_path):
    # Process 0 (the coordinator) killed mid-run: JAX's C++ client in process 1 aborts it at once, which
    # launch.py's supervisor turns into the one line and exit 4 (a lost process 1 usually ends process
    # 0 through a failed collective instead: the same line and code).
    workdir = tmp_path / "w"
    procs = _start_pair(workdir, *LONG)
    metrics = workdir / "logs" / "run1" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 30) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), _finish(procs)
        time.sleep(0.02)
    procs[0].kill()  # SIGKILL: the supervisor, and with it the training process it runs
    start = time.monotonic()
    err = _finish([procs[1]], timeout=120)[0]
    took = time.monotonic() - start
    _finish(procs)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("I0000", "WARNING: All log"))]
    assert procs[1].returncode == PEER_LOST_EXIT, err[-3000:]
    assert took < 20 + 10, took  # parallel.heartbeat_s, and the time to exit
    assert lines[-1].startswith("launch.py: error: lost process 0 (the coordinator) of this 2-process job"), lines[-1]
    assert "restart every process with the same command" in lines[-1], lines[-1]
    assert "Traceback" not in err and "Check failure" not in err and "@ 0x" not in err, err[-3000:]
    assert "Check failure" in (workdir / "logs" / "run1" / "jax-1.log").read_text()  # JAX's dump went to its log

    restarted = _start_pair(workdir, *LONG)  # the same command on both: resumes from the last complete step
    errors = _finish(restarted)
    assert [p.returncode for p in restarted] == [0, 0], "\n".join(e[-3000:] for e in errors)
    _, params = checkpoints.load_run_params(workdir / "checkpoint" / "run1")
    _, reference = checkpoints.load_run_params(pair_run / "checkpoint" / "run1")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, reference)


def test_a_coordinator_that_does_not_answer_is_a_clear_error_in_bounded_time(tmp_path):
    start = time.monotonic()
    done = subprocess.run(_train_cmd(tmp_path, "--config.parallel.distributed=explicit",
                                     f"--config.parallel.coordinator_address=127.0.0.1:{_free_port()}",
                                     "--config.parallel.num_processes=2", "--config.parallel.process_id=1",
                                     "--config.parallel.timeout_s=5"),
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "could not join the distributed job at 127.0.0.1:" in done.stderr
    assert time.monotonic() - start < 200

