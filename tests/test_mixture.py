"""Mixtures (gpt2_jax/mixture.py): the config strings, block-exact shares (largest remainder), stages that switch
at their step (levanter's bug #876), rows drawn by each source's own sampler, only a process's rows read, and
data.datasets' mixture: validation by source, the record of every source."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from experiments import base
from gpt2_jax import data, mixture, shards, storage
from gpt2_jax.data import WindowSampler
from gpt2_jax.errors import UserError
from gpt2_jax.mixture import MixtureSampler, block_counts, parse_mixture, parse_stages
from gpt2_jax.rundir import RunDir

WINDOW = 9


class Vocab:
    """A stand-in encoder for pre-encoded data: only the vocabulary size is read."""

    n_vocab, eot_token = 50257, 50256


def sources(*starts: int) -> list[WindowSampler]:
    """Window samplers whose tokens tell where they come from: source i's are starts[i] + their position."""
    return [WindowSampler([np.arange(s, s + 5000)], WINDOW, mixture.source_seed(0, i)) for i, s in enumerate(starts)]


def source_of(batch: np.ndarray) -> np.ndarray:
    return batch[:, 0] // 10_000  # sources at 0, 10000, 20000


def test_the_mixture_string_keeps_urls_and_globs_whole():
    parsed = parse_mixture(" web:0.7=gs://b/fine=web/*.bin ; code:0.3=data/code/[ab]*.txt;")
    assert parsed == [mixture.Source("web", 0.7, "gs://b/fine=web/*.bin"),
                      mixture.Source("code", 0.3, "data/code/[ab]*.txt")]
    schedule = parse_stages("2000:web=0.5,code=0.5; 8000:code=1", parsed)
    assert [s for s, _ in schedule] == [0, 2000, 8000]
    np.testing.assert_array_equal(schedule[2][1], [0.0, 1.0])  # a source a stage leaves out weighs 0


@pytest.mark.parametrize("mix, stages, message", [
    ("web=gs://b/x", "", r"'web=gs://b/x' is not NAME:WEIGHT=SPEC"),
    ("web:0.5", "", r"'web:0.5' is not NAME:WEIGHT=SPEC"),
    ("we b:1=x", "", r"'we b:1=x' is not NAME:WEIGHT=SPEC"),
    ("web:much=x", "", r"source 'web': weight 'much' is not a number"),
    ("web:-0.1=x;code:1=y", "", r"source 'web': weight -0.1 must be a finite number >= 0"),
    ("web:0=x;code:0=y", "", r"data.mixture: the weights are all zero"),
    ("web:1=x;web:1=y", "", r"the source name 'web' is given twice"),
    ("", "", r"names no source"),
    ("web:1=x;code:1=y", "10:web=1,prose=1", r"stage 10: 'prose=1' names no source of data.mixture \(web, code\)"),
    ("web:1=x;code:1=y", "10:web=1;10:code=1", r"'10:code=1': step 10 is not after step 10"),
    ("web:1=x;code:1=y", "10:web=1;5:code=1", r"'5:code=1': step 5 is not after step 10"),
    ("web:1=x;code:1=y", "0:web=1", r"step 0 is not after step 0"),
    ("web:1=x;code:1=y", "ten:web=1", r"'ten:web=1' does not start with a step"),
    ("web:1=x;code:1=y", "10:web=0", r"stage 10: the weights are all zero"),
    ("web:1=x;code:1=y", "10:web=-1", r"stage 10 source 'web': weight -1 must be a finite number >= 0"),
])
def test_a_bad_mixture_is_one_line_naming_the_field(mix, stages, message):
    with pytest.raises(UserError, match=message) as error:
        parse_stages(stages, parse_mixture(mix))
    assert "\n" not in str(error.value) and "data.mixture" in str(error.value)


@pytest.mark.parametrize("weights, block, counts", [
    ([0.45, 0.35, 0.2], 10, [5, 3, 2]),  # 4.5, 3.5, 2: one row left, the tie to the earlier source
    ([1, 1, 1], 10, [4, 3, 3]),
    ([0.7, 0.3], 2048, [1434, 614]),  # 1433.6, 614.4
    ([0.001, 0.999], 100, [0, 100]),  # 0.1, 99.9
    ([3, 0, 1], 7, [5, 0, 2]),  # 5.25, 0, 1.75
])
def test_block_counts_are_largest_remainder_shares(weights, block, counts):
    assert block_counts(np.asarray(weights), block).tolist() == counts


def test_every_block_holds_exactly_its_share_whatever_the_batch_size():
    sampler = MixtureSampler(sources(0, 10_000, 20_000), [(0, np.asarray([0.45, 0.35, 0.2]))], block=10, seed=0)
    rows = np.concatenate([source_of(sampler.batch(step, 7)) for step in range(30)])  # 7 does not divide 10
    for block in rows.reshape(-1, 10):
        assert np.bincount(block, minlength=3).tolist() == [5, 3, 2]
    assert len({tuple(b) for b in rows.reshape(-1, 10)}) > 5  # positions permuted block by block
    rows_again = np.concatenate([sampler.sources_of(step, 7)[0] for step in range(30)])
    np.testing.assert_array_equal(rows, rows_again)


@pytest.mark.parametrize("batch_size", [3, 5, 8])
def test_a_stage_switches_at_its_step_not_at_a_row_block_boundary(batch_size):
    """levanter's bug #876: stages indexed by rows began at the first block boundary after their step. Here a
    batch size that does not divide the block puts the switch inside a block of the run's rows."""
    plain = [(0, np.asarray([1.0, 0.0])), (5, np.asarray([0.0, 1.0]))]
    sampler = MixtureSampler(sources(0, 10_000), plain, block=8, seed=0)
    assert source_of(sampler.batch(4, batch_size)).tolist() == [0] * batch_size  # every row of step S-1: old
    assert source_of(sampler.batch(5, batch_size)).tolist() == [1] * batch_size  # every row of step S: new
    # shares: blocks counted from the stage's first row, which is the first row of step 5
    staged = [(0, np.asarray([0.5, 0.5])), (5, np.asarray([0.25, 0.75]))]
    sampler = MixtureSampler(sources(0, 10_000), staged, block=8, seed=0)
    before = np.concatenate([source_of(sampler.batch(s, batch_size)) for s in range(5)])
    after = np.concatenate([source_of(sampler.batch(s, batch_size)) for s in range(5, 5 + 8)])
    for block in before[:len(before) // 8 * 8].reshape(-1, 8):
        assert np.bincount(block, minlength=2).tolist() == [4, 4]
    for block in after.reshape(-1, 8):
        assert np.bincount(block, minlength=2).tolist() == [2, 6]


def test_each_source_gives_its_own_samplers_rows_in_order_and_a_batch_is_a_function_of_the_step():
    staged = [(0, np.asarray([0.6, 0.4])), (4, np.asarray([0.2, 0.8]))]
    sampler = MixtureSampler(sources(0, 10_000), staged, block=6, seed=0)
    batches = [sampler.batch(step, 5) for step in range(12)]
    for i, source in enumerate(sources(0, 10_000)):  # counter n: row n % 6 of that source's batch n // 6
        rows = np.concatenate([b[source_of(b) == i] for b in batches])
        expected = np.concatenate([source.batch(k, 6) for k in range(len(rows) // 6 + 1)])[:len(rows)]
        np.testing.assert_array_equal(rows, expected)
    fresh = MixtureSampler(sources(0, 10_000), staged, block=6, seed=0)  # a resumed run: the same batches
    for step in (11, 3, 7):
        np.testing.assert_array_equal(fresh.batch(step, 5), batches[step])
    assert not np.array_equal(MixtureSampler(sources(0, 10_000), staged, 6, seed=1).batch(3, 5), batches[3])


def test_a_process_gets_exactly_its_rows_and_reads_only_theirs(tmp_path):
    for name, start in (("a", 0), ("b", 10_000)):
        for i in range(2):
            np.arange(start + 3000 * i, start + 3000 * (i + 1), dtype=np.uint16).tofile(tmp_path / f"{name}_{i}.bin")
    chunks = [data.load_dataset(tmp_path / f"{n}_*.bin", Vocab(), progress=False) for n in "ab"]
    samplers = [WindowSampler(c, WINDOW, mixture.source_seed(0, i)) for i, c in enumerate(chunks)]
    sampler = MixtureSampler(samplers, [(0, np.asarray([0.7, 0.3]))], block=16, seed=0)
    full = sampler.batch(9, 24)
    for processes in (2, 4):
        per = 24 // processes
        parts = []
        for p in range(processes):
            before = shards.bytes_read()
            parts.append(sampler.batch(9, 24, rows=slice(p * per, (p + 1) * per)))
            assert shards.bytes_read() - before == per * WINDOW * 2
        np.testing.assert_array_equal(np.concatenate(parts), full)


def mixture_config(tmp_path, **fields):
    for name, start in (("web", 0), ("code", 20_000)):
        np.savez(tmp_path / f"{name}.npz", np.arange(start, start + 4000))
    c = base.get_config()
    c.data.mixture = f"web:0.7={tmp_path / 'web.npz'};code:0.3={tmp_path / 'code.npz'}"
    c.data.mixture_block, c.data.val_every, c.data.val_batch_count, c.data.val_batch_size = 10, 5, 3, 4
    for key, value in fields.items():
        setattr(c.data, key, value)
    return c


def test_datasets_of_a_mixture_validate_each_source_on_its_own_tail(tmp_path):
    config = mixture_config(tmp_path, val_split=0.1, mixture_stages="3:code=1")
    sampler, val, record = data.datasets(config, Vocab(), WINDOW - 1, seed=0, is_main=False)
    assert isinstance(sampler, MixtureSampler) and list(val) == ["web", "code"]  # insertion-ordered
    for name, start in (("web", 0), ("code", 20_000)):
        assert len(val[name]) == 3 and all(b.shape == (4, WINDOW) for b in val[name])
        assert all((b >= start + 3600).all() and (b < start + 4000).all() for b in val[name])  # its last 0.1
    trained = np.concatenate([sampler.batch(s, 8) for s in range(6)])
    assert trained.max() < 23_600 and not ((trained >= 3600) & (trained < 4000)).any()  # never a held-out token
    assert source_of(sampler.batch(3, 8)).tolist() == [2] * 8  # 20000 // 10000: code only from step 3
    assert list(record["train"]["sources"]) == ["web", "code"] and record["train"]["stages"] == "3:code=1"
    assert record["validation"]["sources"]["code"]["tokens"] == 400
    # resuming on changed data or weights: one line naming what changed
    run = RunDir(tmp_path / "run")
    storage.mkdir(run.path)
    run.data_record.write_text(json.dumps(record))
    np.savez(tmp_path / "code.npz", np.arange(20_000, 24_000) - (np.arange(4000) == 5))  # one token of its head
    _, _, changed = data.datasets(config, Vocab(), WINDOW - 1, seed=0, is_main=False)
    with pytest.raises(UserError, match=r"data.dataset changed .*: source 'code': same files and sizes, other tokens"):
        data.check_same_data(run, changed, allow_changed=False)
    np.savez(tmp_path / "code.npz", np.arange(20_000, 24_000))
    config.data.mixture_stages = "4:code=1"
    _, _, restaged = data.datasets(config, Vocab(), WINDOW - 1, seed=0, is_main=False)
    with pytest.raises(UserError, match=r"data.mixture_stages '3:code=1' -> '4:code=1'"):
        data.check_same_data(run, restaged, allow_changed=False)
    config.data.mixture_stages = "3:code=1"
    data.check_same_data(run, data.datasets(config, Vocab(), WINDOW - 1, 0, False)[2], False)


@pytest.mark.parametrize("fields, message", [
    ({"dataset": "x.txt"}, r"data.dataset and data.mixture are both set"),
    ({"val_dataset": "x.txt"}, r"data.val_dataset and data.mixture are both set"),
    ({"mixture": "web:1=x.jsonl"}, r"mixture source 'web' \('x.jsonl'\) is a .jsonl of examples"),
    ({"mixture_block": 0}, r"data.mixture_block=0: must be >= 1"),
])
def test_a_mixture_that_cannot_run_is_one_line(tmp_path, fields, message):
    with pytest.raises(UserError, match=message):
        data.datasets(mixture_config(tmp_path, **fields), Vocab(), WINDOW - 1, seed=0, is_main=False)
    config = mixture_config(tmp_path)
    with pytest.raises(UserError, match="train.objective=dpo trains on one .jsonl of preference pairs"):
        data.pair_datasets(config, Vocab(), WINDOW - 1)


def test_a_run_on_a_mixture_logs_each_sources_validation_and_their_mean(tmp_path):
    from conftest import FIXTURES
    from test_loop import read_metrics, tiny_config

    from gpt2_jax import loop

    prose = tmp_path / "prose.txt"
    prose.write_text("It was the best of times, it was the worst of times. " * 40)
    code = FIXTURES / "make_openai_checkpoint.py"
    config = tiny_config(tmp_path, "", **{"data.mixture": f"code:0.75={code};prose:0.25={prose}",
                                          "data.mixture_block": 4, "data.val_split": 0.2, "data.val_every": 2,
                                          "data.val_batch_count": 2, "train.total_steps": 4})
    loop.run(config)
    validated = [r for r in read_metrics(tmp_path) if "val_loss" in r]
    assert [r["step"] for r in validated] == [0, 2, 4]
    for r in validated:  # the mean over both sources' batches (the same number of windows each)
        assert r["val_loss/prose"] != r["val_loss/code"]  # validated apart, each on its own held-out tail
        assert r["val_loss"] == pytest.approx((r["val_loss/code"] + r["val_loss/prose"]) / 2, rel=1e-6)


def test_a_staged_mixture_run_resumes_bitwise_across_its_stage_switch(tmp_path):
    from conftest import FIXTURES
    from test_loop import tiny_config

    from gpt2_jax import loop, rundir

    prose = tmp_path / "prose.txt"
    prose.write_text("It was the best of times, it was the worst of times. " * 40)
    code = FIXTURES / "make_openai_checkpoint.py"
    fields = {"data.mixture": f"code:0.75={code};prose:0.25={prose}", "data.mixture_stages": "3:prose=1",
              "data.mixture_block": 4, "train.noise": 0.1}
    loop.run(tiny_config(tmp_path / "straight", "", **fields, **{"train.total_steps": 5}))
    loop.run(tiny_config(tmp_path / "resumed", "", **fields, **{"train.total_steps": 2}))  # before the switch at 3
    loop.run(tiny_config(tmp_path / "resumed", "", **fields, **{"train.total_steps": 5}))
    straight = rundir.load_run_params(tmp_path / "straight" / "checkpoint" / "run1")[1]
    resumed = rundir.load_run_params(tmp_path / "resumed" / "checkpoint" / "run1")[1]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), straight, resumed)
