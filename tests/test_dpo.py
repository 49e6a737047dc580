"""Preference fine-tuning (DPO), exact against trl's DPOTrainer itself: token ids, per-pair log-probs, every
loss type's loss and metrics, and the gradient; then training, resume, the reference's modes and evaluate."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_hf_dir
from gpt2_jax import data, dpo, loop, rundir
from gpt2_jax.cli import main as cli_main
from gpt2_jax.errors import UserError
from gpt2_jax.weights import _tensor_names, load_weights
from test_loop import no_compile, tiny_config  # noqa: F401 - no_compile is a fixture

PAIRS = [{"prompt": "Q: what colour is the sky? A:", "chosen": " blue", "rejected": " green, I think!!"},
         {"prompt": "Say hi to the reader ", "chosen": "hi there", "rejected": "no."},
         {"prompt": "1 + 1 =", "chosen": " 2", "rejected": " three, or maybe four"},
         {"prompt": "The cat sat on the", "chosen": " mat.", "rejected": " moon, then the sun"}]
LOSSES = [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.0), ("robust", 0.1)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """A random policy and another random model as its reference, in transformers' layout (byte vocabulary)."""
    tmp = tmp_path_factory.mktemp("dpo_models")
    return tiny_hf_dir(tmp / "policy", seed=0), tiny_hf_dir(tmp / "reference", seed=1)


def _trainer(policy_dir: Path, reference_dir: Path, tokenizer_dir: Path, tmp: Path, **settings):
    """trl's DPOTrainer on PAIRS (its own tokenization), the reference a second model."""
    from datasets import Dataset
    from transformers import GPT2LMHeadModel, GPT2Tokenizer
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp / "trl"), report_to=[], use_cpu=True, bf16=False, max_length=None,
                     precompute_ref_log_probs=False, per_device_train_batch_size=len(PAIRS), **settings)
    tokenizer = GPT2Tokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt")) \
        if (tokenizer_dir / "vocab.json").is_file() else \
        GPT2Tokenizer(str(tokenizer_dir / "encoder.json"), str(tokenizer_dir / "vocab.bpe"))
    return DPOTrainer(model=GPT2LMHeadModel.from_pretrained(policy_dir),
                      ref_model=GPT2LMHeadModel.from_pretrained(reference_dir), args=args,
                      train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer)


def test_trl_tokenization_gives_trls_token_ids(models, gpt2_vocab_dir, real_encoder, tmp_path):
    # GPT-2's real vocabulary: a prompt ending in a space merges its space into the completion's first token
    trainer = _trainer(models[0], models[1], gpt2_vocab_dir, tmp_path)
    for pair, theirs in zip(PAIRS, trainer.train_dataset):
        ours = data.encode_pair(real_encoder, pair["prompt"], pair["chosen"], pair["rejected"], tokenize="trl")
        assert ours == (theirs["prompt_ids"], theirs["chosen_ids"], theirs["rejected_ids"]), pair
    apart = data.encode_pair(real_encoder, PAIRS[1]["prompt"], PAIRS[1]["chosen"], PAIRS[1]["rejected"])
    assert apart[0] == real_encoder.encode(PAIRS[1]["prompt"]) and apart[1][-1] == real_encoder.eot_token


def _our_batch(examples: list[dict], eot: int) -> tuple[np.ndarray, np.ndarray]:
    """trl's processed pairs (prompt_ids, chosen_ids, rejected_ids) laid out as our rows, without truncation."""
    triples = [(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in examples]
    window = max(len(p) + max(len(c), len(r)) for p, c, r in triples)
    rows = data.layout_pairs(triples, window, eot, start_with_eot=False)
    assert rows.truncated == 0
    return rows.tokens, rows.weights


def _hf_grads(model) -> dict[tuple, np.ndarray]:
    """The torch model's gradients by our parameter paths (the tied wte's holds both of its uses)."""
    named = dict(model.named_parameters())
    return {n.path: named["transformer." + n.hf].grad.numpy() for n in _tensor_names(model.config.n_layer)}


@pytest.mark.parametrize("loss_type, label_smoothing", LOSSES)
def test_loss_metrics_logps_and_gradient_equal_trls(models, tmp_path, loss_type, label_smoothing):
    trainer = _trainer(models[0], models[1], models[0], tmp_path, beta=0.1, loss_type=[loss_type],
                       label_smoothing=label_smoothing)
    examples = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    batch = trainer.data_collator(examples)
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    loss.backward()
    their_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k in dpo.METRICS}
    their_policy = np.stack([t.detach().numpy() for t in trainer.compute_ref_log_probs(trainer.model, batch)], 1)
    their_reference = np.stack([t.numpy() for t in trainer.compute_ref_log_probs(trainer.ref_model, batch)], 1)

    config, params = load_weights(models[0])
    _, reference_params = load_weights(models[1])
    tokens, weights = _our_batch(examples, eot=299)
    policy, counts = dpo.pair_logps(params, config, jnp.asarray(tokens), jnp.asarray(weights))
    reference = dpo.pair_logps(reference_params, config, jnp.asarray(tokens), jnp.asarray(weights))[0]
    np.testing.assert_allclose(policy, their_policy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(reference, their_reference, rtol=1e-5, atol=1e-5)
    settings = dpo.DPOSettings(beta=0.1, loss_type=loss_type, label_smoothing=label_smoothing)

    def ours(p):
        return dpo.dpo_loss(p, (tokens, weights, np.asarray(reference)), config, settings)

    (our_loss, our_metrics), grads = jax.value_and_grad(ours, has_aux=True)(params)
    assert float(our_loss) == pytest.approx(float(loss), rel=1e-6, abs=1e-6)
    assert set(their_metrics) == set(dpo.METRICS)
    for name in dpo.METRICS:
        assert float(our_metrics[name]) == pytest.approx(their_metrics[name], abs=1e-5, rel=1e-5), name
    theirs = _hf_grads(trainer.model)
    flat = {tuple(getattr(k, "key", k) for k in path)[1:]: np.asarray(g)
            for path, g in jax.tree_util.tree_leaves_with_path(grads)}
    scale = max(np.abs(g).max() for g in theirs.values())
    for path, g in theirs.items():
        np.testing.assert_allclose(flat[path], g.reshape(flat[path].shape), atol=1e-5 * scale, err_msg=str(path))


def test_settings_trl_would_not_take_are_one_line():
    with pytest.raises(UserError, match="dpo.loss_type='kto': use one of sigmoid, ipo, hinge, robust"):
        dpo.check(0.1, "kto", 0.0, prefix="dpo.")
    with pytest.raises(UserError, match="only loss_type=robust uses it"):
        dpo.check(0.1, "sigmoid", 0.1, prefix="dpo.")
    with pytest.raises(UserError, match=r"robust loss needs it in \[0, 0.5\)"):
        dpo.check(0.1, "robust", 0.5, prefix="dpo.")
    with pytest.raises(UserError, match="beta=0: must be > 0"):
        dpo.check(0, "sigmoid", 0.0, prefix="dpo.")


# --- Training ----------------------------------------------------------------------------------------

def write_pairs(path: Path, count: int = 40) -> Path:
    rng = np.random.default_rng(0)
    prompts = ["Q: sky? A:", "Q: grass? A:", "Q: sun? A:", "Say:"]
    lines = [json.dumps({"prompt": prompts[rng.integers(4)], "chosen": " yes", "rejected": " no!"})
             for _ in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


DPO = {"train.objective": "dpo", "train.learning_rate": 1e-3, "train.batch_size": 4, "data.val_split": 0.2,
       "data.val_every": 5, "data.val_batch_count": 2, "checkpoint.save_every": 5}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A 10-step DPO run of the tiny model, never interrupted: (workdir, pairs file, its last metrics)."""
    tmp = tmp_path_factory.mktemp("dpo_straight")
    pairs = write_pairs(tmp / "pairs.jsonl")
    result = loop.run(tiny_config(tmp / "w", pairs, **DPO, **{"train.total_steps": 10}))
    return tmp / "w", pairs, result


def test_a_dpo_run_lowers_its_loss_raises_reward_accuracy_and_logs_trls_metrics(straight):
    workdir, _, result = straight
    records = [json.loads(line) for line in (workdir / "logs" / "run1" / "metrics.jsonl").read_text().splitlines()]
    first = records[0]
    assert first["val_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference: ln 2
    assert result["val_loss"] < 0.8 * math.log(2) and result["val_rewards/accuracies"] == 1.0
    steps = [r for r in records if "loss" in r]
    assert all(name in steps[-1] for name in dpo.METRICS)
    assert steps[-1]["loss"] < steps[0]["loss"] and steps[-1]["rewards/accuracies"] > steps[0]["rewards/accuracies"]
    assert (workdir / "checkpoint" / "run1" / "reference_logps.npz").is_file()


def test_a_dpo_run_resumed_after_sigterm_ends_bitwise_and_reads_its_reference(straight, tmp_path, capsys):
    _, pairs, _ = straight

    def terminate_at_3(step, metrics):
        if step == 3:
            signal.raise_signal(signal.SIGTERM)

    config = tiny_config(tmp_path, pairs, **DPO, **{"train.total_steps": 10})
    assert loop.run(config, on_step=terminate_at_3)["step"] < 10
    capsys.readouterr()
    loop.run(config)
    assert "reference: the log-probs of 32 pairs, computed when the run started" in capsys.readouterr().out
    _, ours = rundir.load_run_params(tmp_path / "checkpoint" / "run1")
    _, theirs = rundir.load_run_params(straight[0] / "checkpoint" / "run1")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), ours, theirs)


@pytest.mark.parametrize("lora", [False, True])
def test_a_reference_computed_every_step_trains_as_the_precomputed_one(tmp_path, lora):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    lora_settings = {"train.lora_rank": 4} if lora else {}
    results = [loop.run(tiny_config(tmp_path / str(precompute), pairs, **DPO, **lora_settings,
                                    **{"train.total_steps": 4, "dpo.precompute_reference": precompute}))
               for precompute in (True, False)]
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-5)
    assert results[0]["val_loss"] == pytest.approx(results[1]["val_loss"], rel=1e-5)


@pytest.mark.parametrize("line, message", [
    ("not json", ":2: not JSON"),
    ('{"prompt": "a", "chosen": "b"}', ':2: "rejected" is missing'),
    ('{"prompt": "a", "chosen": 3, "rejected": "c"}', ':2: "chosen" is not a string'),
])
@pytest.mark.usefixtures("no_compile")
def test_a_bad_pair_line_is_one_line_naming_file_and_line_before_anything_compiles(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n" + line + "\n")
    with pytest.raises(UserError, match=f"{path}{message}"):
        loop.run(tiny_config(tmp_path, path, **DPO))


def test_evaluate_prints_the_dpo_metrics_and_a_policy_equal_to_its_reference_gives_ln_2(straight, models, capsys):
    workdir, pairs, _ = straight
    run_dir = workdir / "checkpoint" / "run1"
    capsys.readouterr()
    cli_main(["evaluate", "--model_dir", str(run_dir), "--dataset", str(pairs), "--json"])
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the reference: the run's start
    assert trained["loss"] < math.log(2) and set(dpo.METRICS) <= set(trained)
    cli_main(["evaluate", "--model_dir", str(run_dir), "--dataset", str(pairs), "--reference_model", str(run_dir),
              "--json", "--loss_type", "sigmoid"])
    same = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert same["loss"] == math.log(2) and same["rewards/margins"] == 0.0
    with pytest.raises(SystemExit):
        cli_main(["evaluate", "--model_dir", str(models[0]), "--dataset", str(pairs)])
    assert "--reference_model is required" in capsys.readouterr().err


def test_accumulated_micro_batches_train_as_the_whole_batch_and_bfloat16_with_remat_trains(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    settings = {**DPO, "train.total_steps": 3, "data.val_every": 0, "model.remat": "full", "train.optimizer": "sgd",
                "train.learning_rate": 0.1}
    whole = loop.run(tiny_config(tmp_path / "whole", pairs, **{**settings, "train.batch_size": 4}))
    split = loop.run(tiny_config(tmp_path / "split", pairs, **{**settings, "train.batch_size": 2,
                                                              "train.accumulate_gradients": 2}))
    for name in ("loss", *dpo.METRICS):
        assert split[name] == pytest.approx(whole[name], rel=1e-5, abs=1e-6), name
    _, a = rundir.load_run_params(tmp_path / "whole" / "checkpoint" / "run1")
    _, b = rundir.load_run_params(tmp_path / "split" / "checkpoint" / "run1")
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a, b)
    half = loop.run(tiny_config(tmp_path / "bf16", pairs, **{**settings, "model.dtype": "bfloat16"}))
    assert half["loss"] == pytest.approx(whole["loss"], rel=0.05)


def test_dpo_through_lora_samples_while_training_and_exports_its_adapters(tmp_path, capsys):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    loop.run(tiny_config(tmp_path / "w", pairs, **DPO, **{"train.total_steps": 3, "train.lora_rank": 4,
                                                         "sample.sample_every": 3, "sample.sample_length": 4}))
    assert (tmp_path / "w" / "samples" / "run1" / "samples-3").is_file()
    cli_main(["export", "--model_dir", str(tmp_path / "w" / "checkpoint" / "run1"), "--out", str(tmp_path / "peft"),
              "--adapter_only"])
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    assert "adapters" in capsys.readouterr().out


def test_compare_reports_the_reward_metrics_of_dpo_runs(straight, tmp_path, capsys):
    workdir, pairs, _ = straight
    loop.run(tiny_config(workdir, pairs, **DPO, **{"train.total_steps": 4, "run_name": "short"}))
    cli_main(["compare", "run1", "short", "--workdir", str(workdir), "--out", str(tmp_path)])
    table = (tmp_path / "compare.md").read_text()
    assert "val_rewards/accuracies" in table and "rewards/margins" in table
    assert json.loads((tmp_path / "compare.json").read_text())["runs"][0]["val_rewards/accuracies"] == 1.0


def test_the_dpo_step_compiles_for_a_target_with_remat_auto(tmp_path):
    import subprocess
    import sys

    from conftest import FIXTURES, REPO, needs_module

    needs_module("jax_cuda12_plugin", "gpu-aot")
    done = subprocess.run([sys.executable, "launch.py", "--config=experiments/dpo.py", f"--workdir={tmp_path}",
                           f"--config.model.name={FIXTURES / 'openai_tiny'}", "--config.data.seq_len=16",
                           "--config.dpo.precompute_reference=False", "--config.model.remat=auto", "--target=h100"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled step (8 DPO pairs of 2 x 16 tokens, reference: a frozen copy of the weights)" in done.stdout
    assert "remat auto: " in done.stdout and "target h100: 1 devices" in done.stdout
