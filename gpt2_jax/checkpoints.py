"""Training checkpoints with orbax: params, optimizer state and run metadata, one directory per step.

A run directory (`WORKDIR/checkpoint/RUN_NAME/`) holds the orbax step directories plus
`hparams.json`, the vocabulary files and `run_config.json`, so it is also a model directory for
`gpt2-jax sample`, `evaluate` and `export`. Orbax writes each step under a temporary name and
renames it when complete, so a run killed mid-save restores from the last complete step.

Every saved array's checksum (two 32-bit sums of its words, computed on the devices) is stored in
the step's metadata and verified on every restore; a step that cannot be read or does not verify is
skipped for the newest one that does, and a resumed run sets it aside under `damaged/` (never
deleted, never counted towards `keep`). A save checks the free space first, and any write failure
becomes one StorageError line with the partial step removed.

This module owns reading a run directory (is_run_dir, resolve_checkpoint, load_run_params);
weights.py lists it among the model-directory layouts it reads; and claiming one (claim_run), so that
only one job trains in it at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from gpt2_jax import storage
from gpt2_jax.errors import StorageError, UserError, reason
from gpt2_jax.model import GPT2Config, convert_layout, merge_lora, param_shapes

RUN_CONFIG = "run_config.json"
DAMAGED = "damaged"  # where a resumed run sets aside the steps that failed to verify
BEST = "best"  # checkpoint.keep_best: the run's best validation step, a run directory of its own
SUPERSEDED = "superseded"  # where restore_from=best sets aside the run's steps after its best
LOCK_SUFFIX = ".lock"  # checkpoint/RUN.lock beside the run directory: locked by the job training in it


def run_lock(run_dir: Path) -> Path:
    """The lock file of a run directory: beside it, so that claiming a run creates nothing inside it."""
    return run_dir.with_name(run_dir.name + LOCK_SUFFIX)


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.datetime.now().isoformat(timespec="seconds")}


def _busy(run_dir: Path, who: str, more: str = "") -> UserError:
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
        try:
            held = self.blob.bucket.get_blob(self.blob.name, timeout=self.lease_s)
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
def claim_run(run_dir: Path, is_main: bool = True, lease_s: float = 300.0):
    """Hold the run directory for this job while it trains; yields a RunLease in Cloud Storage, else None.

    On a disk: process 0 takes an exclusive flock on its run_lock file (naming this host and process id),
    which the operating system releases when the process ends however it ends (kill -9 leaves nothing
    stale). In gs://: a RunLease. A second job on the same run directory is refused in one line, exit 2.
    Where neither works (a network filesystem without locks, another store) the run goes on, with a warning.
    """
    if not is_main:
        yield None
        return
    lock = run_lock(run_dir)
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
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            try:
                who = json.loads(holder)
                who = f"host {who['host']}, process id {who['pid']}, since {who['since']}"
            except (ValueError, KeyError, TypeError):
                who = "a process that has not yet written its name"
            raise _busy(run_dir, who) from None
        except OSError as e:
            _warn(f"cannot lock {lock} ({reason(e)}): a second launch on this run would not "
                  "be refused; make sure only one job trains in it")
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        yield None
    finally:
        os.close(fd)  # releases the lock


def set_aside_after(run_dir: Path, restored_dir: Path, step: int) -> list[str]:
    """After restoring `step` (from the run or its best/), move the steps after it, of a future the run no
    longer has, to superseded/ (never deleted); returns a line for each. A listing, not orbax's manager,
    which would sync every process."""
    def after(d: Path) -> list[tuple[Path, int]]:
        return sorted((d, int(x.name)) for x in d.iterdir() if x.name.isdigit() and int(x.name) > step)

    best_dir = run_dir / BEST
    newer = after(run_dir) if restored_dir == best_dir else []
    newer += after(best_dir) if best_dir.is_dir() else []
    lines = []
    for where, s in newer:
        storage.mkdir(run_dir / SUPERSEDED)
        aside = run_dir / SUPERSEDED / f"{where.name}-{s}.{time.strftime('%Y%m%dT%H%M%S')}"
        storage.move(where / str(s), aside)
        lines.append(f"set aside {where / str(s)}, which is after the restored step, as {aside}")
    return lines


def is_run_dir(path: Path) -> bool:
    """A directory written by the training loop (it has run_config.json and hparams.json)."""
    return (path / RUN_CONFIG).is_file() and (path / "hparams.json").is_file()


class _QuietReadOnly(logging.Filter):
    """Drops orbax's notice that a read-only manager is read-only (logged for every restore)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "read only" not in record.getMessage() and "read_only=True" not in record.getMessage()


class _AbandonedSaveFutures(logging.Filter):
    """Drops asyncio's "exception was never retrieved" for futures an aborted orbax save left behind:
    CheckpointWriter has already reported that failure, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "exception was never retrieved" not in record.getMessage():
            return True
        error = (record.exc_info or (None, None, None))[1] or getattr(record, "exception", None)
        context = getattr(record, "context", None) or {}
        error = error or context.get("exception")
        text = f"{record.getMessage()} {error!r}"
        return "orbax" not in text and "ocdbt" not in text.lower() and "RESOURCE_EXHAUSTED" not in text


_quieted = False


def quiet_orbax() -> None:
    """Installed once, when this process first uses orbax (not at import): the filters above, and the
    unraisable-exception hook that drops what a failed restore leaves behind (_drop_abandoned_reads)."""
    global _quieted
    if not _quieted:
        logging.getLogger("absl").addFilter(_QuietReadOnly())
        logging.getLogger("asyncio").addFilter(_AbandonedSaveFutures())
        sys.unraisablehook = _drop_abandoned_reads(sys.unraisablehook)
        _quieted = True


def make_manager(run_dir: Path, *, keep: int = 5, keep_every_hours: float = 0.0, async_save: bool = True,
                 read_only: bool = False, timeout_s: float | None = None) -> ocp.CheckpointManager:
    """An orbax CheckpointManager keeping the last `keep` steps plus one every `keep_every_hours`; a background
    save, its barrier between processes included, gives up after `timeout_s` (default: orbax's 20 minutes)."""
    quiet_orbax()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep or None,
        save_interval_steps=0 if read_only else 1,
        keep_time_interval=datetime.timedelta(hours=keep_every_hours) if keep_every_hours > 0 else None,
        enable_async_checkpointing=async_save,
        # In a store, the step's directories are made before save() returns: a store that fails then fails
        # the save at once, instead of leaving orbax's writer threads waiting for them until its timeout.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=not storage.is_url(run_dir),
                                       **({"timeout_secs": max(1, int(timeout_s))} if timeout_s else {})),
        # Remove what a killed save left behind. Not in a store, where orbax takes every folder without its
        # commit file for a partial step (damaged/, superseded/, best/): CheckpointWriter removes those there.
        cleanup_tmp_directories=not read_only and not storage.is_url(run_dir),
        create=not read_only,
        read_only=read_only,
        # A reader makes no barrier: whether a process reads a run directory can depend on what it sees of it
        # (process 0 may already be writing there), and unequal barriers abort a multi-process job.
        save_root_metadata=not read_only,
    )
    return ocp.CheckpointManager(storage.absolute(run_dir), options=options,
                                 item_names=("params", "opt_state", "meta"))


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# --- Checksums -------------------------------------------------------------------------------------

def _checksum(x: jax.Array) -> jax.Array:
    """[2] uint32: the sum of an array's words and their sum weighted by (2 x position + 1), both mod 2^32.

    Any change to one word changes both (odd weights are invertible mod 2^32); the sums are exact in
    any order, so the result does not depend on how the array is sharded.
    """
    size = jnp.dtype(x.dtype).itemsize
    word = {1: jnp.uint8, 2: jnp.uint16}.get(size, jnp.uint32)
    w = jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32)  # 8-byte types gain a trailing [2]
    position = jnp.zeros(w.shape, jnp.uint32)
    for axis in range(w.ndim):  # row-major index, without a reshape that would move shards around
        position = position * jnp.uint32(w.shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis)
    return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * (2 * position + 1), dtype=jnp.uint32)])


_checksum_tree = jax.jit(lambda tree: jax.tree.map(_checksum, tree))


def checksums(tree: Any) -> dict[str, str]:
    """Path -> 16 hex digits for every array of a tree, computed where the arrays live."""
    sums = jax.device_get(_checksum_tree(tree))
    return {jax.tree_util.keystr(path): f"{int(s[0]):08x}{int(s[1]):08x}"
            for path, s in jax.tree_util.tree_leaves_with_path(sums)}


class Damaged(Exception):
    """A checkpoint step that cannot be read or does not match its recorded checksums."""


def _verify(tree: Any, recorded: dict[str, str], item: str) -> None:
    actual = checksums(tree)
    bad = [k for k in actual if recorded.get(k) != actual[k]]
    if bad:
        raise Damaged(f"{len(bad)} of {len(actual)} arrays do not match their checksums, first {item}{bad[0]}")


# --- Saving ----------------------------------------------------------------------------------------

class CheckpointWriter:
    """Saves steps through an orbax manager with checksums, a free-space check before each save, and
    every write failure (synchronous or asynchronous) turned into one StorageError line."""

    def __init__(self, run_dir: Path, *, keep: int = 5, keep_every_hours: float = 0.0, async_save: bool = True,
                 store_timeout_s: float | None = None):
        self.run_dir = storage.absolute(run_dir)
        if storage.is_url(self.run_dir) and jax.process_index() == 0 and self.run_dir.is_dir():
            for child in self.run_dir.iterdir():  # before any save: no process writes a step yet
                if child.name.isdigit():
                    _remove_partial_steps(self.run_dir, int(child.name))
        # In a store, a background save that has not finished in store_timeout_s fails (one process's write
        # failing leaves the others waiting for it at orbax's barrier: they give up then, not after 20 minutes).
        self.manager = make_manager(self.run_dir, keep=keep, keep_every_hours=keep_every_hours, async_save=async_save,
                                    timeout_s=store_timeout_s if storage.is_url(self.run_dir) else None)
        self._saving: tuple[int, int] | None = None  # (step, bytes it needs) of the save in flight
        self._failed = False

    def latest_step(self) -> int | None:
        """The newest complete step."""
        return self.manager.latest_step()

    def _needed_bytes(self, params: Any, opt_state: Any) -> int:
        """The newest checkpoint's size on disk, else (first save) the bytes of its arrays."""
        latest = self.manager.latest_step()
        if latest is not None and (self.run_dir / str(latest)).is_dir():
            return storage.tree_bytes(self.run_dir / str(latest))
        return sum(x.nbytes for x in jax.tree.leaves((params, opt_state)))

    def save(self, step: int, params: Any, opt_state: Any, meta: dict) -> None:
        """Start saving one step (in the background when async), after checking it fits on the disk."""
        self.wait()  # a failure of the previous (background) save is reported as that step's
        needed = self._needed_bytes(params, opt_state)
        free = storage.free_bytes(self.run_dir)  # None in a store, which has no free space to ask for
        if not _all_agree(free is None or needed <= free):  # every process stops, or none (the save is collective)
            raise StorageError(f"not saving step {step} to {self.run_dir}: a checkpoint needs about "
                               f"{_size(needed)} but only {_size(free)} is free on that disk; nothing was written and "
                               f"{self.intact()}")
        meta = {**meta, "checksums": {"params": checksums(params), "opt_state": checksums(opt_state)}}
        self._saving = (step, needed)
        try:
            self.manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                            opt_state=ocp.args.StandardSave(opt_state),
                                                            meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types for an I/O failure
            self._fail(e)

    def check(self) -> None:
        """Raise the StorageError of a background save that failed (cheap; call it every step)."""
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def wait(self) -> None:
        """Wait for the save in flight; a failure raises its StorageError."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def close(self) -> None:
        """Finish the save in flight and release orbax's threads (quietly after a reported failure)."""
        try:
            if not self._failed:
                self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - after a failure that was already reported
                if not self._failed:
                    raise

    def intact(self) -> str:
        """What a failed write left intact, as the end of a sentence."""
        latest = self.manager.latest_step()
        if latest is None:
            return "no earlier checkpoint exists"
        return f"earlier checkpoints are intact (restore_from=latest resumes from step {latest})"

    def _fail(self, error: Exception) -> None:
        """One line for a failed write: the path, what failed, the space needed and free; partial step removed."""
        if self._failed:
            raise StorageError("checkpoint writing failed earlier (see above)") from None
        self._failed = True
        step, needed = self._saving or (None, 0)
        try:
            self.manager.wait_until_finished()  # let orbax's threads end before the files go
        except Exception:  # noqa: BLE001 - the same failure, already in hand
            pass
        # In a store that may itself be what failed, an unfinished step that cannot be seen now is removed when
        # the run resumes (CheckpointWriter), and said so.
        removed = "the partial step was removed" if not storage.is_url(self.run_dir) else \
            "an unfinished step is removed when the run resumes"
        if jax.process_index() == 0 and step is not None:
            try:
                if _remove_partial_steps(self.run_dir, step):
                    removed = "the partial step was removed"
            except Exception:  # noqa: BLE001 - the store itself is failing
                removed = "an unfinished step is removed when the run resumes"
        cause = reason(error)
        free = storage.free_bytes(self.run_dir)
        space = f"; a checkpoint needs about {_size(needed)} and {_size(free)} is free" if free is not None else ""
        raise StorageError(f"could not write checkpoint step {step} to {self.run_dir}: {cause}{space}; {removed}, "
                           f"{self.intact()}") from None


def _remove_partial_steps(run_dir: Path, step: int, settle_s: float = 0.5, limit_s: float = 10.0) -> bool:
    """Remove what an unfinished save of `step` left, until nothing of it reappears for `settle_s` (on a disk):
    a thread of the failed save can still write a file into the temporary directory, re-creating it, after the
    save has raised. Whether there was anything to remove."""
    removed = False
    settle_s = 0.0 if storage.is_url(run_dir) else settle_s
    deadline = quiet_since = time.monotonic()
    deadline += limit_s
    while True:
        partials = _partial_steps(run_dir, step)
        for partial in partials:
            storage.rmtree(partial)
        if partials:
            removed, quiet_since = True, time.monotonic()
        if time.monotonic() - quiet_since >= settle_s or time.monotonic() > deadline:
            return removed
        time.sleep(0.05)


def _partial_steps(run_dir: Path, step: int) -> list:
    """The directories an unfinished save of `step` left: on a disk under orbax's temporary name; in a store
    the step's own directory, which orbax marks complete only with a commit_success.txt written last."""
    if not storage.is_url(run_dir):
        return list(run_dir.glob(f"{step}.orbax-checkpoint-tmp*"))
    d = run_dir / str(step)
    return [d] if d.is_dir() and not (d / "commit_success.txt").exists() else []


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# --- Restoring -------------------------------------------------------------------------------------

def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def _all_agree(ok: bool) -> bool:
    """Whether every process's `ok` is true (each process reads its own shards, so a read can fail on one)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _drop_abandoned_reads(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """An unraisable-exception hook that drops what a failed orbax restore leaves behind: its read
    coroutines, never awaited (Python prints each one's traceback, "Exception ignored in ...", when it is
    collected, as late as exit), and tensorstore's callbacks into that restore's event loop, already
    closed. The failure itself is reported once, by restore_verified; everything else goes to `previous`."""

    def abandoned(unraisable: Any) -> bool:
        code = getattr(unraisable.object, "cr_code", None)
        if code is not None:
            return "orbax" in code.co_filename and "read" in code.co_name
        frames = [f.f_code.co_name for f, _ in traceback.walk_tb(unraisable.exc_traceback)]
        return str(unraisable.exc_value) == "Event loop is closed" and "call_soon_threadsafe" in frames

    def hook(unraisable: Any) -> None:
        if not abandoned(unraisable):
            previous(unraisable)

    return hook


def restore_verified(run_dir: Path, step: int, params: Any, opt_state: Any | None = None) -> tuple[Any, Any, dict]:
    """Params, optimizer state (when a target is given) and metadata of one step, laid out like the given
    (abstract or real) trees, every array checked against its recorded checksum; raises Damaged."""
    items = {"params": ocp.args.StandardRestore(_abstract(params)), "meta": ocp.args.JsonRestore()}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state))
    failure = None  # kept as text: the exception's traceback would keep orbax's abandoned coroutines alive
    try:
        restored = make_manager(run_dir, read_only=True).restore(step, args=ocp.args.Composite(**items))
        meta = dict(restored.meta)
    except Exception as e:  # noqa: BLE001 - a damaged step fails inside orbax/tensorstore in many ways
        failure = reason(e)
    if failure and "do not match" in failure and "tree structure" in failure:  # a layout, not damage
        raise UserError(f"step {step} of {run_dir} holds state laid out for other settings ({failure}); resume with "
                        f"the settings it was trained with ({RUN_CONFIG} there)")
    if not _all_agree(failure is None):
        raise Damaged(f"cannot be read ({failure})" if failure else "cannot be read on another process")
    p, o = restored.params, (restored.opt_state if opt_state is not None else None)
    recorded = meta.get("checksums")
    if recorded is None:
        _warn(f"step {step} of {run_dir} has no checksums (saved before gpt2-jax recorded them): not verified")
        return p, o, meta
    _verify(p, recorded.get("params", {}), "params")
    if o is not None:
        _verify(o, recorded.get("opt_state", {}), "opt_state")
    return p, o, meta


# What to do when no step of a run verifies: for a run resuming (training), and for a command reading it.
RESUME_ADVICE = "Restore another run or step with checkpoint.restore_from=PATH, or start anew under another run_name"
READ_ADVICE = "give another run, or one of its step directories (RUN/STEP) that verifies"


def restore_newest(run_dir: Path, steps: list[int], params: Any, opt_state: Any | None = None, *,
                   set_aside: bool = False, advice: str = READ_ADVICE) -> tuple[int, Any, Any, dict]:
    """(step, params, optimizer state, metadata) of the newest of `steps` that reads and verifies.

    Each one that fails is named in a warning; with set_aside (a run resuming itself) those newer than
    the one restored are moved to RUN/damaged/STEP.TIME, never deleted and out of orbax's sight (so
    they never count towards `keep`). After a fallback, one line names the step used. When none
    verifies: a UserError ending in `advice`, and nothing is moved.
    """
    run_dir = storage.absolute(run_dir)
    failed = []
    for step in sorted(steps, reverse=True):
        try:
            p, o, meta = restore_verified(run_dir, step, params, opt_state)
        except Damaged as e:
            failed.append((step, str(e)))
            more = "; trying an older one" if step != min(steps) else ""
            _warn(f"checkpoint step {step} in {run_dir} {e}{more}")
            continue
        if set_aside and failed and jax.process_index() == 0:
            stamp = time.strftime("%Y%m%dT%H%M%S")
            for bad, _ in failed:
                storage.mkdir(run_dir / DAMAGED)
                storage.move(run_dir / str(bad), run_dir / DAMAGED / f"{bad}.{stamp}")
                _warn(f"moved the damaged step {bad} to {run_dir / DAMAGED / f'{bad}.{stamp}'}")
        if set_aside and failed and jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("damaged checkpoints set aside")
        if failed:
            newer = ", ".join(str(s) for s, _ in failed)
            _warn(f"using checkpoint step {step} of {run_dir} (step{'s' * (len(failed) > 1)} {newer} did not verify)")
        return step, p, o, meta
    tried = "; ".join(f"step {s}: {why}" for s, why in failed)
    raise UserError(f"no checkpoint in {run_dir} can be used ({tried}); nothing was deleted or moved: {advice}")


def read_meta(run_dir: Path, step: int) -> dict:
    """The metadata (step, seed, ...) saved with one step, without reading any array."""
    manager = make_manager(run_dir, read_only=True)
    return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)


def read_seed(run_dir: Path, steps: list[int]) -> int | None:
    """The run's seed from the newest of `steps` whose metadata reads (every step of a run records the same)."""
    for step in sorted(steps, reverse=True):
        try:
            return int(read_meta(run_dir, step)["seed"])
        except Exception:  # noqa: BLE001 - a damaged step; restore_newest reports it
            continue
    return None


def steps_of(run_dir: Path) -> list[int]:
    """The complete steps of a run directory, oldest first."""
    return sorted(make_manager(run_dir, read_only=True).all_steps())


def resolve_checkpoint(path: Path) -> tuple[Path, int]:
    """(run directory, step) of a path naming a run directory (its latest step) or one step directory."""
    path = storage.absolute(path)
    if path.name.isdigit() and path.parent.is_dir() and (path / "params").exists():
        return path.parent, int(path.name)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist")
    step = make_manager(path, read_only=True).latest_step()
    if step is None:
        raise UserError(f"{path} holds no complete checkpoint (a run directory with numbered step directories)")
    return path, step


def saved_scan_layers(run_dir: Path) -> bool:
    """Whether a run directory's checkpoints hold the blocks stacked (model.scan_layers when it trained)."""
    try:
        return bool(json.loads((storage.path(run_dir) / RUN_CONFIG).read_text()).get("model", {}).get("scan_layers", False))
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON or not UTF-8: as saved unstacked
        return False


def saved_lora(run_dir: Path) -> dict:
    """A run's LoRA settings as GPT2Config fields (train.lora_*), or {} when it trained every weight."""
    try:
        from gpt2_jax.settings import lora_fields  # settings reads the optimizer's, which reads the model's

        return lora_fields(json.loads((storage.path(run_dir) / RUN_CONFIG).read_text()).get("train", {}))
    except (OSError, ValueError, AttributeError, KeyError, TypeError):  # unreadable: as a full fine-tune
        return {}


def load_run_params(run_dir: Path, *, keep_adapters: bool = False, **overrides) -> tuple[GPT2Config, Any]:
    """Config and params of a run directory's newest checkpoint that verifies, or of one step directory
    (the optimizer state is not read). A LoRA run's adapters are merged into the weights (a plain GPT-2)
    unless keep_adapters."""
    path = storage.absolute(run_dir)
    run_dir, step = resolve_checkpoint(path)
    try:
        hparams = json.loads((run_dir / "hparams.json").read_text(encoding="utf-8"))
        base = GPT2Config(**{k: int(hparams[k]) for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")})
    except (ValueError, KeyError, TypeError) as e:  # JSON, UTF-8, a missing or non-integer field
        raise UserError(f"{run_dir / 'hparams.json'}: not the run's model shape ({type(e).__name__}: "
                        f"{str(e)[:100]}); the file is damaged: restore it, or export the run again") from None
    saved = dataclasses.replace(base, **saved_lora(run_dir))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # whatever mesh wrote it
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          param_shapes(dataclasses.replace(saved, scan_layers=saved_scan_layers(run_dir))))
    candidates = [step] if path != run_dir else [s for s in steps_of(run_dir) if s <= step]
    _, params, _, _ = restore_newest(run_dir, candidates, shapes)
    if not keep_adapters:
        saved, params = merge_lora(saved, params)
    config = dataclasses.replace(saved, **overrides)
    return config, convert_layout(params, config.scan_layers)
