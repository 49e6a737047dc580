"""Where files live: a local path, or a URL (gs://, s3://, az://) read and written through etils.epath,
the path layer orbax uses for the arrays, so that a run whose hosts share no disk keeps everything in
one bucket.

`path()` gives a `pathlib.Path` for a local path (every local behaviour unchanged) and an
`epath.Path` for a URL; the rest of the project uses the operations both share (`/`, `name`, `parent`,
`exists`, `is_file`, `is_dir`, `iterdir`, `read_text`, `write_text`, `read_bytes`, `open`) and the
helpers here for what differs: object stores have no directories to create, no rename (a folder is
moved object by object), no appending, no free space to ask for and no file locks.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import importlib
import importlib.util
import math
import os
import queue
import re
import shutil
import socket
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Union

from gpt2_jax.errors import StorageError, UserError, reason

AnyPath = Union[Path, Any]  # pathlib.Path, or etils.epath.Path for a URL
# The fsspec file system each URL scheme needs (etils.epath reads and writes through it).
_BACKENDS = {"gs": ("gcsfs", "gcs"), "s3": ("s3fs", "s3"), "az": ("adlfs", "az")}


def is_url(p: Any) -> bool:
    """Whether p names an object in a store (scheme://...) rather than a local file."""
    return "://" in str(p)


def path(p: str | os.PathLike) -> AnyPath:
    """A local path as pathlib.Path, a URL as etils.epath.Path (its scheme's file system checked)."""
    if not is_url(p):
        return p if isinstance(p, Path) else Path(p)
    text = str(p)
    scheme = text.split("://", 1)[0]
    if scheme not in _BACKENDS:
        raise UserError(f"{text}: the scheme {scheme}:// is not supported; use a local path or gs://, s3:// or az://")
    module, extra = _BACKENDS[scheme]
    if importlib.util.find_spec(module) is None:
        raise UserError(f"{text}: {scheme}:// paths need {module}, which is not installed: pip install "
                        f"'gpt2-jax[{extra}]'")
    _no_stale_listings()
    from etils import epath

    return epath.Path(text)


def _no_stale_listings() -> None:
    """fsspec file systems (gcsfs, s3fs) list each time instead of caching listings: a cached listing does not
    see what another process (or orbax, through another path) wrote or deleted since."""
    import fsspec

    for scheme in _BACKENDS:
        fsspec.config.conf.setdefault(scheme, {}).setdefault("use_listings_cache", False)


def absolute(p: str | os.PathLike) -> AnyPath:
    """p made absolute (a URL already is)."""
    p = path(p)
    return p if is_url(p) else p.absolute()


def _fs(p: AnyPath) -> tuple[Any, str]:
    """(fsspec file system, path within it) of a URL."""
    import fsspec

    return fsspec.core.url_to_fs(str(p))


def store_errors() -> tuple[type[BaseException], ...]:
    """The exception types a store's client raises beside OSError (those of the clients installed)."""
    found: list[type[BaseException]] = []
    for module, name in (("gcsfs.retry", "HttpError"), ("aiohttp", "ClientError"),
                         ("google.api_core.exceptions", "GoogleAPIError")):
        if importlib.util.find_spec(module.split(".")[0]) is not None:
            try:
                found.append(getattr(importlib.import_module(module), name))
            except (ImportError, AttributeError):
                continue
    return tuple(found)


def bound_retries(seconds: float) -> None:
    """Make a failing store fail a save in about `seconds`, with its one line: tensorstore (orbax's array I/O)
    instead of its default of 32 retries (a quarter of an hour), and gcsfs (the small files: orbax's metadata,
    logs) instead of its 6 retries a request with sleeps doubling from 1 s (about a minute each). Acts on the
    contexts orbax makes and the gs:// file systems made after this call."""
    _bound_gcsfs_retries(seconds)
    from orbax.checkpoint._src.serialization import tensorstore_utils

    delay = max(1.0, min(32.0, seconds / 4))
    retries = {"max_retries": max(1, int(seconds // delay)), "initial_delay": "1s", "max_delay": f"{delay:g}s"}
    for name in ("_DEFAULT_OCDBT_TS_CONTEXT", "_BASE_TS_CONTEXT"):
        context = getattr(tensorstore_utils, name, None)
        if isinstance(context, dict):
            context["gcs_request_retries"] = retries
            context["s3_request_retries"] = retries


def _bound_gcsfs_retries(seconds: float) -> None:
    """gs:// through a gcsfs file system whose requests retry only while their sleeps (1, 2, 4, ... s) add
    up to at most a quarter of `seconds` (an operation makes a few requests)."""
    try:
        import fsspec
        from gcsfs.retry import retry_request
        base = fsspec.get_filesystem_class("gs")
    except (ImportError, ValueError):  # no gcsfs: no gs:// paths to bound
        return
    retries, slept = 1, 0.0
    while retries < 6 and slept + 2 ** (retries - 1) <= seconds / 4:
        slept, retries = slept + 2 ** (retries - 1), retries + 1
    request = getattr(base._request, "__wrapped__", None)
    if retries >= 6 or request is None:  # gcsfs's own schedule is within the bound (or not one we know)
        return

    class BoundedRetries(base):
        _request = retry_request(retries=retries)(request)

    for scheme in ("gs", "gcs"):  # etils.epath asks fsspec for "gcs"
        fsspec.register_implementation(scheme, BoundedRetries, clobber=True)


def mkdir(p: AnyPath) -> None:
    """Create a local directory and its parents; nothing for a URL (an object store has no directories, and
    creating one could create its bucket)."""
    if not is_url(p):
        Path(p).mkdir(parents=True, exist_ok=True)


def size(p: AnyPath) -> int:
    """A file's size in bytes."""
    return Path(p).stat().st_size if not is_url(p) else int(path(p).stat().length)


def tree_bytes(p: AnyPath) -> int:
    """The bytes of every file under a directory."""
    if not is_url(p):
        return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())
    fs, inner = _fs(p)
    return int(fs.du(inner, total=True))


def free_bytes(p: AnyPath) -> int | None:
    """The free space of the disk holding a local directory; None for a store, which reports none."""
    return None if is_url(p) else shutil.disk_usage(p).free


def files_of(spec: str | os.PathLike) -> list[AnyPath]:
    """The files a path, a directory (walked recursively, sorted, hidden files skipped) or a glob names."""
    p = path(spec)
    if not is_url(p):
        if p.is_file():
            return [p]
        if p.is_dir():
            return sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith("."))
        return sorted(Path(x) for x in globlib.glob(str(spec), recursive=True) if Path(x).is_file())
    fs, inner = _fs(p)
    scheme = str(p).split("://", 1)[0]
    if globlib.has_magic(inner):
        found = fs.glob(inner)
    elif fs.isfile(inner):
        return [p]
    else:
        found = fs.find(inner)
    names = sorted(f for f in found if not Path(f).name.startswith(".") and fs.isfile(f))
    return [path(f"{scheme}://{f}") for f in names]


def move(src: AnyPath, dst: AnyPath) -> None:
    """Move a file or directory (dst must not exist): a rename on a disk; in a store, a server-side copy of
    each object, then the originals removed (stores have no rename of a folder)."""
    if not is_url(src):
        Path(src).rename(dst)
        return
    fs, inner = _fs(src)
    _, target = _fs(dst)
    if fs.isfile(inner):
        fs.copy(inner, target)
    else:
        for f in fs.find(inner):
            fs.copy(f, target + f[len(inner.rstrip("/")):])
    fs.rm(inner, recursive=True)


def rmtree(p: AnyPath) -> None:
    """Remove a directory and everything under it (missing: nothing to do)."""
    if not is_url(p):
        shutil.rmtree(p, ignore_errors=True)
        return
    fs, inner = _fs(p)
    if fs.exists(inner):
        fs.rm(inner, recursive=True)


def upload(local: str | os.PathLike, dst: AnyPath) -> None:
    """Copy a local file to dst (a URL's object appears whole when its upload completes)."""
    if not is_url(dst):
        shutil.copyfile(local, dst)
        return
    with open(local, "rb") as source, path(dst).open("wb") as out:
        shutil.copyfileobj(source, out, 1 << 22)


def check_writable(directory: AnyPath, what: str) -> None:
    """A URL's bucket exists and takes writes (a probe object written and removed), else one line, exit 2."""
    if not is_url(directory):
        return
    probe = path(directory) / f".write-probe-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    bucket = str(directory).split("://", 1)[1].split("/", 1)[0]
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except Exception as e:  # noqa: BLE001 - a missing bucket, no credentials or no permission, in many types
        why = f"the bucket {bucket} does not exist" if isinstance(e, FileNotFoundError) else reason(e)
        raise UserError(f"{what} {directory}: cannot write there ({why}); check that the bucket {bucket} "
                        "exists and that these credentials may write to it (nothing was written)") from None


class _Uploads:
    """Objects written by a thread of their own, in the order their bytes were handed over, so that whoever hands
    them over never waits on the store. The n-th is named `name(n)`, numbered after `last()` (asked once, in the
    thread). The first failure is kept, raised as one line by check(), and nothing is written after it: what is in
    the store is always a whole prefix of what was handed over."""

    def __init__(self, where: str, name: Callable[[int], str], last: Callable[[], int] = lambda: 0):
        self.where, self.name, self.last = where, name, last
        self.error: str | None = None
        self.abandoned = self.closed = False
        self.queue: queue.Queue[bytes | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name=f"upload {where}", daemon=True)
        self.thread.start()
        _UPLOADS.add(self)

    def put(self, data: bytes) -> None:
        """Write data as the next object, in the background (dropped once a write failed: none follows it)."""
        if self.error is None and not self.abandoned:
            self.queue.put(data)

    def _run(self) -> None:
        number = None
        while True:
            data = self.queue.get()
            try:
                if data is None:
                    return
                if self.error is None and not self.abandoned:
                    number = self._write(data, number)
            finally:
                self.queue.task_done()

    def _write(self, data: bytes, number: int | None) -> int | None:
        doing = f"list {self.where}"
        try:
            number = (self.last() if number is None else number) + 1
            doing = f"write {self.name(number)}"
            fs, inner = _fs(self.name(number))
            fs.pipe_file(inner, data)
        except Exception as e:  # noqa: BLE001 - a store's client fails in many types: kept for check()
            self.error = f"could not {doing}: {reason(e)}"
        return number

    def check(self) -> None:
        """Raise the kept failure as one line (StorageError)."""
        if self.error is not None and not self.abandoned:
            raise StorageError(f"{self.error}; what was written there before is intact, nothing more is written")

    def wait(self) -> None:
        """Until everything handed over is written (or dropped after a failure), then check()."""
        if not self.abandoned:
            self.queue.join()
        self.check()

    def close(self) -> None:
        """Write what is pending, end the thread, then check() (the first close only: tensorboardX closes its
        writers again at exit)."""
        if self.closed:
            return
        self.closed = True
        if not self.abandoned:
            self.queue.put(None)
            self.thread.join()
        self.check()

    def abandon(self) -> None:
        """Write nothing more (what is pending is dropped), end the thread after its current write."""
        self.abandoned = True
        self.queue.put(None)


_UPLOADS: weakref.WeakSet[_Uploads] = weakref.WeakSet()  # the writers whose thread runs (it holds them)
PARTS = ".parts"  # a log in a store is kept as numbered parts: metrics.jsonl.parts/000000000001.jsonl, ...
_PART_NAME = re.compile(r"\d{12}\.jsonl")


def log_parts(p: AnyPath) -> list[AnyPath]:
    """The parts an AppendLog at p wrote in a store (P.parts/NNNNNNNNNNNN.jsonl), in order; [] if none."""
    parts = path(f"{p}{PARTS}")
    if not is_url(parts):
        return sorted(f for f in parts.iterdir() if _PART_NAME.fullmatch(f.name)) if parts.is_dir() else []
    fs, inner = _fs(parts)
    scheme = str(parts).split("://", 1)[0]
    return [path(f"{scheme}://{f}") for f in sorted(fs.find(inner)) if _PART_NAME.fullmatch(f.rsplit("/", 1)[-1])]


def read_log(p: AnyPath) -> list[str]:
    """The lines of an AppendLog at p: the file itself where there is one (on a disk, or written in a store before
    logs were kept in parts), then its parts in order (fetched concurrently). Each file is split on its own, so
    that a line cut short by a kill stays a line of its own. FileNotFoundError where there is neither."""
    p = path(p)
    files = ([p] if p.is_file() else []) + log_parts(p)
    if not files:
        raise FileNotFoundError(f"{p}: no such file, nor {p}{PARTS}")
    if is_url(p):
        inner = [_fs(f)[1] for f in files]
        contents = _fs(p)[0].cat(inner)
        blobs = [contents[name] for name in inner]
    else:
        blobs = [Path(f).read_bytes() for f in files]
    return [line for blob in blobs for line in blob.decode("utf-8", errors="replace").splitlines()]


class AppendLog:
    """A text file written line by line (metrics.jsonl). On a disk: appended and flushed. In a store, which cannot
    append: at most every `upload_every_s` seconds (and at close()) the lines written since the last upload are
    handed to a thread that writes them as the next part, P.parts/NNNNNNNNNNNN.jsonl, numbered after the parts
    already there (a resumed run continues them): a flush's cost does not grow with the log, and the caller never
    waits on the store. read_log() reads the file and its parts back as one."""

    def __init__(self, p: AnyPath, upload_every_s: float = 10.0):
        self.path, self.upload_every_s = path(p), upload_every_s
        self._file: IO[str] | None = None
        self._uploads: _Uploads | None = None
        if not is_url(self.path):
            self._file = open(self.path, "a", encoding="utf-8")
            return
        parts = f"{self.path}{PARTS}"
        self._uploads = _Uploads(parts, lambda n: f"{parts}/{n:012d}.jsonl", lambda: _last_part(self.path))
        self._lines: list[str] = []
        self._handed = -math.inf  # the first flush hands its lines over at once

    def write(self, text: str) -> None:
        """Add text (whole lines)."""
        if self._file is not None:
            self._file.write(text)
        else:
            self._lines.append(text)

    def flush(self, force: bool = False) -> None:
        """Make what was written durable: on a disk, now; in a store, hand the new lines to the uploading thread if
        the last hand-over is `upload_every_s` old. With `force`, hand them over now and wait until they are in
        the store (a failure raised as one line)."""
        if self._uploads is None:
            self._file.flush()
            return
        if force or time.monotonic() - self._handed >= self.upload_every_s:
            self._hand_over()
        if force:
            self._uploads.wait()

    def _hand_over(self) -> None:
        if self._lines:
            self._uploads.put("".join(self._lines).encode("utf-8"))
            self._lines, self._handed = [], time.monotonic()

    def check(self) -> None:
        """Raise, as one line (StorageError), a failure of the background uploads (nothing on a disk)."""
        if self._uploads is not None:
            self._uploads.check()

    def close(self) -> None:
        """Flush and close; in a store, wait for the uploads and raise their failure as one line."""
        if self._uploads is None:
            self._file.close()
            return
        self._hand_over()
        self._uploads.close()


def _last_part(p: AnyPath) -> int:
    """The number of the last part of an AppendLog at p (0: none yet)."""
    parts = log_parts(p)
    return int(parts[-1].name.split(".")[0]) if parts else 0


class _RolledObject:
    """A file in a store for TensorBoard's event writer: each flush hands what was written since the last one to a
    thread that writes it as a new object, FILE.NNNNNNNNNNNN. TensorBoard reads the event files of a directory in
    name order (a name with "tfevents"), and tensorboardX flushes whole records, so the objects read as one file
    would; none is rewritten, and nothing is kept after its flush."""

    def __init__(self, url: str):
        self.buffer, self.lock = bytearray(), threading.Lock()
        self.uploads = _Uploads(url, lambda n: f"{url}.{n:012d}")

    def write(self, data: bytes) -> None:
        with self.lock:
            self.buffer += data

    def flush(self) -> None:
        with self.lock:
            data, self.buffer = bytes(self.buffer), bytearray()
        if data:
            self.uploads.put(data)

    def close(self) -> None:
        self.flush()
        self.uploads.close()


class _RolledObjectFactory:
    """tensorboardX's writer factory for a store's URLs."""

    def open(self, url: str) -> _RolledObject:
        return _RolledObject(url)

    def directory_check(self, url: str) -> None:
        pass  # a store has no directories to create


def tensorboard_writer(log_dir: AnyPath) -> Any:
    """tensorboardX's SummaryWriter for a local directory or a URL (events written through this module, in the
    background: check_uploads() raises their failure, its close() too)."""
    from tensorboardX import SummaryWriter, record_writer

    if is_url(log_dir):
        record_writer.register_writer_factory(str(log_dir).split("://", 1)[0], _FACTORY)
    return SummaryWriter(str(log_dir))


def _uploads_under(log_dir: AnyPath) -> list[_Uploads]:
    prefix = str(log_dir).rstrip("/") + "/"
    return [u for u in list(_UPLOADS) if u.where.startswith(prefix)]


def check_uploads(log_dir: AnyPath) -> None:
    """Raise, as one line (StorageError), the first failure of the background uploads of the files under log_dir
    in a store (metrics.jsonl's parts, TensorBoard's events)."""
    for uploads in _uploads_under(log_dir):
        uploads.check()


def abandon_uploads(log_dir: AnyPath) -> None:
    """Write nothing more to the objects under log_dir (their store is failing: each later upload, at exit too,
    would wait out the client's retries again); their close() neither waits nor raises."""
    for uploads in _uploads_under(log_dir):
        uploads.abandon()


_FACTORY = _RolledObjectFactory()


@contextlib.contextmanager
def local_copy(p: AnyPath) -> Iterator[Path]:
    """A local file to read p from: p itself on a disk, a temporary download of a URL (removed after)."""
    if not is_url(p):
        yield Path(p)
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gpt2_jax_") as tmp:
        local = Path(tmp) / path(p).name
        with path(p).open("rb") as source, open(local, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 22)
        yield local
