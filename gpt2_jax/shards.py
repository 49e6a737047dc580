"""Token shards read a window at a time: nanoGPT's headerless uint16 `.bin` files and llm.c's / modded-nanogpt's
(a header of 256 little-endian int32: magic 20240520, version 1, token count; then the uint16 tokens), on a disk or
in a bucket, and the llm.c shards `gpt2-jax encode --shard_tokens` writes.

A shard is never read whole: `open_shards` reads each file's header and a sample of its two ends, and gives one
lazy `Tokens` per shard that the samplers slice and read: a positioned read (os.pread) on a disk, a range request
to a store (fsspec's cat_ranges: the windows of one batch fetched concurrently). `bytes_read()` counts every byte
this process has read, so that tests and bench/shards.py can check that a batch costs its rows x window x 2 bytes.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from gpt2_jax import storage
from gpt2_jax.errors import UserError, reason

MAGIC, VERSION = 20240520, 1  # llm.c's GPT-2 shards (dev/data/data_common.py), read by modded-nanogpt as well
LLAMA3_MAGIC = 20240801  # llm.c's uint32 Llama 3 shards: recognised, to be refused by name
HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
TOKEN = np.dtype("<u2")  # both layouts hold uint16 ids
SAMPLE_BYTES = 1 << 16  # the fingerprint's sample of each end of a shard (64 KiB)
# Range requests in flight at once: fsspec's default (128) overflows the accept queue of small servers (the GCS
# emulator's queues 5: 200 requests took 14 s at 128, 1 s at 8); a batch's windows are a few tens anyway.
CONCURRENT_REQUESTS = 16

_lock = threading.Lock()
_bytes_read = 0


def bytes_read() -> int:
    """Bytes this process has read from token files through this module (headers, samples, windows)."""
    return _bytes_read


def _count(n: int) -> None:
    global _bytes_read
    with _lock:
        _bytes_read += n


class _File:
    """One token file: `count` tokens of `dtype` from byte `offset` on (after a header), read by ranges."""

    def __init__(self, path: Any, size: int, offset: int, count: int, dtype: np.dtype):
        self.path, self.size, self.offset, self.count, self.dtype = str(path), size, offset, count, np.dtype(dtype)
        self._digest: bytes | None = None  # set by open_shards from the samples it read, else on first use
        self.fs, self.inner = _fs(self.path) if storage.is_url(self.path) else (None, self.path)

    def digest(self) -> bytes:
        """BLAKE2 of the file's size, its first HEADER_BYTES + SAMPLE_BYTES bytes and its last SAMPLE_BYTES."""
        if self._digest is None:
            self._digest = _sample_digest(self.size, read_ranges([(self, r) for r in _sample_ranges(self.size)]))
        return self._digest


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    storage.path(url)  # the scheme and its client checked, listings not cached (as storage does)
    return fsspec.core.url_to_fs(url)


def read_ranges(requests: Sequence[tuple[_File, tuple[int, int]]]) -> list[bytes]:
    """The bytes [start, end) of each (file, (start, end)): positioned reads on a disk, one concurrent batch of
    range requests per store. A failure is one line naming the file."""
    out: list[bytes | None] = [None] * len(requests)
    remote: dict[int, list[int]] = {}
    local: dict[str, list[int]] = {}
    for i, (f, _) in enumerate(requests):
        (remote.setdefault(id(f.fs), []) if f.fs is not None else local.setdefault(f.path, [])).append(i)
    for path, indices in local.items():
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                for i in indices:
                    start, end = requests[i][1]
                    out[i] = os.pread(fd, end - start, start)
            finally:
                os.close(fd)
        except OSError as e:
            raise UserError(f"{path}: cannot be read ({reason(e)})") from None
    for indices in remote.values():
        fs = requests[indices[0]][0].fs
        try:
            got = fs.cat_ranges([requests[i][0].inner for i in indices], [requests[i][1][0] for i in indices],
                                [requests[i][1][1] for i in indices], on_error="raise",
                                batch_size=CONCURRENT_REQUESTS)
        except (OSError, *storage.store_errors()) as e:
            raise UserError(f"{requests[indices[0]][0].path}: cannot be read ({reason(e)})") from None
        for i, data in zip(indices, got):
            out[i] = data
    for (f, (start, end)), data in zip(requests, out):
        if len(data) != end - start:  # a file shorter than when it was opened (replaced or truncated since)
            raise UserError(f"{f.path}: bytes {start}..{end} asked, {len(data)} read: the file is shorter than "
                            "when the run opened it (replaced or truncated since?)")
        _count(len(data))
    return out  # type: ignore[return-value]


class Tokens:
    """A lazy run of a token file: `len()`, slicing (another lazy run, nothing read) and `np.asarray` (the read),
    so that the samplers and data.split_tail treat it as an array."""

    __slots__ = ("file", "start", "stop")
    ndim = 1

    def __init__(self, file: _File, start: int, stop: int):
        self.file, self.start, self.stop = file, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def size(self) -> int:
        return len(self)

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    @property
    def dtype(self) -> np.dtype:
        return self.file.dtype

    def __getitem__(self, key: slice | int) -> Tokens | int:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("token shards are sliced with step 1")
            return Tokens(self.file, self.start + start, self.start + max(start, stop))
        index = range(len(self))[key]  # an IndexError out of range, as an array's
        return int(np.asarray(self[index:index + 1])[0])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        tokens = read([self])[0]
        return tokens if dtype is None else tokens.astype(dtype)

    def byte_range(self) -> tuple[int, int]:
        itemsize = self.file.dtype.itemsize
        return self.file.offset + self.start * itemsize, self.file.offset + self.stop * itemsize

    def digest(self) -> bytes:
        """Its file's sampled digest and where in the file it lies (the fingerprint of a chunk of shards)."""
        return self.file.digest() + np.asarray([self.start, self.stop], "<i8").tobytes()

    def __repr__(self) -> str:
        return f"Tokens({self.file.path}, [{self.start}:{self.stop}])"


def read(views: Sequence[Any]) -> list[np.ndarray]:
    """Each view's tokens: a numpy array as it is, a `Tokens` by reading only its own bytes (all of a store's at
    once, concurrently)."""
    lazy = [v for v in views if isinstance(v, Tokens)]
    got = iter(read_ranges([(v.file, v.byte_range()) for v in lazy]))
    return [np.frombuffer(next(got), v.dtype) if isinstance(v, Tokens) else np.asarray(v) for v in views]


def flat_file(path: Any, dtype: np.dtype) -> Tokens:
    """All of a headerless file of `dtype` ids (the project's own flat .bin in a bucket), read by ranges."""
    size = storage.size(path)
    return Tokens(_File(path, size, 0, size // np.dtype(dtype).itemsize, dtype), 0, size // np.dtype(dtype).itemsize)


def _sample_ranges(size: int) -> list[tuple[int, int]]:
    """What the fingerprint reads of a file: the header and first 64 KiB, and the last 64 KiB (or all of it)."""
    head = HEADER_BYTES + SAMPLE_BYTES
    return [(0, size)] if size <= head + SAMPLE_BYTES else [(0, head), (size - SAMPLE_BYTES, size)]


def _sample_digest(size: int, samples: Iterable[bytes]) -> bytes:
    digest = hashlib.blake2b(np.int64(size).tobytes(), digest_size=16)
    for sample in samples:
        digest.update(sample)
    return digest.digest()


def listing(paths: Sequence[Any]) -> dict[str, int]:
    """{path: size} of each file and of its sidecar (PATH.json) where there is one: stats on a disk, one listing
    per folder in a store (not a request per shard)."""
    sizes: dict[str, int] = {}
    for p in map(str, paths):
        if not storage.is_url(p):
            sizes.update({f: os.stat(f).st_size for f in (p, p + ".json") if os.path.isfile(f)})
    urls = [str(p) for p in paths if storage.is_url(p)]
    for folder in sorted({u.rsplit("/", 1)[0] for u in urls}):
        fs, inner = _fs(folder)
        scheme = folder.split("://", 1)[0]
        try:
            entries = fs.ls(inner, detail=True)
        except (OSError, *storage.store_errors()) as e:
            raise UserError(f"{folder}: cannot be listed ({reason(e)})") from None
        sizes.update({f"{scheme}://{e['name'].rstrip('/')}": int(e["size"]) for e in entries
                      if e.get("type") == "file"})
    return sizes


def _layout(path: str, size: int, head: bytes) -> tuple[int, int]:
    """(byte offset of the tokens, token count) of a shard from its first bytes; a damaged or foreign header is
    one line naming the shard."""
    fix = "encode it again (gpt2-jax encode ... --shard_tokens N) or remove it from the glob"
    if size >= HEADER_BYTES:
        ints = np.frombuffer(head[:HEADER_BYTES], "<i4")
        if ints[0] == LLAMA3_MAGIC:
            raise UserError(f"{path}: llm.c's Llama 3 layout (magic {LLAMA3_MAGIC}, uint32 tokens) is not read; "
                            f"GPT-2 shards have magic {MAGIC}")
        if ints[0] == MAGIC:
            if ints[1] != VERSION:
                raise UserError(f"{path}: llm.c header version {ints[1]}, but only version {VERSION} (uint16 GPT-2 "
                                f"tokens) is read; {fix}")
            expected = HEADER_BYTES + 2 * int(ints[2])
            if ints[2] < 0 or size != expected:
                raise UserError(f"{path}: its header says {ints[2]} tokens ({expected} bytes) but the file holds "
                                f"{size} bytes: truncated or damaged; {fix}")
            return HEADER_BYTES, int(ints[2])
        # llm.c's header but another magic: its fields (a version, a count) followed by 253 zero ints. No
        # headerless GPT-2 shard starts with 506 "!" tokens.
        if not ints[3:].any() and (ints[1] or ints[2]):
            raise UserError(f"{path}: an llm.c header with magic {ints[0]}, not {MAGIC}: damaged; {fix}")
    if size % TOKEN.itemsize:
        raise UserError(f"{path}: {size} bytes, an odd number: not uint16 tokens (nanoGPT's headerless .bin) nor "
                        f"llm.c's layout (magic {MAGIC}); {fix}")
    return 0, size // TOKEN.itemsize


def open_shards(paths: Sequence[Any], n_vocab: int, sizes: dict[str, int] | None = None) -> list[Tokens]:
    """One lazy `Tokens` per shard (each a chunk: no window crosses two), its layout detected by its header and
    checked: llm.c's magic, version and size against the count, one layout for the whole set, and the ids of
    the samples read (each end's 64 KiB, for the fingerprint) inside the vocabulary. `sizes`: their `listing`."""
    sizes = sizes if sizes is not None else listing(paths)
    files = [_File(p, sizes[str(p)], 0, 0, TOKEN) for p in paths]
    requests = [(f, r) for f in files for r in _sample_ranges(f.size)]
    samples: dict[int, list[bytes]] = {}
    for (f, _), data in zip(requests, read_ranges(requests)):
        samples.setdefault(id(f), []).append(data)
    chunks, headed = [], {}
    for f in files:
        head = samples[id(f)][0]
        f.offset, f.count = _layout(f.path, f.size, head)
        f._digest = _sample_digest(f.size, samples[id(f)])
        headed[bool(f.offset)] = f.path
        if len(headed) > 1:
            raise UserError(f"{headed[True]} has llm.c's header (magic {MAGIC}) but {headed[False]} has none: a "
                            "glob of shards must hold one layout; remove the other files from it")
        ids = np.concatenate([np.frombuffer(head[f.offset:len(head) - len(head) % 2], TOKEN)]
                             + [np.frombuffer(s, TOKEN) for s in samples[id(f)][1:]])
        if ids.size and int(ids.max()) >= n_vocab:
            raise UserError(f"{f.path}: holds token id {int(ids.max())}, outside the model's vocabulary [0, "
                            f"{n_vocab}); was it encoded with another model's vocabulary?")
        if f.count:
            chunks.append(Tokens(f, 0, f.count))
    return chunks


def header(count: int) -> bytes:
    """llm.c's header of a GPT-2 shard of `count` tokens: 256 int32, magic, version, count, then zeros."""
    ints = np.zeros(HEADER_INTS, "<i4")
    ints[:3] = MAGIC, VERSION, count
    return ints.tobytes()


def shard_path(out: Path, index: int) -> Path:
    """The index-th shard of `out`: OUT.bin -> OUT_000000.bin, OUT_000001.bin, ..."""
    return out.with_name(f"{out.stem}_{index:06d}{out.suffix}")


def write_shards(blocks: Iterable[np.ndarray], out: Path, shard_tokens: int,
                 done: Callable[[Path], None] = lambda p: None) -> tuple[list[Path], int]:
    """Write the concatenated uint16 ids of `blocks` as llm.c shards of at most `shard_tokens` tokens each beside
    `out` (shard_path), streamed: each is written under a temporary name, its header (with the count) put at its
    start when it is complete, then renamed, and handed to `done` (an upload). Returns (the shards, tokens)."""
    if not 0 < shard_tokens < 1 << 31:
        raise UserError(f"--shard_tokens={shard_tokens}: must be between 1 and {(1 << 31) - 1} (llm.c's int32 count)")
    written: list[Path] = []
    total, current, f = 0, 0, None
    tmp = out.with_name(out.name + ".tmp")

    def close() -> None:
        f.seek(0)
        f.write(header(current))
        f.close()
        final = shard_path(out, len(written))
        os.replace(tmp, final)
        written.append(final)
        done(final)

    try:
        for block in blocks:
            block = np.ascontiguousarray(block, TOKEN)
            while block.size:
                if f is None:
                    f, current = open(tmp, "wb"), 0
                    f.write(bytes(HEADER_BYTES))  # the count is known when the shard is complete
                take = min(block.size, shard_tokens - current)
                f.write(block[:take].tobytes())
                current, total, block = current + take, total + take, block[take:]
                if current == shard_tokens:
                    close()
                    f = None
        if f is not None:
            close()
            f = None
    except BaseException:  # an error or Ctrl-C: no partial shard is left under a shard's name
        if f is not None:
            f.close()
        tmp.unlink(missing_ok=True)
        raise
    return written, total
