"""How a run stops: signals, background writers' failures, and a multi-process job that fails as one.

`StopRequest` turns SIGINT/SIGTERM into a flag the loop reads after each step (a second SIGINT aborts).
`BackgroundFailures` keeps what threads raise (TensorBoard's writer, orbax's) for the loop to raise as
one line, and keeps the clients' own logged copies of a failure off the terminal. `JobAgreement` is what
makes a multi-process job stop as one: every step carries each process's code (nothing, a stop asked
for, or a failure held), combined by a tiny all-reduce; a failure on any process (a lost lock, a log or
TensorBoard write, orbax) is held there until the job agrees on it, then every process raises the same
one line with the same exit code at the same step. `quiet_orbax` keeps orbax's own logged copies of
failures it also raises (and the leftovers of an aborted read) off the terminal: the run says each once.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import sys
import threading
import traceback
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from gpt2_jax import parallel, storage
from gpt2_jax.errors import StorageError, UserError, reason


class StopRequest:
    """SIGINT/SIGTERM set a flag the loop checks after each step; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
                   "(Ctrl-C again to abort without saving)")

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class BackgroundFailures:
    """While training, background writers' failures become the loop's one line instead of tracebacks.

    An exception in a background thread (TensorBoard's event writer) is kept for `check()` to raise;
    orbax's logged copies of the save errors that CheckpointWriter raises, the errors a store's client
    logs before it raises them to its caller (gcsfs, fsspec), and the unraisable leftovers of the
    coroutines an aborted save abandons ("Event loop is closed"), are dropped. When the run ends on a failed
    write the logging filters stay: orbax's threads, still retrying, would log the same failure again after
    its one line.
    """

    STORE_CLIENTS = ("gcsfs", "fsspec", "aiohttp", "google", "s3fs", "adlfs")

    def __init__(self):
        self.errors: list[BaseException] = []

    def _handlers(self) -> list[logging.Handler]:
        """Where records of every logger end (a filter on a logger misses its children's records)."""
        return [*logging.getLogger().handlers, *([logging.lastResort] if logging.lastResort else [])]

    def __enter__(self):
        self._hooks = threading.excepthook, sys.unraisablehook
        threading.excepthook = lambda args: self.errors.append(args.exc_value)
        sys.unraisablehook = self._unraisable
        for name in ("absl", "asyncio"):
            logging.getLogger(name).addFilter(self._filter)
        self._filtered = self._handlers()
        for handler in self._filtered:
            handler.addFilter(self._filter)
        return self

    def __exit__(self, exc_type, exc, tb):
        gc.collect()  # abandoned coroutines are collected (and dropped) while the hooks are ours
        threading.excepthook, sys.unraisablehook = self._hooks
        if isinstance(exc, (StorageError, OSError, *storage.store_errors())):
            return  # the run ends with its one line: orbax's threads, still failing, log the same failure again
        for name in ("absl", "asyncio"):
            logging.getLogger(name).removeFilter(self._filter)
        for handler in self._filtered:
            handler.removeFilter(self._filter)

    @staticmethod
    def _from_checkpointing(error: BaseException | None) -> bool:
        frames = traceback.extract_tb(error.__traceback__) if error is not None else []
        return "Event loop is closed" in str(error) or any("orbax" in f.filename for f in frames)

    def _unraisable(self, unraisable) -> None:
        if not self._from_checkpointing(unraisable.exc_value):
            self._hooks[1](unraisable)

    @staticmethod
    def _filter(record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        return ("orbax" not in record.pathname and "exception was never retrieved" not in record.getMessage()
                and record.name.split(".")[0] not in BackgroundFailures.STORE_CLIENTS)

    def check(self, intact: str) -> None:
        """Raise the first background failure as one line."""
        if self.errors:
            raise StorageError(f"a background writer failed: {reason(self.errors[0])}; {intact}")


def write_failure(error: BaseException, where: Any, intact: str) -> UserError | None:
    """An OSError (disk full, permissions) or a store's error from writing logs, samples or run files as a
    StorageError naming `where` and what is `intact`; a UserError as it is; None for anything else."""
    if isinstance(error, UserError):
        return error
    if isinstance(error, (OSError, *storage.store_errors())):
        return StorageError(f"a write under {where} failed: {reason(error)}; {intact}")
    return None


@contextlib.contextmanager
def writes_as_one_line(where: Any, intact: Callable[[], str]):
    """Within: a failed write (write_failure) is raised as its one-line StorageError."""
    try:
        yield
    except (OSError, *storage.store_errors()) as e:
        raise write_failure(e, where, intact()) from None


NOTHING, STOP, FAIL = 0, 1, 2  # a process's code in the agreement; the job acts on the largest
_MESSAGE_BYTES = 2048  # a failure's line travels as this many UTF-8 bytes (exit code first)


class JobAgreement:
    """What every process of a job agrees on after a step: whether any asked to stop, or holds a failure.

    `hold(fn)` runs a side effect of this process (a log write, a check of its writers or its lock); in a
    multi-process job its failure is held, not raised, and this process writes nothing more. `code()` is
    what this process contributes to the next step's all-reduce (`combine`, jitted over the mesh: one
    scalar, dispatched with the step); `act(code)` acts on the job's combined code: a failure is shared
    (each process's line gathered, the first failing process's raised by all, with its exit code) and a
    stop is remembered. `settle()` checks the `fence` (the run's lock, before anything is saved) and agrees at
    once, for the points where every process must enter a collective (checkpoints, validation): none may enter
    it while another holds a failure. In a single-process run a failure is raised where it happens, as always.
    """

    def __init__(self, mesh: Any, stop: StopRequest, as_one_line: Callable[[BaseException], UserError | None],
                 fence: Callable[[], None] | None = None):
        self.stop, self.as_one_line, self.fence = stop, as_one_line, fence
        self.multi = jax.process_count() > 1
        self.failure: UserError | None = None
        self.stopping = False
        if self.multi:
            sharding, n = parallel.batch_sharding(mesh), mesh.devices.size
            reduce = jax.jit(lambda codes: codes.max(), out_shardings=parallel.replicated(mesh))
            self.combine = lambda code: reduce(parallel.global_batch(np.full((n,), code, np.int32), sharding))

    def hold(self, fn: Callable[[], Any]) -> None:
        """Run fn; in a multi-process job, hold its failure (as one line) for the job to agree on."""
        if not self.multi:
            fn()
            return
        if self.failure is not None:
            return  # a process that failed writes nothing more
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - turned into its one line, or raised as it is
            error = self.as_one_line(e)
            if error is None:
                raise
            self.failure = error

    def code(self) -> int:
        """This process's code: a failure held, a stop asked for, or nothing."""
        return FAIL if self.failure is not None else STOP if self.stop.requested else NOTHING

    def act(self, combined: Any) -> None:
        """Act on the job's combined code (a device scalar from `combine`, read here)."""
        code = int(combined)
        if code >= FAIL:
            self._fail_together()
        self.stopping = self.stopping or code == STOP

    def settle(self) -> None:
        """Check the fence (this job still holds its run's lock), then agree now (a blocking all-reduce): before
        every process enters a collective (and a checkpoint is written)."""
        if self.fence is not None:
            self.hold(self.fence)
        if self.multi:
            self.act(self.combine(self.code()))

    def _fail_together(self) -> None:
        """Every process raises the first failing process's line, with its exit code."""
        from jax.experimental import multihost_utils

        mine = np.zeros(_MESSAGE_BYTES, np.uint8)
        if self.failure is not None:
            text = f"{self.failure.exit_code} {self.failure}".encode()[:_MESSAGE_BYTES]
            mine[:len(text)] = np.frombuffer(text, np.uint8)
        rows = np.asarray(multihost_utils.process_allgather(mine))
        first = next(i for i, row in enumerate(rows) if row.any())
        if first == jax.process_index():
            raise self.failure  # as it is (its type tells what failed: the logs of a lost lock are not written)
        exit_code, _, message = bytes(rows[first]).rstrip(b"\0").decode(errors="replace").partition(" ")
        error = StorageError(message) if int(exit_code) == StorageError.exit_code else UserError(message)
        error.exit_code = int(exit_code)
        raise error


# --- orbax's own logging of failures it has already raised ----------------------------------------------

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
