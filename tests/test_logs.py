"""Logs whose cost does not grow with the run: metrics.jsonl in a store written in the background as numbered parts
(each holding only the lines since the last upload, a resumed run continuing the numbering) and read back as one;
TensorBoard's events rolled into new objects that TensorBoard's reading order puts back together; a failing store
raised as one line, never waited on by the caller. Against the local GCS emulator (conftest.gcs)."""

from __future__ import annotations

import contextlib
import json
import struct
import time

import pytest

from conftest import GCS
from gpt2_jax import report, storage
from gpt2_jax.errors import StorageError


def records(first: int, last: int) -> list[str]:
    return [json.dumps({"step": s, "loss": 10.0 - s / 8, "time": 1700000000.0 + s}) + "\n" for s in range(first, last)]


def part_names(log: str) -> list[str]:
    return [str(p).rsplit("/", 1)[-1] for p in storage.log_parts(log)]


def test_a_log_in_a_store_is_written_as_parts_of_only_the_new_lines_continued_on_resume_and_read_as_one(gcs):
    log_dir = gcs.url("parts", "run1")
    url = f"{log_dir}/metrics.jsonl"
    # a run written before logs were kept in parts: a whole object, its last line cut short by a kill
    storage.path(url).write_text("".join(records(0, 2)) + '{"step": 2, "lo')
    log = storage.AppendLog(url, upload_every_s=3600)
    for line in records(2, 5):
        log.write(line)
    log.flush(force=True)
    assert part_names(url) == ["000000000001.jsonl"]
    assert storage.path(f"{url}.parts/000000000001.jsonl").read_text() == "".join(records(2, 5))
    log.write(records(5, 6)[0])
    log.flush()  # the last upload is recent: nothing handed over yet
    log.write(records(6, 7)[0])
    log.close()
    assert part_names(url) == ["000000000001.jsonl", "000000000002.jsonl"]
    assert storage.path(f"{url}.parts/000000000002.jsonl").read_text() == "".join(records(5, 7))  # only the new
    resumed = storage.AppendLog(url, upload_every_s=0)  # every flush hands its lines over
    for line in records(7, 9):
        resumed.write(line)
        resumed.flush()
    resumed.close()
    assert part_names(url) == [f"{n:012d}.jsonl" for n in (1, 2, 3, 4)]  # numbered on after the parts there
    assert storage.path(f"{url}.parts/000000000004.jsonl").read_text() == records(8, 9)[0]
    assert storage.path(url).read_text().endswith('"lo')  # the object of the earlier run is never rewritten
    assert report.read_metrics(storage.path(log_dir)) == [json.loads(r) for r in records(0, 2) + records(2, 9)]


def test_a_log_on_a_disk_is_appended_and_flushed_as_before(tmp_path):
    for first, last in ((0, 3), (3, 5)):
        log = storage.AppendLog(tmp_path / "metrics.jsonl")
        for line in records(first, last):
            log.write(line)
        log.flush()
        assert (tmp_path / "metrics.jsonl").read_text() == "".join(records(0, last))  # on the disk at once
        log.check()
        log.close()
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    assert report.read_metrics(tmp_path) == [json.loads(r) for r in records(0, 5)]


@contextlib.contextmanager
def gcsfs_retries_bounded(seconds: float):
    """gs:// file systems made meanwhile give up after about `seconds` (the gcsfs part of storage.bound_retries, as
    the loop sets it), instead of a minute; the file system classes restored after."""
    import fsspec

    before = {scheme: fsspec.get_filesystem_class(scheme) for scheme in ("gs", "gcs")}
    storage._bound_gcsfs_retries(seconds)
    try:
        yield
    finally:
        for scheme, cls in before.items():
            fsspec.register_implementation(scheme, cls, clobber=True)


def one_line_error(call) -> str:
    with pytest.raises(StorageError) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message and "intact" in message, message
    return message


def test_a_failing_store_is_raised_as_one_line_by_check_and_close_and_the_caller_never_waits_on_it():
    store = GCS()  # an emulator of its own, stopped while the logs are written
    try:
        with gcsfs_retries_bounded(4), store.active():
            log_dir = store.url("logs", "run1")
            log = storage.AppendLog(f"{log_dir}/metrics.jsonl", upload_every_s=0)
            tb = storage.tensorboard_writer(log_dir)
            log.write(records(0, 1)[0])
            log.flush(force=True)
            store.stop()
            log.write(records(1, 2)[0])
            started = time.monotonic()
            log.flush()  # handed over to the uploading thread, which now waits out the store's retries
            assert time.monotonic() - started < 0.5  # a retry alone sleeps 1 s or more
            log.check()  # not failed yet
            deadline = time.monotonic() + 30
            while True:
                try:
                    log.check()
                except StorageError:
                    break
                assert time.monotonic() < deadline, "the upload to the stopped store did not fail"
                time.sleep(0.1)
            message = one_line_error(log.check)
            assert f"could not write {log_dir}/metrics.jsonl.parts/000000000002.jsonl: " in message, message
            assert one_line_error(log.close) == message
            tb.add_scalar("loss", 1.0, 1)  # TensorBoard's events: the same, raised by its close() and check_uploads()
            events = one_line_error(tb.close)
            assert f"could not write {log_dir}/events.out.tfevents." in events, events
            assert one_line_error(lambda: storage.check_uploads(log_dir)) in (message, events)
    finally:
        store.stop()


def read_events(blobs: list[bytes]) -> list:
    """The events of TensorBoard event files read one after the other, as TensorBoard reads the event files of a
    directory: TFRecords, each length and payload checked against its masked CRC-32C (tensorboardX's own)."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    events = []
    for blob in blobs:
        at = 0
        while at < len(blob):
            header = blob[at:at + 8]
            (length,) = struct.unpack("<Q", header)
            data = blob[at + 12:at + 12 + length]
            assert struct.unpack("<I", blob[at + 8:at + 12])[0] == masked_crc32c(header)
            assert struct.unpack("<I", blob[at + 12 + length:at + 16 + length])[0] == masked_crc32c(data)
            events.append(event_pb2.Event.FromString(data))
            at += 16 + length
    return events


def test_tensorboard_events_in_a_store_roll_into_new_objects_that_read_back_every_scalar_once(gcs):
    log_dir = gcs.url("tb", "run1")
    writer = storage.tensorboard_writer(log_dir)

    def objects() -> list:
        return [p for p in storage.files_of(log_dir) if "tfevents" in p.name]

    for step in range(5):
        writer.add_scalar("loss", 10.0 - step, step)
    writer.flush()  # as tensorboardX's thread does every 120 s: what its thread has written so far, uploaded
    deadline = time.monotonic() + 20
    while not objects():
        assert time.monotonic() < deadline, "no event object was written"
        time.sleep(0.1)
    first = objects()
    for step in range(5, 10):
        writer.add_scalar("loss", 10.0 - step, step)
        writer.add_scalar("lr", step / 100, step)
    writer.close()
    rolled = objects()
    assert len(rolled) >= 2 and rolled[:len(first)] == first
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in rolled[:len(first)]]  # never rewritten
    names = [p.name for p in rolled]
    assert names == sorted(names) and len({n.rsplit(".", 1)[0] for n in names}) == 1, names
    events = read_events([p.read_bytes() for p in rolled])  # in TensorBoard's order: by name
    assert events[0].file_version == "brain.Event:2"
    scalars = [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]
    expected = [(s, "loss", 10.0 - s) for s in range(5)]
    expected += [(s, tag, value) for s in range(5, 10) for tag, value in (("loss", 10.0 - s), ("lr", s / 100))]
    assert scalars == [(s, tag, pytest.approx(value)) for s, tag, value in expected]


def test_abandoned_uploads_write_nothing_more_and_close_at_once(gcs):
    log_dir = gcs.url("abandoned", "run1")
    log = storage.AppendLog(f"{log_dir}/metrics.jsonl")
    writer = storage.tensorboard_writer(log_dir)
    storage.abandon_uploads(log_dir)
    log.write(records(0, 1)[0])
    log.flush()
    writer.add_scalar("loss", 1.0, 1)
    log.close()
    writer.close()
    storage.check_uploads(log_dir)
    assert storage.files_of(log_dir) == []
