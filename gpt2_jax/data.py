"""Datasets: text files, directories and globs encoded to token chunks, or pre-encoded .npz files."""

from __future__ import annotations

import glob as globlib
import json
import math
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt2_jax.encoder import Encoder
from gpt2_jax.errors import UserError


def resolve_paths(spec: str | os.PathLike) -> list[Path]:
    """The files named by a path, a directory (walked recursively, sorted) or a glob pattern."""
    spec = str(spec)
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    else:
        files = sorted(Path(p) for p in globlib.glob(spec, recursive=True) if Path(p).is_file())
    if not files:
        raise UserError(f"dataset {spec!r}: no file matches (give a file, a directory or a glob such as 'texts/*.txt')")
    return files


def read_text(path: Path, encoding: str = "utf-8", errors: str = "strict") -> str:
    """A text file's contents; undecodable bytes raise an error naming the file and byte offset."""
    data = path.read_bytes()
    try:
        return data.decode(encoding, errors=errors)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid {encoding} text at byte offset {e.start}; set the right encoding, "
                        f"or encoding_errors=replace to substitute bad bytes") from None
    except LookupError:
        raise UserError(f"encoding={encoding!r} is not a known text encoding") from None


def token_dtype(n_vocab: int) -> np.dtype:
    """The smallest unsigned dtype holding every id: uint16 for GPT-2's 50257."""
    return np.dtype(np.uint16 if n_vocab <= 1 << 16 else np.uint32)


def load_npz(path: Path, n_vocab: int) -> list[np.ndarray]:
    """Token chunks of a pre-encoded .npz (one array per chunk), checked against the vocabulary size."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            chunks = [np.asarray(npz[name]).reshape(-1) for name in npz.files]
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: not a readable .npz of token arrays ({e})") from None
    for i, chunk in enumerate(chunks):
        if chunk.size and (chunk.dtype.kind not in "iu" or chunk.min() < 0 or chunk.max() >= n_vocab):
            bad = chunk.max() if chunk.dtype.kind in "iu" else chunk.dtype
            raise UserError(f"{path}: chunk {i} holds token id {bad}, outside the vocabulary [0, {n_vocab}); "
                            "was it encoded with another model's vocabulary?")
    return [c.astype(token_dtype(n_vocab)) for c in chunks]


def load_flat(path: Path, n_vocab: int) -> list[np.ndarray]:
    """Token chunks of a flat .bin file (memory-mapped, never read whole), split as its .json sidecar says."""
    meta_path = Path(str(path) + ".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    dtype = np.dtype(meta.get("dtype", "uint16"))
    tokens = np.memmap(path, dtype=dtype, mode="r")
    if meta.get("n_vocab", n_vocab) > n_vocab:
        raise UserError(f"{path}: encoded with a vocabulary of {meta['n_vocab']} ids but the model has {n_vocab}; "
                        "encode it again with this model's vocabulary")
    bounds = meta.get("chunk_starts", [0]) + [len(tokens)]
    return [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _encoded_files(files: list[Path], encoder: Encoder, encoding: str, encoding_errors: str, progress: bool):
    """(path, ids, characters) per text file; every file after the first starts with the end-of-text id.

    Files are read in groups of up to 16M characters, and a group is encoded across cores.
    """
    first = True
    bar = tqdm(total=len(files), desc="encoding", unit="file", disable=not progress or len(files) < 2)
    group: list[tuple[Path, str]] = []

    def flush():
        nonlocal first
        for (path, text), ids in zip(group, encoder.encode_batch([t for _, t in group])):
            if not first:
                ids.insert(0, encoder.eot_token)
            first = False
            bar.update(1)
            yield path, ids, len(text)
        group.clear()

    for path in files:
        group.append((path, read_text(path, encoding, encoding_errors)))
        if sum(len(t) for _, t in group) >= 16_000_000:
            yield from flush()
    yield from flush()
    bar.close()


def load_dataset(spec: str | os.PathLike, encoder: Encoder, combine: int = 50000, encoding: str = "utf-8",
                 encoding_errors: str = "strict", progress: bool = True) -> list[np.ndarray]:
    """Token chunks of a dataset: files joined by the end-of-text id, cut at >= `combine` characters.

    Each text file after the first is preceded by the end-of-text token (the id itself, never the
    string), and a chunk closes after the file that brings it to `combine` characters. .npz and
    .bin files contribute their chunks as they are.
    """
    dtype = token_dtype(encoder.n_vocab)
    files = resolve_paths(spec)
    chunks: list[np.ndarray] = []
    for path in files:
        if path.suffix == ".npz":
            chunks.extend(load_npz(path, encoder.n_vocab))
        elif path.suffix == ".bin":
            chunks.extend(load_flat(path, encoder.n_vocab))
    texts = [p for p in files if p.suffix not in (".npz", ".bin") and not p.name.endswith(".bin.json")]
    pending: list[list[int]] = []
    pending_chars = 0
    for _, ids, chars in _encoded_files(texts, encoder, encoding, encoding_errors, progress):
        pending.append(ids)
        pending_chars += chars
        if pending_chars >= combine:
            chunks.append(np.fromiter((t for part in pending for t in part), dtype=dtype))
            pending, pending_chars = [], 0
    if pending:
        chunks.append(np.fromiter((t for part in pending for t in part), dtype=dtype))
    chunks = [c for c in chunks if c.size]
    if not chunks:
        raise UserError(f"dataset {str(spec)!r} is empty: its files hold no tokens")
    return chunks


def encode_to_file(spec: str | os.PathLike, out: str | os.PathLike, encoder: Encoder, combine: int = 50000,
                   encoding: str = "utf-8", encoding_errors: str = "strict", progress: bool = True) -> Path:
    """Encode a dataset to `out`: .npz (the original's format, one array per chunk) or .bin (flat, streamed).

    A .bin file holds the ids back to back (uint16 for GPT-2) and is written file by file, so corpora
    larger than memory work; its .bin.json sidecar records the dtype, vocabulary size and chunk starts.
    The output is written under a temporary name and renamed, so an existing file is never half-replaced.
    """
    out = Path(out)
    if out.suffix not in (".npz", ".bin"):
        raise UserError(f"{out}: the output must end in .npz (chunks, as the original) or .bin (flat tokens)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".npz":
        chunks = load_dataset(spec, encoder, combine, encoding, encoding_errors, progress)
        with open(tmp, "wb") as f:
            np.savez_compressed(f, *chunks)
        os.replace(tmp, out)
        return out
    dtype = token_dtype(encoder.n_vocab)
    files = [p for p in resolve_paths(spec) if p.resolve() != out.resolve()]
    chunk_starts, written, chars = [0], 0, 0
    with open(tmp, "wb") as f:
        for _, ids, n_chars in _encoded_files(files, encoder, encoding, encoding_errors, progress):
            f.write(np.asarray(ids, dtype=dtype).tobytes())
            written, chars = written + len(ids), chars + n_chars
            if chars >= combine:
                chunk_starts.append(written)
                chars = 0
    if written == 0:
        tmp.unlink()
        raise UserError(f"dataset {str(spec)!r} is empty: its files hold no text")
    meta = {"dtype": dtype.name, "n_vocab": encoder.n_vocab, "chunk_starts": [s for s in chunk_starts if s < written]}
    Path(str(out) + ".json").write_text(json.dumps(meta))
    os.replace(tmp, out)
    return out


def split_tail(chunks: list[np.ndarray], fraction: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(head, tail): the last `fraction` of the tokens held out, cut from the end of the chunk list.

    Deterministic (no randomness, no reordering) and disjoint: no token of the tail is in the head,
    and the cut is a chunk boundary, so no window of one can reach into the other.
    """
    total = sum(len(c) for c in chunks)
    remaining = math.ceil(total * fraction)
    head, tail = list(chunks), []
    while remaining > 0 and head:
        last = head.pop()
        take = min(remaining, len(last))
        tail.insert(0, last[len(last) - take:])
        if take < len(last):
            head.append(last[:len(last) - take])
        remaining -= take
    return head, tail


class WindowSampler:
    """Windows drawn uniformly over every start position that does not cross a chunk boundary.

    The original's "fair" sampler, made stateless: batch number k is a pure function of (seed, k),
    so a resumed run, or any number of hosts each taking its slice, sees the same global batches.
    """

    def __init__(self, chunks: list[np.ndarray], window: int, seed: int, what: str = "dataset"):
        lengths = np.array([len(c) for c in chunks], np.int64)
        if lengths.max(initial=0) < window:
            raise UserError(f"{what} is too small: its largest chunk has {lengths.max(initial=0)} tokens "
                            f"({lengths.sum()} in all) but one training window needs {window} "
                            "(seq_len + 1); add text or lower data.seq_len")
        self.chunks, self.window, self.seed = chunks, window, seed
        self.bounds = np.concatenate([[0], np.cumsum(lengths)])  # chunk i is tokens [bounds[i], bounds[i+1])
        self.valid_starts = int(np.sum(np.maximum(lengths - window + 1, 0)))

    def batch(self, index: int, batch_size: int) -> np.ndarray:
        """Batch number `index`: [batch_size, window] token ids."""
        rng = np.random.default_rng([self.seed, index])
        rows: list[np.ndarray] = []
        while len(rows) < batch_size:
            starts = rng.integers(0, self.bounds[-1] - self.window + 1, size=2 * batch_size)
            chunk = np.searchsorted(self.bounds, starts, side="right") - 1
            for start, c in zip(starts, chunk):  # rejection: keep windows inside one chunk
                if start + self.window <= self.bounds[c + 1] and len(rows) < batch_size:
                    offset = start - self.bounds[c]
                    rows.append(np.asarray(self.chunks[c][offset:offset + self.window]))
        return np.stack(rows).astype(np.int32)
