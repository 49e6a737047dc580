"""OpenAI's byte-level BPE tokenizer for GPT-2, exact to tiktoken's "gpt2" encoding.

Text is split by OpenAI's pre-tokenisation pattern, each piece's UTF-8 bytes are mapped to
printable unicode symbols (bytes_to_unicode), and merges are applied lowest rank first.
"""

from __future__ import annotations

import collections
import functools
import heapq
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Collection, Iterable, Iterator, Literal

import numpy as np
import regex

from gpt2_jax import storage
from gpt2_jax.errors import UserError

EOT = "<|endoftext|>"
# OpenAI's pattern: contractions, letters, digits, other symbols, whitespace runs.
PRETOKENIZE = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
# Texts (or batches of texts) this long are encoded in parallel when more than one core is free.
PARALLEL_MIN_CHARS = 4_000_000
# Where text may be cut so that each side pre-tokenises exactly as within the whole text: after a
# lone newline between two non-spaces, or before a lone space between two non-spaces. (After a longer
# whitespace run it may not: "\n\n" alone is one pre-token, but before a non-space it is two.)
SAFE_CUT = regex.compile(r"(?<=\S\n)(?=\S)|(?<=\S)(?= \S)")
# For text without such points (megabytes with no space or newline): after a letter or digit where
# another class begins; no pre-token spans that change. Not before an apostrophe: it starts "'s".
FALLBACK_CUT = regex.compile(r"(?<=\p{L})(?=[^\s\p{L}'])|(?<=\p{N})(?=[^\s\p{N}'])")


@functools.lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character (OpenAI's table; whitespace/control shifted up)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    shift = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + shift)
            shift += 1
    return dict(zip(printable, map(chr, chars)))


class Encoder:
    """Byte-level BPE: `encode(text)` -> ids, `decode(ids)` -> text."""

    def __init__(self, encoder: dict[str, int], bpe_merges: list[tuple[str, str]]):
        self.encoder = encoder
        self.decoder = {i: s for s, i in encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(bpe_merges)}
        if EOT not in encoder:
            raise UserError(f"the vocabulary has no {EOT} token")
        self.eot_token = encoder[EOT]
        self._merges = bpe_merges  # kept to rebuild the encoder in worker processes
        self._cache: dict[str, tuple[int, ...]] = {}  # pre-token -> its ids

    @property
    def n_vocab(self) -> int:
        """Number of ids (the largest id + 1)."""
        return max(self.decoder) + 1

    def _bpe(self, symbols: str) -> list[str]:
        """Merge adjacent symbols of one pre-token, lowest merge rank first (leftmost on ties).

        A heap over a linked list keeps this O(n log n), so very long pre-tokens stay fast.
        """
        n = len(symbols)
        if n < 2:
            return [symbols]
        ranks = self.bpe_ranks
        word: list[str | None] = list(symbols)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        heap = [(r, i) for i in range(n - 1) if (r := ranks.get((word[i], word[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            r, i = heapq.heappop(heap)
            j = nxt[i]
            if word[i] is None or j >= n or ranks.get((word[i], word[j])) != r:
                continue  # stale: one side was merged since this entry was pushed
            word[i], word[j] = word[i] + word[j], None
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            p, k = prv[i], nxt[i]
            if p >= 0 and (rp := ranks.get((word[p], word[i]))) is not None:
                heapq.heappush(heap, (rp, p))
            if k < n and (rk := ranks.get((word[i], word[k]))) is not None:
                heapq.heappush(heap, (rk, i))
        return [w for w in word if w is not None]

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        ids = self._cache.get(piece)
        if ids is None:
            symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids = tuple(self.encoder[s] for s in self._bpe(symbols))
            if len(self._cache) < 500_000:
                self._cache[piece] = ids
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of `text`, with any literal '<|endoftext|>' treated as ordinary text."""
        if len(text) >= PARALLEL_MIN_CHARS and (os.cpu_count() or 1) > 1:
            return self._encode_parallel(text)
        ids: list[int] = []
        cache, extend = self._cache, ids.extend
        for piece in PRETOKENIZE.findall(text):
            hit = cache.get(piece)
            extend(hit if hit is not None else self._encode_piece(piece))
        return ids

    def encode(self, text: str, allowed_special: Collection[str] | Literal["all"] = ()) -> list[int]:
        """Ids of `text`; '<|endoftext|>' becomes the special id only where `allowed_special` allows it."""
        if allowed_special == "all" or EOT in allowed_special:
            ids: list[int] = []
            for i, part in enumerate(text.split(EOT)):
                if i:
                    ids.append(self.eot_token)
                ids.extend(self.encode_ordinary(part))
            return ids
        return self.encode_ordinary(text)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of `ids` (may end inside a UTF-8 character)."""
        try:
            text = "".join(self.decoder[int(i)] for i in ids)
        except KeyError as e:
            raise UserError(f"token id {e.args[0]} is not in the vocabulary (size {self.n_vocab})") from None
        return bytes(self.byte_decoder[c] for c in text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; invalid or partial UTF-8 becomes U+FFFD instead of raising."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        """Write encoder.json and vocab.bpe (OpenAI's file names and formats) into `directory`."""
        directory = storage.path(directory)
        (directory / "encoder.json").write_text(json.dumps(self.encoder, ensure_ascii=False), encoding="utf-8")
        merges = "".join(f"{a} {b}\n" for a, b in self._merges)
        (directory / "vocab.bpe").write_text("#version: 0.2\n" + merges, encoding="utf-8")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ordinary ids of each text, spread over worker processes when there is enough text to pay off."""
        if sum(map(len, texts)) >= PARALLEL_MIN_CHARS and (os.cpu_count() or 1) > 1:
            return [ids.tolist() for ids in self.encode_stream(texts, np.int64, workers=os.cpu_count() or 1)]
        return [self.encode_ordinary(t) for t in texts]

    def _encode_parallel(self, text: str) -> list[int]:
        # Cut only where no pre-token crosses (SAFE_CUT), so the concatenated ids equal a serial encode.
        parts = split_for_parallel(text, min(os.cpu_count() or 1, 16) * 4)
        return [t for ids in self.encode_stream(parts, np.int64, workers=os.cpu_count() or 1) for t in ids.tolist()]

    def encode_stream(self, texts: Iterable[str], dtype: np.dtype, workers: int) -> Iterator[np.ndarray]:
        """Ordinary ids of each text as arrays, in order; with workers > 1 in that many processes, at most
        2 x workers texts in flight, so memory stays bounded however long the iterator is."""
        if workers <= 1:
            yield from (np.asarray(self.encode_ordinary(t), dtype) for t in texts)
            return
        # Workers forked from a server process, not from this one: a process holding JAX's threads must
        # not fork (JAX warns that it may deadlock), and a server forks workers faster than spawn starts them.
        context = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                                              else "spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                 initargs=(self.encoder, self._merges)) as pool:
            pending: collections.deque = collections.deque()
            for text in texts:
                pending.append(pool.submit(_worker_encode, text, dtype))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()


def next_safe_cut(text: str, pos: int) -> int:
    """The first point at or after pos where text can be cut without changing its pre-tokens, or len(text)."""
    found = SAFE_CUT.search(text, pos) or FALLBACK_CUT.search(text, pos)
    return found.start() if found else len(text)


def last_safe_cut(text: str) -> int:
    """The last point where text can be cut without changing its pre-tokens (0 if none): the end of a
    streamed block, whose rest is carried into the next one."""
    for pattern in (SAFE_CUT, FALLBACK_CUT):
        window = 1 << 16
        while True:  # look back from the end, widening the window until a cut or the start is reached
            start = max(0, len(text) - window)
            cuts = [m.start() for m in pattern.finditer(text, start) if m.start() > start or start == 0]
            if cuts:
                return cuts[-1]
            if start == 0:
                break
            window *= 4
    return 0


def split_for_parallel(text: str, n_parts: int) -> list[str]:
    """Split `text` into about n_parts pieces at points no pre-token crosses."""
    step = max(1, len(text) // n_parts)
    parts, start = [], 0
    while start < len(text):
        cut = next_safe_cut(text, min(start + step, len(text)))
        parts.append(text[start:cut])
        start = cut
    return parts


_worker_encoder: Encoder | None = None


def _init_worker(encoder: dict[str, int], merges: list[tuple[str, str]]) -> None:
    global _worker_encoder
    _worker_encoder = Encoder(encoder, merges)


def _worker_encode(text: str, dtype: np.dtype) -> np.ndarray:
    # Called in a worker process: always a serial encode, whatever the text's length; an array
    # travels back to the parent far more compactly than a list of ints.
    ids: list[int] = []
    for piece in PRETOKENIZE.findall(text):
        ids.extend(_worker_encoder._encode_piece(piece))
    return np.asarray(ids, dtype)


def read_merges(path: Path) -> list[tuple[str, str]]:
    """Merge pairs from a vocab.bpe / merges.txt file (first line is a '#version' header)."""
    try:
        lines = storage.path(path).read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e}); the vocabulary is damaged: download it again") from None
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = []
    for n, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        pair = line.split()
        if len(pair) != 2:
            raise UserError(f"{path}: line {n} is not a merge pair: {line!r}; the file is truncated or damaged: "
                            "download it again")
        merges.append((pair[0], pair[1]))
    return merges


VOCAB_FILES = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))


def find_vocab(model_dir: Path) -> tuple[Path, Path] | None:
    """(ids file, merges file) in a model directory, in OpenAI's or transformers' naming."""
    model_dir = storage.path(model_dir)
    for ids_name, merges_name in VOCAB_FILES:
        if (model_dir / ids_name).is_file() and (model_dir / merges_name).is_file():
            return model_dir / ids_name, model_dir / merges_name
    return None


def get_encoder(model_dir: str | os.PathLike) -> Encoder:
    """The tokenizer of a model directory (encoder.json + vocab.bpe, or vocab.json + merges.txt)."""
    found = find_vocab(model_dir)
    if found is None:
        names = " or ".join(" + ".join(pair) for pair in VOCAB_FILES)
        raise UserError(f"{model_dir}: no vocabulary found; it needs {names} (gpt2-jax download fetches them)")
    ids_path, merges_path = found
    try:
        encoder = json.loads(ids_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{ids_path}: not valid JSON ({e}); the vocabulary is damaged: download it again") from None
    if not isinstance(encoder, dict):
        raise UserError(f"{ids_path}: not a JSON object of token ids; the vocabulary is damaged: download it again")
    merges = read_merges(merges_path)
    _check_merges(encoder, merges, ids_path, merges_path)
    return Encoder(encoder, merges)


def _check_merges(encoder: dict[str, int], merges: list[tuple[str, str]], ids_path: Path, merges_path: Path) -> None:
    """Each merge makes a token of the vocabulary, and each token that is neither a byte nor a special
    `<|...|>` one is made by a merge: a truncated merges file (fewer merges, other tokens) is caught here."""
    for n, (a, b) in enumerate(merges, start=2):
        if a + b not in encoder:
            raise UserError(f"{merges_path}: the merge on line {n} ({a} {b}) makes a token that is not in {ids_path}; "
                            "the two files are damaged or from different vocabularies: download them again")
    byte_symbols = set(bytes_to_unicode().values())
    special = [token for token in encoder if token.startswith("<|") and token.endswith("|>")]
    merged = sum(1 for token in encoder if token not in byte_symbols) - len(special)
    if merged != len(merges):
        raise UserError(f"{merges_path}: {len(merges)} merges, but {ids_path} has {merged} merged tokens; the merges "
                        "file is truncated or damaged: download it again")


def byte_level_encoder() -> Encoder:
    """A vocabulary of the 256 byte symbols plus '<|endoftext|>' (id 256) and no merges."""
    symbols = bytes_to_unicode()
    encoder = {symbols[b]: b for b in range(256)}
    encoder[EOT] = 256
    return Encoder(encoder, [])
