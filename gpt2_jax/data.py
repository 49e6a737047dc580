"""Datasets: text files, directories and globs encoded to token chunks, pre-encoded .npz and .bin files, token
shards (shards.py); the samplers that draw batches from them; what a run trains and validates on."""

from __future__ import annotations

import codecs
import collections
import hashlib
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
from tqdm import tqdm

from gpt2_jax import encoder as encoder_module
from gpt2_jax import mixture, shards, storage
from gpt2_jax.encoder import Encoder, last_safe_cut
from gpt2_jax.errors import UserError, reason


def resolve_paths(spec: str | os.PathLike) -> list[Path]:
    """The files named by a path, a directory (walked recursively, sorted) or a glob pattern; local or a URL."""
    spec = str(spec)
    try:
        files = storage.files_of(spec)
    except OSError as e:  # a store that cannot be listed (no credentials, no such bucket...)
        raise UserError(f"dataset {spec!r}: cannot be listed ({reason(e)})") from None
    if not files:
        raise UserError(f"dataset {spec!r}: no file matches (give a file, a directory or a glob such as 'texts/*.txt')")
    return files


def token_dtype(n_vocab: int) -> np.dtype:
    """The smallest unsigned dtype holding every id: uint16 for GPT-2's 50257."""
    return np.dtype(np.uint16 if n_vocab <= 1 << 16 else np.uint32)


def load_npz(path: Path, n_vocab: int) -> list[np.ndarray]:
    """Token chunks of a pre-encoded .npz (one array per chunk), checked against the vocabulary size."""
    try:
        with storage.path(path).open("rb") as f, np.load(f, allow_pickle=False) as npz:
            chunks = [np.asarray(npz[name]).reshape(-1) for name in npz.files]
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: not a readable .npz of token arrays ({e})") from None
    for i, chunk in enumerate(chunks):
        if chunk.size and (chunk.dtype.kind not in "iu" or chunk.min() < 0 or chunk.max() >= n_vocab):
            bad = chunk.max() if chunk.dtype.kind in "iu" else chunk.dtype
            raise UserError(f"{path}: chunk {i} holds token id {bad}, outside the vocabulary [0, {n_vocab}); "
                            "was it encoded with another model's vocabulary?")
    return [c.astype(token_dtype(n_vocab)) for c in chunks]


def load_flat(path: Path, n_vocab: int) -> list[np.ndarray | shards.Tokens]:
    """Token chunks of the project's flat .bin file, split as its .json sidecar says: memory-mapped on a disk,
    read by ranges in a store (shards.Tokens); never read whole."""
    meta_path = storage.path(str(path) + ".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    dtype = np.dtype(meta.get("dtype", "uint16"))
    tokens = np.memmap(path, dtype=dtype, mode="r") if not storage.is_url(path) else shards.flat_file(path, dtype)
    if meta.get("n_vocab", n_vocab) > n_vocab:
        raise UserError(f"{path}: encoded with a vocabulary of {meta['n_vocab']} ids but the model has {n_vocab}; "
                        "encode it again with this model's vocabulary")
    if meta.get("tokens", len(tokens)) != len(tokens):
        raise UserError(f"{path}: holds {len(tokens)} tokens but its sidecar {meta_path.name} says {meta['tokens']}; "
                        "the two are from different encodes: encode the dataset again")
    bounds = meta.get("chunk_starts", [0]) + [len(tokens)]
    return [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


# Text is read, encoded and written in blocks of about this many characters (cut where no pre-token
# crosses), so encoding holds a bounded amount of text and ids in memory whatever the input's size.
BLOCK_CHARS = 1 << 20


def read_blocks(path: Path, encoding: str = "utf-8", errors: str = "strict", block_chars: int = BLOCK_CHARS
                ) -> Iterator[tuple[str, int]]:
    """(text, bytes read for it) blocks of a text file, each cut where no pre-token crosses
    (encoder.last_safe_cut), so that their ids concatenate to the whole file's; at least one block."""
    try:
        decoder = codecs.getincrementaldecoder(encoding)(errors=errors)
    except LookupError:
        raise UserError(f"encoding={encoding!r} is not a known text encoding") from None
    carry, carry_bytes, offset = "", 0, 0
    with storage.path(path).open("rb") as f:
        while True:
            raw = f.read(block_chars)
            buffered = len(decoder.getstate()[0])
            try:
                carry += decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: not valid {encoding} text at byte offset {offset - buffered + e.start}; set "
                                "the right encoding, or encoding_errors=replace to substitute bad bytes") from None
            offset += len(raw)
            carry_bytes += len(raw)
            if not raw:
                break
            if len(carry) >= block_chars and (cut := last_safe_cut(carry)):
                yield carry[:cut], carry_bytes
                carry, carry_bytes = carry[cut:], 0
    yield carry, carry_bytes


def _encoded_files(files: list[Path], encoder: Encoder, encoding: str, encoding_errors: str, progress: bool
                   ) -> Iterator[tuple[np.ndarray, int, bool]]:
    """(ids, characters, whether its file ends here) per block of each text file, in order; every file
    after the first starts with the end-of-text id. Blocks are encoded across cores when the files
    hold at least encoder.PARALLEL_MIN_CHARS bytes, a bounded number at a time."""
    dtype = token_dtype(encoder.n_vocab)
    total = sum(storage.size(p) for p in files)
    workers = (os.cpu_count() or 1) if total >= encoder_module.PARALLEL_MIN_CHARS else 1
    bar = tqdm(total=total, desc="encoding", unit="B", unit_scale=True, disable=not progress or total < 1 << 24)
    blocks: collections.deque = collections.deque()  # (starts a file after the first, chars, ends its file)

    def texts() -> Iterator[str]:
        for i, path in enumerate(files):
            parts = read_blocks(path, encoding, encoding_errors, BLOCK_CHARS)
            (text, nbytes), first = next(parts), True
            for following in itertools.chain(parts, [None]):  # one block of lookahead marks a file's last
                blocks.append((i > 0 and first, len(text), following is None))
                bar.update(nbytes)
                yield text
                if following is not None:
                    (text, nbytes), first = following, False

    eot = np.asarray([encoder.eot_token], dtype)
    for ids in encoder.encode_stream(texts(), dtype, workers):
        file_start, chars, file_end = blocks.popleft()
        yield (np.concatenate([eot, ids]) if file_start else ids), chars, file_end
    bar.close()


def load_dataset(spec: str | os.PathLike, encoder: Encoder, combine: int = 50000, encoding: str = "utf-8",
                 encoding_errors: str = "strict", progress: bool = True) -> list[np.ndarray]:
    """Token chunks of a dataset: files joined by the end-of-text id, cut at >= `combine` characters.

    Each text file after the first is preceded by the end-of-text token (the id itself, never the
    string), and a chunk closes after the file that brings it to `combine` characters. .npz and
    .bin files contribute their chunks as they are: a .bin with a .bin.json sidecar is the project's flat
    encode (load_flat), one without is a token shard, nanoGPT's or llm.c's (shards.open_shards: one chunk each,
    read by ranges).
    """
    dtype = token_dtype(encoder.n_vocab)
    files = resolve_paths(spec)
    chunks: list[np.ndarray | shards.Tokens] = []
    bins = [p for p in files if p.suffix == ".bin"]
    sizes = shards.listing(bins) if bins else {}  # which .bin has a sidecar: one listing per folder in a store
    for path in files:
        if path.suffix == ".npz":
            chunks.extend(load_npz(path, encoder.n_vocab))
        elif path.suffix == ".bin" and f"{path}.json" in sizes:
            chunks.extend(load_flat(path, encoder.n_vocab))
    shard_paths = [p for p in bins if f"{p}.json" not in sizes]
    if shard_paths:
        chunks.extend(shards.open_shards(shard_paths, encoder.n_vocab, sizes))
    texts = [p for p in files if p.suffix not in (".npz", ".bin") and not p.name.endswith(".bin.json")]
    pending: list[np.ndarray] = []
    pending_chars = 0
    encoded = _encoded_files(texts, encoder, encoding, encoding_errors, progress) if texts else ()  # pre-encoded only
    for ids, chars, file_end in encoded:
        pending.append(ids)
        pending_chars += chars
        if file_end and pending_chars >= combine:  # a chunk closes after the file that fills it
            chunks.append(np.concatenate(pending).astype(dtype))
            pending, pending_chars = [], 0
    if pending:
        chunks.append(np.concatenate(pending).astype(dtype))
    chunks = [c for c in chunks if c.size]
    if not chunks:
        raise UserError(f"dataset {str(spec)!r} is empty: its files hold no tokens")
    return chunks


def encode_to_file(spec: str | os.PathLike, out: str | os.PathLike, encoder: Encoder, combine: int = 50000,
                   encoding: str = "utf-8", encoding_errors: str = "strict", progress: bool = True) -> Path:
    """Encode a dataset to `out`: .npz (the original's format, one array per chunk) or .bin (flat, streamed).

    A .bin file holds the ids back to back (uint16 for GPT-2) and is written block by block as the
    blocks are encoded (across cores), so memory stays bounded whatever the corpus size; its .bin.json
    sidecar records the dtype, vocabulary size, token count and chunk starts. A .npz holds every
    chunk in memory before writing it. Either is written under a temporary name and renamed when
    complete: an interrupted encode leaves no file under the final name. A URL's output is encoded to a
    local temporary file, then uploaded (the sidecar first): an object appears only once it is whole.
    """
    if storage.is_url(out):
        import tempfile

        out = storage.path(out)
        if out.suffix not in (".npz", ".bin"):
            raise UserError(f"{out}: the output must end in .npz (chunks, as the original) or .bin (flat tokens)")
        with tempfile.TemporaryDirectory(prefix="gpt2_jax_encode_") as tmp:
            local = _encode_locally(spec, Path(tmp) / out.name, encoder, combine, encoding, encoding_errors,
                                    progress, exclude={str(out), f"{out}.json"})
            if Path(f"{local}.json").is_file():
                storage.upload(f"{local}.json", storage.path(f"{out}.json"))
            storage.upload(local, out)
        return out
    return _encode_locally(spec, Path(out), encoder, combine, encoding, encoding_errors, progress)


def _encode_locally(spec: str | os.PathLike, out: Path, encoder: Encoder, combine: int, encoding: str,
                    encoding_errors: str, progress: bool, exclude: frozenset[str] = frozenset()) -> Path:
    """encode_to_file to a local `out`, never reading the inputs named in `exclude` (the output's URLs)."""
    if out.suffix not in (".npz", ".bin"):
        raise UserError(f"{out}: the output must end in .npz (chunks, as the original) or .bin (flat tokens)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".npz":
        chunks = load_dataset(spec, encoder, combine, encoding, encoding_errors, progress)
        try:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, *chunks)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, out)
        return out
    dtype = token_dtype(encoder.n_vocab)
    sidecar = Path(str(out) + ".json")
    ours = {p.resolve() for p in (out, tmp, sidecar)}
    files = [p for p in resolve_paths(spec) if str(p) not in exclude and
             (storage.is_url(p) or p.resolve() not in ours)]
    chunk_starts, written, chars = [0], 0, 0
    try:
        with open(tmp, "wb") as f:
            for ids, n_chars, file_end in _encoded_files(files, encoder, encoding, encoding_errors, progress):
                f.write(ids.astype(dtype, copy=False).tobytes())
                written, chars = written + len(ids), chars + n_chars
                if file_end and chars >= combine:
                    chunk_starts.append(written)
                    chars = 0
        if written == 0:
            raise UserError(f"dataset {str(spec)!r} is empty: its files hold no text")
    except BaseException:  # an error or Ctrl-C: no partial output is left behind
        tmp.unlink(missing_ok=True)
        raise
    meta = {"dtype": dtype.name, "n_vocab": encoder.n_vocab, "tokens": written,
            "chunk_starts": [s for s in chunk_starts if s < written]}
    sidecar.write_text(json.dumps(meta))
    os.replace(tmp, out)
    return out


def encode_to_shards(spec: str | os.PathLike, out: str | os.PathLike, encoder: Encoder, shard_tokens: int,
                     encoding: str = "utf-8", encoding_errors: str = "strict", progress: bool = True
                     ) -> tuple[list, int]:
    """Encode a dataset to llm.c's shards beside `out` (OUT.bin -> OUT_000000.bin, OUT_000001.bin, ...), each
    the llm.c header and at most `shard_tokens` uint16 ids: the token stream of a flat encode (files joined by
    the end-of-text id), streamed (shards.write_shards). A URL's shards are encoded locally and uploaded one by
    one, each removed locally once uploaded. Returns (the shards, their tokens).

    Refuses an output whose name already has shards (a glob would mix the old ones in); an interrupted encode
    leaves the shards completed so far, never a partial one.
    """
    if encoder.n_vocab > 1 << 16:
        raise UserError(f"--shard_tokens writes llm.c's uint16 shards, but this vocabulary has {encoder.n_vocab} ids; "
                        "write a flat OUT.bin instead")
    target = storage.path(out)
    if target.suffix != ".bin":
        raise UserError(f"{out}: with --shard_tokens the output is OUT.bin (the shards are OUT_000000.bin, ...)")
    pattern = str(shards.shard_path(target, 0)).replace("000000", "[0-9]" * 6)
    try:
        existing = storage.files_of(pattern)
    except OSError as e:
        raise UserError(f"{out}: its folder cannot be listed ({reason(e)})") from None
    if existing:
        raise UserError(f"{existing[0]} already exists ({len(existing)} shard(s) match {pattern}): remove them or "
                        "write elsewhere, so that no glob mixes two encodes (nothing was written)")
    files = resolve_paths(spec)
    blocks = (ids for ids, _, _ in _encoded_files(files, encoder, encoding, encoding_errors, progress))
    if not storage.is_url(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        written, total = shards.write_shards(blocks, target, shard_tokens)
    else:
        import tempfile

        uploaded = []

        def upload(local: Path) -> None:
            uploaded.append(target.parent / local.name)
            storage.upload(local, uploaded[-1])
            local.unlink()

        with tempfile.TemporaryDirectory(prefix="gpt2_jax_encode_") as tmp:
            _, total = shards.write_shards(blocks, Path(tmp) / target.name, shard_tokens, done=upload)
        written = uploaded
    if not total:
        raise UserError(f"dataset {str(spec)!r} is empty: its files hold no text")
    return written, total


# How the fingerprint of data read by ranges (token shards, a .bin in a bucket) hashes it: a sample, not every token.
SAMPLED_HASH = "sampled: each file's size, its first 65 KiB (an llm.c header and 64 KiB) and its last 64 KiB"


def fingerprint(spec: str | os.PathLike, chunks: list[np.ndarray | shards.Tokens]) -> dict:
    """What a dataset was: its files with their sizes, its chunk and token counts, and a BLAKE2 hash of
    the token stream (so a change of text, files or vocabulary shows), for a run to compare on resume.

    Data read by ranges (shards.Tokens: token shards, a .bin in a bucket) is not read whole for it: its hash
    covers each file's size and the two ends SAMPLED_HASH says (`hash` in the record), weaker than the hash of
    every token: a change in the middle of a shard that keeps its size goes unseen.
    """
    digest = hashlib.blake2b(digest_size=16)
    sampled = False
    for chunk in chunks:
        digest.update(np.int64(len(chunk)).tobytes())
        if isinstance(chunk, shards.Tokens):
            digest.update(chunk.digest())
            sampled = True
            continue
        for start in range(0, len(chunk), 1 << 24):  # memory-mapped chunks are hashed a slice at a time
            digest.update(np.ascontiguousarray(chunk[start:start + (1 << 24)], dtype="<u4").tobytes())
    known = {c.file.path: c.file.size for c in chunks if isinstance(c, shards.Tokens)}  # no request per shard
    files = [{"path": str(storage.absolute(p)), "bytes": known[str(p)] if str(p) in known else storage.size(p)}
             for p in resolve_paths(spec)]
    record = {"files": files, "chunks": len(chunks), "tokens": int(sum(len(c) for c in chunks)),
              "blake2b": digest.hexdigest()}
    return {**record, "hash": SAMPLED_HASH} if sampled else record


def describe_change(before: dict, after: dict) -> str | None:
    """How a dataset changed between two fingerprints, in a few words; None when its tokens are the same.
    A mixture's (mixture_fingerprint) names the source that changed, or its weights. Hashes of two kinds (every
    token, sampled) are not compared: then only the files, their sizes and the token counts are."""
    if "sources" in before or "sources" in after:
        return _describe_mixture_change(before, after)
    old = {f["path"]: f["bytes"] for f in before.get("files", [])}
    new = {f["path"]: f["bytes"] for f in after.get("files", [])}
    same_hash = before.get("blake2b") == after.get("blake2b") if before.get("hash") == after.get("hash") else old == new
    if same_hash and before.get("tokens") == after.get("tokens"):
        return None
    changes = [f"{p} added" for p in new if p not in old] + [f"{p} removed" for p in old if p not in new]
    changes += [f"{p} {old[p]} -> {new[p]} bytes" for p in new if p in old and old[p] != new[p]]
    if not changes:
        same_count = before.get("tokens") == after.get("tokens")
        changes = [f"{before.get('tokens')} -> {after.get('tokens')} tokens" if not same_count
                   else "same files and sizes, other tokens (the text or the vocabulary changed)"]
    more = f" and {len(changes) - 3} more" if len(changes) > 3 else ""
    return ", ".join(changes[:3]) + more


def mixture_fingerprint(data: Any, sources: dict[str, dict]) -> dict:
    """A mixture's record: its sources' fingerprints by name, and the settings that place their rows."""
    return {"mixture": data.mixture, "stages": data.mixture_stages, "block": data.mixture_block, "sources": sources}


def _describe_mixture_change(before: dict, after: dict) -> str | None:
    old, new = before.get("sources", {}), after.get("sources", {})
    changes = [f"source {n!r} added" for n in new if n not in old] + [f"source {n!r} removed" for n in old
                                                                        if n not in new]
    changes += [f"source {n!r}: {change}" for n in new if n in old
                if (change := describe_change(old[n], new[n])) is not None]
    changes += [f"{what} {before.get(key)!r} -> {after.get(key)!r}" for key, what in
                (("mixture", "data.mixture"), ("stages", "data.mixture_stages"), ("block", "data.mixture_block"))
                if before.get(key) != after.get(key)]
    return "; ".join(changes) if changes else None


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
    Chunks may be arrays or shards.Tokens (read by ranges: only the windows a batch's rows hold).
    """

    def __init__(self, chunks: list[np.ndarray | shards.Tokens], window: int, seed: int, what: str = "dataset"):
        lengths = np.array([len(c) for c in chunks], np.int64)
        if lengths.max(initial=0) < window:
            raise UserError(f"{what} is too small: its largest chunk has {lengths.max(initial=0)} tokens "
                            f"({lengths.sum()} in all) but one training window needs {window} "
                            "(seq_len + 1); add text or lower data.seq_len")
        self.chunks, self.window, self.seed = chunks, window, seed
        self.bounds = np.concatenate([[0], np.cumsum(lengths)])  # chunk i is tokens [bounds[i], bounds[i+1])
        self.valid_starts = int(np.sum(np.maximum(lengths - window + 1, 0)))

    def batch(self, index: int, batch_size: int, rows: slice | None = None) -> np.ndarray:
        """Batch number `index`: [batch_size, window] token ids; with `rows`, only those rows of it (the
        draws made for the whole batch, so every process agrees; only those rows' windows read)."""
        rng = np.random.default_rng([self.seed, index])
        picked = np.zeros(0, np.int64)  # window starts, in the order drawn
        while len(picked) < batch_size:
            starts = rng.integers(0, self.bounds[-1] - self.window + 1, size=2 * batch_size)
            chunk = np.searchsorted(self.bounds, starts, side="right") - 1
            inside = starts + self.window <= self.bounds[chunk + 1]  # rejection: keep windows inside one chunk
            picked = np.concatenate([picked, starts[inside][:batch_size - len(picked)]])
        picked = picked[_row_indices(rows, batch_size)]
        chunk = np.searchsorted(self.bounds, picked, side="right") - 1
        offsets = picked - self.bounds[chunk]
        windows = shards.read([self.chunks[c][o:o + self.window] for c, o in zip(chunk, offsets)])
        return np.stack(windows).astype(np.int32) if windows else np.zeros((0, self.window), np.int32)


def _row_indices(rows: slice | None, batch_size: int) -> np.ndarray:
    """The indices of `rows` (all when None) of a batch of batch_size rows."""
    return np.arange(batch_size)[rows if rows is not None else slice(None)]


# --- Prompt/completion examples (.jsonl) ----------------------------------------------------------

def is_examples(spec: str | os.PathLike) -> bool:
    """A dataset of examples, one JSON object a line: a .jsonl file."""
    return str(spec).endswith(".jsonl")


def read_examples(path: str | os.PathLike, encoder: Encoder) -> list[tuple[list[int], list[int]]]:
    """Each line's (ids, target flags): {"prompt", "completion"} is the prompt's ids, then the
    completion's (each encoded on its own, so the boundary is where the user put it), then the
    end-of-text id, the loss on the completion and that end only; {"text"} is the text's ids and the
    end, all targets. A bad line is one error naming the file and line."""
    examples = []
    usage = 'each line must be a JSON object with "prompt" and "completion" strings, or a "text" string'
    for where, example in _json_lines(path, usage):
        if "prompt" in example or "completion" in example:
            _check_strings(example, ("prompt", "completion"), where, usage)
            prompt, completion = encoder.encode(example["prompt"]), encoder.encode(example["completion"])
            examples.append((prompt + completion + [encoder.eot_token],
                             [0] * len(prompt) + [1] * (len(completion) + 1)))
        elif isinstance(example.get("text"), str):
            text = encoder.encode(example["text"])
            examples.append((text + [encoder.eot_token], [1] * (len(text) + 1)))
        else:
            raise UserError(f"{where}: no \"prompt\"/\"completion\" or \"text\" string; {usage}")
    if not examples:
        raise UserError(f"dataset {str(storage.path(path))!r} is empty: it holds no examples")
    return examples


def _json_lines(path: str | os.PathLike, usage: str) -> Iterator[tuple[str, dict]]:
    """("FILE:LINE", object) for each non-blank line of a .jsonl; a missing file, or a line that is not a JSON
    object, is one error naming the file and line and saying what a line must be (`usage`)."""
    path = storage.path(path)
    if not path.is_file():
        raise UserError(f"dataset {str(path)!r}: no such file")
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: not JSON ({e.msg} at column {e.colno}); {usage}") from None
            if not isinstance(value, dict):
                raise UserError(f"{path}:{number}: a JSON {type(value).__name__}, not an object; {usage}")
            yield f"{path}:{number}", value


def _check_strings(line: dict, keys: tuple[str, ...], where: str, usage: str) -> None:
    """One error naming each of `keys` that a line lacks or holds as something other than a string."""
    bad = [f'"{k}" is {"missing" if k not in line else "not a string"}' for k in keys
           if not isinstance(line.get(k), str)]
    if bad:
        raise UserError(f"{where}: {' and '.join(bad)}; {usage}")


class Examples(NamedTuple):
    """Examples laid out in rows of `window` tokens, each row opened by an end-of-text id."""

    tokens: np.ndarray  # [rows, window] int32; padding is the end-of-text id
    weights: np.ndarray  # [rows, window] float32: 1 where the token is a target the loss covers
    count: int  # examples
    truncated: int  # examples longer than a row, cut from the prompt's left (then the completion's end)


def layout_examples(examples: list[tuple[list[int], list[int]]], window: int, eot: int, pack: bool) -> Examples:
    """Rows of examples: packed greedily in file order (pack; document masking keeps them apart), or one
    a row, padded. Every example follows an end-of-text id, the row's first or the previous example's
    last, so each is seen as it would be alone: after an end-of-text id."""
    rows: list[tuple[list[int], list[int]]] = []
    tokens, flags = [eot], [0]
    truncated = 0
    for ids, targets in examples:
        room = window - 1
        if len(ids) > room:
            truncated += 1
            drop = min(len(ids) - room, targets.index(1) if 1 in targets else 0)  # the prompt's left first
            ids, targets = ids[drop:][:room], targets[drop:][:room]
        if len(tokens) > 1 and (not pack or len(tokens) + len(ids) > window):
            rows.append((tokens, flags))
            tokens, flags = [eot], [0]
        tokens, flags = tokens + ids, flags + targets
    rows.append((tokens, flags))
    out_tokens = np.full((len(rows), window), eot, np.int32)
    out_weights = np.zeros((len(rows), window), np.float32)
    for i, (ids, targets) in enumerate(rows):
        out_tokens[i, :len(ids)], out_weights[i, :len(ids)] = ids, targets
    return Examples(out_tokens, out_weights, len(examples), truncated)


class ExampleSampler:
    """Batches of example rows drawn uniformly with replacement: batch k a pure function of (seed, k)."""

    def __init__(self, examples: Examples, seed: int):
        self.examples, self.seed = examples, seed

    def batch(self, index: int, batch_size: int, rows: slice | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Batch number `index`: tokens [batch_size, window] and their target weights; with `rows`, only those
        rows (drawn for the whole batch)."""
        picked = np.random.default_rng([self.seed, index]).integers(0, len(self.examples.tokens), batch_size)
        picked = picked[_row_indices(rows, batch_size)]
        return self.examples.tokens[picked], self.examples.weights[picked]


# --- Preference pairs (.jsonl of prompt/chosen/rejected), for train.objective=dpo -------------------

def is_pairs(spec: str | os.PathLike) -> bool:
    """A .jsonl whose first example is a preference pair (has "chosen"), not a prompt/completion example."""
    if not is_examples(spec):
        return False
    path = storage.path(spec)
    if not path.is_file():
        return False
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(first, dict) and "chosen" in first
    return False


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_pair(encoder: Encoder, prompt: str, chosen: str, rejected: str, tokenize: str = "apart"
                ) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen ids, rejected ids), each completion ending in the end-of-text id.

    "apart", as prompt/completion examples: each text encoded on its own. "trl", as trl's DPOTrainer:
    prompt + completion encoded as one text, the completion starting where the prompt's own ids stop
    matching (a token that straddles the boundary goes to the completions), the prompt cut to what both
    completions share.
    """
    eot = encoder.eot_token
    if tokenize == "apart":
        return encoder.encode(prompt), encoder.encode(chosen) + [eot], encoder.encode(rejected) + [eot]
    p = encoder.encode(prompt)
    with_chosen, with_rejected = encoder.encode(prompt + chosen) + [eot], encoder.encode(prompt + rejected) + [eot]
    cut = min(_common_prefix(p, with_chosen), _common_prefix(p, with_rejected))
    return p[:cut], with_chosen[cut:], with_rejected[cut:]


def read_pairs(path: str | os.PathLike, encoder: Encoder, tokenize: str = "apart"
               ) -> list[tuple[list[int], list[int], list[int]]]:
    """Each line's encode_pair; a bad line (not JSON, a missing or non-string field) is one error naming the
    file and line."""
    usage = 'each line must be a JSON object with "prompt", "chosen" and "rejected" strings'
    pairs = []
    for where, pair in _json_lines(path, usage):
        _check_strings(pair, ("prompt", "chosen", "rejected"), where, usage)
        pairs.append(encode_pair(encoder, pair["prompt"], pair["chosen"], pair["rejected"], tokenize))
    if not pairs:
        raise UserError(f"dataset {str(storage.path(path))!r} is empty: it holds no pairs")
    return pairs


class Pairs(NamedTuple):
    """Preference pairs laid out as two rows each, chosen then rejected."""

    tokens: np.ndarray  # [pairs, 2, window] int32; padding is the end-of-text id
    weights: np.ndarray  # [pairs, 2, window] float32: 1 at the completion's tokens and its end
    count: int  # pairs
    truncated: int  # pairs longer than a row, cut from the prompt's left (then the completions' ends)


def layout_pairs(pairs: list[tuple[list[int], list[int], list[int]]], window: int, eot: int,
                 start_with_eot: bool = True) -> Pairs:
    """Each pair's two sequences in rows of `window` tokens, opened by an end-of-text id when start_with_eot
    (as prompt/completion examples are), padded with it. A pair longer than a row loses the same tokens from
    its prompt's left in both rows, then, if a completion alone is too long, that completion's end."""
    start = [eot] if start_with_eot else []
    tokens = np.full((len(pairs), 2, window), eot, np.int32)
    weights = np.zeros((len(pairs), 2, window), np.float32)
    truncated = 0
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        room = window - len(start)
        longest = len(prompt) + max(len(chosen), len(rejected))
        if longest > room:
            truncated += 1
            prompt = prompt[min(longest - room, len(prompt)):]
        for j, completion in enumerate((chosen, rejected)):
            completion = completion[:room - len(prompt)]
            row = start + prompt + completion
            tokens[i, j, :len(row)] = row
            weights[i, j, len(row) - len(completion):len(row)] = 1.0
    return Pairs(tokens, weights, len(pairs), truncated)


class PairSampler:
    """Batches of pairs drawn uniformly with replacement, with their reference log-probabilities [pairs, 2]
    (zeros when the step computes them itself): batch k a pure function of (seed, k)."""

    def __init__(self, pairs: Pairs, seed: int, reference: np.ndarray | None = None):
        self.pairs, self.seed = pairs, seed
        self.reference = reference if reference is not None else np.zeros((pairs.count, 2), np.float32)

    def batch(self, index: int, batch_size: int, rows: slice | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Batch number `index`: tokens and weights [batch_size, 2, window], reference log-probs [batch_size, 2];
        with `rows`, only those pairs (drawn for the whole batch)."""
        picked = np.random.default_rng([self.seed, index]).integers(0, self.pairs.count, batch_size)
        picked = picked[_row_indices(rows, batch_size)]
        return self.pairs.tokens[picked], self.pairs.weights[picked], self.reference[picked]


# What a run trains and validates on, from its config (the loop's data setup). Validation batches are drawn
# once, with seed 1: the same for every run of the same data.



def datasets(config: Any, encoder: Encoder, seq_len: int, seed: int, is_main: bool
             ) -> tuple[Any, list | dict[str, list], dict]:
    """The training sampler, the fixed validation batches (none when data.val_every is 0) and the
    fingerprints of both datasets (the run directory's dataset.json).

    Validation data is data.val_dataset, else the last data.val_split of the training data (held out:
    never trained on), else, with a warning, windows of the training data itself. A mixture (data.mixture)
    gives a mixture.MixtureSampler and its validation batches by source: {name: [batches]}.
    """
    data = config.data  # its split and validation settings checked by settings.check_config
    if data.mixture:
        return mixture_datasets(config, encoder, seq_len, seed, is_main)
    if not data.dataset:
        raise UserError("data.dataset is empty: set --config.data.dataset=PATH (a file, directory, glob, .npz or "
                        ".bin shards), or data.mixture")
    if is_examples(data.dataset):
        return example_datasets(config, encoder, seq_len, seed)
    data_kw = dict(combine=data.combine, encoding=data.encoding, encoding_errors=data.encoding_errors, progress=is_main)
    chunks = load_dataset(data.dataset, encoder, **data_kw)
    val_chunks, val_name = chunks, f"validation data (the training data {data.dataset!r})"
    if data.val_split:
        chunks, val_chunks = split_tail(chunks, data.val_split)
        val_name = f"validation split (the last {data.val_split:g} of {data.dataset!r})"
    elif data.val_dataset:
        val_chunks = load_dataset(data.val_dataset, encoder, **data_kw)
        val_name = f"validation dataset {data.val_dataset!r}"
    sampler = WindowSampler(chunks, seq_len + 1, seed, f"dataset {data.dataset!r}")
    record = {"train": fingerprint(data.dataset, chunks), "validation": None}
    validation = "no validation (data.val_every=0)" if data.val_every <= 0 else \
        f"{val_name}: {_tokens(val_chunks):,} tokens"
    tqdm.write(f"data: {data.dataset}: {_tokens(chunks):,} tokens in {len(chunks)} chunks, windows of {seq_len + 1} "
               f"tokens; {validation}")
    if data.val_every <= 0:
        return sampler, [], record
    if not (data.val_split or data.val_dataset):
        tqdm.write("validation: neither data.val_dataset nor data.val_split is set, validating on batches drawn "
                   "from the training data")
    record["validation"] = fingerprint(data.val_dataset or data.dataset, val_chunks)
    return sampler, _validation_batches(WindowSampler(val_chunks, seq_len + 1, seed=1, what=val_name), data), record


def mixture_datasets(config: Any, encoder: Encoder, seq_len: int, seed: int, is_main: bool
                     ) -> tuple[mixture.MixtureSampler, dict[str, list], dict]:
    """datasets for data.mixture: one WindowSampler per source (seeded by mixture.source_seed), each source's
    validation its own last data.val_split, else, with a warning, windows of its training data; the record
    holds every source's fingerprint."""
    data = config.data
    if data.dataset or data.val_dataset:
        which = "data.dataset" if data.dataset else "data.val_dataset"
        raise UserError(f"{which} and data.mixture are both set: a mixture names its datasets itself, and each "
                        "source validates on its own last data.val_split; unset " + which)
    sources = mixture.parse_mixture(data.mixture)
    schedule = mixture.parse_stages(data.mixture_stages, sources)
    data_kw = dict(combine=data.combine, encoding=data.encoding, encoding_errors=data.encoding_errors, progress=is_main)
    samplers, val_batches, train_prints, val_prints = [], {}, {}, {}
    for i, source in enumerate(sources):
        what = f"mixture source {source.name!r} ({source.spec!r})"
        if is_examples(source.spec):
            raise UserError(f"data.mixture: {what} is a .jsonl of examples; a mixture mixes windows of text, .npz, "
                            ".bin or token shards")
        chunks = val_chunks = load_dataset(source.spec, encoder, **data_kw)
        if data.val_split:
            chunks, val_chunks = split_tail(chunks, data.val_split)
        samplers.append(WindowSampler(chunks, seq_len + 1, mixture.source_seed(seed, i), what))
        tqdm.write(f"data: {what}, weight {source.weight:g}: {_tokens(chunks):,} tokens in {len(chunks)} chunks"
                   + (f"; its last {data.val_split:g} held out: {_tokens(val_chunks):,} tokens" if data.val_split
                      else ""))
        train_prints[source.name] = fingerprint(source.spec, chunks)
        if data.val_every > 0:
            val_name = f"validation of {what}" + (f" (its last {data.val_split:g})" if data.val_split else "")
            val_batches[source.name] = _validation_batches(WindowSampler(val_chunks, seq_len + 1, 1, val_name), data)
            val_prints[source.name] = fingerprint(source.spec, val_chunks)
    if data.val_every > 0 and not data.val_split:
        tqdm.write("validation: data.val_split is not set, validating each mixture source on batches drawn from its "
                   "training data")
    record = {"train": mixture_fingerprint(data, train_prints),
              "validation": mixture_fingerprint(data, val_prints) if val_prints else None}
    return mixture.MixtureSampler(samplers, schedule, data.mixture_block, seed), val_batches, record


def _tokens(chunks: list) -> int:
    return int(sum(len(c) for c in chunks))


def _validation_batches(sampler: Any, data: Any) -> list:
    """The fixed validation batches: data.val_batch_count of data.val_batch_size, drawn once (seed 1)."""
    return [sampler.batch(i, data.val_batch_size) for i in range(data.val_batch_count)]


def _hold_out(items: list, data: Any, kind: str) -> tuple[list, list, str]:
    """(training, validation, what the validation is) of examples or pairs: the last data.val_split of the
    file held out, else all of them for both."""
    if not data.val_split:
        return items, items, f"the training {kind} {data.dataset!r}"
    cut = len(items) - math.ceil(len(items) * data.val_split)
    if cut < 1:
        raise UserError(f"data.val_split={data.val_split} of {len(items)} {kind} leaves none to train on")
    return items[:cut], items[cut:], f"the last {len(items) - cut} {kind} of {data.dataset!r}"


def _rows_fingerprint(spec: str, rows: Examples | Pairs) -> dict:
    """fingerprint of laid-out rows: their tokens and which of them are targets."""
    return fingerprint(spec, [rows.tokens.ravel(), rows.weights.ravel().astype(np.uint8)])


def example_datasets(config: Any, encoder: Encoder, seq_len: int, seed: int
                     ) -> tuple[ExampleSampler, list[tuple[np.ndarray, np.ndarray]], dict]:
    """_datasets for prompt/completion examples (.jsonl): rows of seq_len + 1 tokens, packed with
    data.document_mask (which keeps them apart), else one example a row; the loss on the completions."""
    data = config.data
    examples, val_examples, val_name = _hold_out(read_examples(data.dataset, encoder), data, "examples")
    if data.val_dataset:
        if not is_examples(data.val_dataset):
            raise UserError(f"data.val_dataset={data.val_dataset!r}: the training data are examples (.jsonl), so "
                            "the validation data must be too")
        val_examples, val_name = read_examples(data.val_dataset, encoder), repr(data.val_dataset)

    def rows_of(these: list) -> Examples:
        return layout_examples(these, seq_len + 1, encoder.eot_token, pack=data.document_mask)

    train_rows = rows_of(examples)
    tqdm.write(f"examples: {train_rows.count} in {len(train_rows.tokens)} rows of {seq_len + 1} tokens "
               f"({'packed: data.document_mask' if data.document_mask else 'one a row, padded'}), "
               f"{int(train_rows.weights.sum())} target tokens; {train_rows.truncated} longer than a row, cut from "
               "the prompt's left")
    record = {"train": _rows_fingerprint(data.dataset, train_rows), "validation": None}
    if data.val_every <= 0:
        return ExampleSampler(train_rows, seed), [], record
    if val_examples is examples:
        tqdm.write("validation: neither data.val_dataset nor data.val_split is set, validating on the training "
                   "examples")
    val_rows = rows_of(val_examples)
    record["validation"] = _rows_fingerprint(data.val_dataset or data.dataset, val_rows)
    tqdm.write(f"validation: {val_rows.count} examples ({val_name})")
    return ExampleSampler(train_rows, seed), _validation_batches(ExampleSampler(val_rows, seed=1), data), record


def pair_datasets(config: Any, encoder: Encoder, seq_len: int) -> tuple[Pairs, Pairs | None, dict]:
    """The training pairs, the validation pairs (None when data.val_every is 0) and their fingerprints:
    data.val_dataset, else the last data.val_split of the file, else, with a warning, the training pairs."""
    data, tokenize = config.data, config.dpo.tokenize
    if data.mixture:
        raise UserError("data.mixture: train.objective=dpo trains on one .jsonl of preference pairs, not a mixture; "
                        "unset data.mixture and set data.dataset")
    if not is_examples(data.dataset):
        raise UserError(f"data.dataset={data.dataset!r}: train.objective=dpo trains on preference pairs, a .jsonl of "
                        '{"prompt", "chosen", "rejected"} lines')
    pairs, val_pairs, val_name = _hold_out(read_pairs(data.dataset, encoder, tokenize), data, "pairs")
    if data.val_dataset:
        val_pairs, val_name = read_pairs(data.val_dataset, encoder, tokenize), repr(data.val_dataset)

    def rows_of(these: list) -> Pairs:
        return layout_pairs(these, seq_len + 1, encoder.eot_token, start_with_eot=tokenize == "apart")

    train_rows = rows_of(pairs)
    tqdm.write(f"pairs: {train_rows.count}, each as two rows of {seq_len + 1} tokens (dpo.tokenize={tokenize}), "
               f"{int(train_rows.weights.sum())} completion tokens; {train_rows.truncated} longer than a row, cut "
               "from the prompt's left")
    record = {"train": _rows_fingerprint(data.dataset, train_rows), "validation": None}
    if data.val_every <= 0:
        return train_rows, None, record
    if val_pairs is pairs:
        tqdm.write("validation: neither data.val_dataset nor data.val_split is set, validating on the training pairs")
    val_rows = rows_of(val_pairs)
    record["validation"] = _rows_fingerprint(data.val_dataset or data.dataset, val_rows)
    tqdm.write(f"validation: {val_rows.count} pairs ({val_name})")
    return train_rows, val_rows, record


def pair_batches(config: Any, pairs: Pairs, val_pairs: Pairs | None, seed: int, reference: np.ndarray | None,
                 val_reference: np.ndarray | None) -> tuple[PairSampler, list]:
    """The training sampler and the fixed validation batches (drawn once with seed 1) of pairs."""
    if val_pairs is None:
        return PairSampler(pairs, seed, reference), []
    return PairSampler(pairs, seed, reference), _validation_batches(PairSampler(val_pairs, 1, val_reference),
                                                                    config.data)


def check_same_data(run: Any, record: dict, allow_changed: bool) -> None:
    """A run (rundir.RunDir) resumes on the data it started on (its dataset.json), unless data.allow_changed says
    otherwise."""
    path = run.data_record
    if not path.is_file():  # a run from before the record existed: nothing to compare
        return
    recorded = json.loads(path.read_text())
    for part, setting in (("train", "data.dataset"), ("validation", "the validation data")):
        before, after = recorded.get(part), record.get(part)
        change = describe_change(before, after) if before and after else None
        if change is None:
            continue
        if not allow_changed:
            raise UserError(f"{setting} changed since this run started (recorded in {path}): {change}; the resumed "
                            "run would not continue exactly. Set data.allow_changed=True to resume on the new data, "
                            "or start anew under another run_name")
        tqdm.write(f"warning: {setting} changed since this run started ({change}); resuming on it "
                   "(data.allow_changed=True), so batches differ from an uninterrupted run")
