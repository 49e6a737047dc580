"""A profiler window in a training run, and the table of where a trace's time goes.

With profile.start_step > 0, `ProfileWindow` (a hook: a row of loop.HOOKS) traces the profile.steps steps after that
step with jax.profiler into WORKDIR/logs/RUN/profile/ (in a multi-process job, each process its own trace under
process_N/), which TensorBoard's profile plugin and ui.perfetto.dev read; the run's results are unchanged.
`time_breakdown` sums a trace's op time by op (or, given the compiled step's HLO text, by place in the step) and by
kind: `gpt2-jax profile-summary` and `bench/train.py --profile` print it.
"""

from __future__ import annotations

import atexit
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import jax
from tqdm import tqdm

from gpt2_jax import storage
from gpt2_jax.errors import UserError
from gpt2_jax.hooks import Hook, Run
from gpt2_jax.train import TrainState

# --- Where the time goes -----------------------------------------------------------------------------------

# Kernel or XLA op names (and the JAX name stacks they came from) -> what they compute; first match wins.
CATEGORIES = (
    ("attention", ("sdpa", "fmha", "flash", "attention", "cudnn")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "dot")),
    ("collective", ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "nccl")),
    ("copy", ("memcpy", "memset", "copy", "transpose")),
)
MODEL_PARTS = ("attn", "mlp", "ln_1", "ln_2", "ln_f", "c_attn", "c_proj", "c_fc")


def category(name: str) -> str:
    """What a kernel or op computes, by its name: attention, matmul, collective, copy, or other."""
    lowered = name.lower().replace("transpose(", "(")  # JAX's name stacks mark the backward pass transpose(jvp(...))
    return next((cat for cat, keys in CATEGORIES if any(k in lowered for k in keys)), "other (fusions)")


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (what it runs: opcode, custom-call target such as __cublas$gemm, called
    computation; the JAX name stack it was lowered from, its metadata op_name)."""
    found = re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = ([^\n]*?)metadata=\{[^\n]*?op_name="([^"]*)"', hlo_text, re.M)
    return {m.group(1): (_what_it_runs(m.group(2)), m.group(3).split(";")[0]) for m in found}


def _what_it_runs(instruction: str) -> str:
    """An HLO instruction's opcode, custom-call target and called computation (not its operands' names)."""
    patterns = (r"[\]}) ]([a-z][\w\-]*)\(", r'custom_call_target="([^"]*)"', r"calls=%?([\w.\-]+)")
    found = (re.search(pattern, instruction) for pattern in patterns)
    return " ".join(m.group(1) for m in found if m)


def place_in_step(stack: str) -> str:
    """A readable place in the training step for a JAX name stack: the pass and the part of the model."""
    phase = "backward" if "transpose(jvp" in stack else "forward" if "jvp(" in stack else "update"
    if "GPT2." not in stack:
        return f"{phase} {'loss' if phase != 'update' else '(optimizer)'}"
    inside = stack.split("GPT2.", 1)[1]
    parts = [c for c in inside.split("/") if c in MODEL_PARTS]
    if inside.startswith("logits"):
        where = "logits (tied wte)"
    elif not parts:
        where = "embeddings" if "_take" in inside or "wpe" in inside else "other"
    elif parts == ["attn"]:
        where = "attn softmax(QK^T)V"
    else:
        where = ".".join(parts)
    return f"{phase} {where}"


class Trace(NamedTuple):
    """What a trace file says: every op the accelerators (else the CPU) ran, as (HLO op or kernel name, its
    program, duration ns), and on how many devices; the program that took the most time and its executions in
    the trace (None: not recorded); the traced wall time."""

    file: str
    events: list[tuple[str, str, float]]
    devices: int
    program: str
    executions: int | None
    wall_s: float


def trace_files(directory: str | Path) -> list[Any]:
    """The traces (*.xplane.pb) under a directory (a path or a URL), sorted."""
    return [f for f in storage.files_of(directory) if str(f).endswith(".xplane.pb")]


def newest_trace(directory: str | Path) -> tuple[Any, int]:
    """The newest trace under a directory (the first process's, where a session holds several) and how many
    there are; one line when there is none."""
    files = trace_files(directory)
    if not files:
        raise UserError(f"{directory}: no profiler trace (*.xplane.pb) under it; give a run's logs/RUN/profile "
                        "directory (profile.start_step) or one jax.profiler wrote")
    return max(files, key=lambda f: f.parent.name), len(files)  # session folders are named by their start time


def read_trace(file: Any) -> Trace:
    """The ops of one trace file (a path or a URL)."""
    from jax.profiler import ProfileData

    with storage.local_copy(file) as local:
        data = ProfileData.from_file(str(local))
    events: list[tuple[str, str, float]] = []
    modules: dict[str, float] = {}  # each program's time
    runs: dict[str, int] = {}  # each program's executions
    run_ids: dict[str, set] = {}
    span, devices = (0.0, 0.0), 0
    for plane in data.planes:
        stats = dict(plane.stats)
        if "profile_start_time" in stats:  # the session's own start and stop
            span = (float(stats["profile_start_time"]), float(stats["profile_stop_time"]))
        if plane.name.startswith("/device:"):  # accelerators: XLA's op line, else the kernels on each stream
            lines = list(plane.lines)
            for ln in lines:
                if ln.name == "XLA Modules":  # one event per execution of a program, "NAME(ID)", on each device
                    here: dict[str, int] = {}
                    for e in ln.events:
                        name = e.name.rsplit("(", 1)[0]
                        here[name] = here.get(name, 0) + 1
                        modules[name] = modules.get(name, 0.0) + e.duration_ns
                    runs.update({name: max(n, runs.get(name, 0)) for name, n in here.items()})
            picked = ([ln for ln in lines if ln.name == "XLA Ops"]
                      or [ln for ln in lines if ln.name.startswith("Stream")] or lines)
            ops = [(_op_name(e), str(dict(e.stats).get("hlo_module", "")), e.duration_ns)
                   for ln in picked for e in ln.events]
            events, devices = events + ops, devices + bool(ops)
    if not events:  # CPU: XLA's executor tags each op it runs with its HLO name, its program and the execution
        for plane in data.planes:
            for e in (e for ln in plane.lines for e in ln.events if "hlo_op" in dict(e.stats)):
                stats = dict(e.stats)
                module = str(stats.get("hlo_module", ""))
                events.append((_op_name(e), module, e.duration_ns))
                modules[module] = modules.get(module, 0.0) + e.duration_ns
                if "run_id" in stats:
                    run_ids.setdefault(module, set()).add(stats["run_id"])
        runs = {name: len(ids) for name, ids in run_ids.items()}
    program = max(modules, key=modules.get, default="")
    wall_s = (span[1] - span[0]) / 1e9 if span[1] > span[0] else sum(d for _, _, d in events) / 1e9
    return Trace(str(file), events, max(devices, 1), program, runs.get(program), wall_s)


def _op_name(event: Any) -> str:
    return str(dict(event.stats).get("hlo_op", event.name))


def time_breakdown(trace: Trace, steps: int, wall_s: float, hlo_text: str = "", top: int = 16) -> list[tuple]:
    """Rows (op, or place in the step given the compiled step's HLO text; category; ms per step and device;
    share) of a trace of `steps` steps: the wall time, the ops' total, each category, then the `top` ops by time.
    Another program's ops (not trace.program) are summed by program."""
    instructions = hlo_instructions(hlo_text)
    busy = sum(d for _, _, d in trace.events) or 1.0
    by_place: dict[tuple[str, str], float] = {}
    by_category: dict[str, float] = {}
    for name, module, d in trace.events:
        if module and trace.program and module != trace.program:
            key = (f"program {module}", category(module))
        else:
            instruction, stack = instructions.get(name, ("", ""))
            # what it computes, by its name, its instruction (a GPU matmul is a custom call to cuBLAS), its stack
            kind = category(f"{name} {instruction} {stack}")
            key = (place_in_step(stack), kind) if stack else (name[:60], kind)
        by_place[key] = by_place.get(key, 0.0) + d
        by_category[key[1]] = by_category.get(key[1], 0.0) + d
    ms = lambda ns: f"{ns / steps / trace.devices / 1e6:.2f}"  # noqa: E731
    rows = [("wall time", "", f"{wall_s / steps * 1e3:.2f}", ""),
            ("total: ops, summed", "", ms(busy), f"{busy / trace.devices / 1e9 / wall_s:.0%} of wall")]
    rows += [(f"all {cat}", cat, ms(d), f"{d / busy:.1%}")
             for cat, d in sorted(by_category.items(), key=lambda kv: -kv[1])]
    rows += [(place, cat, ms(d), f"{d / busy:.1%}")
             for (place, cat), d in sorted(by_place.items(), key=lambda kv: -kv[1])[:top]]
    if any(name.startswith("command_buffer") for name, _, _ in trace.events):  # XLA's CUDA graphs: one event for many
        rows.append(("ops inside XLA command buffers are not seen one by one: rerun with "
                     "XLA_FLAGS=--xla_gpu_enable_command_buffer=", "", "", ""))
    return rows


def summary(directory: str | Path, top: int = 16) -> str:
    """`gpt2-jax profile-summary`: the table of the newest trace under a directory, per execution of its busiest
    program (a training step, in a run's window)."""
    if top < 1:
        raise UserError(f"--top {top}: must be >= 1")
    file, count = newest_trace(directory)
    trace = read_trace(file)
    steps = trace.executions or 1
    each = f"per execution of {trace.program} ({steps} traced)" if trace.executions else "in the whole trace"
    each += f", the mean of {trace.devices} devices" if trace.devices > 1 else ""
    others = f"; the newest of {count} traces: give a folder to choose" if count > 1 else ""
    lines = [f"Where the time goes in {file}, ms {each}{others}", "",
             "| op (top by time) | category | ms | share |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in time_breakdown(trace, steps, trace.wall_s, top=top)]
    return "\n".join(lines)


# --- The window in a run -----------------------------------------------------------------------------------

def check_profile(config: Any) -> None:
    """profile.start_step and profile.steps: a window that opens and closes within the run, else one line."""
    p, total = config.profile, config.train.total_steps
    if p.start_step < 0:
        raise UserError(f"profile.start_step={p.start_step}: must be >= 0 (0 = no profiler trace)")
    if p.start_step and p.steps < 1:
        raise UserError(f"profile.steps={p.steps}: must be >= 1 (the steps traced after profile.start_step)")
    if p.start_step and total and p.start_step + p.steps > total:
        raise UserError(f"profile.start_step={p.start_step} + profile.steps={p.steps} ends after "
                        f"train.total_steps={total}: the trace would cover steps the run never takes")


_open: ProfileWindow | None = None  # the window whose trace is open in this process (jax traces one at a time)


@atexit.register
def _close_at_exit() -> None:
    """A trace a failed run left open is written (and a store's uploaded) when the process ends, or before the
    next window in this process opens."""
    if _open is not None:
        try:
            _open.close(None, None)
        except Exception as e:  # noqa: BLE001 - the run has failed already: say it, do not hide its failure
            print(f"profile: the trace open at the run's failure was not saved ({type(e).__name__}: {e})")


class ProfileWindow(Hook):
    """A jax.profiler trace of steps profile.start_step + 1 ... + profile.steps: opened at start_step once the
    step's work (and the other hooks' at it) has ended, closed at start_step + profile.steps once that step's has;
    forced at the run's end when it stops inside the window. A run resumed at or after start_step traces nothing
    (its first step compiles). Opening and writing the trace pause the run: the next step's tokens/s leaves them
    out, as validation's; the traced steps' own are measured with the profiler on. The other hooks' work at the
    window's last step (validation, a checkpoint; at a stop, the last checkpoint) is in the trace."""

    pauses = True

    def __init__(self, config: Any, run: Run):
        p = config.profile
        self.first, self.last, self.run = p.start_step, p.start_step + p.steps, run
        self.at_end = "always" if self.first > 0 else "never"  # build_hooks keeps it when on; see forced_at_end
        self.root = storage.path(config.workdir) / "logs" / config.run_name / "profile"
        # each process its own trace: processes on one host would write the same file names into one folder
        self.target = self.root / f"process_{jax.process_index()}" if jax.process_count() > 1 else self.root
        self.local: Path | None = None  # where the open trace is written (a temporary directory for a store)
        self.opened_at = 0

    def due(self, step: int) -> bool:
        return self.first > 0 and (step == self.first or (self.local is not None and step == self.last))

    def forced_at_end(self, step: int, completed: bool) -> bool:
        return self.local is not None  # never leave a trace open

    def __call__(self, step: int, state: TrainState) -> dict[str, float]:
        if self.local is None and step == self.first:
            self.open(step, state)
        elif self.local is not None:
            self.close(step, state)
        return {}

    def open(self, step: int, state: TrainState) -> None:
        """Start the trace once the step's work has ended (so none of it is traced)."""
        global _open
        _close_at_exit()  # a trace an earlier failed run in this process left open
        jax.block_until_ready(state)
        # jax.profiler writes to a local directory: a temporary one for a store's target, uploaded at the close
        self.local = Path(tempfile.mkdtemp(prefix="gpt2_jax_profile_")) if storage.is_url(self.target) else \
            storage.path(self.target)
        try:  # perfetto_trace.json.gz beside the trace: what ui.perfetto.dev opens
            jax.profiler.start_trace(self.local, create_perfetto_trace=True)
        except RuntimeError as e:  # another jax.profiler trace is running in this process
            raise UserError(f"profile.start_step={self.first}: cannot start the trace ({e})") from None
        self.opened_at, _open = step, self

    def close(self, step: int | None, state: TrainState | None) -> None:
        """Stop the trace once step `step`'s work has ended, written under logs/RUN/profile/ (a store's uploaded
        there, nothing left locally). Without a step: at the process's exit after a failure."""
        global _open
        local, self.local, _open = self.local, None, None
        if state is not None:
            jax.block_until_ready(state)
        try:
            jax.profiler.stop_trace()
            if storage.is_url(self.target):
                def upload() -> None:
                    for f in sorted(p for p in local.rglob("*") if p.is_file()):
                        storage.upload(f, self.target / f.relative_to(local).as_posix())
                if step is None:  # at exit: the run has failed already
                    upload()
                else:  # a failed upload is the job's failure, as a failed log write
                    self.run.agreement.hold(upload)
        finally:
            if storage.is_url(self.target):
                shutil.rmtree(local, ignore_errors=True)
        if self.run.is_main:
            first = self.opened_at + 1
            steps = (f"the steps after {self.opened_at}" if step is None else "no step" if step < first else
                     f"step {step}" if step == first else f"steps {first}-{step}")
            each = " (process_N/: one trace per process)" if self.target != self.root else ""
            why = " (the run ended inside the window)" if step != self.last else ""
            tqdm.write(f"profile: {steps} traced into {self.root}{each}{why}; gpt2-jax profile-summary {self.root}")
