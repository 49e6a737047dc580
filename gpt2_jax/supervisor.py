"""One process of a multi-process job, run under a small supervisor that turns JAX's C++ abort into one line.

When the coordination service (or a process's client of it) learns that a peer is gone, JAX's C++
client logs its errors and aborts the process (SIGABRT, a C++ stack dump) before Python sees
anything; no Python API catches it. So `launch.py` runs each process of a multi-process job as a
child of itself: the parent forwards SIGTERM and SIGINT, keeps the child's stdout as it is, copies its stderr
except JAX's C++ log lines (absl format, and everything after a fatal one), which go to
`WORKDIR/logs/RUN/jax-PROCESS.log`, and when the child dies by a signal after the coordination
service reported a lost task, prints one line naming it and exits with parallel.PEER_LOST_EXIT.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Sequence

from gpt2_jax.parallel import PEER_LOST_EXIT, PEER_ERRORS

CHILD_ENV = "GPT2_JAX_SUPERVISED"  # set in the child: it trains instead of supervising again
# absl/glog lines ("E1202 07:04:24.123456  1234 coordination_service.cc:123] ...") and a C++ crash's dump.
_CPP_LOG = re.compile(rb"^(?:([IWEF])\d{4} [\d:.]+ +\d+ [^ \]]+:\d+\] ?(.*)|WARNING: All log messages before absl)")
_CRASH = re.compile(rb"^(\*\*\* |PC: @|\s+@ +0x|Fatal Python error|Check failed)")
_STATUS = re.compile(rb"absl::Status: ([^.]*)")
_TASK = re.compile(rb"/job:[\w-]+/replica:\d+/task:(\d+)|stopped sending heartbeats\):\s*(\d+)")


def process_name() -> str:
    """This process's number in a job started by a cluster (SLURM, a TPU VM slice, a Kubernetes indexed job),
    for its log's name; else host and process id."""
    for variable in ("SLURM_PROCID", "TPU_WORKER_ID", "JOB_COMPLETION_INDEX", "CLOUD_TPU_TASK_ID"):
        if os.environ.get(variable, "").isdigit():
            return os.environ[variable]
    return f"{socket.gethostname()}-{os.getpid()}"


def is_supervised_child() -> bool:
    """True in the process the supervisor started (it trains)."""
    return os.environ.get(CHILD_ENV) == "1"


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the supervisor dies (kill -9 of it ends the job's process too)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _StderrFilter:
    """Copies the child's stderr to ours, diverting JAX's C++ log lines (and a crash dump) to a file."""

    def __init__(self, source: BinaryIO, log_path: Path):
        self.source, self.log_path = source, log_path
        self.crashed = False  # a fatal C++ line or a crash dump was seen: the rest is the dump
        self.errors: list[bytes] = []  # the C++ error and fatal messages, for the one line
        self._log: BinaryIO | None = None
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _to_log(self, segment: bytes) -> None:
        if self._log is None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")
        self._log.write(segment)
        self._log.flush()

    def _route(self, segment: bytes, continues: bool) -> None:
        """One line: to the log if it is JAX's (or continues a multi-line message of JAX's written in the
        same write as its first line, `continues`), else to our stderr."""
        cpp = _CPP_LOG.match(segment)
        if cpp and cpp.group(1) and cpp.group(1) in b"EF":
            self.errors.append(cpp.group(2).strip())
        elif continues and not cpp and self.errors:
            self.errors[-1] += b" " + segment.strip()
        if (cpp and cpp.group(1) == b"F") or _CRASH.match(segment):
            self.crashed = True
        if cpp or continues or self.crashed:
            self._to_log(segment)
        else:
            sys.stderr.buffer.write(segment)
            sys.stderr.buffer.flush()

    def _pump(self) -> None:
        pending = b""
        while chunk := os.read(self.source.fileno(), 65536):
            pending += chunk
            in_error = False  # an error line of JAX's came earlier in this chunk: the lines after it are its own
            # Whole lines (a progress bar's "\r" ends one too) are routed as they come.
            for segment in re.findall(rb"[^\r\n]*(?:\r\n|\r|\n)", pending):
                cpp = _CPP_LOG.match(segment)
                self._route(segment, continues=in_error and not cpp)
                in_error = bool(cpp.group(1) in b"EF") if cpp and cpp.group(1) else in_error and not cpp
                pending = pending[len(segment):]
        if pending:
            self._route(pending, continues=False)
        if self._log is not None:
            self._log.close()

    def lost_peer(self) -> tuple[str, str] | None:
        """('process N' or 'a peer', JAX's reason) when JAX's errors say the job lost a task, else None."""
        text = b" ".join(self.errors)
        if not any(marker.encode() in text.lower() for marker in PEER_ERRORS):
            return None
        task = _TASK.search(text)
        who = f"process {int(task.group(1) or task.group(2))}" if task else \
            "process 0 (the coordinator)" if b"leader task" in text else "a peer"
        status = _STATUS.search(text)
        reason = re.sub(rb"\):.*", b")", status.group(1) if status else self.errors[-1])
        return who, reason.decode(errors="replace")[:160]


def supervise(argv: Sequence[str], log: str, job: str) -> int:
    """Run this command line again as a child and return the exit code this process should end with
    (`job` says which job it is in the one line: "2-process job"). JAX's log goes to `log`; in a store
    (a URL), to a local file first, uploaded when the child ends."""
    from gpt2_jax import storage

    local = Path(tempfile.mkdtemp(prefix="gpt2_jax_log_")) / Path(log).name if storage.is_url(log) else Path(log)
    try:
        return _supervise(argv, local, log, job)
    finally:
        if storage.is_url(log) and local.is_file():
            try:
                storage.upload(local, storage.path(log))
            except Exception as e:  # noqa: BLE001 - the store failing: the log stays on this host
                print(f"warning: could not upload JAX's log to {log} ({e}); it is kept at {local}", file=sys.stderr)
            else:
                shutil.rmtree(local.parent, ignore_errors=True)


def _supervise(argv: Sequence[str], log_path: Path, log_name: str, job: str) -> int:
    # The child runs in a process group of its own, so that a terminal's Ctrl-C reaches it once, through this
    # process, as `kill -INT` of this process does: both are forwarded, as SIGTERM is (a scheduler, a
    # preemption). The child saves and stops at the first; a second SIGINT aborts it.
    child = subprocess.Popen([sys.executable, *argv], env={**os.environ, CHILD_ENV: "1"}, stderr=subprocess.PIPE,
                             preexec_fn=_die_with_parent, process_group=0)
    filtered = _StderrFilter(child.stderr, log_path)
    previous = {sig: signal.signal(sig, lambda signum, _: child.send_signal(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
        filtered.thread.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code >= 0:
        return code
    name = signal.Signals(-code).name
    lost = filtered.lost_peer()
    if lost is not None:
        who, detail = lost
        print(f"{Path(argv[0]).name}: error: lost {who} of this {job} (JAX's coordination "
              f"service: {detail}); restart every process with the same command: it resumes from the last complete "
              f"checkpoint (JAX's log: {log_name})", file=sys.stderr, flush=True)
        return PEER_LOST_EXIT
    where = f" (JAX's log: {log_name})" if filtered.crashed else ""
    print(f"{Path(argv[0]).name}: error: the training process ended by {name}{where}", file=sys.stderr, flush=True)
    return 128 - code
