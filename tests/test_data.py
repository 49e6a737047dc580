"""Datasets: file resolution, chunking with the end-of-text id, .npz/.bin formats, the sampler, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2_jax.cli import main
from gpt2_jax.data import WindowSampler, encode_to_file, load_dataset, resolve_paths, split_tail
from gpt2_jax.encoder import byte_level_encoder
from gpt2_jax.errors import UserError


@pytest.fixture
def texts(tmp_path):
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("first file " * 5)
    (root / "sub" / "b.txt").write_text("second <|endoftext|> file " * 5)
    (root / "c.md").write_text("third " * 5)
    return root


def test_directory_glob_and_file_resolve(texts):
    assert [p.name for p in resolve_paths(texts)] == ["a.txt", "c.md", "b.txt"]
    assert [p.name for p in resolve_paths(texts / "**" / "*.txt")] == ["a.txt", "b.txt"]
    assert resolve_paths(texts / "a.txt") == [texts / "a.txt"]


def test_files_are_joined_by_the_end_of_text_id_not_the_string(texts, real_encoder):
    chunks = load_dataset(texts, real_encoder, combine=10**9, progress=False)
    assert len(chunks) == 1
    ids = chunks[0].tolist()
    assert ids.count(50256) == 2  # between a/c and c/b; the literal text inside b.txt is ordinary text
    first = real_encoder.encode((texts / "a.txt").read_text())
    assert ids[:len(first) + 1] == first + [50256]
    assert chunks[0].dtype == np.uint16


def test_combine_cuts_chunks_after_enough_characters(texts):
    enc = byte_level_encoder()
    chunks = load_dataset(texts, enc, combine=60, progress=False)
    # a.txt (55 chars) is under 60, so c.md (30) joins it; b.txt (130) starts the next chunk with the separator.
    assert [len(c) for c in chunks] == [55 + 1 + 30, 1 + 130]
    assert chunks[1][0] == enc.eot_token


def test_npz_is_the_originals_format_and_bin_is_flat_and_memory_mapped(texts, tmp_path, capsys):
    enc = byte_level_encoder()
    expected = load_dataset(texts, enc, combine=60, progress=False)
    out = encode_to_file(texts, tmp_path / "d.npz", enc, combine=60, progress=False)
    with np.load(out) as npz:
        assert npz.files == ["arr_0", "arr_1"]  # np.savez(*chunks), as the original encode.py
        for name, chunk in zip(npz.files, expected):
            np.testing.assert_array_equal(npz[name], chunk)
    flat = encode_to_file(texts, tmp_path / "d.bin", enc, combine=60, progress=False)
    assert flat.stat().st_size == 2 * sum(len(c) for c in expected)  # uint16, back to back
    loaded = load_dataset(flat, enc, progress=False)
    assert all(isinstance(c, np.memmap) for c in loaded)
    for a, b in zip(loaded, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(load_dataset(out, enc, progress=False), expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_encode_cli(texts, tmp_path, gpt2_vocab_dir, real_encoder):
    main(["encode", str(texts), str(tmp_path / "out.npz"), "--model_dir", str(gpt2_vocab_dir)])
    with np.load(tmp_path / "out.npz") as npz:
        np.testing.assert_array_equal(npz["arr_0"], load_dataset(texts, real_encoder, progress=False)[0])


def test_sampler_is_fair_seeded_and_never_crosses_chunks():
    chunks = [np.full(50, 1), np.full(7, 2), np.full(200, 3), np.full(10, 4)]  # chunk 4 is too short for 10+1
    sampler = WindowSampler(chunks, 11, seed=5)
    batch = sampler.batch(0, 2000)
    assert batch.shape == (2000, 11)
    assert all(len(set(row)) == 1 for row in batch.tolist())  # every window lies inside one chunk
    counts = {v: int(np.sum(batch[:, 0] == v)) for v in (1, 2, 3, 4)}
    assert counts[2] == counts[4] == 0
    # uniform over valid starts: 40 in chunk 1, 190 in chunk 3
    assert abs(counts[1] / 2000 - 40 / 230) < 0.03
    np.testing.assert_array_equal(sampler.batch(7, 8), WindowSampler(chunks, 11, seed=5).batch(7, 8))
    assert not np.array_equal(sampler.batch(7, 8), sampler.batch(8, 8))


def test_bad_datasets_are_clear_errors(tmp_path):
    enc = byte_level_encoder()
    with pytest.raises(UserError, match="no file matches"):
        load_dataset(tmp_path / "missing*.txt", enc)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="is empty"):
        load_dataset(tmp_path / "empty.txt", enc)
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(UserError, match=r"latin.txt: not valid utf-8 text at byte offset 3.*encoding_errors=replace"):
        load_dataset(tmp_path / "latin.txt", enc)
    assert load_dataset(tmp_path / "latin.txt", enc, encoding_errors="replace")[0].size > 0
    assert enc.decode(load_dataset(tmp_path / "latin.txt", enc, encoding="latin-1")[0]) == "café au lait"
    np.savez(tmp_path / "big.npz", np.array([1, 2, 70000]))
    with pytest.raises(UserError, match="big.npz: chunk 0 holds token id 70000, outside the vocabulary \\[0, 257\\)"):
        load_dataset(tmp_path / "big.npz", enc)
    with pytest.raises(UserError, match="largest chunk has 3 tokens .* needs 11"):
        WindowSampler([np.arange(3)], 11, 0, "dataset 'x'")


def test_streamed_blocks_encode_to_the_whole_files_ids(shared_dir, tmp_path, real_encoder, tiktoken_gpt2, monkeypatch):
    from gpt2_jax import data as data_module, encoder as encoder_module

    text = (shared_dir / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:200_000]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(text, encoding="utf-8")
    (tmp_path / "in" / "b.txt").write_text("no_spaces_or_newlines" * 400 + "42", encoding="utf-8")  # fallback cuts
    monkeypatch.setattr(data_module, "BLOCK_CHARS", 3000)  # ~70 blocks, encoded in 2 worker processes
    monkeypatch.setattr(encoder_module, "PARALLEL_MIN_CHARS", 10)
    monkeypatch.setattr(encoder_module.os, "cpu_count", lambda: 2)
    blocks = [t for t, _ in data_module.read_blocks(tmp_path / "in" / "a.txt", block_chars=3000)]
    assert len(blocks) > 50 and "".join(blocks) == text
    encode_to_file(tmp_path / "in", tmp_path / "out.bin", real_encoder, combine=10**9, progress=False)
    expected = (tiktoken_gpt2.encode_ordinary(text) + [50256]
                + tiktoken_gpt2.encode_ordinary((tmp_path / "in" / "b.txt").read_text()))
    assert np.fromfile(tmp_path / "out.bin", np.uint16).tolist() == expected
    # an undecodable byte far into the file is reported at its offset in the whole file
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok " * 5000 + b"\xff")
    with pytest.raises(UserError, match="bad.txt: not valid utf-8 text at byte offset 15000"):
        load_dataset(bad, real_encoder, progress=False)


def test_files_are_encoded_in_parallel_with_identical_ids(texts, real_encoder, monkeypatch):
    from gpt2_jax import encoder as encoder_module

    serial = load_dataset(texts, real_encoder, combine=60, progress=False)
    monkeypatch.setattr(encoder_module, "PARALLEL_MIN_CHARS", 10)
    monkeypatch.setattr(encoder_module.os, "cpu_count", lambda: 2)
    parallel = load_dataset(texts, real_encoder, combine=60, progress=False)
    for a, b in zip(parallel, serial, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.75])
def test_split_tail_holds_out_the_end_deterministically_and_disjointly(fraction):
    chunks = [np.arange(0, 40), np.arange(40, 50), np.arange(50, 100)]
    head, tail = split_tail(chunks, fraction)
    held = np.concatenate(tail)
    assert len(held) == int(np.ceil(100 * fraction))
    np.testing.assert_array_equal(np.concatenate(head + tail), np.arange(100))  # nothing lost, nothing shared
    assert held[0] > np.concatenate(head).max()  # the tail is the end of the data
    head2, tail2 = split_tail(chunks, fraction)
    assert all(np.array_equal(a, b) for a, b in zip(head + tail, head2 + tail2))
