"""Multi-device and multi-process training on CPU: 8 forced devices, and two processes over gloo."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import FAST_COMPILE_FLAG, FIXTURES, GCS, REPO, free_port
from gpt2_jax import checkpoints, rundir
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


def _train_cmd(workdir, *extra: str, model: str = str(FIXTURES / "openai_tiny"),
               dataset: str = str(FIXTURES / "make_openai_checkpoint.py")) -> list[str]:
    return [sys.executable, str(REPO / "launch.py"), "--config=experiments/finetune.py", f"--workdir={workdir}",
            f"--config.model.name={model}", f"--config.data.dataset={dataset}", "--config.data.seq_len=16",
            "--config.train.batch_size=4", "--config.train.optimizer=sgd", "--config.train.learning_rate=0.05",
            "--config.train.momentum=0.9", "--config.sample.sample_every=0",
            "--config.train.total_steps=3", *extra]


ENV = os.environ | {"XLA_FLAGS": FAST_COMPILE_FLAG, "JAX_PLATFORMS": "cpu"}  # one CPU device each


def _start_pair(workdir, *extra: str, logs: Path | None = None, hosts: Path | None = None, env: dict = ENV,
                **cmd) -> list[subprocess.Popen]:
    """Processes 0 and 1 of a two-process job on 127.0.0.1; each one's output goes to a file beside workdir
    (or in `logs`). With `hosts`, each process runs in a directory of its own, hosts/0 and hosts/1, as on
    machines that share no disk."""
    port = free_port()
    logs = Path(logs or Path(workdir).parent)
    name = Path(str(workdir)).name
    procs = []
    for i in range(2):
        err = logs / f"{name}-{len(list(logs.glob(f'{name}-*.err')))}.err"
        cwd = REPO if hosts is None else hosts / str(i)
        cwd.mkdir(parents=True, exist_ok=True)
        procs.append(subprocess.Popen(_train_cmd(workdir, "--config.parallel.distributed=explicit",
                                                 f"--config.parallel.coordinator_address=127.0.0.1:{port}",
                                                 "--config.parallel.num_processes=2",
                                                 f"--config.parallel.process_id={i}", "--config.parallel.timeout_s=60",
                                                 *extra, **cmd),
                                      cwd=cwd, env=env, stdout=err.open("w"), stderr=subprocess.STDOUT))
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


def _periodic_actions(tasks: Path) -> tuple[str, ...]:
    """Every process's periodic actions besides checkpoints: lm-eval tasks (written into `tasks`, scored and
    generated on the live params over the job's mesh), llm.c's HellaSwag and samples at steps 30 and 60, a
    profiler window over steps 21-22. None changes the training's results (test_profiling.py: bitwise)."""
    from test_harness import WORDS, _task
    from test_hellaswag import DOCS, _doc

    tasks.mkdir(exist_ok=True)
    hellaswag = tasks / "hellaswag_val.jsonl"
    hellaswag.write_text("".join(json.dumps(_doc(i, *d)) + "\n" for i, d in enumerate(DOCS)), encoding="utf-8")
    lines = [" ".join(WORDS[i:i + 6 + i % 4]) for i in range(8)]
    _task(tasks, "tiny_choice", [{"question": f"{ln}?", "choices": WORDS[i:i + 3], "label": i % 3}
                                 for i, ln in enumerate(lines)],
          "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
          "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    _task(tasks, "tiny_generate", [{"prompt": ln, "answer": " the"} for ln in lines],
          "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
          "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 4\n  do_sample: false\n"
          "metric_list:\n  - metric: exact_match\n")
    return ("--config.eval.tasks=tiny_choice,tiny_generate", f"--config.eval.include_path={tasks}",
            f"--config.eval.hellaswag={hellaswag}", "--config.eval.every=30", "--config.sample.sample_every=30",
            "--config.sample.sample_length=4", "--config.profile.start_step=20", "--config.profile.steps=2")


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory):
    """The workdir of the long two-process run, never interrupted, with every periodic action."""
    workdir = tmp_path_factory.mktemp("pair") / "w"
    procs = _start_pair(workdir, *LONG, *_periodic_actions(workdir.parent / "tasks"))
    errors = _finish(procs)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-3000:] for e in errors)
    return workdir


def _evaluations(workdir: Path) -> dict[int, dict]:
    from gpt2_jax import report

    return {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")}
            for r in report.read_metrics(workdir / "logs" / "run1") if any(k.startswith("eval/") for k in r)}


def test_two_processes_train_like_one(pair_run, tmp_path):
    one = subprocess.run(_train_cmd(tmp_path / "one", *LONG, *_periodic_actions(tmp_path / "tasks")), cwd=REPO,
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    _, two_params = rundir.load_run_params(pair_run / "checkpoint" / "run1")
    _, one_params = rundir.load_run_params(tmp_path / "one" / "checkpoint" / "run1")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), two_params, one_params)
    assert (pair_run / "logs" / "run1" / "metrics.jsonl").read_text().count("\n") == 60  # process 0 only
    # the tasks' figures at steps 30 and 60 as one process finds them (lm-eval's scoring and greedy generation,
    # HellaSwag's endings)
    evaluations = _evaluations(pair_run)
    assert sorted(evaluations) == [30, 60] and set(evaluations[30]) == {
        "eval/tiny_choice/acc", "eval/tiny_choice/acc_norm", "eval/tiny_generate/exact_match",
        "eval/hellaswag_llmc/acc", "eval/hellaswag_llmc/acc_norm"}
    assert evaluations == _evaluations(tmp_path / "one")
    assert sorted(p.name for p in (pair_run / "samples" / "run1").iterdir()) == ["samples-30", "samples-60"]
    profile = pair_run / "logs" / "run1" / "profile"  # each process its own trace of the window
    assert sorted(p.name for p in profile.iterdir()) == ["process_0", "process_1"]
    for process in profile.iterdir():
        assert len(list(process.rglob("*.xplane.pb"))) == 1, list(process.rglob("*"))
    summary = subprocess.run([sys.executable, "-m", "gpt2_jax", "profile-summary", str(profile / "process_1")],
                             cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert summary.returncode == 0 and "of jit_train_step (2 traced)" in summary.stdout, \
        summary.stdout + summary.stderr[-2000:]


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
    _, params = rundir.load_run_params(workdir / "checkpoint" / "run1")
    _, reference = rundir.load_run_params(pair_run / "checkpoint" / "run1")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, reference)


def test_a_coordinator_that_does_not_answer_is_a_clear_error_in_bounded_time(tmp_path):
    start = time.monotonic()
    done = subprocess.run(_train_cmd(tmp_path, "--config.parallel.distributed=explicit",
                                     f"--config.parallel.coordinator_address=127.0.0.1:{free_port()}",
                                     "--config.parallel.num_processes=2", "--config.parallel.process_id=1",
                                     "--config.parallel.timeout_s=5"),
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "could not join the distributed job at 127.0.0.1:" in done.stderr
    assert time.monotonic() - start < 200


def _lines_after_metrics(procs: list[subprocess.Popen], metrics: Path, count: int) -> None:
    """Wait until process 0 has logged `count` steps (every process still running)."""
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= count) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), _finish(procs)
        time.sleep(0.02)


def _stopped_at(err: str) -> int:
    return int(next(line for line in err.splitlines() if "stopped at step" in line).split("stopped at step ")[1]
               .split(":")[0])


@pytest.mark.parametrize("sig, who", [(signal.SIGTERM, "process 1 alone"), (signal.SIGINT, "both, a second apart")])
def test_a_stop_sent_to_any_process_saves_the_same_step_on_every_process(tmp_path, sig, who):
    workdir = tmp_path / "w"
    procs = _start_pair(workdir, *LONG)
    _lines_after_metrics(procs, workdir / "logs" / "run1" / "metrics.jsonl", 25)
    # A spot VM's notice reaches one host, or `kill -INT PID` one process: its supervisor forwards it.
    procs[1].send_signal(sig)
    if who.startswith("both"):
        time.sleep(1.0)
        procs[0].send_signal(sig)
    start = time.monotonic()
    errors = _finish(procs, timeout=120)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-3000:] for e in errors)
    assert time.monotonic() - start < 60
    steps = [_stopped_at(e) for e in errors]
    assert steps[0] == steps[1] < 60, steps  # the same step on both, before the end
    assert checkpoints.steps_of(workdir / "checkpoint" / "run1")[-1] == steps[0]
    # Resuming such a stop bitwise: the job in a bucket, below.


def _ended_as_one(procs: list[subprocess.Popen], code: int, timeout: float = 120) -> str:
    """Both processes' last line once they ended, the same on both, with exit code `code`, and no traceback."""
    errors = _finish(procs, timeout=timeout)
    assert [p.returncode for p in procs] == [code, code], "\n".join(e[-3000:] for e in errors)
    last = [[line for line in e.splitlines() if line.strip()][-1] for e in errors]
    assert last[0] == last[1] and last[0].startswith("launch.py: error: "), last
    assert not any("Traceback" in e for e in errors), errors
    return last[0]


def test_a_job_whose_hosts_share_no_disk_keeps_its_run_in_a_bucket_fails_as_one_and_resumes_bitwise(pair_run,
                                                                                                     tmp_path):
    # Each process in a directory of its own, everything in a bucket of a store of this test's own, which refuses
    # the writes named in `faults`. The job is preempted on one host, loses its lock to another job, has its
    # TensorBoard writes refused on process 0, then runs to the end: equal to the job never interrupted.
    from test_gcs import upload

    from gpt2_jax import report, storage

    faults = tmp_path / "faults"
    store = GCS(faults=faults)
    try:
        with store.active():
            model = upload(FIXTURES / "openai_tiny", store.url("pair", "openai_tiny"))
            data = upload(FIXTURES / "make_openai_checkpoint.py", store.url("pair", "data.py"))
            workdir, env = store.url("pair", "w"), {**ENV, **store.env}
            pair = dict(logs=tmp_path, hosts=tmp_path / "hosts", env=env, model=model, dataset=data)
            job = (*LONG, "--config.checkpoint.lock_lease_s=4")
            run_dir = storage.path(workdir) / "checkpoint" / "run1"
            lock = storage.path(workdir) / "checkpoint" / "run1.lock"

            def saved(step: int) -> bool:
                try:
                    return max(checkpoints.steps_of(run_dir), default=0) > step
                except FileNotFoundError:  # listed while the job was writing or removing a step
                    return False

            def saved_after(step: int, procs: list[subprocess.Popen]) -> None:
                deadline = time.monotonic() + 240
                while not saved(step) and time.monotonic() < deadline:
                    assert all(p.poll() is None for p in procs), _finish(procs)
                    time.sleep(0.2)

            procs = _start_pair(workdir, *job, **pair)
            saved_after(0, procs)  # step 10 saved: well under way
            procs[1].send_signal(signal.SIGTERM)  # a preempted host
            errors = _finish(procs, timeout=120)
            assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-3000:] for e in errors)
            stopped = _stopped_at(errors[0])
            assert stopped == _stopped_at(errors[1]) < 60

            procs = _start_pair(workdir, *job, **pair)
            deadline = time.monotonic() + 120
            while not lock.exists() and time.monotonic() < deadline:  # claimed by this job (the last released it)
                assert all(p.poll() is None for p in procs), _finish(procs)
                time.sleep(0.1)
            lock.write_text('{"host": "another job"}')  # taken over: process 0's next renewal finds it gone
            line = _ended_as_one(procs, 2)
            assert f"lost the lock of {run_dir} (another job took it over" in line, line
            assert lock.read_text() == '{"host": "another job"}'  # the other job's lock, untouched
            lock.unlink()  # that job is gone

            faults.write_text("pair/w/logs/run1/events\n")  # TensorBoard's writes on process 0 refused
            line = _ended_as_one(_start_pair(workdir, *job, **pair), 3)
            assert "could not write" in line and "events.out.tfevents" in line and "nothing more is written" in line
            faults.unlink()

            restarted = _start_pair(workdir, *job, **pair)
            errors = _finish(restarted)
            assert [p.returncode for p in restarted] == [0, 0], "\n".join(e[-3000:] for e in errors)
            _, params = rundir.load_run_params(run_dir)
            _, reference = rundir.load_run_params(pair_run / "checkpoint" / "run1")
            jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, reference)
            assert [p for p in (tmp_path / "hosts").rglob("*") if p.is_file()] == []  # nothing on a host's disk
            logged = {r["step"] for r in report.read_metrics(storage.path(workdir) / "logs" / "run1")}
            assert logged >= set(range(1, stopped + 1)) | {60}, logged  # metrics.jsonl's parts (not those of a
            # process that failed or lost its lock: nothing is written after that)
            sample = subprocess.run([sys.executable, "-m", "gpt2_jax", "sample", "--model_dir", str(run_dir),
                                     "--length", "3", "--seed", "0"], cwd=REPO, env=env, capture_output=True,
                                    text=True, timeout=120)
            assert sample.returncode == 0 and "SAMPLE 1" in sample.stdout, sample.stderr[-2000:]
    finally:
        store.stop()


def test_a_store_that_answers_oddly_fails_an_async_save_on_every_process_within_its_timeout(tmp_path):
    # A store that is not quite GCS (no generation headers, no preconditions): process 0's writes of the step fail
    # while process 1 waits for it at orbax's barrier. Both end with process 0's line within store_timeout_s.
    store = GCS(raw=True)
    try:
        pair = dict(logs=tmp_path, hosts=tmp_path / "hosts", env={**ENV, **store.env})
        start = time.monotonic()
        procs = _start_pair(store.url("odd", "w"), "--config.train.total_steps=100000",
                            "--config.checkpoint.save_every=5", "--config.checkpoint.store_timeout_s=5", **pair)
        line = _ended_as_one(procs, 3, timeout=240)
        assert re.search(r"could not write checkpoint step \d+ to gs://", line), line  # the first that fails
        assert time.monotonic() - start < 140  # start-up, compile, then at most about store_timeout_s more
    finally:
        store.stop()


def test_distributed_auto_joins_a_slurm_job_from_the_variables_srun_sets(tmp_path):
    job_id = 61440 + (free_port() % 4096)  # JAX puts the coordinator on port 61440 + job id % 4096
    procs = []
    for i in range(2):
        slurm = {"SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
                 "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i), "SLURM_STEP_NUM_NODES": "1"}
        log = tmp_path / f"{i}.out"
        procs.append(subprocess.Popen(_train_cmd(tmp_path / "w", "--config.parallel.distributed=auto",
                                                 "--config.parallel.timeout_s=60"),
                                      cwd=REPO, env={**ENV, **slurm}, stdout=log.open("w"), stderr=subprocess.STDOUT))
        procs[-1].err_path = log
    outputs = _finish(procs)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    for i, out in enumerate(outputs):
        assert f"distributed: process {i} of 2 (SLURM), 1 local device" in out, out[-2000:]
    assert checkpoints.steps_of(tmp_path / "w" / "checkpoint" / "run1") == [3]
    assert (tmp_path / "w" / "logs" / "run1" / "metrics.jsonl").read_text().count("\n") == 3  # process 0's only
