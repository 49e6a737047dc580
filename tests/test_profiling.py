"""The profiler window of a run (profile.start_step, profile.steps) and `gpt2-jax profile-summary`: the trace
covers exactly its steps, on a disk and in a store, a stop inside it still writes it, the run's results are
bitwise those of a run without it; the table of where the time goes; bad input is one line."""

from __future__ import annotations

import signal
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import FIXTURES
from gpt2_jax import checkpoints, loop, rundir, storage
from gpt2_jax.cli import main as cli_main
from gpt2_jax.errors import UserError
from gpt2_jax.profiling import category, hlo_instructions, place_in_step, read_trace, trace_files
from gpt2_jax.settings import check_config
from test_loop import read_metrics, tiny_config

DATASET = FIXTURES / "make_openai_checkpoint.py"
RUN = {"train.total_steps": 6, "checkpoint.save_every": 3}
TIMING = ("tokens_per_sec", "mfu", "time")  # a record's clock readings: the only fields a trace may change


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("plain")
    loop.run(tiny_config(workdir, DATASET, **RUN))
    return workdir


def checksums(run_dir, step: int) -> dict:
    """What a checkpoint's metadata records of every array it holds (params, Adam's moments)."""
    meta = checkpoints.make_manager(run_dir, read_only=True).restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta
    return meta["checksums"]


def test_a_window_traces_exactly_its_steps_and_leaves_every_result_bitwise_alike(tmp_path, plain_run,
                                                                                  capsys):
    loop.run(tiny_config(tmp_path, DATASET, **RUN, **{"profile.start_step": 2, "profile.steps": 2}))
    profile = tmp_path / "logs" / "run1" / "profile"
    [trace] = trace_files(profile)
    assert trace.parent.parent == profile / "plugins" / "profile"  # where TensorBoard's profile plugin looks
    assert (trace.parent / "perfetto_trace.json.gz").is_file()  # what ui.perfetto.dev opens
    read = read_trace(trace)
    assert read.program == "jit_train_step" and read.executions == 2  # steps 3 and 4, nothing before or after
    assert "profile: steps 3-4 traced into" in capsys.readouterr().out
    strip = lambda records: [{k: v for k, v in r.items() if k not in TIMING} for r in records]  # noqa: E731
    assert strip(read_metrics(tmp_path)) == strip(read_metrics(plain_run))
    run_dir, plain_dir = tmp_path / "checkpoint" / "run1", plain_run / "checkpoint" / "run1"
    for step in (3, 6):
        assert checksums(run_dir, step) == checksums(plain_dir, step)
    _, params = rundir.load_run_params(run_dir)
    _, reference = rundir.load_run_params(plain_dir)
    jax.tree.map(np.testing.assert_array_equal, params, reference)

    cli_main(["profile-summary", str(profile), "--top", "5"])
    table = capsys.readouterr().out.splitlines()
    assert "per execution of jit_train_step (2 traced)" in table[0]
    rows = [line.split(" | ") for line in table if line.startswith("| ")][1:]
    names = [row[0].lstrip("| ") for row in rows]
    assert names[:2] == ["wall time", "total: ops, summed"] and any(n.startswith("all ") for n in names)
    assert float(rows[1][2]) > 0  # the ops' total, ms per step
    ops = [row for row in rows if not row[0].lstrip("| ").startswith(("wall", "total", "all "))]
    assert 1 <= len(ops) <= 5 and all(float(row[2]) >= 0 for row in ops)


def test_a_stop_inside_the_window_writes_the_trace_of_the_steps_taken(tmp_path, capsys):
    def ctrl_c_at_3(step, metrics):
        if step == 3:
            signal.raise_signal(signal.SIGINT)  # the same path a real Ctrl-C takes

    fields = {"train.total_steps": 0, "train.dispatch_ahead": False, "checkpoint.save_every": 2,
              "profile.start_step": 2, "profile.steps": 3}
    assert loop.run(tiny_config(tmp_path, DATASET, **fields), on_step=ctrl_c_at_3)["step"] == 3
    [trace] = trace_files(tmp_path / "logs" / "run1" / "profile")
    assert read_trace(trace).executions == 1  # step 3, closed at the stop
    out = capsys.readouterr().out
    assert "profile: step 3 traced into" in out and "(the run ended inside the window)" in out
    jax.profiler.start_trace(tmp_path / "again")  # no trace was left open
    jax.profiler.stop_trace()


def test_a_window_in_a_store_is_uploaded_and_nothing_is_left_locally(gcs, tmp_path, monkeypatch):
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the trace is written before its upload
    workdir = gcs.url("profiled")
    loop.run(tiny_config(workdir, DATASET, **{"train.total_steps": 3, "profile.start_step": 1, "profile.steps": 1}))
    profile = storage.path(workdir) / "logs" / "run1" / "profile"
    [trace] = trace_files(profile)
    assert read_trace(trace).executions == 1
    assert any(str(f).endswith("perfetto_trace.json.gz") for f in storage.files_of(profile))
    assert not list((tmp_path / "tmp").glob("gpt2_jax_profile_*"))


@pytest.mark.parametrize("fields, field", [
    ({"profile.start_step": -1}, "profile.start_step=-1"),
    ({"profile.start_step": 2, "profile.steps": 0}, "profile.steps=0"),
    ({"profile.start_step": 5, "profile.steps": 3, "train.total_steps": 7}, "train.total_steps=7"),
])
def test_a_window_that_cannot_run_is_one_line_at_the_config_check(tmp_path, fields, field):
    with pytest.raises(UserError, match=field.replace("+", r"\+")) as e:
        check_config(tiny_config(tmp_path, DATASET, **fields))
    assert "\n" not in str(e.value)
    check_config(tiny_config(tmp_path, DATASET, **{"profile.start_step": 4, "profile.steps": 3,
                                                   "train.total_steps": 7}))  # ends at the last step: fine


def test_a_directory_without_a_trace_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for directory in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(SystemExit) as e:
            cli_main(["profile-summary", str(directory)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "no profiler trace" in err


def test_op_categories_tell_backward_fusions_from_copies():
    backward = "jit(step)/transpose(jvp(GPT2))/GPT2.hidden/h_0/mlp"  # the name stack of a backward-pass op
    hlo = (f'  %custom-call.12 = (bf16[64,32]{{1,0}}, s8[4]{{0}}) custom-call(bf16[64,8]{{1,0}} %fusion.3, '
           f'bf16[8,32]{{1,0}} %copy.4), custom_call_target="__cublas$gemm", metadata={{op_name="{backward}/c_fc/'
           f'transpose" source_file="model.py"}}, backend_config={{}}\n'
           f'  %loop_multiply_fusion.3 = bf16[64,32]{{1,0}} fusion(bf16[64,32]{{1,0}} %dot.5, f32[] %copy.2), '
           f'kind=kLoop, calls=%fused_multiply.3, metadata={{op_name="{backward}/gelu/mul"}}\n'
           f'  ROOT %copy.7 = f32[8,32]{{0,1}} copy(f32[8,32]{{1,0}} %param.1), metadata={{op_name="{backward}/x"}}\n')
    kinds = {name: category(f"{name} {runs} {stack}") for name, (runs, stack) in hlo_instructions(hlo).items()}
    # a cuBLAS call is a matmul whatever its stack; a backward fusion is not a copy for its operands' names
    # or for the transpose(...) that marks the backward pass in JAX's name stacks
    assert kinds == {"custom-call.12": "matmul", "loop_multiply_fusion.3": "other (fusions)", "copy.7": "copy"}
    assert place_in_step(hlo_instructions(hlo)["custom-call.12"][1]) == "backward mlp.c_fc"
    assert category("loop_transpose_fusion.2") == "copy" and category("nvjet_tst_gemm") == "matmul"

