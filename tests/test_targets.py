"""Compiling for an accelerator that is not attached (launch.py --target): names, bad input, and the
training step compiled for a TPU (libtpu) and an NVIDIA GPU (the CUDA plugin), data parallel and FSDP.

The compile tests need the optional extras `tpu-aot` and `gpu-aot` (.ci/run installs both); they skip
without them on a developer's machine and fail instead under CI (CI=true).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from gpt2_jax import targets
from gpt2_jax.errors import UserError
from tests.conftest import REPO, needs_module

LINE = re.compile(r"^target (\S+): (\d+) devices, mesh data=(\d+) fsdp=(\d+), peak (\d+\.\d{3}) GiB of "
                  r"(\d+\.\d{3}) GiB per device, (fits|does not fit)$", re.M)
# Wide enough that the weights and Adam's state, which FSDP shards, outweigh the activations.
TINY = ["--config=experiments/demo.py", "--config.model.vocab=bytes", "--config.model.n_layer=2",
        "--config.model.n_embd=256", "--config.model.n_head=4", "--config.model.n_ctx=64", "--config.data.seq_len=64",
        "--config.model.dtype=bfloat16", "--config.train.batch_size=8"]


def _needs(module: str) -> None:
    needs_module(module, "tpu-aot,gpu-aot")


def _launch(*args: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch.py", *args, f"--workdir={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name, platform, devices, topology, memory_gib", [
    ("v4-8", "tpu", 4, "v4:2x2x1", 32), ("v5p-8", "tpu", 4, "v5p:2x2x1", 95), ("v5e-1", "tpu", 1, "v5e:1x1", 16),
    ("v5e-8", "tpu", 8, "v5e:2x4", 16), ("v5e-256", "tpu", 256, "v5e:16x16", 16), ("v6e-8", "tpu", 8, "v6e:2x4", 32),
    ("v4-32", "tpu", 16, "v4:2x2x4", 32), ("v5e:4x4", "tpu", 16, "v5e:4x4", 16),
    ("h100", "gpu", 1, "1x1x1", 81559 / 1024), ("H200x8", "gpu", 8, "1x1x8", 143771 / 1024),
    ("a100-40gbx16", "gpu", 16, "1x2x8", 40),
])
def test_names_resolve_as_gcp_and_nvidia_count(name, platform, devices, topology, memory_gib):
    t = targets.parse_target(name)
    assert (t.platform, t.num_devices, t.topology) == (platform, devices, topology)
    assert t.memory_bytes == pytest.approx(memory_gib * 2**30)
    assert t.budget_bytes() == pytest.approx(0.9 * t.memory_bytes) and t.budget_bytes(2.0) == 2 * 2**30


@pytest.mark.parametrize("name, message", [
    ("v5e-3", "v5e slices come in sizes 1, 4, 8"), ("v4:2x2", "a v4 topology has 3 axes"),
    ("tpu-v9", "unknown target"), ("h100x9", "more than 8 GPUs come 8 to a host"),
    ("missing.txtpb", "cannot read the GPU description missing.txtpb"),
])
def test_bad_names_are_one_line(name, message):
    with pytest.raises(UserError, match=re.escape(message)) as e:
        targets.parse_target(name)
    assert "\n" not in str(e.value)


def test_a_users_gpu_file_is_read_and_a_malformed_one_refused(tmp_path):
    own = tmp_path / "my_gpu.txtpb"
    own.write_text(targets.gpu_target_config(targets.GPUS["a100-80gb"], (9, 8, 0)).replace(
        "NVIDIA A100-SXM4-80GB", "NVIDIA A100 test part"))
    t = targets.parse_target(f"{own}x4")
    assert (t.platform, t.num_devices, t.memory_bytes, t.peak_bf16_flops) == ("gpu", 4, 81920 * 2**20, 312e12)
    assert 'name: "NVIDIA A100 test part"' in t.gpu_config and "minor: 0" in t.gpu_config
    (tmp_path / "bad.txtpb").write_text("not a proto")
    with pytest.raises(UserError, match="is not a text-format GpuTargetConfigProto"):
        targets.parse_target(str(tmp_path / "bad.txtpb"))


def test_hopper_descriptions_ask_for_sm90a():
    h100 = targets.gpu_target_config(targets.GPUS["h100"], (9, 8, 0))
    assert "major: 9" in h100 and "ACCELERATED_FEATURES" in h100 and "core_count: 132" in h100
    assert "ACCELERATED_FEATURES" not in targets.gpu_target_config(targets.GPUS["a100-40gb"], (9, 8, 0))


def test_a_missing_extra_is_one_line_naming_the_install(monkeypatch):
    monkeypatch.setattr(targets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=re.escape('needs libtpu, which is not installed: pip install -e ".[tpu-aot]"')):
        targets.parse_target("v5e-8").devices()
    with pytest.raises(UserError, match=re.escape('needs jax_cuda12_plugin, which is not installed: pip install -e '
                                                  '".[gpu-aot]"')):
        targets.parse_target("h100").devices()


def test_device_defaults_follow_the_target():
    from gpt2_jax.model import GPT2Config

    cfg = GPT2Config(n_vocab=300, n_ctx=32, n_embd=32, n_head=4, n_layer=1, dtype="bfloat16")
    gpu, tpu = targets.for_target(cfg, targets.parse_target("h100")), targets.for_target(cfg, targets.parse_target("v5e-4"))
    assert (gpu.attention, gpu.vocab_multiple) == ("cudnn", 128)
    assert (tpu.attention, tpu.vocab_multiple) == ("xla", 128)
    assert targets.for_target(GPT2Config(n_embd=32, n_head=4, vocab_multiple=1), targets.parse_target("h100")).attention == "xla"


def test_cli_lists_targets_and_refuses_bad_ones_in_one_line(tmp_path):
    listed = _launch("--target=list", tmp_path=tmp_path)
    assert listed.returncode == 0 and "v5e-8 = v5e:2x4" in listed.stdout and "h100 " in listed.stdout
    bad = _launch(*TINY, "--target=v7x-8", tmp_path=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("launch.py: error: --target=v7x-8: unknown target")


def _fit(done: subprocess.CompletedProcess) -> tuple:
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    found = LINE.findall(done.stdout)
    assert len(found) == 1, done.stdout[-2000:]
    name, n, data, fsdp, peak, memory, verdict = found[0]
    return name, int(n), int(data), int(fsdp), float(peak), float(memory), verdict


@pytest.mark.parametrize("target, module, devices", [("v5e-4", "libtpu", 4), ("a100-80gbx4", "jax_cuda12_plugin", 4)])
def test_tiny_step_compiles_for_the_target_and_fsdp_shrinks_the_peak(target, module, devices, tmp_path):
    _needs(module)
    rows = []
    for fsdp in (1, devices):  # with document masking: on the GPU, cuDNN's attention takes the mask
        done = _launch(*TINY, "--dry_run", f"--target={target}", f"--config.mesh.fsdp={fsdp}",
                       "--config.data.document_mask=True", tmp_path=tmp_path)
        rows.append(_fit(done))
        assert "(compile-only)" in done.stdout
        # (JAX's cuDNN partitioning rule refuses the mask's bias under FSDP: XLA's attention then, said in a line)
        cudnn = module == "jax_cuda12_plugin" and fsdp == 1
        assert f"attention={'cudnn' if cudnn else 'xla'}" in done.stdout, done.stdout[-1500:]
    (_, n, data, fsdp1, peak1, memory, verdict), (_, _, data4, fsdp4, peak4, _, _) = rows
    assert (n, data, fsdp1, data4, fsdp4, verdict) == (devices, devices, 1, 1, devices, "fits")
    assert peak4 < peak1  # FSDP shards the weights and the optimizer state
    assert memory == pytest.approx(targets.parse_target(target).memory_bytes / 2**30, abs=1e-3)


def test_a_124m_step_compiles_for_a_tpu_and_auto_remat_uses_the_gpus_budget(tmp_path):
    _needs("libtpu")
    _needs("jax_cuda12_plugin")
    big = ["--config=experiments/finetune.py:124M", "--config.model.dtype=bfloat16", "--config.model.scan_layers=True",
           "--config.train.batch_size=8", "--config.data.seq_len=256"]
    name, n, data, fsdp, peak, memory, verdict = _fit(_launch(*big, "--dry_run", "--target=v5e-8",
                                                              "--config.mesh.fsdp=8", tmp_path=tmp_path))
    assert (name, n, data, fsdp, memory, verdict) == ("v5e-8", 8, 1, 8, 16.0, "fits") and 0.1 < peak < 16
    # 64 windows of 1024 tokens on one v5e chip: libtpu refuses to compile it, which is "does not fit"
    refused = _launch(*big, "--dry_run", "--target=v5e-1", "--config.train.batch_size=64", "--config.data.seq_len=1024",
                      tmp_path=tmp_path)
    assert _fit(refused)[-1] == "does not fit" and _fit(refused)[4] > 16
    assert "the compiler refused it: out of memory" in refused.stdout
    done = _launch(*TINY, "--target=h100", "--config.model.remat=auto", "--config.train.batch_size=4", tmp_path=tmp_path)
    _fit(done)
    budget = 0.9 * 81559 / 1024
    assert re.search(r"^remat auto: none, micro-batch 4 x accumulate 1, peak \d+\.\d{3} GiB of budget "
                     rf"{budget:.3f} GiB$", done.stdout, re.M), done.stdout[-2000:]
    assert "candidates are not timed" in done.stdout


def test_the_ablation_compiles_for_the_target_only(tmp_path):
    _needs("libtpu")
    done = _launch("--config=experiments/remat_ablation.py:tiny", "--target=v5e-4", "--config.ablation.policies=none,full",
                   "--config.ablation.micro_batches=16", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "ablation" / "remat_tiny"
    assert "4 x TPU v5 lite (compiled for target v5e-4: nothing ran)" in (out / "ablation.md").read_text()
    report = json.loads((out / "ablation.json").read_text())
    assert report["meta"]["memory_budget_gb"] == pytest.approx(0.9 * 16)  # the target's memory less the headroom
    none, full = report["rows"]
    assert "step_s" not in none and "step_s" not in full  # compiled, never run
    assert full["flops"] > none["flops"] > 0  # the TPU compiler counts remat's recomputed forward pass
