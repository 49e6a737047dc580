"""A local Google Cloud Storage for the tests: gcp-storage-emulator (a test-only dependency) on 127.0.0.1,
run as `python tests/gcs_emulator.py PORT BUCKET [--data DIR] [--raw] [--faults FILE]` by the `gcs` fixture in
conftest.py (in memory; with --data, kept in DIR, so that a test can stop the store and start it again).

Two things real GCS does that the emulator does not are added here: its upload and delete handlers answer
412 when `ifGenerationMatch` does not hold (gpt2-jax's run lock relies on it: an object created only if
absent, renewed or deleted only while it is the generation the job wrote), and reads name the object's
generation and honour generation conditions (tensorstore's reads of orbax's OCDBT manifests rely on them).
With --raw neither is added: a store that is not quite GCS, whose answers orbax and tensorstore do not expect.

With --faults FILE, an upload or delete of an object whose name starts with one of FILE's lines (read at each
request; no file, no faults) is answered 403 Forbidden, as GCS answers a write it refuses: a test makes one
kind of write fail mid-run by writing the file.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from http import HTTPStatus

from gcp_storage_emulator import server, storage
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_LOCK = threading.Lock()  # the check and the write are one step, as in GCS


def _object_name(request) -> str | None:
    if "object_id" in request.params:
        return request.params["object_id"]
    if "name" in request.query:
        return request.query["name"][0]
    data = request.data
    if isinstance(data, dict):
        return (data.get("meta") or {}).get("name") or data.get("name")
    return None


def _with_preconditions(handler):
    def wrapped(request, response, storage, *args, **kwargs):
        wanted = request.query.get("ifGenerationMatch")
        if not wanted:
            return handler(request, response, storage, *args, **kwargs)
        with _LOCK:
            try:
                current = str(storage.get_file_obj(request.params["bucket_name"], _object_name(request))
                              .get("generation") or "0")
            except NotFound:
                current = "0"
            if current != wanted[0]:
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "Precondition Failed"}})
                return None
            return handler(request, response, storage, *args, **kwargs)
    return wrapped


def _reads_with_generations(handler):
    """A read answers with the object's generation in x-goog-generation and honours ifGenerationMatch (412)
    and ifGenerationNotMatch (304, not modified), as GCS does: tensorstore's reads of orbax's OCDBT
    manifests rely on both."""
    def wrapped(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:
            return handler(request, response, storage, *args, **kwargs)
        generation = str(obj.get("generation"))
        if request.query.get("ifGenerationMatch", [generation])[0] != generation:
            response.status = HTTPStatus.PRECONDITION_FAILED
            return None
        if request.query.get("ifGenerationNotMatch", [None])[0] == generation:
            response.status = HTTPStatus.NOT_MODIFIED
            response["x-goog-generation"] = generation
            return None
        response["x-goog-generation"] = generation
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        return handler(request, response, storage, *args, **kwargs)
    return wrapped


def _atomic_write_bytes(write_bytes):
    """A file on disk is written whole or not at all (a temporary file renamed over it), as a GCS object is:
    the tests kill the emulator mid-run, and a half-written `.meta` would keep it from starting again."""
    def wrapped(self, rel, content):
        if self._use_memory:
            return write_bytes(self, rel, content)
        path = self._disk_path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = self._root.parent / "staging"  # beside the store's root: never listed as an object
        staging.mkdir(exist_ok=True)
        temporary = staging / f"{threading.get_ident()}.tmp"
        temporary.write_bytes(content)
        os.replace(temporary, path)
        return None
    return wrapped


def _failing_writes(faults: str, handler):
    """Writes of objects under the prefixes listed in the file `faults` answered 403."""
    def wrapped(request, response, storage, *args, **kwargs):
        try:
            with open(faults, encoding="utf-8") as f:
                prefixes = [line.strip() for line in f if line.strip()]
        except FileNotFoundError:
            prefixes = []
        name = _object_name(request) or ""
        if any(name.startswith(p) for p in prefixes):
            response.status = HTTPStatus.FORBIDDEN
            response.json({"error": {"code": 403, "message": f"writes under this prefix are refused: {name}"}})
            return None
        return handler(request, response, storage, *args, **kwargs)
    return wrapped


def _option(name: str) -> str | None:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else None


def main() -> None:
    port, bucket = int(sys.argv[1]), sys.argv[2]
    data, faults, raw = _option("--data"), _option("--faults"), "--raw" in sys.argv
    logging.basicConfig(level=logging.CRITICAL)
    storage._FileStore.write_bytes = _atomic_write_bytes(storage._FileStore.write_bytes)
    wrapped = {} if raw else {
        objects.insert: _with_preconditions(objects.insert), objects.delete: _with_preconditions(objects.delete),
        objects.download: _reads_with_generations(objects.download), objects.get: _reads_with_generations(objects.get)}
    if faults:
        for write in (objects.insert, objects.delete):
            wrapped[write] = _failing_writes(faults, wrapped.get(write, write))
    for _, handlers in server.HANDLERS:
        for method, handler in handlers.items():
            handlers[method] = wrapped.get(handler, handler)
    # the router's fallback for uploads posted without /upload
    objects.insert = wrapped.get(objects.insert, objects.insert)
    emulator = server.create_server("127.0.0.1", port, in_memory=data is None, default_bucket=bucket, data_dir=data)
    print("ready", flush=True)
    emulator.run()


if __name__ == "__main__":
    main()
