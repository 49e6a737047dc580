"""Experiments by name: --list, --dry_run for each experiment, the remat ablation end to end, bad names."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


def _launch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)


def test_list_shows_every_experiment_and_variant():
    done = _launch("--list")
    assert done.returncode == 0, done.stderr
    for name in ("demo.py", "finetune.py", "shakespeare.py", "remat_ablation.py", "documents.py", "sft.py", "lora.py"):
        assert f"experiments/{name}: " in done.stdout
    for variant in (":124M", ":355M", ":774M", ":1558M", ":tiny", ":default"):
        assert variant in done.stdout
    assert "base.py" not in done.stdout  # the base is not an experiment


@pytest.mark.parametrize("spec, params", [
    ("experiments/demo.py", None),
    ("experiments/finetune.py:124M", "124,439,808"),
    ("experiments/shakespeare.py", "124,439,808"),
    ("experiments/remat_ablation.py:tiny", None),
])
def test_dry_run_prints_config_params_flops_and_memory(spec, params, shared_dir, tmp_path):
    env = {**os.environ, "GPT2_JAX_SHARED": str(shared_dir)}
    done = _launch(f"--config={spec}", "--dry_run", f"--workdir={tmp_path}", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "train:" in out and "learning_rate" in out  # the resolved config
    assert "parameters: " in out and (params is None or f"parameters: {params}" in out)
    assert " GFLOP per device, peak memory " in out
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written
    # The from-scratch shape fields are printed only where they apply (fine-tuning takes model.name's shape).
    config_part = out.split("\nmodel: {")[0]
    assert ("  n_embd: " in config_part) == (spec in ("experiments/demo.py", "experiments/remat_ablation.py:tiny"))


@pytest.mark.parametrize("args", [[], ["--help"], ["-h"], ["--config=finetune.py", "--help"]], ids=str)
def test_help_lists_commands_flags_experiments_and_an_experiments_keys(args, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "launch.py"), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # from another directory
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr[-2000:]
    out = done.stdout
    assert "python launch.py --config=experiments/NAME.py[:VARIANT]" in out
    for flag in ("--config", "--workdir", "--list", "--dry_run", "--sweep", "--sweep_name", "--target"):
        assert f"  {flag}: " in out, flag
    if args[:1] == ["--config=finetune.py"]:
        assert "    :355M " in out and "experiments/demo.py" not in out  # its variants, not every experiment
        assert "train:" in out and "learning_rate: " in out and "base.py" in out  # every key with its value
    else:
        assert "experiments/demo.py: " in out and "experiments/finetune.py: " in out


@pytest.mark.parametrize("mode", ["sweep", "dry_run", "trian"])
def test_a_mode_the_config_cannot_name_is_one_line(mode, tmp_path):
    # --sweep and --dry_run are flags: as config.mode they would run without their flag's values
    done = _launch("--config=experiments/demo.py", f"--workdir={tmp_path}", f"--config.mode={mode}")
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == \
        f"launch.py: error: mode={mode!r}: use train or remat_ablation", done.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_remat_ablation_end_to_end(tmp_path):
    # one micro-batch keeps CI short; the variant's list (2,4) is exercised by dry runs and by hand
    done = _launch("--config=experiments/remat_ablation.py:tiny", f"--workdir={tmp_path}",
                   "--config.ablation.micro_batches=4")
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "ablation" / "remat_tiny"
    report = json.loads((out / "ablation.json").read_text())
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "ablation.md").read_text()
    rows = report["rows"]
    policies = {r["policy"] for r in rows}
    assert policies == {"none", "full", "dots", "dots_no_batch", "save_qkv", "save_attn", "save_named"}
    for r in rows:
        assert f"| {r['policy']} | {r['micro_batch']} |" in table
    for batch in (4,):
        by = {r["policy"]: r for r in rows if r["micro_batch"] == batch}
        assert by["full"]["temp_bytes"] < by["none"]["temp_bytes"]
        assert by["full"]["flops"] > by["none"]["flops"]
        for r in by.values():
            assert r["loss"] == pytest.approx(by["none"]["loss"], rel=1e-5), r["policy"]
            assert r["step_s"] > 0 and r["tokens_per_s"] > 0
    fits = report["meta"]["largest_micro_batch_within_budget"]
    assert set(fits) == policies and all(isinstance(v, int) for v in fits.values())


def test_bad_experiment_names_list_the_valid_ones():
    done = _launch("--config=experiments/finetuen.py")
    assert done.returncode == 2
    assert "no experiment file experiments/finetuen.py here" in done.stderr
    assert "the experiments are: demo.py, documents.py, dpo.py, finetune.py" in done.stderr
    done = _launch("--config=experiments/remat_ablation.py:2B")
    assert done.returncode == 2 and "use one of tiny, 124M, 355M, 774M, 1558M" in done.stderr


def test_the_ablation_times_what_fits_smallest_peak_first_and_bounds_hidden_device_peaks(tmp_path, monkeypatch):
    # CPU keeps no device peak: a fake one that, like the GPU's, only ever rises (it cannot be reset)
    from experiments import remat_ablation
    from gpt2_jax import ablation
    from gpt2_jax.resolve import model_config_of

    config = remat_ablation.get_config("tiny")
    config.model.n_ctx, config.model.n_layer, config.data.seq_len = 32, 1, 32
    config.ablation.policies, config.ablation.micro_batches = "none,full", "2"
    timed, peaks = [], iter([0, 500, 500, 500])  # before the first row, after each row; before the second run
    real_time = ablation._time
    monkeypatch.setattr(ablation, "_device_peak", lambda: next(peaks))
    monkeypatch.setattr(ablation, "_time", lambda *a: timed.append(a[2].remat) or real_time(*a))
    rows = ablation.run_ablation(config, model_config_of(config), tmp_path)
    first, second = sorted(rows, key=lambda r: r["peak_bytes"])
    assert timed == [first["policy"], second["policy"]]
    assert (first["device_peak_bytes"], first["device_peak_exact"]) == (500, True)
    assert (second["device_peak_bytes"], second["device_peak_exact"]) == (500, False)  # hidden by the first's
    table = (tmp_path / "ablation.md").read_text()
    assert f"| {second['policy']} | 2 | {second['peak_bytes'] / 2**30:.3f} | <= 0.000 |" in table
    assert f"| {first['policy']} | 2 | {first['peak_bytes'] / 2**30:.3f} | 0.000 |" in table
    # a candidate whose compiled peak exceeds the budget is compiled and reported, never run
    timed.clear()
    config.ablation.memory_budget_gb = first["peak_bytes"] / 2**30 / 2
    rows = ablation.run_ablation(config, model_config_of(config), tmp_path / "tight")
    assert timed == [] and not any("step_s" in r for r in rows) and all(r["flops"] > 0 for r in rows)
    assert f"| {first['policy']} | 2 | {first['peak_bytes'] / 2**30:.3f} | n/a |" in \
        (tmp_path / "tight" / "ablation.md").read_text()
