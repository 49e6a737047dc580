"""The run's lock: one job trains a run directory at a time.

On a disk, process 0 holds an exclusive flock on RUN.lock beside the run directory (the operating system
releases it however the process ends). In Google Cloud Storage, where there is no flock, a lock object with a
lease (RunLease). A second job on the same run is refused in one line, exit 2.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import threading
import time
from typing import Any

from gpt2_jax import storage
from gpt2_jax.errors import UserError, reason
from gpt2_jax.rundir import RunDir


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.datetime.now().isoformat(timespec="seconds")}


def _busy(run_dir: Any, who: str, more: str = "") -> UserError:
    return UserError(f"{run_dir} is being trained by another job ({who}); stop that job first, or train under another "
                     f"run_name{more} (nothing was written)")


class LeaseLost(UserError):
    """This job no longer holds its run's lock: it stops before its next write, so that one job writes the run."""


class RunLease:
    """The lock of a run in Google Cloud Storage, where there is no flock: an object created only if absent
    (generation precondition 0), renewed by a thread of process 0 every lease/4 seconds while it trains (each
    renewal conditional on the generation it wrote last, retried until it succeeds or the lease runs out),
    and deleted at the end. Another launch judges the lock stale by the store's clock alone (its object's
    last update against the time the store gives a probe object just written), after `lease_s`, and takes
    it over: kill -9 locks a run out for no longer than the lease.

    This job's lease runs from the moment it sent its last renewal that the store took (a conservative bound
    of the store's own view). `check()`, cheap, raises LeaseLost when the lease lapsed (no renewal got
    through in `lease_s`) or another job took the lock over; `fence()`, before a checkpoint, also asks the
    store whether the lock object is still the generation this job wrote (fencing by generation).
    """

    def __init__(self, url: Any, run_dir: Any, lease_s: float):
        from google.cloud import storage as gcs

        bucket, _, name = str(url).split("://", 1)[1].partition("/")
        self.blob = gcs.Client().bucket(bucket).blob(name)
        self.run_dir, self.lease_s = run_dir, lease_s
        self.lost: str | None = None  # why this job lost the lock (set by the renewing thread)
        self.renewed_at = time.monotonic()  # when the last renewal the store took was sent
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_until_stopped, daemon=True)

    def _store_now(self) -> datetime.datetime:
        """The store's clock: the update time it gives a probe object written now (then removed)."""
        probe = self.blob.bucket.blob(f"{self.blob.name}.clock-{socket.gethostname()}-{os.getpid()}")
        probe.upload_from_string(b"", timeout=self.lease_s)
        try:
            return probe.updated
        finally:
            try:
                probe.delete(timeout=self.lease_s)
            except Exception:  # noqa: BLE001 - an empty probe left behind harms nothing
                pass

    def acquire(self) -> None:
        """Create the lock object, taking over a stale one; a fresh one held by another job: UserError."""
        from google.api_core.exceptions import NotFound, PreconditionFailed

        for _ in range(3):
            try:
                sent = time.monotonic()
                self.blob.upload_from_string(json.dumps({**_holder(), "lease_s": self.lease_s}),
                                             if_generation_match=0)
                self.renewed_at = sent
                self._thread.start()
                return
            except PreconditionFailed:
                held = self.blob.bucket.get_blob(self.blob.name)
                if held is None:  # released meanwhile
                    continue
                age = (self._store_now() - held.updated).total_seconds()
                try:
                    who = json.loads(held.download_as_text())
                    who = f"host {who['host']}, process id {who['pid']}, since {who['since']}"
                except Exception:  # noqa: BLE001 - unreadable or deleted meanwhile: say what is known
                    who = "a job that did not say who it is"
                if age <= self.lease_s:
                    raise _busy(self.run_dir, f"{who}, its lock {self.blob.name} renewed {max(age, 0):.0f} s ago",
                                f"; a job that was killed holds it for at most checkpoint.lock_lease_s="
                                f"{self.lease_s:g} s") from None
                _warn(f"taking over the lock of {self.run_dir} from {who}: not renewed for {age:.0f} s, longer "
                      f"than checkpoint.lock_lease_s={self.lease_s:g} (its job was killed)")
                try:
                    held.delete(if_generation_match=held.generation)
                except (NotFound, PreconditionFailed):
                    pass  # another launch took it over first: the next attempt finds out whose it is
        raise _busy(self.run_dir, "another launch is taking it over at this moment")

    def _renew_until_stopped(self) -> None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        while not self._stop.wait(self.lease_s / 4):
            while not self._stop.is_set():  # retried until it gets through, or the lease has run out
                left = self.renewed_at + self.lease_s - time.monotonic()
                if left <= 0:
                    self.lost = "no renewal of it got through"
                    return
                sent = time.monotonic()
                try:
                    self.blob.upload_from_string(json.dumps({**_holder(), "lease_s": self.lease_s}),
                                                 if_generation_match=self.blob.generation, retry=None,
                                                 timeout=max(left, 1.0))
                    self.renewed_at = sent
                    break
                except (PreconditionFailed, NotFound):
                    self.lost = "another job took it over"
                    return
                except Exception:  # noqa: BLE001 - a passing failure of the store: tried again within the lease
                    self._stop.wait(min(1.0, max(left - (time.monotonic() - sent), 0.0)))

    def _lost(self, why: str) -> LeaseLost:
        return LeaseLost(f"lost the lock of {self.run_dir} ({why} within checkpoint.lock_lease_s={self.lease_s:g} s); "
                         "stopped before writing more, so that one job writes the run. Check that no other job "
                         "trains it, then launch again: it resumes from the last complete checkpoint")

    def check(self) -> None:
        """Raise LeaseLost when this job's lease lapsed or another job took the lock over."""
        if self.lost:
            raise self._lost(self.lost)
        if time.monotonic() - self.renewed_at > self.lease_s:
            raise self._lost("no renewal of it got through")

    def fence(self) -> None:
        """check(), and the lock object in the store is still the generation this job wrote (before a save)."""
        self.check()
        try:  # one attempt, briefly: a store that is failing fails the save itself, with its own line
            held = self.blob.bucket.get_blob(self.blob.name, retry=None, timeout=min(self.lease_s, 10.0))
        except Exception:  # noqa: BLE001 - the store is failing: the save itself will say so
            return
        if held is None or held.generation != self.blob.generation:
            self.lost = "another job took it over"
            raise self._lost(self.lost)

    def release(self) -> None:
        """Stop renewing and delete the lock object, if it is still this job's."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.lease_s / 4)
        if not self.lost:
            try:
                self.blob.delete(if_generation_match=self.blob.generation, retry=None, timeout=10)
            except Exception:  # noqa: BLE001 - already gone, or the store is failing: it goes stale
                pass


@contextlib.contextmanager
def claim_run(run_dir: Any, is_main: bool = True, lease_s: float = 300.0):
    """Hold the run directory for this job while it trains; yields a RunLease in Cloud Storage, else None.

    On a disk: process 0 takes an exclusive flock on its run_lock file (naming this host and process id),
    which the operating system releases when the process ends however it ends (kill -9 leaves nothing
    stale). In gs://: a RunLease. A second job on the same run directory is refused in one line, exit 2.
    Where neither works (a network filesystem without locks, another store) the run goes on, with a warning.
    """
    if not is_main:
        yield None
        return
    lock = RunDir(run_dir).lock
    if storage.is_url(lock):
        if not str(lock).startswith("gs://"):
            _warn(f"cannot lock {lock} (runs are locked on disks and in gs:// only): a second launch on this run "
                  "would not be refused; make sure only one job trains in it")
            yield None
            return
        lease = RunLease(lock, run_dir, lease_s)
        lease.acquire()
        try:
            yield lease
        finally:
            lease.release()
        return
    created = [d for d in (lock.parent, *lock.parent.parents) if not d.exists()]  # removed again if left empty
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd, locked = _flock(lock, run_dir)
    try:
        yield None
    finally:
        if locked:  # removed while still held: a launch that did nothing leaves nothing behind
            lock.unlink(missing_ok=True)
        os.close(fd)  # releases the lock
        for d in created:  # innermost first
            try:
                d.rmdir()
            except OSError:  # not empty (the run wrote there), or gone
                break


def _flock(lock: Any, run_dir: Any) -> tuple[int, bool]:
    """(descriptor, whether it is locked) of the lock file, held exclusively, naming this host and process.
    The file is removed when released, so a launch that took a file another job has just removed retries on the
    file now at that path (the inode it locked must be the path's)."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            os.close(fd)
            try:
                who = json.loads(holder)
                who = f"host {who['host']}, process id {who['pid']}, since {who['since']}"
            except (ValueError, KeyError, TypeError):
                who = "a process that has not yet written its name"
            raise _busy(run_dir, who) from None
        except OSError as e:
            _warn(f"cannot lock {lock} ({reason(e)}): a second launch on this run would not "
                  "be refused; make sure only one job trains in it")
            return fd, False
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # released and removed by its holder meanwhile: try the file there now
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        return fd, True
