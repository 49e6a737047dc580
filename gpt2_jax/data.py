"""Datasets: text files, directories and globs encoded to token chunks, or pre-encoded .npz files."""

from __future__ import annotations

import glob as globlib
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


def load_dataset(spec: str | os.PathLike, encoder: Encoder, combine: int = 50000, encoding: str = "utf-8",
                 encoding_errors: str = "strict", progress: bool = True) -> list[np.ndarray]:
    """Token chunks of a dataset: files joined by the end-of-text id, cut at >= `combine` characters.

    Each text file after the first is preceded by the end-of-text token (the id itself, never the
    string), and a chunk closes after the file that brings it to `combine` characters. .npz files
    contribute their arrays as they are.
    """
    dtype = token_dtype(encoder.n_vocab)
    chunks: list[np.ndarray] = []
    pending: list[list[int]] = []
    pending_chars = 0
    first_text = True
    files = resolve_paths(spec)
    for path in tqdm(files, desc="encoding", unit="file", disable=not progress or len(files) < 2):
        if path.suffix == ".npz":
            chunks.extend(load_npz(path, encoder.n_vocab))
            continue
        text = read_text(path, encoding, encoding_errors)
        ids = encoder.encode_ordinary(text)
        if not first_text:
            ids.insert(0, encoder.eot_token)
        first_text = False
        pending.append(ids)
        pending_chars += len(text)
        if pending_chars >= combine:
            chunks.append(np.fromiter((t for part in pending for t in part), dtype=dtype))
            pending, pending_chars = [], 0
    if pending:
        chunks.append(np.fromiter((t for part in pending for t in part), dtype=dtype))
    chunks = [c for c in chunks if c.size]
    if not chunks:
        raise UserError(f"dataset {str(spec)!r} is empty: its files hold no text")
    return chunks
