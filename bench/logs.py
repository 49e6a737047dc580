"""What one flush of a run's logs to a bucket costs as the run grows: metrics.jsonl and TensorBoard's events,
flushed with 1k and with 100k records already written, the way gpt2-jax writes them (storage.AppendLog and the
TensorBoard writer's objects: only the records since the last flush, written as a new object by a thread of their
own) against the way it did before (the whole log kept in memory and rewritten as one object at every flush, on the
caller's thread; kept here as the peer).

    python bench/logs.py [--records 1000 100000] [--new 100] [--repeat 9] [--smoke] [--no_record]

Against the tests' GCS emulator (tests/gcs_emulator.py, in memory) on 127.0.0.1, started here. Each flush follows
--new records (about 10 s of a fast run's metrics); "the caller waits" is the flush call (what the training thread
pays), "until in the store" runs until the object is written, and "bytes uploaded" is that object's size.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def arguments() -> argparse.ArgumentParser:
    """The command line (also parsed by tests/test_bench.py)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, nargs="+", default=[1000, 100000],
                        help="records already written when the timed flushes happen")
    parser.add_argument("--new", type=int, default=100, help="records written before each timed flush")
    parser.add_argument("--repeat", type=int, default=9, help="timed flushes per case (median reported)")
    common.add_record_flags(parser, "tiny logs, to check the script runs")
    return parser


def metric_lines(first: int, count: int) -> str:
    """metrics.jsonl lines as the loop writes them, one per step."""
    return "".join(json.dumps({"step": s, "loss": 3.0 + 1 / (s + 1), "avg_loss": 3.1, "learning_rate": 1e-4,
                               "grad_norm": 0.8123, "tokens_per_sec": 12345.6, "mfu": 0.412,
                               "time": round(1.7e9 + s, 3)}) + "\n" for s in range(first, first + count))


def event_records(first: int, count: int) -> bytes:
    """TensorBoard scalar events, framed as tensorboardX's RecordWriter frames them (length, CRCs)."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c
    from tensorboardX.summary import scalar

    out = io.BytesIO()
    for s in range(first, first + count):
        event = event_pb2.Event(wall_time=1.7e9 + s, step=s, summary=scalar("loss", 3.0 + 1 / (s + 1)))
        data = event.SerializeToString()
        header = struct.pack("Q", len(data))
        out.write(header + struct.pack("I", masked_crc32c(header)) + data + struct.pack("I", masked_crc32c(data)))
    return out.getvalue()


class WholeObject:
    """The peer, the way before: everything written kept in memory, the object rewritten whole at every flush on
    the caller's thread (the old AppendLog in a store and the old TensorBoard object)."""

    def __init__(self, url: str):
        from gpt2_jax import storage

        self.path, self.buffer = storage.path(url), io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        self.path.write_bytes(self.buffer.getvalue())


def time_flushes(write: Any, flush: Any, wait: Any, last_object: Any, first: int, new: int, repeat: int,
                 records: Any) -> tuple[float, float, int]:
    """Medians of (the flush call s, until in the store s, bytes of the object it wrote) over `repeat` flushes,
    each after `new` records."""
    called, stored, sizes = [], [], []
    for r in range(repeat):
        write(records(first + r * new, new))
        t0 = time.perf_counter()
        flush()
        t1 = time.perf_counter()
        wait()
        t2 = time.perf_counter()
        called.append(t1 - t0)
        stored.append(t2 - t0)
        sizes.append(last_object())
    return statistics.median(called), statistics.median(stored), int(statistics.median(sizes))


def run_case(root: str, kind: str, written: int, new: int, repeat: int) -> list[tuple]:
    """The rows of one log kind at one size: the way now, then the way before."""
    from gpt2_jax import storage

    rows = []
    if kind == "metrics.jsonl":
        text = lambda first, count: metric_lines(first, count)  # noqa: E731
        url = f"{root}/now/metrics.jsonl"
        log = storage.AppendLog(url, upload_every_s=0)
        log.write(text(0, written))
        log.flush(force=True)
        now = time_flushes(log.write, log.flush, lambda: log.flush(force=True),
                           lambda: storage.size(storage.log_parts(url)[-1]), written, new, repeat, text)
        log.close()
        old = WholeObject(f"{root}/before/metrics.jsonl")
        encoded = lambda first, count: text(first, count).encode()  # noqa: E731
    else:
        url = f"{root}/now/events.out.tfevents.1700000000.bench"
        rolled = storage._RolledObject(url)
        rolled.write(event_records(0, written))
        rolled.flush()
        rolled.uploads.wait()
        flushes = iter(range(2, repeat + 2))
        now = time_flushes(rolled.write, rolled.flush, rolled.uploads.wait,
                           lambda: storage.size(f"{url}.{next(flushes):012d}"), written, new, repeat, event_records)
        rolled.close()
        old = WholeObject(f"{root}/before/events.out.tfevents.1700000000.bench")
        encoded = event_records
    old.write(encoded(0, written))
    old.flush()
    before = time_flushes(old.write, old.flush, lambda: None, lambda: storage.size(old.path), written, new, repeat,
                          encoded)
    for way, (called, stored, size) in (("now: new records as a new object, in a thread", now),
                                        ("before: the whole log rewritten", before)):
        rows.append((kind, f"{written:,}", way, f"{called * 1e3:.2f}", f"{stored * 1e3:.1f}", f"{size:,}"))
    return rows


def main() -> None:
    """Run the benchmark, print its table and record it."""
    args = arguments().parse_args()
    if args.smoke:
        args.records, args.new, args.repeat, args.no_record = [10, 100], 5, 1, True

    from conftest import GCS

    store = GCS()  # its address in the environment before gcsfs is imported (as the tests' fixture does)
    os.environ.update(store.env)
    rows = []
    try:
        for kind in ("metrics.jsonl", "TensorBoard events"):
            for written in args.records:
                rows += run_case(store.url("bench", f"{kind.split()[0]}-{written}"), kind, written, args.new,
                                 args.repeat)
    finally:
        store.stop()
    title = (f"One flush of a run's logs to a bucket (GCS emulator on 127.0.0.1), {args.new} new records a flush, "
             f"median of {args.repeat}")
    header = ["log", "records already written", "way", "the caller waits ms", "until in the store ms",
              "bytes uploaded"]
    common.report(common.table(title, header, rows), record=not args.no_record, out=args.out)


if __name__ == "__main__":
    main()
