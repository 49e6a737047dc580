"""log.wandb: a run's records, read back from W&B's offline run file, equal metrics.jsonl; a resumed run continues
the same W&B run; W&B unreachable or broken is one warning and the run unchanged; no network anywhere."""

from __future__ import annotations

import importlib.metadata
import json
import re
import struct
import zlib
from collections import defaultdict
from pathlib import Path

import jax
import pytest

from conftest import FIXTURES, free_port, needs_module
from gpt2_jax import loop, wandb_sink
from gpt2_jax.errors import UserError
from gpt2_jax.settings import check_config
from gpt2_jax.weights import load_weights
from test_loop import TINY_MODEL, read_metrics, tiny_config

DATA = FIXTURES / "make_openai_checkpoint.py"  # any text: the tiny model's vocabulary is bytes
FIELDS = {"data.val_split": 0.2, "data.val_every": 2, "data.val_batch_count": 2, "train.total_steps": 4}
TIMED = ("time", "tokens_per_sec", "mfu")  # a record's wall-clock fields, which differ between two runs


def run_config(workdir: Path, **fields):
    return tiny_config(workdir, DATA, **{**FIELDS, **fields})


def by_step(records: list[dict], leave_out: tuple[str, ...] = ("time",)) -> dict[int, dict]:
    """metrics.jsonl's records of each step merged (the end's validation is a second record of the last step)."""
    merged: dict[int, dict] = defaultdict(dict)
    for r in records:
        merged[r["step"]].update({k: v for k, v in r.items() if k != "step" and k not in leave_out})
    return dict(merged)


def wandb_records(path: Path) -> list:
    """The records of a .wandb file: a LevelDB-style log (wandb's ':W&B' header, then 32 KiB blocks of chunks, each
    crc32 + length + type) of wandb's own protobuf Records. wandb no longer ships a Python reader of it."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))), f"{path}: damaged chunk at {pos}"
        pos, pending = pos + 7 + length, pending + chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def offline_runs(where: Path) -> list[tuple[str, dict, dict[int, dict]]]:
    """Each offline run under `where`/wandb, oldest first: (run id, config, {step: history row less W&B's keys})."""
    runs = []
    for run_dir in sorted(where.glob("wandb/offline-run-*")):
        (file,) = run_dir.glob("*.wandb")
        records = wandb_records(file)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        config = {u.key: json.loads(u.value_json) for u in run.config.update}
        history = {}
        for r in records:
            if r.WhichOneof("record_type") == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                history[r.history.step.num] = {k: v for k, v in row.items() if not k.startswith("_")}
        runs.append((run.run_id, config, history))
    return runs


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """W&B offline, everything it writes under tmp_path (none of the user's settings or credentials read); a run's
    files in its logs' directory (no WANDB_DIR). wandb reads the environment once per process (wandb.setup): it is
    torn down before and after, so that each test's holds."""
    needs_module("wandb", "wandb")
    import wandb

    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_DIR", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    wandb.teardown()
    yield
    wandb.teardown()


@pytest.fixture(scope="module")
def without_wandb(tmp_path_factory) -> dict[int, dict]:
    """The reference: the same run with log.wandb off, its records by step less their timings."""
    workdir = tmp_path_factory.mktemp("plain")
    loop.run(run_config(workdir))
    return by_step(read_metrics(workdir), TIMED)


def test_the_records_in_wandb_equal_metrics_jsonl_and_a_resumed_run_continues_the_same_wandb_run(
        tmp_path, wandb_env, without_wandb):
    workdir = tmp_path / "work"
    loop.run(run_config(workdir, **{"log.wandb": True}))
    before = read_metrics(workdir)
    assert by_step(before, TIMED) == without_wandb  # W&B changes nothing in the run
    loop.run(run_config(workdir, **{"log.wandb": True, "train.total_steps": 6}))  # resumes at step 4
    after = read_metrics(workdir)[len(before):]

    log_dir = workdir / "logs" / "run1"  # one offline directory a launch, beside metrics.jsonl
    (first_id, first_config, first), (second_id, second_config, second) = offline_runs(log_dir)
    assert first_id == second_id == wandb_sink.run_id("run1", str(log_dir.resolve()))
    assert sorted(first) == list(range(5)) and sorted(second) == [4, 5, 6]  # the resumed run validates at 4
    assert first == by_step(before) and second == by_step(after)  # every step's keys and values, exactly
    assert "val_loss" in first[0] and "grad_norm" in first[4] and "val_loss" in second[6]
    assert first_config["train"]["total_steps"] == 4 and second_config["train"]["total_steps"] == 6
    _, params = load_weights(TINY_MODEL)
    assert first_config["run_settings"] == {
        "model": {"n_vocab": 257, "n_ctx": 32, "n_embd": 16, "n_head": 2, "n_layer": 2},
        "num_params": sum(x.size for x in jax.tree.leaves(params)), "tokens_per_step": 32, "seq_len": 16,
        "rows_per_step": 2, "objective": "lm", "mesh": {"data": 1, "fsdp": 1}, "processes": 1}


@pytest.mark.parametrize("failure", ["unreachable", "log fails"])
def test_wandb_failing_is_one_warning_and_the_run_goes_on_unchanged(tmp_path, wandb_env, without_wandb,
                                                                    monkeypatch, capsys, failure):
    if failure == "unreachable":  # online, to a port nobody listens on
        monkeypatch.setenv("WANDB_MODE", "online")
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
        monkeypatch.setattr(wandb_sink, "INIT_TIMEOUT_S", 1.0)
    else:  # wandb broken mid-run; its files in WANDB_DIR
        import wandb

        def broken(*args, **kwargs):
            raise RuntimeError("wandb-core went away")
        monkeypatch.setattr(wandb.Run, "log", broken)
        (tmp_path / "elsewhere").mkdir()
        monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    loop.run(run_config(tmp_path, **{"log.wandb": True}))
    warnings = [line for line in capsys.readouterr().out.splitlines() if "W&B" in line]
    what = "could not start W&B run run1-" if failure == "unreachable" else "W&B stopped logging at step 0 "
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {what}"), warnings
    assert by_step(read_metrics(tmp_path), TIMED) == without_wandb
    if failure == "log fails":
        assert len(offline_runs(tmp_path / "elsewhere")) == 1 and not (tmp_path / "logs" / "run1" / "wandb").exists()


def test_a_resumed_wandb_run_is_not_sent_the_steps_it_holds_already():
    class Run:  # a W&B run resumed online at its step 5; wandb would drop earlier steps, a warning line each
        starting_step, logged = 5, []

        def log(self, record, step):
            self.logged.append((step, record))

    sink = wandb_sink.WandbSink(Run())
    for step in range(3, 7):  # steps 3 and 4 repeated after a crash
        sink.log(step, {"loss": float(step)})
    assert Run.logged == [(5, {"loss": 5.0}), (6, {"loss": 6.0})]


@pytest.mark.parametrize("installed", [None, "0.28.1", "0.28.2", "1.0.0rc1"])
def test_log_wandb_without_wandb_or_with_an_old_one_is_one_line_at_config_check(tmp_path, monkeypatch, installed):
    def version(name: str, real=importlib.metadata.version) -> str:
        if name != "wandb":
            return real(name)
        if installed is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed

    monkeypatch.setattr(importlib.metadata, "version", version)
    check_config(run_config(tmp_path))  # off: wandb is not asked for
    if installed in ("0.28.2", "1.0.0rc1"):
        check_config(run_config(tmp_path, **{"log.wandb": True}))
        return
    have = "Weights & Biases is not installed" if installed is None else "wandb 0.28.1 is older than 0.28.2"
    with pytest.raises(UserError, match=rf"^log.wandb=True: {have}.*; pip install 'gpt2-jax\[wandb\]'$"):
        check_config(run_config(tmp_path, **{"log.wandb": True}))


def test_the_wandb_run_id_is_the_runs_in_wandbs_characters():
    ident = wandb_sink.run_id("my run/1:ü", "/work/logs/my run/1:ü")
    assert re.fullmatch(r"my-run-1-[0-9a-f]{12}", ident), ident
    assert ident == wandb_sink.run_id("my run/1:ü", "/work/logs/my run/1:ü")
    assert ident != wandb_sink.run_id("my run/1:ü", "/elsewhere/logs/my run/1:ü")
    assert len(wandb_sink.run_id("x" * 300, "/w")) <= 64
