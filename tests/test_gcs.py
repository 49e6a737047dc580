"""Runs whose files live in Google Cloud Storage (gs://), against a local GCS emulator (conftest.gcs): every
output in the bucket, resume bitwise, the guarantees of a disk (checksums, damaged steps set aside within
the bucket, keep, changed data), the run's lock object, and the store's failures as one line.

The two-process job in a bucket, preempted on one host, is in test_parallel.py beside its reference run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import FIXTURES, GCS, REPO
from gpt2_jax import checkpoints, lock, loop, report, rundir, storage
from gpt2_jax.cli import main as cli_main
from gpt2_jax.errors import UserError
from gpt2_jax.rundir import RunDir
from test_loop import no_compile, tiny_config  # noqa: F401 - no_compile is a fixture

DATASET = FIXTURES / "make_openai_checkpoint.py"
RUN = {"checkpoint.save_every": 2, "checkpoint.keep": 2, "train.noise": 0.1, "data.val_every": 2,
       "data.val_batch_count": 2, "checkpoint.keep_best": True, "sample.sample_every": 2, "sample.sample_length": 4}


def upload(local: Path, url: str) -> str:
    """A local file or directory copied into the bucket; its URL."""
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for f in files:
        storage.path(url if f == local else f"{url}/{f.relative_to(local)}").write_bytes(f.read_bytes())
    return url


def same_params(a, b) -> None:
    _, pa = rundir.load_run_params(a)
    _, pb = rundir.load_run_params(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), pa, pb)


@pytest.fixture(scope="module")
def inputs(gcs):
    """The tiny model and its dataset in the bucket."""
    return (upload(FIXTURES / "openai_tiny", gcs.url("inputs", "openai_tiny")),
            upload(DATASET, gcs.url("inputs", "data", DATASET.name)))


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory) -> Path:
    """The same run on a local disk, 6 steps without a stop: what the bucket's runs must end bitwise equal to."""
    workdir = tmp_path_factory.mktemp("local")
    loop.run(tiny_config(workdir, DATASET, **RUN, **{"train.total_steps": 6}))
    return workdir / "checkpoint" / "run1"


def test_a_run_in_a_bucket_keeps_everything_there_sets_a_damaged_step_aside_within_it_resumes_bitwise_and_is_read(
        gcs, inputs, local_reference, tmp_path, capfd):
    model, data = inputs
    workdir = gcs.url("run-a")
    run_dir = storage.path(workdir) / "checkpoint" / "run1"
    loop.run(tiny_config(workdir, data, **RUN, **{"model.name": model, "train.total_steps": 4}))
    assert checkpoints.steps_of(run_dir) == [2, 4]
    arrays = [p for p in storage.files_of(run_dir / "4" / "params") if "/d/" in str(p)]
    largest = max(arrays, key=storage.size)  # one bit flipped in step 4's largest array object
    damaged = bytearray(largest.read_bytes())
    damaged[len(damaged) // 2] ^= 0x10
    largest.write_bytes(bytes(damaged))
    capfd.readouterr()
    loop.run(tiny_config(workdir, data, **RUN, **{"model.name": model, "train.total_steps": 6}))  # resumes from 2
    err = capfd.readouterr().err
    assert "checkpoint step 4" in err and "do not match their checksums" in err, err[-2000:]
    aside = [p.name for p in RunDir(run_dir).damaged.iterdir()]
    assert len(aside) == 1 and aside[0].startswith("4."), aside  # moved within the bucket, never deleted
    same_params(run_dir, local_reference)
    assert checkpoints.steps_of(run_dir) == [4, 6]  # checkpoint.keep=2, in the bucket too
    assert checkpoints.steps_of(RunDir(run_dir).best.path) != []  # keep_best's run directory survived
    names = {str(p)[len(workdir) + 1:] for p in storage.files_of(workdir)}
    for name in ("checkpoint/run1/hparams.json", "checkpoint/run1/encoder.json", "checkpoint/run1/run_config.json",
                 "checkpoint/run1/dataset.json", "logs/run1/metrics.jsonl.parts/000000000001.jsonl",
                 "logs/run1/curves.png",
                 "logs/run1/run_config.json", "samples/run1/samples-2", "samples/run1/samples-6"):
        assert name in names, name
    assert any(n.startswith("logs/run1/events.out.tfevents") for n in names)
    records = report.read_metrics(storage.path(workdir) / "logs/run1")  # metrics.jsonl's parts, read as one
    assert {r["step"] for r in records if "loss" in r} == {1, 2, 3, 4, 5, 6}  # both runs' lines, appended
    assert not (run_dir.parent / "run1.lock").exists()  # released at the end

    capfd.readouterr()
    cli_main(["sample", "--model_dir", str(run_dir), "--length", "3", "--seed", "0"])
    cli_main(["evaluate", "--model_dir", str(run_dir), "--dataset", data, "--window", "16", "--json"])
    evaluated = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert evaluated["tokens"] > 0 and np.isfinite(evaluated["loss"])
    cli_main(["export", "--model_dir", str(run_dir), "--out", str(tmp_path / "exported")])
    assert (tmp_path / "exported" / "model.safetensors").is_file()
    cli_main(["encode", data, gcs.url("encoded", "data.bin"), "--model_dir", str(run_dir)])
    cli_main(["evaluate", "--model_dir", str(run_dir), "--dataset", gcs.url("encoded", "data.bin"), "--window", "16",
              "--json"])
    assert json.loads(capfd.readouterr().out.strip().splitlines()[-1]) == evaluated


def test_changed_data_in_a_bucket_is_one_line(gcs, inputs):
    model, _ = inputs
    data = upload(DATASET, gcs.url("changing", "data.txt"))
    workdir = gcs.url("run-changed")
    loop.run(tiny_config(workdir, data, **{"model.name": model, "train.total_steps": 2}))
    storage.path(data).write_text(DATASET.read_text() + "\n# one more line\n")
    with pytest.raises(UserError, match="data.dataset changed since this run started .*data.txt"):
        loop.run(tiny_config(workdir, data, **{"model.name": model, "train.total_steps": 4}))


@pytest.mark.usefixtures("no_compile")
def test_a_missing_bucket_dataset_or_model_is_one_line_before_anything_compiles(gcs, inputs):
    model, data = inputs
    with pytest.raises(UserError, match="--workdir gs://no-such-bucket/w: cannot write there .*the bucket "
                                        "no-such-bucket does not exist"):
        loop.run(tiny_config("gs://no-such-bucket/w", data, **{"model.name": model}))
    with pytest.raises(UserError, match=f"dataset '{gcs.url('inputs', 'nothing.txt')}': no file matches"):
        loop.run(tiny_config(gcs.url("w"), gcs.url("inputs", "nothing.txt"), **{"model.name": model}))
    with pytest.raises(UserError, match=f"model directory {gcs.url('inputs', 'no-model')} does not exist"):
        loop.run(tiny_config(gcs.url("w"), data, **{"model.name": gcs.url("inputs", "no-model")}))


def _launch(log: Path, workdir: str, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """launch.py on the tiny model in the background, its output (stdout then stderr) in the file `log`."""
    proc = subprocess.Popen([sys.executable, "launch.py", "--config=experiments/finetune.py", f"--workdir={workdir}",
                             f"--config.model.name={FIXTURES / 'openai_tiny'}", f"--config.data.dataset={DATASET}",
                             "--config.data.seq_len=16", "--config.train.batch_size=2",
                             "--config.sample.sample_every=0", *extra],
                            cwd=REPO, env=env or os.environ, stdout=log.open("w"), stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def _ended(proc: subprocess.Popen, timeout: float = 240) -> str:
    """The output of a launch once it ended."""
    proc.wait(timeout=timeout)
    return proc.log.read_text(errors="replace")


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.log.read_text()[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_second_launch_is_refused_while_the_lock_is_fresh_and_a_killed_job_not_for_longer_than_the_lease(
        gcs, tmp_path):
    workdir = gcs.url("run-locked")
    lease = "--config.checkpoint.lock_lease_s=6"
    lock = storage.path(workdir) / "checkpoint" / "run1.lock"
    first = _launch(tmp_path / "first", workdir, lease, "--config.train.total_steps=100000",
                    "--config.checkpoint.save_every=5")
    try:
        _wait_for(lambda: checkpoints.steps_of(storage.path(workdir) / "checkpoint" / "run1"), first)
        out = _ended(_launch(tmp_path / "second", workdir, lease, "--config.train.total_steps=3"))
        line = out.strip().splitlines()[-1]
        assert "is being trained by another job (host " in line and "renewed" in line, out[-3000:]
        assert "checkpoint.lock_lease_s=6" in line and "nothing was written" in line, line
        assert json.loads(lock.read_text())["pid"] == first.pid
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    killed_at = time.monotonic()
    again = _launch(tmp_path / "again", workdir, lease, "--config.train.total_steps=3")  # the lock left behind is fresh
    out = _ended(again)
    assert again.returncode == 2 and "is being trained by another job" in out, out[-3000:]
    time.sleep(max(0.0, 6.5 - (time.monotonic() - killed_at)))
    last = _launch(tmp_path / "last", workdir, lease, "--config.train.total_steps=3")
    out = _ended(last)
    assert last.returncode == 0, out[-3000:]
    assert "taking over the lock" in out and "longer than checkpoint.lock_lease_s=6" in out, out[-3000:]
    assert not lock.exists()


def test_the_store_failing_mid_run_is_one_line_exit_3_and_earlier_steps_are_intact(tmp_path):
    store = GCS(data=tmp_path / "store")  # an emulator of its own, stopped mid-run, kept on disk
    try:
        env = {**os.environ, **store.env}
        workdir = store.url("run-failing")
        run_dir = storage.path(workdir) / "checkpoint" / "run1"
        proc = _launch(tmp_path / "failing", workdir, "--config.train.total_steps=100000",
                       "--config.checkpoint.save_every=2", "--config.checkpoint.store_timeout_s=8", env=env)
        with store.active():
            _wait_for(lambda: (run_dir / "4" / "commit_success.txt").exists(), proc)
        store.stop()
        out = _ended(proc, timeout=300)
        lines = [line for line in out.splitlines() if line.strip()]
        assert proc.returncode == 3 and "Traceback" not in out, out[-3000:]
        assert lines[-1].startswith("launch.py: error: ") and workdir in lines[-1], lines[-1]
        assert "could not write checkpoint step" in lines[-1] or "a write under" in lines[-1], lines[-1]
        store.start()
        with store.active():  # the steps written before the store failed are whole and verify
            steps = checkpoints.steps_of(run_dir)
            assert 4 in steps, steps
            rundir.load_run_params(run_dir / str(max(steps)))
    finally:
        store.stop()


# --- The lease: renewed within its lease, fenced by generation, judged by the store's clock --------------------

def _lease(store: GCS, name: str, lease_s: float) -> lock.RunLease:
    return lock.RunLease(store.url(name, "run1.lock"), store.url(name, "run1"), lease_s)


def test_a_lease_survives_a_store_outage_shorter_than_it_and_lapses_after_a_longer_one(tmp_path):
    store = GCS(data=tmp_path / "store")
    try:
        with store.active():
            lease = _lease(store, "outage", 8.0)
            lease.acquire()  # renewed every 2 s
            store.stop()
            time.sleep(4.0)  # renewals fail meanwhile, and are retried
            store.start()
            time.sleep(4.0)
            lease.check()  # a renewal got through within the lease: still this job's
            assert time.monotonic() - lease.renewed_at < 4.0
            lease.fence()
            store.stop()
            time.sleep(9.0)  # longer than the lease: no renewal got through
            with pytest.raises(lock.LeaseLost, match=r"lost the lock of .*outage/run1 \(no renewal of it got "
                                                            r"through within checkpoint.lock_lease_s=8 s\); stopped "
                                                            r"before writing more"):
                lease.check()
            store.start()
            lease.release()
    finally:
        store.stop()


def test_a_lock_taken_over_is_fenced_before_the_next_write_and_staleness_is_judged_by_the_store_clock(
        gcs, monkeypatch):
    lease = _lease(gcs, "fenced", 60.0)
    lease.acquire()
    # The local clock an hour ahead: a fresh lock is still fresh, as the store's own times say.
    real = lock.datetime.datetime

    class Ahead(real):
        @classmethod
        def now(cls, tz=None):
            return real.now(tz) + lock.datetime.timedelta(hours=1)

    monkeypatch.setattr(lock.datetime, "datetime", Ahead)
    with pytest.raises(UserError, match="is being trained by another job .*renewed 0 s ago"):
        _lease(gcs, "fenced", 60.0).acquire()
    monkeypatch.undo()
    lease.blob.bucket.blob(lease.blob.name).upload_from_string(b'{"host": "other"}')  # another job took it over
    with pytest.raises(lock.LeaseLost, match="another job took it over"):
        lease.fence()  # the generation in the store is not this job's: no more writes
    with pytest.raises(lock.LeaseLost):
        lease.check()
    lease.release()  # not deleted: it is the other job's now
    assert storage.path(gcs.url("fenced", "run1.lock")).read_text() == '{"host": "other"}'
