"""Fault injection on tiny runs: damaged checkpoints, a full disk, changed data, interrupted and large encodes.

Each fault must end in one clear line with a documented exit code (2: bad input or no usable
checkpoint, 3: a write failed) and lose nothing: a damaged checkpoint gives way to the newest good
one and the run ends bitwise where an undamaged run would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import FIXTURES, REPO
from gpt2_jax import checkpoints, loop, rundir
from gpt2_jax.cli import main as cli_main
from gpt2_jax.errors import StorageError, UserError
from gpt2_jax.rundir import RunDir
from test_loop import TINY_MODEL, read_metrics, tiny_config

DATASET = FIXTURES / "make_openai_checkpoint.py"
SAVE_EVERY_2 = {"checkpoint.save_every": 2, "train.noise": 0.1}  # noise: the rng stream must resume exactly too


def _largest_array_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "params").rglob("*")
             if p.is_file() and "ocdbt.process" in str(p) and "/d/" in str(p)]
    return max(files, key=lambda p: p.stat().st_size)


def flip_one_bit(step_dir: Path) -> None:
    """One bit flipped in the middle of the step's largest array file (the issue's silent corruption)."""
    path = _largest_array_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(step_dir: Path) -> None:
    """The step's largest array file cut to half its length."""
    path = _largest_array_file(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _tree(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def undamaged(tmp_path_factory) -> Path:
    """8 steps, checkpoints every 2: the reference a damaged run must end equal to."""
    workdir = tmp_path_factory.mktemp("undamaged")
    loop.run(tiny_config(workdir, DATASET, **SAVE_EVERY_2, **{"train.total_steps": 8}))
    return workdir


@pytest.mark.parametrize("damage", [flip_one_bit, truncate])
def test_a_damaged_latest_checkpoint_gives_way_to_the_previous_one_and_the_run_ends_bitwise(
        damage, undamaged, tmp_path, capfd):
    loop.run(tiny_config(tmp_path, DATASET, **SAVE_EVERY_2, **{"train.total_steps": 6}))
    run_dir = tmp_path / "checkpoint" / "run1"
    damage(run_dir / "6")
    damaged_bytes = _tree(run_dir / "6")
    capfd.readouterr()
    assert loop.run(tiny_config(tmp_path, DATASET, **SAVE_EVERY_2, **{"train.total_steps": 8}))["step"] == 8
    out, err = capfd.readouterr()
    assert "warning: checkpoint step 6 in" in err and ("do not match their checksums" in err or "cannot be read" in err)
    assert "restored step 4" in out + err
    assert f"warning: using checkpoint step 4 of {run_dir} (step 6 did not verify)" in err
    # the damaged step is set aside, byte for byte, and out of orbax's sight (it never counts towards keep)
    (aside,) = RunDir(run_dir).damaged.iterdir()
    assert aside.name.startswith("6.") and _tree(aside) == damaged_bytes
    assert checkpoints.steps_of(run_dir) == [2, 4, 6, 8]
    _, params = rundir.load_run_params(run_dir)
    _, reference = rundir.load_run_params(undamaged / "checkpoint" / "run1")
    jax.tree.map(np.testing.assert_array_equal, params, reference)  # bitwise
    losses = {m["step"]: m["loss"] for m in read_metrics(tmp_path) if "loss" in m}
    assert [losses[s] for s in (5, 6, 7, 8)] == [m["loss"] for m in read_metrics(undamaged) if m["step"] > 4]


def test_an_explicit_damaged_checkpoint_or_none_that_verifies_is_one_line_and_nothing_is_touched(undamaged, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(undamaged / "checkpoint" / "run1", source)
    flip_one_bit(source / "8")
    with pytest.raises(UserError, match=r"step 8: 1 of \d+ arrays do not match their checksums.*nothing was deleted"):
        loop.run(tiny_config(tmp_path / "w", DATASET, **{"train.total_steps": 9,
                                                       "checkpoint.restore_from": str(source / "8")}))
    for step in (2, 4, 6):
        truncate(source / str(step))
    before = _tree(source)
    with pytest.raises(UserError, match=r"no checkpoint in .*source can be used \(step 8: .*step 2: .*cannot be read"):
        rundir.load_run_params(source)
    assert _tree(source) == before  # nothing deleted or moved
    done = subprocess.run([sys.executable, "-m", "gpt2_jax", "sample", "--model_dir", str(source), "--length", "4"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "ignored" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("gpt2-jax sample: error: no checkpoint in ") and last.endswith(checkpoints.READ_ADVICE), last
    assert "restore_from" not in last  # training's advice, not a reading command's


def test_sample_and_export_fall_back_to_the_newest_checkpoint_that_verifies(undamaged, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(undamaged / "checkpoint" / "run1", run_dir)
    flip_one_bit(run_dir / "8")
    cli_main(["export", "--model_dir", str(run_dir), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert "warning: checkpoint step 8 in" in err and f"using checkpoint step 6 of {run_dir}" in err
    from gpt2_jax.weights import load_weights

    _, exported = load_weights(tmp_path / "hf")
    _, step6 = rundir.load_run_params(undamaged / "checkpoint" / "run1" / "6")
    jax.tree.map(np.testing.assert_array_equal, exported, step6)
    assert (run_dir / "8").is_dir()  # read-only commands set nothing aside


def test_a_checkpoint_saved_before_checksums_existed_still_resumes(tmp_path, capfd):
    loop.run(tiny_config(tmp_path, DATASET, **{"train.total_steps": 2}))
    meta_file = tmp_path / "checkpoint" / "run1" / "2" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "checksums"}))
    assert loop.run(tiny_config(tmp_path, DATASET, **{"train.total_steps": 3}))["step"] == 3
    assert "has no checksums (saved before gpt2-jax recorded them): not verified" in capfd.readouterr().err


# --- A full disk -------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (these machines run tests as root); CI must have it, elsewhere the test skips."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs for the full-disk tests: {done.stderr.decode().strip()}")
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave_kib: int) -> None:
    """Fill the disk until about leave_kib KiB are free."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "ab") as f:
        f.write(b"\0" * max(0, free - leave_kib * 1024))


def _train_cmd(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "launch.py", "--config=experiments/finetune.py", f"--workdir={workdir}",
            f"--config.model.name={TINY_MODEL}", f"--config.data.dataset={DATASET}", "--config.data.seq_len=16",
            "--config.train.batch_size=2", "--config.sample.sample_every=0", "--config.checkpoint.save_every=1",
            "--config.train.total_steps=6", *extra]


def test_a_disk_filling_during_an_async_save_is_one_line_exit_3_and_the_partial_step_removed(small_disk):
    fill(small_disk, leave_kib=200)  # more than the first save's estimate, less than it writes
    done = subprocess.run(_train_cmd(small_disk / "w"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr[-3000:]
    # the progress bar, and JAX's and its plugins' own log lines ("W1202 ...", "I0000 ...", absl's notice)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip() and not ln.startswith(("run1:", "WARNING: All log"))
             and not re.match(r"[IWEF]\d{4} ", ln)]
    assert lines == [lines[-1]] and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[-1].startswith("launch.py: error: could not write checkpoint step 1 to ")
    assert "No space left on device; a checkpoint needs about " in lines[-1]
    assert " is free; the partial step was removed" in lines[-1]
    run_dir = small_disk / "w" / "checkpoint" / "run1"
    assert not list(run_dir.glob("*tmp*")) and checkpoints.steps_of(run_dir) == []


def test_a_full_disk_keeps_earlier_checkpoints_sync_and_before_writing(small_disk, monkeypatch):
    workdir = small_disk / "w"
    sync = {"checkpoint.save_every": 1, "checkpoint.async_save": False}
    loop.run(tiny_config(workdir, DATASET, **sync, **{"train.total_steps": 2}))
    run_dir = workdir / "checkpoint" / "run1"
    step2 = _tree(run_dir / "2")
    fill(small_disk, leave_kib=60)
    with monkeypatch.context() as m:  # the check passes (as when another program fills the disk meanwhile)
        m.setattr(checkpoints.CheckpointWriter, "_needed_bytes", lambda self, trees: 1)
        with pytest.raises(StorageError, match=r"could not write checkpoint step 3 to .*: No space left on device; "
                                               r".*partial step was removed, .*resumes from step 2"):
            loop.run(tiny_config(workdir, DATASET, **sync, **{"train.total_steps": 6}))
    assert not list(run_dir.glob("*tmp*")) and checkpoints.steps_of(run_dir) == [1, 2]
    assert _tree(run_dir / "2") == step2
    fill(small_disk, leave_kib=50)  # now the check sees it cannot fit: nothing is written at all
    with pytest.raises(StorageError, match=r"not saving step 3 to .*: a checkpoint needs about .* but only .* is free "
                                           r"on that disk; nothing was written and .*resumes from step 2"):
        loop.run(tiny_config(workdir, DATASET, **sync, **{"train.total_steps": 6}))
    assert checkpoints.steps_of(run_dir) == [1, 2]
    (small_disk / "filler").unlink()  # space again: the run resumes where it was
    assert loop.run(tiny_config(workdir, DATASET, **sync, **{"train.total_steps": 3}))["step"] == 3


# --- Changed data on resume -------------------------------------------------------------------------

def test_resuming_on_changed_data_is_one_line_unless_accepted(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text(DATASET.read_text())
    loop.run(tiny_config(tmp_path, data, **{"train.total_steps": 2}))
    data.write_text(DATASET.read_text() + "\nmore text\n")
    with pytest.raises(UserError, match=r"data.dataset changed since this run started .*dataset.json\): "
                                        r".*data.txt \d+ -> \d+ bytes; .*data.allow_changed=True"):
        loop.run(tiny_config(tmp_path, data, **{"train.total_steps": 3}))
    result = loop.run(tiny_config(tmp_path, data, **{"train.total_steps": 3, "data.allow_changed": True}))
    assert result["step"] == 3
    assert loop.run(tiny_config(tmp_path, data, **{"train.total_steps": 4}))["step"] == 4  # the new data is recorded


# --- Encoding ----------------------------------------------------------------------------------------

def test_an_interrupted_encode_leaves_no_output_and_keeps_the_old_one(tmp_path, real_encoder, monkeypatch):
    from gpt2_jax import data as data_module

    monkeypatch.setattr(data_module, "BLOCK_CHARS", 1000)
    src = tmp_path / "in.txt"
    src.write_bytes(b"some text here\n" * 2000 + b"\xff")  # the error comes after many blocks were written
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")
    with pytest.raises(UserError, match="not valid utf-8 text at byte offset 30000"):
        data_module.encode_to_file(src, out, real_encoder, progress=False)
    assert out.read_bytes() == b"old" and not list(tmp_path.glob("*.tmp"))


def test_encoding_to_bin_holds_bounded_memory(tmp_path, shared_dir):
    # The whole-file encoder held every id as a Python int (17x the input); streaming holds a block.
    text = (shared_dir / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    big = tmp_path / "big.txt"
    big.write_text(text * 12, encoding="utf-8")  # 13 MB
    script = (f"import resource, sys; sys.path.insert(0, {str(REPO)!r})\n"
              "from gpt2_jax import encoder as e; from gpt2_jax.data import encode_to_file\n"
              f"enc = e.get_encoder({str(shared_dir / 'gpt2')!r}); e.PARALLEL_MIN_CHARS = 10**12\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              f"encode_to_file({str(big)!r}, {str(tmp_path / 'big.bin')!r}, enc, progress=False)\n"
              "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    grown_mib = int(done.stdout.split()[-1])
    assert grown_mib < 100, f"encoding 13 MB grew the process by {grown_mib} MiB"
    assert os.path.getsize(tmp_path / "big.bin") == 2 * json.loads((tmp_path / "big.bin.json").read_text())["tokens"]


def _launch_cmd(workdir: Path, *extra: str) -> list[str]:
    """launch.py on the tiny model, as undamaged's runs: 8 steps, checkpoints every 2, noise 0.1."""
    return [sys.executable, "launch.py", "--config=experiments/finetune.py", f"--workdir={workdir}",
            f"--config.model.name={TINY_MODEL}", f"--config.data.dataset={DATASET}", "--config.data.seq_len=16",
            "--config.train.batch_size=2", "--config.train.learning_rate=1e-3", "--config.sample.sample_every=0",
            "--config.checkpoint.save_every=2", "--config.train.noise=0.1", "--config.train.total_steps=8", *extra]


def _held(lock: Path) -> bool:
    """Whether some process holds the run directory's lock."""
    import fcntl

    if not lock.is_file():
        return False
    with open(lock) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_a_second_launch_on_a_run_in_training_is_refused_in_one_line_and_the_first_is_unharmed(tmp_path):
    run_dir = tmp_path / "a" / "checkpoint" / "run1"
    first = subprocess.Popen(_launch_cmd(tmp_path / "a"), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 120
        while not _held(RunDir(run_dir).lock) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first launch ended before the second could start"
        started = time.monotonic()
        second = subprocess.run(_launch_cmd(tmp_path / "a"), cwd=REPO, capture_output=True, text=True, timeout=120)
        refused_in = time.monotonic() - started
        first_out, first_err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
    line = second.stderr.strip().splitlines()[-1]
    assert line.startswith(f"launch.py: error: {run_dir} is being trained by another job (host ")
    assert f"process id {first.pid}, since " in line and "another run_name" in line
    assert refused_in < 60  # before compiling anything
    assert first.returncode == 0, first_err[-3000:]
    solo = subprocess.run(_launch_cmd(tmp_path / "solo"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert solo.returncode == 0, solo.stderr[-3000:]
    _, params = rundir.load_run_params(run_dir)
    _, reference = rundir.load_run_params(tmp_path / "solo" / "checkpoint" / "run1")
    jax.tree.map(np.testing.assert_array_equal, params, reference)  # the first run trained as if alone
    losses = lambda w: [m["loss"] for m in read_metrics(w) if "loss" in m]  # noqa: E731
    assert losses(tmp_path / "a") == losses(tmp_path / "solo") and len(losses(tmp_path / "a")) == 8  # one writer
    assert not _held(RunDir(run_dir).lock)  # released at the end
