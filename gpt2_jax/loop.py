"""The training loop: the steps and, after each, its record and the hooks due (hooks.py). Everything with side
effects lives here and in the modules it drives: the run's start (start.py), its logs (logs.py), how it stops
and fails (faults.py), its lock (lock.py), its checkpoints (checkpoints.py) and directory (rundir.py).

WORKDIR/checkpoint/RUN/  orbax steps + hparams.json, vocabulary, run_config.json (a model directory: rundir.py)
WORKDIR/samples/RUN/     samples-STEP text files
WORKDIR/logs/RUN/        metrics.jsonl, TensorBoard event files, run_config.json, curves.png
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable

import jax
from tqdm import tqdm

from gpt2_jax import checkpoints, eval_tasks, faults, hooks, parallel, profiling, storage
from gpt2_jax.errors import UserError
from gpt2_jax.lock import RunLease, claim_run
from gpt2_jax.logs import Meter, RunLogs, peak_flops
from gpt2_jax.rundir import RunDir
from gpt2_jax.settings import check_config
from gpt2_jax.start import Start, start
from gpt2_jax.steps import flops_per_token


# Every periodic action, in the order they act at a step: (name, hook class made from the config and the run).
HOOKS: tuple[tuple[str, Callable[[Any, hooks.Run], hooks.Hook]], ...] = (
    ("validation", hooks.Validation),
    ("eval_tasks", eval_tasks.EvalTasks),
    ("hellaswag", eval_tasks.HellaSwag),
    ("sampling", hooks.Sampling),
    ("checkpoint", hooks.Checkpointing),
    ("profile", profiling.ProfileWindow),  # last: the other hooks' work at its first step is not traced
)


def build_hooks(config: Any, run: hooks.Run) -> list[hooks.Hook]:
    """Every hook the config asks for (one with nothing to do, `every` 0 and not always at the end, left out)."""
    made = [make(config, run) for _, make in HOOKS]
    return [h for h in made if h.every > 0 or h.at_end == "always"]


def run(config: Any, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train as the config says; returns the last step's metrics. `on_step(step, metrics)` is for tests."""
    parallel.init_distributed(config.parallel)  # before anything touches a device
    check_config(config)  # a config that cannot run: one line before anything is written
    faults.quiet_orbax()  # before BackgroundFailures saves (and at its end restores) the hooks it wraps
    workdir = storage.path(config.workdir)
    if storage.is_url(workdir):  # before the first file system is made: each keeps the retries it was made with
        storage.bound_retries(config.checkpoint.store_timeout_s)
    storage.check_writable(workdir, "--workdir")  # a bucket that is missing or read-only: one line, exit 2
    run_dir = RunDir(workdir / "checkpoint" / config.run_name)
    # The claim: one job per run, taken before anything is written. A stop asked for while the run starts
    # (a preemption during compilation) is acted on at the first step.
    with parallel.peer_loss_ends_the_job(), claim_run(run_dir.path, jax.process_index() == 0,
                                                      config.checkpoint.lock_lease_s) as lease, \
            faults.StopRequest() as stop:
        return _train(config, run_dir, on_step, lease, stop)


def _train(config: Any, run_dir: RunDir, on_step: Callable[[int, dict], None] | None, lease: RunLease | None,
           stop: faults.StopRequest) -> dict:
    """run(), in a run directory this job holds (through `lease` in Cloud Storage): the start, its writers
    and hooks, then the steps."""
    is_main = jax.process_index() == 0
    workdir = storage.path(config.workdir)
    begun = start(config, run_dir, is_main)
    # From here on, a failed write (checkpoints, logs, samples; in the background or not) ends the run
    # with one line saying what failed and what is intact.
    writer: checkpoints.CheckpointWriter | None = None
    intact = lambda: writer.intact() if writer else "no checkpoint was written by this run"  # noqa: E731
    # In a multi-process job, a failure on one process (a log write, its writers, the lock) is held until every
    # process agrees on it, then all raise its line at the same step (faults.JobAgreement).
    agreement = faults.JobAgreement(begun.steps.mesh, stop, lambda e: faults.write_failure(e, workdir, intact()),
                                    fence=lease.fence if lease else None)
    with faults.BackgroundFailures() as background, faults.writes_as_one_line(workdir, intact):
        writer, best_writer = _writers(config, run_dir, begun, is_main)
        train_step, eval_step = _step_functions(begun)

        def meta(step: int) -> dict:  # saved with each checkpoint: the seed, and what the hooks continue from
            return {"step": step, "seed": begun.seed, "batches_drawn": step,
                    **{k: v for hook in loop.hooks for k, v in hook.meta().items()}}

        run = hooks.Run(begun, run_dir, eval_step, writer, best_writer, agreement, meta, is_main)
        logs = RunLogs(workdir / "logs" / config.run_name, is_main, config, begun)
        checks = [writer.check, lambda: background.check(intact()), *([lease.check] if lease else []), logs.check]
        loop = _Loop(config, run_dir, begun, train_step, build_hooks(config, run), logs, checks, agreement,
                     on_step, lambda n, m: _check_step(config.train, n, m, writer.latest_step(), run_dir))
        try:
            loop.start(resumed=bool(begun.meta))
            loop.run()
            agreement.settle()  # every process ends here alike, or all raise one process's failure
            loop.end()
            for w in (writer, best_writer) if best_writer is not None else (writer,):
                agreement.hold(w.wait)
            agreement.hold(lambda: logs.close(config.run_name))
            agreement.settle()  # the last save and the logs ended on every process, or all raise one's failure
        finally:
            failing = sys.exc_info()[1]
            loop.bar.close()
            writer.close()
            if best_writer is not None:
                best_writer.close()
            logs.close(config.run_name, failing)
        return {"step": loop.step, "run_dir": str(run_dir), **loop.metrics}


def _writers(config: Any, run_dir: RunDir, begun: Start, is_main: bool
             ) -> tuple[checkpoints.CheckpointWriter, checkpoints.CheckpointWriter | None]:
    """The run's model files written (process 0), and the checkpoint writers: the run's, and its best/'s
    (checkpoint.keep_best: the best step, outside the keep rotation, in a run directory of its own)."""
    c = config.checkpoint
    dirs = [run_dir, *([run_dir.best] if begun.settings.keep_best else [])]
    if is_main:
        for d in dirs:
            d.write_model_files(begun.model_config, begun.encoder, config, begun.data.record)
    writers = [checkpoints.CheckpointWriter(d.path, keep=c.keep if d == run_dir else 1, async_save=c.async_save,
                                            keep_every_hours=c.keep_every_hours if d == run_dir else 0.0,
                                            store_timeout_s=c.store_timeout_s) for d in dirs]
    return writers[0], (writers[1] if len(writers) > 1 else None)


class _Loop:
    """The steps, from the start's to train.total_steps, a stop or a hook's stop (early stopping). With
    train.dispatch_ahead, step n+1 is dispatched before step n's metrics are read (the device never waits for
    the host), except at a step where a hook is due: hooks act on that step's state."""

    def __init__(self, config: Any, run_dir: RunDir, begun: Start, train_step: Callable, hooks: list[hooks.Hook],
                 logs: RunLogs, checks: list[Callable[[], None]], agreement: faults.JobAgreement,
                 on_step: Callable[[int, dict], None] | None, check_finite: Callable[[int, dict], None]):
        steps, settings = begun.steps, begun.settings
        self.state, self.step, self.train_step, self.hooks, self.logs = begun.state, int(begun.state.step), \
            train_step, hooks, logs
        self.checks = checks  # after each step: the failures of background writers, the lease
        self.agreement, self.on_step, self.check_finite = agreement, on_step, check_finite
        self.total, self.dispatch_ahead = config.train.total_steps, config.train.dispatch_ahead
        self.objective, self.run_dir = settings.objective, run_dir
        self.sampler, self.rows, self.batch_sharding = begun.data.sampler, settings.rows, steps.batch_sharding
        self.my_rows = parallel.process_rows(steps.batch_sharding, settings.rows)  # all this process reads
        seed = begun.seed
        self.step_key = jax.jit(lambda s: jax.random.fold_in(jax.random.key(seed), s),
                                out_shardings=parallel.replicated(steps.mesh))
        self.meter = Meter(settings.tokens_per_step, flops_per_token(begun.model_config, settings.seq_len),
                           peak_flops(config))
        self.metrics: dict[str, float] = {}  # the last step's
        self.bar = tqdm(total=self.total or None, initial=self.step, desc=config.run_name, unit="step",
                        disable=jax.process_index() != 0, dynamic_ncols=True)

    def stopping(self) -> bool:
        a = self.agreement
        return a.stopping if a.multi else a.stop.requested

    def done(self) -> bool:
        return bool(self.total and self.step >= self.total) or self.stopping() or any(h.stops() for h in self.hooks)

    def batch(self, step: int) -> Any:
        local = self.sampler.batch(step, self.rows, rows=self.my_rows)
        return parallel.global_batch(local, self.batch_sharding, rows=self.rows)

    def start(self, resumed: bool) -> None:
        """The hooks that act at the run's first step, before training (validation's starting point)."""
        first = [h for h in self.hooks if h.at_start]
        if first:
            self.agreement.settle()
        record = {k: v for h in first for k, v in h.start(self.step, self.state, resumed).items()}
        if record:
            self.agreement.hold(lambda: self.logs.write(self.step, record))

    def run(self) -> None:
        """The steps."""
        next_batch = self.batch(self.step)
        pending: tuple[int, dict] | None = None  # (step, metrics on the device) not yet read: dispatch_ahead
        while not self.done():
            self.state, out = self.train_step(self.state, next_batch, self.step_key(self.step))  # asynchronous
            if self.agreement.multi:  # SIGTERM, Ctrl-C or a failure on any process: every process acts on it
                out = {**out, "agreed": self.agreement.combine(self.agreement.code())}  # after the same step
            self.step += 1
            next_batch = self.batch(self.step)  # meanwhile, on the host
            if pending is not None:  # the previous step's metrics, read while this one runs
                self.record(*pending, acting=False)
                pending = None
            if self.dispatch_ahead and not any(h.due(self.step) for h in self.hooks):
                pending = (self.step, out)
            else:
                self.record(self.step, out, acting=True)
        if pending is not None:
            self.record(*pending, acting=False)

    def record(self, step: int, out: dict, acting: bool) -> None:
        """Step `step`'s metrics (waiting for it), logged; when `acting` (the state is that step's), the hooks
        due at it."""
        if "agreed" in out:
            self.agreement.act(out["agreed"])
        metrics = self.meter.read(out)
        self.check_finite(step, metrics)
        for check in self.checks:  # before this step's writes: a failed writer, a lapsed lease
            self.agreement.hold(check)
        due = [h for h in self.hooks if h.due(step)] if acting else []
        self.act(step, due, metrics)
        self.bar.set_postfix_str(self.postfix(metrics), refresh=False)  # drawn at most 10 times a second
        self.bar.update(1)
        self.metrics = metrics
        if self.on_step is not None:
            self.on_step(step, metrics)

    def act(self, step: int, due: list[hooks.Hook], metrics: dict[str, float]) -> None:
        """The hooks due at a step, the logged ones before the step's record is written, the rest after it."""
        if due:  # no process enters a hook's collectives (a checkpoint, validation) while another holds a failure
            self.agreement.settle()
        for hook in due:
            if hook.logged:
                metrics.update(hook(step, self.state))
                hook.acted_at = step
        self.agreement.hold(lambda: self.logs.write(step, metrics))
        for hook in due:
            if not hook.logged:
                hook(step, self.state)
                hook.acted_at = step
        if any(h.pauses for h in due):
            self.meter.restart_clock()

    def end(self) -> None:
        """Why the run stopped, in a line, and the hooks forced at its last step (validation at the last of
        train.total_steps, the checkpoint always)."""
        if self.stopping():
            tqdm.write(f"stopped at step {self.step}: saving a checkpoint to {self.run_dir}")
        for hook in self.hooks:
            if hook.stops():
                tqdm.write(hook.why_stopped(self.step))
        completed = bool(self.total and self.step >= self.total)
        record: dict[str, float] = {}
        for hook in [h for h in self.hooks if h.forced_at_end(self.step, completed)]:
            out = hook(self.step, self.state)
            record.update(out if hook.logged else {})
            hook.acted_at = self.step
        if record:
            self.metrics.update(record)
            self.agreement.hold(lambda: self.logs.write(self.step, record))

    def postfix(self, metrics: dict[str, float]) -> str:
        """The progress bar's words for a step."""
        parts = [f"loss={metrics['loss']:.3f}", f"avg={metrics['avg_loss']:.3f}", *self.objective.postfix(metrics)]
        if "tokens_per_sec" in metrics:
            parts.append(f"tok/s={metrics['tokens_per_sec']:.0f}")
        parts.append(f"mfu={metrics['mfu']:.1%}" if "mfu" in metrics else "mfu=n/a")
        return " ".join(parts)


def _step_functions(begun: Start) -> tuple[Callable, Callable]:
    """The compiled train and eval steps, given the frozen reference where every step takes one."""
    steps, reference = begun.steps, begun.reference_params
    if reference is None:
        return steps.train_step, steps.eval_step
    return (lambda s, b, k: steps.train_step(s, b, k, reference)), (lambda p, b: steps.eval_step(p, b, reference))


def _check_step(train: Any, step: int, metrics: dict[str, float], latest_saved: int | None, run_dir: RunDir
                ) -> None:
    """A loss or gradient norm that is no longer finite ends the run, keeping the last good checkpoint; with
    train.skip_spikes such a step was skipped instead, and train.max_consecutive_skips of them in a row end it."""
    kept = f"The last good checkpoint (step {latest_saved}) is kept in {run_dir}"
    if train.skip_spikes:
        if metrics["skips_in_a_row"] >= train.max_consecutive_skips:
            raise UserError(f"{int(metrics['skips_in_a_row'])} steps in a row were skipped (loss spikes or non-finite "
                            f"losses; train.max_consecutive_skips={train.max_consecutive_skips}) at step {step}; "
                            f"stopped without saving it. {kept}; lower train.learning_rate or set train.grad_clip")
        return
    for what, key in (("loss", "loss"), ("gradient norm", "grad_norm")):
        if not math.isfinite(metrics[key]):
            raise UserError(f"the {what} became {metrics[key]} at step {step}; stopped without saving it. {kept}; "
                            "lower train.learning_rate or set train.grad_clip")
