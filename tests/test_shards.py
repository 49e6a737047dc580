"""Token shards (gpt2_jax/shards.py): nanoGPT's and llm.c's layouts detected and checked, windows read by ranges
(never a whole shard), each process's rows only, the sampled fingerprint, `encode --shard_tokens`, a bucket."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import write_byte_vocab
from gpt2_jax import data, shards
from gpt2_jax.cli import main
from gpt2_jax.data import ExampleSampler, PairSampler, WindowSampler, load_dataset
from gpt2_jax.encoder import byte_level_encoder
from gpt2_jax.errors import UserError


class Vocab:
    """A stand-in encoder for pre-encoded data: only the vocabulary size is read."""

    n_vocab, eot_token = 50257, 50256


def llm_c_shard(path, tokens) -> None:
    """A shard as llm.c's dev/data/data_common.py write_datafile writes it: 256 int32 (magic 20240520, version 1,
    the token count, zeros), then the uint16 tokens."""
    head = np.zeros(256, dtype=np.int32)
    head[0], head[1], head[2] = 20240520, 1, len(tokens)
    with open(path, "wb") as f:
        f.write(head.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


@pytest.fixture
def texts(tmp_path):
    root = tmp_path / "texts"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (20 + i))
    return root


def test_encode_writes_llm_c_shards_whose_tokens_are_the_flat_encode(texts, tmp_path, capsys):
    (tmp_path / "vocab").mkdir()
    write_byte_vocab(tmp_path / "vocab", 257)
    main(["encode", str(texts), str(tmp_path / "out" / "flat.bin"), "--model_dir", str(tmp_path / "vocab")])
    main(["encode", str(texts), str(tmp_path / "out" / "web.bin"), "--model_dir", str(tmp_path / "vocab"),
          "--shard_tokens", "1000"])
    assert "--config.data.dataset='" + str(tmp_path / "out" / "web_*.bin") + "'" in capsys.readouterr().out
    flat = np.fromfile(tmp_path / "out" / "flat.bin", np.uint16)
    written = sorted((tmp_path / "out").glob("web_*.bin"))
    assert [p.name for p in written] == [f"web_{i:06d}.bin" for i in range(len(flat) // 1000 + 1)]
    assert not list((tmp_path / "out").glob("*.tmp")) and not list((tmp_path / "out").glob("web*.json"))
    tokens = []
    for i, path in enumerate(written):
        raw = path.read_bytes()
        count = 1000 if i < len(written) - 1 else len(flat) % 1000
        expected = np.zeros(256, np.int32)
        expected[:3] = [20240520, 1, count]
        assert raw[:1024] == expected.tobytes() and len(raw) == 1024 + 2 * count
        tokens.append(np.frombuffer(raw[1024:], np.uint16))
    np.testing.assert_array_equal(np.concatenate(tokens), flat)  # documents joined by the end-of-text id, as flat
    # read back through a glob: one chunk per shard, so no window crosses two
    chunks = load_dataset(tmp_path / "out" / "web_*.bin", byte_level_encoder(), progress=False)
    assert [len(c) for c in chunks] == [len(t) for t in tokens]
    for chunk, expected in zip(chunks, tokens):
        np.testing.assert_array_equal(np.asarray(chunk), expected)
    # a second encode to the same name would leave a glob mixing two encodes: refused, nothing written
    with pytest.raises(SystemExit):
        main(["encode", str(texts), str(tmp_path / "out" / "web.bin"), "--model_dir", str(tmp_path / "vocab"),
              "--shard_tokens", "10"])
    assert "web_000000.bin already exists (3 shard(s) match" in capsys.readouterr().err
    assert sorted((tmp_path / "out").glob("web_*.bin")) == written


def test_nanogpt_headerless_shards_sample_as_the_same_tokens_in_memory(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 50257, n).astype(np.uint16) for n in (3000, 40, 2000)]  # the 40: no window fits
    for i, a in enumerate(arrays):
        a.tofile(tmp_path / f"train_{i}.bin")  # nanoGPT's prepare.py: np.memmap(..., dtype=np.uint16) filled
    chunks = load_dataset(tmp_path / "train_*.bin", Vocab(), progress=False)
    assert all(isinstance(c, shards.Tokens) for c in chunks) and [len(c) for c in chunks] == [3000, 40, 2000]
    lazy, memory = WindowSampler(chunks, 65, seed=3), WindowSampler(arrays, 65, seed=3)
    for step in (0, 1, 17):
        np.testing.assert_array_equal(lazy.batch(step, 16), memory.batch(step, 16))
    head, tail = data.split_tail(chunks, 0.3)  # lazy views, cut at the end, as for arrays
    np.testing.assert_array_equal(np.concatenate([np.asarray(c) for c in head + tail]), np.concatenate(arrays))
    assert len(np.concatenate([np.asarray(c) for c in tail])) == np.ceil(0.3 * 5040)


def _as_the_original_loop(chunks, window, seed, index, batch_size) -> np.ndarray:
    """WindowSampler.batch as it was written before rows: a Python loop of rejections over the draws."""
    bounds = np.concatenate([[0], np.cumsum([len(c) for c in chunks])])
    rng = np.random.default_rng([seed, index])
    rows = []
    while len(rows) < batch_size:
        starts = rng.integers(0, bounds[-1] - window + 1, size=2 * batch_size)
        chunk = np.searchsorted(bounds, starts, side="right") - 1
        for start, c in zip(starts, chunk):
            if start + window <= bounds[c + 1] and len(rows) < batch_size:
                rows.append(np.asarray(chunks[c][start - bounds[c]:start - bounds[c] + window]))
    return np.stack(rows).astype(np.int32)


def test_the_sampler_draws_the_windows_it_always_drew():  # resumed runs started before this change stay bitwise
    chunks = [np.arange(0, 50), np.arange(100, 107), np.arange(200, 400), np.arange(500, 510)]
    for index, batch_size in ((0, 1), (3, 8), (9, 300)):
        np.testing.assert_array_equal(WindowSampler(chunks, 11, seed=5).batch(index, batch_size),
                                      _as_the_original_loop(chunks, 11, 5, index, batch_size))


def test_each_process_reads_only_its_rows(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(3):
        llm_c_shard(tmp_path / f"s_{i}.bin", rng.integers(0, 50257, 5000))
    chunks = load_dataset(tmp_path / "s_*.bin", Vocab(), progress=False)
    sampler, window, batch_size = WindowSampler(chunks, 129, seed=0), 129, 12
    full = sampler.batch(4, batch_size)
    for processes in (2, 3, 4):
        per = batch_size // processes
        parts = []
        for p in range(processes):
            before = shards.bytes_read()
            parts.append(sampler.batch(4, batch_size, rows=slice(p * per, (p + 1) * per)))
            assert shards.bytes_read() - before == per * window * 2  # its own rows' windows, nothing else
        np.testing.assert_array_equal(np.concatenate(parts), full)
    assert sampler.batch(4, batch_size, rows=slice(3, 3)).shape == (0, window)
    # examples and pairs: the same rows of the same draws
    examples = data.Examples(np.arange(40).reshape(10, 4), np.ones((10, 4)), 10, 0)
    full_examples = ExampleSampler(examples, 2).batch(3, 6)
    for got, want in zip(ExampleSampler(examples, 2).batch(3, 6, rows=slice(2, 5)), full_examples):
        np.testing.assert_array_equal(got, want[2:5])
    pairs = data.Pairs(np.arange(80).reshape(10, 2, 4), np.ones((10, 2, 4)), 10, 0)
    full_pairs = PairSampler(pairs, 2).batch(3, 6)
    for got, want in zip(PairSampler(pairs, 2).batch(3, 6, rows=slice(4, 6)), full_pairs):
        np.testing.assert_array_equal(got, want[4:6])


def _write_bad(path, kind: str) -> None:
    tokens = np.arange(100)
    if kind == "llama3":
        head = np.zeros(256, np.int32)
        head[:3] = 20240801, 7, 100
        path.write_bytes(head.tobytes() + tokens.astype(np.uint32).tobytes())
        return
    llm_c_shard(path, tokens)
    raw = bytearray(path.read_bytes())
    if kind == "magic":
        raw[:4] = np.int32(20240519).tobytes()
    elif kind == "version":
        raw[4:8] = np.int32(2).tobytes()
    elif kind == "truncated":
        raw = raw[:-10]
    elif kind == "odd size":
        raw = raw[1024:] + b"\0"
    elif kind == "vocabulary":
        raw[1024:1026] = np.uint16(60000).tobytes()
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("kind, message", [
    ("magic", r"an llm.c header with magic 20240519, not 20240520: damaged"),
    ("version", r"llm.c header version 2, but only version 1 \(uint16 GPT-2 tokens\) is read"),
    ("truncated", r"its header says 100 tokens \(1224 bytes\) but the file holds 1214 bytes: truncated"),
    ("llama3", r"llm.c's Llama 3 layout \(magic 20240801, uint32 tokens\) is not read"),
    ("odd size", r"201 bytes, an odd number: not uint16 tokens"),
    ("vocabulary", r"holds token id 60000, outside the model's vocabulary \[0, 50257\)"),
    ("mixed", r"s_0.bin has llm.c's header .* but .*s_1.bin has none: a glob of shards must hold one layout"),
])
def test_a_bad_shard_is_one_line_naming_it(tmp_path, kind, message):
    llm_c_shard(tmp_path / "s_0.bin", np.arange(2000))
    if kind == "mixed":
        np.arange(100, dtype=np.uint16).tofile(tmp_path / "s_1.bin")
    else:
        _write_bad(tmp_path / "s_1.bin", kind)
    with pytest.raises(UserError, match=message) as error:
        load_dataset(tmp_path / "s_*.bin", Vocab(), progress=False)
    assert "\n" not in str(error.value) and str(tmp_path / "s_1.bin") in str(error.value)


def test_the_fingerprint_samples_each_shard_and_says_so(tmp_path):
    rng = np.random.default_rng(2)
    tokens = [rng.integers(0, 50257, 200_000) for _ in range(3)]  # 400 KB each
    for i, t in enumerate(tokens):
        llm_c_shard(tmp_path / f"s_{i}.bin", t)
    spec = str(tmp_path / "s_*.bin")
    before = shards.bytes_read()
    chunks = load_dataset(spec, Vocab(), progress=False)
    record = data.fingerprint(spec, chunks)
    assert shards.bytes_read() - before == 3 * (1024 + 2 * 65536)  # each header and both ends, once
    assert record["hash"] == data.SAMPLED_HASH and record["tokens"] == 600_000
    assert [f["bytes"] for f in record["files"]] == [1024 + 400_000] * 3

    def changed_at(position: int) -> str | None:
        edited = tokens[1].copy()
        edited[position] = (edited[position] + 1) % 50257
        llm_c_shard(tmp_path / "s_1.bin", edited)
        change = data.describe_change(record, data.fingerprint(spec, load_dataset(spec, Vocab(), progress=False)))
        llm_c_shard(tmp_path / "s_1.bin", tokens[1])
        return change

    assert changed_at(10) == changed_at(199_990) == "same files and sizes, other tokens (the text or the " \
        "vocabulary changed)"
    assert changed_at(100_000) is None  # the documented weakness: the middle of a shard is not hashed
    llm_c_shard(tmp_path / "s_1.bin", tokens[1][:-1])
    assert "s_1.bin 401024 -> 401022 bytes" in data.describe_change(
        record, data.fingerprint(spec, load_dataset(spec, Vocab(), progress=False)))
    # a record hashed another way (every token) is compared by its files and sizes only
    llm_c_shard(tmp_path / "s_1.bin", tokens[1])
    assert data.describe_change({**record, "hash": None, "blake2b": "other"}, record) is None


def test_shards_in_a_bucket_are_read_by_ranges_never_whole(gcs, texts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URL made a local path would show up here
    (tmp_path / "vocab").mkdir()
    write_byte_vocab(tmp_path / "vocab", 257)
    with gcs.active():
        main(["encode", str(texts), gcs.url("shards", "web.bin"), "--model_dir", str(tmp_path / "vocab"),
              "--shard_tokens", "1500"])
        main(["encode", str(texts), str(tmp_path / "web.bin"), "--model_dir", str(tmp_path / "vocab"),
              "--shard_tokens", "1500"])
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["texts", "vocab"] + [
            f"web_{i:06d}.bin" for i in range(len(list(tmp_path.glob("web_*.bin"))))])  # nothing else local
        local = load_dataset(tmp_path / "web_*.bin", byte_level_encoder(), progress=False)
        before = shards.bytes_read()
        remote = load_dataset(gcs.url("shards", "web_*.bin"), byte_level_encoder(), progress=False)
        assert shards.bytes_read() - before == sum(min(1024 + 2 * len(c), 1024 + 2 * 65536) for c in local)
        assert len(remote) == len(local) > 1 and all(isinstance(c, shards.Tokens) for c in remote)
        expected = WindowSampler(local, 33, 7).batch(2, 6)[2:4]
        before = shards.bytes_read()
        np.testing.assert_array_equal(WindowSampler(remote, 33, 7).batch(2, 6, rows=slice(2, 4)), expected)
        assert shards.bytes_read() - before == 2 * 33 * 2  # two windows: ranges of the shards, none read whole
        # the project's own flat .bin with its sidecar, in the bucket: read by ranges too, chunked by the sidecar
        flat = data.encode_to_file(texts, gcs.url("flat", "all.bin"), byte_level_encoder(), combine=500,
                                   progress=False)
        meta = json.loads(data.storage.path(f"{flat}.json").read_text())
        before = shards.bytes_read()
        chunks = load_dataset(flat, byte_level_encoder(), progress=False)
        assert shards.bytes_read() == before and [c.start for c in chunks] == meta["chunk_starts"]
        np.testing.assert_array_equal(np.concatenate([np.asarray(c) for c in chunks]),
                                      np.concatenate([np.asarray(c) for c in local]))


def test_a_run_on_shards_in_a_bucket_resumes_bitwise(gcs, tmp_path):
    import signal

    from conftest import FIXTURES
    from experiments import base
    from gpt2_jax import loop

    rng = np.random.default_rng(3)
    for i in range(4):  # 4 small shards: the batches' windows come from all of them
        llm_c_shard(tmp_path / f"s_{i}.bin", rng.integers(0, 257, 300))
    with gcs.active():
        for i in range(4):
            data.storage.upload(tmp_path / f"s_{i}.bin", data.storage.path(gcs.url("run-shards", f"s_{i}.bin")))

        def config(workdir):
            c = base.get_config()
            c.workdir, c.model.name, c.data.dataset = str(workdir), str(FIXTURES / "openai_tiny"), gcs.url(
                "run-shards", "s_*.bin")
            c.data.seq_len, c.data.val_split, c.train.batch_size, c.train.total_steps = 16, 0.1, 4, 6
            c.train.learning_rate, c.sample.sample_every, c.checkpoint.save_every = 1e-3, 0, 0
            return c

        def stop_at_3(step, metrics):
            if step == 3:
                signal.raise_signal(signal.SIGINT)

        loop.run(config(tmp_path / "straight"))
        assert loop.run(config(tmp_path / "resumed"), on_step=stop_at_3)["step"] < 6  # 4 with dispatch_ahead
        loop.run(config(tmp_path / "resumed"))
    losses = [[json.loads(line)["loss"] for line in (tmp_path / w / "logs" / "run1" / "metrics.jsonl").read_text()
               .splitlines() if "loss" in json.loads(line)] for w in ("straight", "resumed")]
    assert len(losses[0]) == 6 and losses[0] == losses[1]  # bitwise equal floats
    record = json.loads((tmp_path / "resumed" / "checkpoint" / "run1" / "dataset.json").read_text())
    assert record["train"]["hash"] == data.SAMPLED_HASH and record["train"]["chunks"] == 4
