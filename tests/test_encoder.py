"""The tokenizer against tiktoken's "gpt2" encoding and transformers' GPT2TokenizerFast."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from gpt2_jax import encoder as encoder_module
from gpt2_jax.encoder import (EOT, FALLBACK_CUT, PRETOKENIZE, SAFE_CUT, byte_level_encoder, get_encoder,
                              last_safe_cut, split_for_parallel)
from gpt2_jax.errors import UserError

EDGE_CASES = [
    "",
    "Hello world",
    "I'm can't won't you'll we've they're he'd 'S 'LL",  # contractions, upper-case ones split
    "   leading and trailing   ",
    "tabs\t\tand\n\n\nnewlines \n \n",
    "line one\r\nline two\r\n\r\n",  # CRLF
    "x" + " " * 37 + "y",  # whitespace runs
    "1234567890 3.14159 1,000,000 0x1F",  # digits
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷",  # ZWJ sequences and modifiers
    "中文字符测试 日本語のテキスト 한국어",  # CJK
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937",  # combining marks
    "supercalifragilistic" * 200,  # a very long word
    "".join(chr(c) for c in range(0x20, 0x250)),  # Latin blocks, one long run
    "a<|endoftext|>b <|endoftext|> <|endoftext",  # the literal special token, as text
    "\u00a0non-breaking\u2009thin\u3000ideographic spaces",
    "mixed123abc!!!???...---___",
    "\x00\x01\x7f control bytes",
]


def test_edge_cases_match_tiktoken(real_encoder, tiktoken_gpt2):
    for text in EDGE_CASES:
        assert real_encoder.encode(text) == tiktoken_gpt2.encode_ordinary(text), text
        assert real_encoder.decode(real_encoder.encode(text)) == text


def test_tinyshakespeare_matches_tiktoken(shared_dir, real_encoder, tiktoken_gpt2):
    text = (shared_dir / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    ids = real_encoder.encode(text)
    assert ids == tiktoken_gpt2.encode_ordinary(text)
    assert len(ids) == 338025
    assert real_encoder.decode(ids) == text


def _stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def test_python_stdlib_matches_tiktoken(real_encoder, tiktoken_gpt2):
    files = _stdlib_sources()
    assert len(files) > 500
    checked = 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a handful of test files are deliberately not UTF-8
        ids = real_encoder.encode(text)
        assert ids == tiktoken_gpt2.encode_ordinary(text), path
        assert real_encoder.decode(ids) == text, path
        checked += 1
    assert checked > 500


def test_special_token_only_when_allowed(real_encoder, tiktoken_gpt2):
    text = "one<|endoftext|>two"
    assert EOT not in real_encoder.decode([50256]) or real_encoder.decode([50256]) == EOT
    assert 50256 not in real_encoder.encode(text)
    assert real_encoder.encode(text) == tiktoken_gpt2.encode_ordinary(text)
    allowed = real_encoder.encode(text, allowed_special={EOT})
    assert allowed == tiktoken_gpt2.encode(text, allowed_special={EOT})
    assert allowed.count(50256) == 1
    assert real_encoder.encode(text, allowed_special="all") == allowed


def test_matches_transformers_fast_tokenizer(gpt2_vocab_dir, shared_dir, real_encoder, tmp_path):
    import shutil

    from transformers import GPT2TokenizerFast

    shutil.copyfile(gpt2_vocab_dir / "encoder.json", tmp_path / "vocab.json")
    shutil.copyfile(gpt2_vocab_dir / "vocab.bpe", tmp_path / "merges.txt")
    hf = GPT2TokenizerFast.from_pretrained(tmp_path)
    assert len(hf) == 50257
    text = (shared_dir / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:200_000]
    for sample in [text] + [t for t in EDGE_CASES if EOT not in t]:
        assert real_encoder.encode(sample) == hf.encode(sample), sample[:50]


def test_decode_never_raises_on_partial_utf8(real_encoder):
    ids = real_encoder.encode("😀")
    assert len(ids) > 1  # one emoji spans several byte-level tokens
    assert real_encoder.decode(ids[:1]) == "\ufffd"
    assert real_encoder.decode_bytes(ids) == "😀".encode()
    with pytest.raises(UserError, match="token id 99999 is not in the vocabulary"):
        real_encoder.decode([99999])


def test_parallel_encoding_equals_serial(shared_dir, real_encoder, monkeypatch):
    text = (shared_dir / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    serial = real_encoder.encode(text)
    parts = split_for_parallel(text, 16)
    assert "".join(parts) == text and len(parts) > 8
    monkeypatch.setattr(encoder_module, "PARALLEL_MIN_CHARS", 1000)
    monkeypatch.setattr(encoder_module.os, "cpu_count", lambda: 2)

    def no_fork():  # this process holds JAX's threads: its workers come from a fork server, not from it
        raise AssertionError("the encoder forked the process it runs in")
    monkeypatch.setattr(encoder_module.os, "fork", no_fork)
    assert real_encoder.encode(text) == serial


def test_safe_cuts_never_change_the_pre_tokens():
    # Every point either cut pattern finds, in random text over the characters that matter (runs of
    # spaces and newlines, apostrophes, letters, digits, punctuation, a combining mark): the two sides
    # pre-tokenise, alone, exactly as the whole does. The rule the encoder had before cut after
    # "\n\n" and fails here ("x\n\ny": "\n\n" alone is one pre-token, inside the text two).
    rng = np.random.default_rng(0)
    alphabet = list("ab1 \n\t'.s") + ["\u0301", "é", "  ", "\n\n"]
    checked = 0
    for _ in range(400):
        text = "".join(rng.choice(alphabet, size=24))
        whole = PRETOKENIZE.findall(text)
        for pattern in (SAFE_CUT, FALLBACK_CUT):
            for m in pattern.finditer(text):
                cut = m.start()
                assert PRETOKENIZE.findall(text[:cut]) + PRETOKENIZE.findall(text[cut:]) == whole, (text, cut)
                checked += 1
    assert checked > 1000
    assert last_safe_cut("x\n\ny") == 0 and last_safe_cut("ab cd\nef") == 6 and last_safe_cut("abc123") == 3


def test_parallel_encoding_cuts_only_where_the_ids_stay_the_same(real_encoder, tiktoken_gpt2, monkeypatch):
    text = "Speech one.\n\nSpeech two, longer.\n  Indented line\n\n\nThird: x's 1.5e3\n" * 400
    monkeypatch.setattr(encoder_module, "PARALLEL_MIN_CHARS", 1000)
    monkeypatch.setattr(encoder_module.os, "cpu_count", lambda: 2)
    assert len(split_for_parallel(text, 64)) > 32
    assert real_encoder.encode(text) == tiktoken_gpt2.encode_ordinary(text)


def test_byte_level_vocabulary():
    enc = byte_level_encoder()
    text = "héllo\n😀 <|endoftext|>"
    ids = enc.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert enc.decode(ids) == text
    assert enc.encode("a<|endoftext|>b", allowed_special="all") == [97, 256, 98]
    assert enc.n_vocab == 257


def test_missing_or_broken_vocabulary_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no vocabulary found; it needs encoder.json \\+ vocab.bpe or vocab.json"):
        get_encoder(tmp_path)
    (tmp_path / "encoder.json").write_text("{not json")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n")
    with pytest.raises(UserError, match="encoder.json: not valid JSON"):
        get_encoder(tmp_path)


@pytest.mark.parametrize("cut", ["lines", "mid-line"])
def test_a_truncated_merges_file_is_one_line_naming_it(gpt2_vocab_dir, tmp_path, cut, capsys):
    import shutil

    from gpt2_jax.cli import main as cli_main

    shutil.copyfile(gpt2_vocab_dir / "encoder.json", tmp_path / "encoder.json")
    text = (gpt2_vocab_dir / "vocab.bpe").read_text(encoding="utf-8")
    end = text.index("\n", len(text) // 2) + 1
    (tmp_path / "vocab.bpe").write_text(text[:end] if cut == "lines" else text[:end + 3], encoding="utf-8")
    with pytest.raises(UserError, match=f"^{tmp_path / 'vocab.bpe'}: .*download (it|them) again"):
        get_encoder(tmp_path)
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["encode", str(tmp_path / "a.txt"), str(tmp_path / "a.npz"), "--model_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and f"{tmp_path / 'vocab.bpe'}:" in err, err
    assert not (tmp_path / "a.npz").exists()
