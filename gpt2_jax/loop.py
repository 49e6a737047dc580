"""The training loop: everything with side effects (files, logs, progress, signals) lives here.

It runs what resolve.py (model, params, resume decision) and steps.py (the compiled steps) set up.

WORKDIR/checkpoint/RUN/  orbax steps + hparams.json, vocabulary, run_config.json (a model directory)
WORKDIR/samples/RUN/     samples-STEP text files
WORKDIR/logs/RUN/        metrics.jsonl, TensorBoard event files, run_config.json, curves.png
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from gpt2_jax import autoremat, checkpoints, data, faults, parallel, report, storage
from gpt2_jax import dpo as dpo_module
from gpt2_jax.data import PairSampler, Pairs
from gpt2_jax.encoder import Encoder
from gpt2_jax.errors import StorageError, UserError, reason
from gpt2_jax.model import GPT2Config, convert_layout
from gpt2_jax.resolve import Resume, check_resumable, compute_settings, decide_resume, find_vocab_dir, initial_model
from gpt2_jax.sampling import SAMPLE_HEADER, generate
from gpt2_jax.settings import RunSettings, check_config, settings_of
from gpt2_jax.steps import Steps, abstract_state, build_steps, flops_per_token, reference_shapes
from gpt2_jax.targets import peak_bf16_flops
from gpt2_jax.train import TrainState


class _Logs:
    """metrics.jsonl (each record with its wall-clock time), TensorBoard, the run's config and, at the end,
    curves.png; written by process 0 only."""

    def __init__(self, log_dir: Path, enabled: bool, config: Any):
        self.log_dir, self.enabled, self.closed = log_dir, enabled, False
        if enabled:
            storage.mkdir(log_dir)
            (log_dir / checkpoints.RUN_CONFIG).write_text(config.to_json_best_effort(indent=2))
            self.jsonl = storage.AppendLog(log_dir / "metrics.jsonl")
            self.tb = storage.tensorboard_writer(log_dir)
            self.in_store, self.tb_flushed = storage.is_url(log_dir), -math.inf

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics, "time": round(time.time(), 3)}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            self.tb.add_scalar(key, value, step)
        if self.in_store and time.monotonic() - self.tb_flushed >= self.jsonl.upload_every_s:
            self.tb.flush()  # in a store, TensorBoard's new records go as the metrics do: at once, then every 10 s
            self.tb_flushed = time.monotonic()

    def close(self, title: str, failing: BaseException | None = None) -> None:
        """Close the files and draw curves.png (loss, validation loss, learning rate) from metrics.jsonl.
        While the run is `failing` (already ending with its one line), a write that fails here is a warning;
        when the store holding the logs is what failed, nothing more is written to it."""
        if not self.enabled or self.closed:
            return
        self.closed = True  # once: the run closes its logs before its last agreement, or on its way out
        if isinstance(failing, (StorageError, checkpoints.LeaseLost, OSError, *storage.store_errors())) \
                and storage.is_url(self.log_dir):  # a failing store, or a lock lost: nothing more is written
            storage.abandon_uploads(self.log_dir)
            return
        errors = []
        for close in (self.jsonl.close, self.tb.close):  # each tried: a writer that failed writes no more
            try:
                close()
            except (StorageError, OSError, *storage.store_errors()) as e:
                errors.append(e)
        if errors:
            if not failing:
                raise errors[0]
            tqdm.write(f"warning: could not finish writing the logs in {self.log_dir}: {reason(errors[0])}")
            return
        try:
            report.plot_run(report.read_metrics(self.log_dir), self.log_dir / "curves.png", title)
        except Exception as e:  # noqa: BLE001 - a picture is not worth failing (or masking) the run's end for
            tqdm.write(f"warning: could not draw {self.log_dir / 'curves.png'}: {reason(e)}")


def _peak_flops(config: Any) -> float | None:
    if config.train.peak_tflops > 0:
        return config.train.peak_tflops * 1e12
    return peak_bf16_flops(jax.devices()[0].device_kind) if config.model.dtype == "bfloat16" else None


def _write_run_files(run_dir: Path, start: _Start, config: Any) -> None:
    """What makes the run directory a model directory, and what its data was."""
    storage.mkdir(run_dir)
    (run_dir / data.DATA_RECORD).write_text(json.dumps(start.data_record, indent=2))
    (run_dir / "hparams.json").write_text(json.dumps(start.model_config.hparams(), indent=2))
    start.encoder.save(run_dir)
    (run_dir / checkpoints.RUN_CONFIG).write_text(config.to_json_best_effort(indent=2))


def run(config: Any, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train as the config says; returns the last step's metrics. `on_step(step, metrics)` is for tests."""
    parallel.init_distributed(config.parallel)  # before anything touches a device
    check_config(config)  # a config that cannot run: one line before anything is written
    checkpoints.quiet_orbax()  # before BackgroundFailures saves (and at its end restores) the hooks it wraps
    workdir = storage.path(config.workdir)
    if storage.is_url(workdir):  # before the first file system is made: each keeps the retries it was made with
        storage.bound_retries(config.checkpoint.store_timeout_s)
    storage.check_writable(workdir, "--workdir")  # a bucket that is missing or read-only: one line, exit 2
    run_dir = storage.absolute(workdir / "checkpoint" / config.run_name)
    # The claim: one job per run, taken before anything is written. A stop asked for while the run starts
    # (a preemption during compilation) is acted on at the first step.
    with parallel.peer_loss_ends_the_job(), checkpoints.claim_run(run_dir, jax.process_index() == 0,
                                                                  config.checkpoint.lock_lease_s) as lease, \
            faults.StopRequest() as stop:
        return _train(config, run_dir, on_step, lease, stop)


@dataclasses.dataclass
class _Start:
    """What the steps start from, after every check: nothing of the run is written yet."""

    settings: RunSettings
    model_config: GPT2Config  # with remat=auto's choice
    encoder: Encoder
    steps: Steps
    state: TrainState  # restored, or initialised from the starting params
    seed: int  # a resumed run's own: its batches and noise continue exactly
    meta: dict  # the restored step's metadata; {} for a new run
    sampler: Any  # the training batches, a function of the step
    val_batches: list  # the fixed validation batches, on the host
    reference_params: Any  # dpo.reference "params": the frozen reference given to every step; else None
    data_record: dict  # what the data was (data.DATA_RECORD)


def _start(config: Any, run_dir: Path, is_main: bool) -> _Start:
    """Resume or not, the model, the run's settings, the data and the compiled steps. Every bad-input error
    is raised here, the data's before anything compiles."""
    workdir = storage.path(config.workdir)
    resume = decide_resume(config.checkpoint.restore_from, run_dir)
    seed = config.seed
    if resume:
        check_resumable(config, resume)
        seed = checkpoints.read_seed(resume.run_dir, resume.candidates())
        if seed is None:
            raise UserError(f"no checkpoint of {resume.run_dir} (steps {resume.candidates()}) has readable metadata; "
                            "nothing was deleted. Restore another run with checkpoint.restore_from=PATH")
    model_config, params, encoder = initial_model(config, resume.run_dir if resume else None)
    if config.model.from_scratch and resume is None:
        vocab = find_vocab_dir(config)
        tqdm.write(f"vocabulary: {f'GPT-2 BPE from {vocab}' if vocab else 'byte-level'}, {encoder.n_vocab} tokens "
                   "(model.vocab: a directory, or bytes)")
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    settings = settings_of(config, model_config, mesh, encoder.eot_token)
    if settings.dpo is None:
        sampler, val_batches, data_record = data.datasets(config, encoder, settings.seq_len, seed, is_main)
    else:  # the pairs' batches carry their reference log-probs, known once the reference has run
        pairs, val_pairs, data_record = data.pair_datasets(config, encoder, settings.seq_len)
    if resume and resume.run_dir in (run_dir, run_dir / checkpoints.BEST):
        data.check_same_data(run_dir, data_record, config.data.allow_changed)

    train = config.train
    if config.model.remat == "auto":  # the fastest policy and micro-batch split that fit the memory budget
        model_config, train, line = autoremat.resolve(config, model_config, mesh, settings, run_dir,
                                                      workdir / "logs" / config.run_name)
        tqdm.write(line)
    steps = build_steps(model_config, train, mesh, document_eot=settings.document_eot, dpo=settings.dpo)
    meta: dict = {}
    if resume is None:
        state = steps.init_state(params)
        del params
    else:
        p, o, meta = _restore(resume, model_config, train, steps)
        state = TrainState(step=parallel.put_tree(np.int32(meta["step"]), parallel.replicated(mesh)), params=p,
                           opt_state=o)
        tqdm.write(f"restored step {meta['step']} from {resume.run_dir}")
        if is_main:
            for line in checkpoints.set_aside_after(run_dir, resume.run_dir, meta["step"]):
                tqdm.write(line)
    reference_params = None
    if settings.dpo is not None:
        sampler, val_batches, reference_params = _preference_batches(
            config, settings.dpo, model_config, steps, state.params if resume is None else None, pairs, val_pairs,
            seed, run_dir, data_record, is_main)
    return _Start(settings, model_config, encoder, steps, state, seed, meta, sampler, val_batches, reference_params,
                  data_record)


class _Hook:
    """An action every `every` steps (0: never) on the step's state, taken after the step's metrics are read
    (so the loop does not read ahead past it). `logged`: its metrics go into the step's log line; `pauses`:
    it takes time the next step's throughput leaves out."""

    every, logged, pauses = 0, False, False

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def stops(self) -> bool:
        """Whether the run should stop here (early stopping)."""
        return False

    def __call__(self, step: int, state: TrainState) -> dict[str, float]:
        raise NotImplementedError


class _Validation(_Hook):
    """Validation on fixed batches every data.val_every steps, and what acts on it: the best loss so far and
    its step (kept by `save_best`: checkpoint.keep_best), and the validations since without an improvement of
    more than min_delta (early stopping). That state is saved with every checkpoint (`meta`)."""

    logged, pauses = True, True

    def __init__(self, config: Any, start: _Start, eval_step: Callable, save_best: Callable | None):
        self.every = config.data.val_every if start.val_batches else 0
        self.eval_step, self.save_best, self.settings = eval_step, save_best, start.settings
        # A mixture's sources are validated apart (val_loss/SOURCE); val_loss is over all of their batches.
        by_source = start.val_batches if isinstance(start.val_batches, dict) else {"": start.val_batches}
        self.sources = [name for name in by_source for _ in by_source[name]]  # each batch's source
        # Each batch's mean counts by its targets: all its tokens, or the weighted ones of examples (pairs: alike).
        self.counts = [float(np.sum(b[1][:, 1:])) if isinstance(b, tuple) and start.settings.dpo is None else 1.0
                       for batches in by_source.values() for b in batches]
        self.batches = [parallel.global_batch(b, start.steps.batch_sharding) for batches in by_source.values()
                        for b in batches]
        saved = start.meta.get("best_val_loss")
        self.best_loss = math.inf if saved is None else float(saved)
        self.best_step = start.meta.get("best_step")
        self.stale = int(start.meta.get("validations_without_improvement", 0))
        self.validated_at: int | None = None

    def __call__(self, step: int, state: TrainState) -> dict[str, float]:
        result = self.validate(step, state.params)
        self.judge(step, state, result["val_loss"])
        return result

    def validate(self, step: int, params: Any) -> dict[str, float]:
        """val_loss (with DPO, val_ and each of its metrics) over the validation batches."""
        outs = [self.eval_step(params, b) for b in self.batches]
        outs = [{k: float(v) for k, v in o.items()} if isinstance(o, dict) else {"loss": float(o)} for o in outs]
        names = ["loss", *(k for k in dpo_module.METRICS if k in outs[0])]

        def mean(key: str, source: str | None = None) -> float:
            pairs = [(o[key], c) for o, c, s in zip(outs, self.counts, self.sources) if source in (None, s)]
            return float(np.sum([v * c for v, c in pairs]) / max(np.sum([c for _, c in pairs]), 1.0))

        result = {f"val_{k}": mean(k) for k in names}
        result.update({f"val_loss/{s}": mean("loss", s) for s in dict.fromkeys(self.sources) if s})
        tqdm.write(f"[{step} | validation] " + " ".join(f"{k}={v:.4f}" for k, v in result.items()))
        self.validated_at = step
        return result

    def judge(self, step: int, state: TrainState, loss: float) -> None:
        """A new best (kept with keep_best), or one more validation without an improvement."""
        if loss < self.best_loss - self.settings.min_delta:
            self.best_loss, self.best_step, self.stale = loss, step, 0
            if self.save_best is not None:
                self.save_best(step, state)
        else:
            self.stale += 1

    def stops(self) -> bool:
        return bool(self.settings.patience) and self.stale >= self.settings.patience

    def meta(self) -> dict:
        return {"best_step": self.best_step, "best_val_loss": None if math.isinf(self.best_loss) else self.best_loss,
                "validations_without_improvement": self.stale}


class _Sampling(_Hook):
    """Samples every sample.sample_every steps (printed, and written by process 0)."""

    pauses = True

    def __init__(self, config: Any, start: _Start, is_main: bool, hold: Callable[[Callable[[], Any]], None]):
        self.every, self.config, self.start, self.is_main = config.sample.sample_every, config, start, is_main
        self.hold = hold  # the file's write: its failure is the job's (faults.JobAgreement.hold)

    def __call__(self, step: int, state: TrainState) -> dict[str, float]:
        texts = _sample(self.config, self.start.model_config, state.params, self.start.encoder, step)
        if self.is_main:
            tqdm.write("\n".join(texts))
            directory = storage.path(self.config.workdir) / "samples" / self.config.run_name

            def write() -> None:
                storage.mkdir(directory)
                (directory / f"samples-{step}").write_text("\n".join(texts) + "\n", encoding="utf-8")

            self.hold(write)
        return {}


class _Checkpointing(_Hook):
    """A checkpoint every checkpoint.save_every steps, and at the end (`save`: once per step)."""

    def __init__(self, every: int, writer: checkpoints.CheckpointWriter, meta: Callable[[int], dict],
                 last_saved: int | None, agreement: faults.JobAgreement):
        self.every, self.writer, self.meta, self.last_saved = every, writer, meta, last_saved
        self.agreement = agreement

    def __call__(self, step: int, state: TrainState) -> dict[str, float]:
        if self.last_saved != step:
            _save(self.writer, self.agreement, step, state, self.meta(step))
            self.last_saved = step
        return {}


def _save(writer: checkpoints.CheckpointWriter, agreement: faults.JobAgreement, step: int, state: TrainState,
          meta: dict) -> None:
    """Save a step once the previous save has ended on every process: in a multi-process job, one process's
    failed background save is the job's failure before any process starts the next (orbax's save is collective)."""
    agreement.hold(writer.wait)
    agreement.settle()
    writer.save(step, state.params, state.opt_state, meta)


class _Meter:
    """A step's metrics from its outputs: the loss and the original's running average of it, the learning
    rate, the gradient norm, DPO's metrics, and tokens/s and MFU since the step before."""

    def __init__(self, settings: RunSettings, flops_per_token: float, peak_flops: float | None):
        self.settings, self.flops_per_token, self.peak = settings, flops_per_token, peak_flops
        self.average = (0.0, 0.0)  # decayed sum and weight
        self.last_time: float | None = None  # the first step's time is mostly compilation: not measured

    def read(self, out: dict) -> dict[str, float]:
        loss, grad_norm = float(out["loss"]), float(out["grad_norm"])  # waits for the step
        now = time.perf_counter()
        self.average = (self.average[0] * 0.99 + loss, self.average[1] * 0.99 + 1)
        metrics = {"loss": loss, "avg_loss": self.average[0] / self.average[1],
                   "learning_rate": float(out["learning_rate"]), "grad_norm": grad_norm,
                   **{k: float(out[k]) for k in dpo_module.METRICS if k in out}}
        if self.last_time is not None:
            metrics["tokens_per_sec"] = self.settings.tokens_per_step / (now - self.last_time)
            if self.peak:
                metrics["mfu"] = metrics["tokens_per_sec"] * self.flops_per_token / self.peak
        self.last_time = now
        return metrics

    def restart_clock(self) -> None:
        """After validating or sampling: the next step's time leaves them out."""
        self.last_time = time.perf_counter()


def _train(config: Any, run_dir: Path, on_step: Callable[[int, dict], None] | None,
           lease: checkpoints.RunLease | None, stop: faults.StopRequest) -> dict:
    """run(), in a run directory this job holds (through `lease` in Cloud Storage): the start, its writers
    and hooks, then the steps."""
    is_main = jax.process_index() == 0
    workdir = storage.path(config.workdir)
    start = _start(config, run_dir, is_main)
    # From here on, a failed write (checkpoints, logs, samples; in the background or not) ends the run
    # with one line saying what failed and what is intact.
    writer: checkpoints.CheckpointWriter | None = None
    intact = lambda: writer.intact() if writer else "no checkpoint was written by this run"  # noqa: E731
    # In a multi-process job, a failure on one process (a log write, its writers, the lock) is held until every
    # process agrees on it, then all raise its line at the same step (faults.JobAgreement).
    agreement = faults.JobAgreement(start.steps.mesh, stop, lambda e: faults.write_failure(e, workdir, intact()),
                                    fence=lease.fence if lease else None)
    with faults.BackgroundFailures() as background, faults.writes_as_one_line(workdir, intact):
        if is_main:
            _write_run_files(run_dir, start, config)
        timeout = config.checkpoint.store_timeout_s
        writer = checkpoints.CheckpointWriter(run_dir, keep=config.checkpoint.keep,
                                              keep_every_hours=config.checkpoint.keep_every_hours,
                                              async_save=config.checkpoint.async_save, store_timeout_s=timeout)
        best_writer = None
        if start.settings.keep_best:  # the best step, outside the keep rotation, in a run directory of its own
            if is_main:
                _write_run_files(run_dir / checkpoints.BEST, start, config)
            best_writer = checkpoints.CheckpointWriter(run_dir / checkpoints.BEST, keep=1,
                                                       async_save=config.checkpoint.async_save, store_timeout_s=timeout)
        train_step, eval_step = _step_functions(start)

        def meta(step: int) -> dict:  # saved with each checkpoint
            return {"step": step, "seed": start.seed, "batches_drawn": step, **validation.meta()}

        save_best = (lambda step, state: _save(best_writer, agreement, step, state, meta(step))
                     ) if best_writer is not None else None
        validation = _Validation(config, start, eval_step, save_best)
        step = int(start.state.step)
        checkpointing = _Checkpointing(config.checkpoint.save_every, writer, meta, step if start.meta else None,
                                       agreement)
        logs = _Logs(workdir / "logs" / config.run_name, is_main, config)
        checks = [writer.check, lambda: background.check(intact()), *([lease.check] if lease else []),
                  *([lambda: storage.check_uploads(logs.log_dir)] if is_main else [])]  # logs sent in the background
        sampling = _Sampling(config, start, is_main, agreement.hold)
        loop = _Loop(config, start, train_step, [validation, sampling, checkpointing], logs, checks, agreement,
                     on_step, lambda n, m: _check_finite(n, m, writer.latest_step(), run_dir))
        try:
            if validation.batches:  # the starting point, so the log shows how far validation loss falls
                first = validation.validate(loop.step, start.state.params)
                logs.write(loop.step, first)
                if not start.meta:  # a resumed step was judged when it was first validated
                    validation.judge(loop.step, start.state, first["val_loss"])
            loop.run()
            agreement.settle()  # every process ends here alike, or all raise one process's failure
            total = config.train.total_steps
            if validation.batches and total and loop.step >= total and validation.validated_at != loop.step:
                last = validation(loop.step, loop.state)  # a run ends validated
                loop.metrics.update(last)
                agreement.hold(lambda: logs.write(loop.step, last))
            _say_why_stopped(loop, validation, run_dir, best_writer is not None)
            checkpointing(loop.step, loop.state)
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


class _Loop:
    """The steps, from the start's to train.total_steps, a stop or a hook's stop (early stopping). With
    train.dispatch_ahead, step n+1 is dispatched before step n's metrics are read (the device never waits for
    the host), except at a step where a hook is due: hooks act on that step's state."""

    def __init__(self, config: Any, start: _Start, train_step: Callable, hooks: list[_Hook], logs: _Logs,
                 checks: list[Callable[[], None]], agreement: faults.JobAgreement,
                 on_step: Callable[[int, dict], None] | None, check_finite: Callable[[int, dict], None]):
        steps, settings = start.steps, start.settings
        self.state, self.step, self.train_step, self.hooks, self.logs = start.state, int(start.state.step), \
            train_step, hooks, logs
        self.checks = checks  # after each step: the failures of background writers, the lease
        self.agreement, self.on_step, self.check_finite = agreement, on_step, check_finite
        self.total, self.dispatch_ahead = config.train.total_steps, config.train.dispatch_ahead
        self.sampler, self.rows, self.batch_sharding = start.sampler, settings.rows, steps.batch_sharding
        self.my_rows = parallel.process_rows(steps.batch_sharding, settings.rows)  # all this process reads
        seed = start.seed
        self.step_key = jax.jit(lambda s: jax.random.fold_in(jax.random.key(seed), s),
                                out_shardings=parallel.replicated(steps.mesh))
        self.meter = _Meter(settings, flops_per_token(start.model_config, settings.seq_len), _peak_flops(config))
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

    def run(self) -> None:
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
        if due:  # no process enters a hook's collectives (a checkpoint, validation) while another holds a failure
            self.agreement.settle()
        for hook in due:
            if hook.logged:
                metrics.update(hook(step, self.state))
        self.agreement.hold(lambda: self.logs.write(step, metrics))
        self.bar.set_postfix_str(_postfix(metrics), refresh=False)  # drawn by update(), at most 10 times a second
        self.bar.update(1)
        for hook in due:
            if not hook.logged:
                hook(step, self.state)
        if any(h.pauses for h in due):
            self.meter.restart_clock()
        self.metrics = metrics
        if self.on_step is not None:
            self.on_step(step, metrics)


def _step_functions(start: _Start) -> tuple[Callable, Callable]:
    """The compiled train and eval steps, given the frozen DPO reference where every step takes it."""
    steps, reference = start.steps, start.reference_params
    if reference is None:
        return steps.train_step, steps.eval_step
    return (lambda s, b, k: steps.train_step(s, b, k, reference)), (lambda p, b: steps.eval_step(p, b, reference))


def _check_finite(step: int, metrics: dict[str, float], latest_saved: int | None, run_dir: Path) -> None:
    """A loss or gradient norm that is no longer finite ends the run, keeping the last good checkpoint."""
    for what, key in (("loss", "loss"), ("gradient norm", "grad_norm")):
        if not math.isfinite(metrics[key]):
            raise UserError(f"the {what} became {metrics[key]} at step {step}; stopped without saving it. The last "
                            f"good checkpoint (step {latest_saved}) is kept in {run_dir}; lower "
                            "train.learning_rate or set train.grad_clip")


def _say_why_stopped(loop: _Loop, validation: _Validation, run_dir: Path, keeps_best: bool) -> None:
    if loop.stopping():
        tqdm.write(f"stopped at step {loop.step}: saving a checkpoint to {run_dir}")
    if validation.stops():
        s = validation.settings
        kept = f", kept in {run_dir / checkpoints.BEST}" if keeps_best else ""
        tqdm.write(f"early stop at step {loop.step}: validation loss has not improved by more than "
                   f"train.early_stop_min_delta={s.min_delta:g} for {validation.stale} validations "
                   f"(train.early_stop_patience={s.patience}); the best, {validation.best_loss:.4f}, was at "
                   f"step {validation.best_step}{kept}")


REFERENCE_LOGPS = "reference_logps.npz"  # in the run directory: dpo.precompute_reference's log-probs


def _reference_model(config: Any, model_config: GPT2Config, steps: Steps) -> Any:
    """The params of the DPO reference as a plain GPT-2 on the mesh, sharded as the policy's: dpo.reference's
    model, else the weights the run started from (loaded again: the policy has trained since)."""
    from gpt2_jax.weights import load_weights

    plain = {k: v for k, v in compute_settings(config).items() if not k.startswith("lora")}
    if config.dpo.reference:
        reference_config, params = load_weights(config.dpo.reference, **plain)
        shape = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
        if [getattr(reference_config, k) for k in shape] != [getattr(model_config, k) for k in shape]:
            raise UserError(f"dpo.reference={config.dpo.reference!r}: a {reference_config.hparams()} model, but the "
                            f"policy is {model_config.hparams()}; the reference must be the same shape")
    else:
        start = initial_model(config, None)
        params = start[1] if not model_config.lora_rank else dpo_module.base_of(start[0], start[1])[1]
    shapes = steps.reference if steps.reference is not None else reference_shapes(model_config, steps.mesh)
    return parallel.put_tree(params, jax.tree.map(lambda a: a.sharding, shapes))


def _preference_batches(config: Any, dpo: dpo_module.DPOSettings, model_config: GPT2Config, steps: Steps,
                        start_params: Any, pairs: Pairs, val_pairs: Pairs | None, seed: int, run_dir: Path,
                        data_record: dict, is_main: bool) -> tuple[PairSampler, list, Any]:
    """The DPO sampler and validation batches, carrying the reference's log-probs when they are precomputed
    (read from the run directory when it holds those of this data and reference, else computed once and
    kept there), and the frozen reference's params when every step computes them (dpo.reference "params").
    `start_params`: the policy's params at step 0 (None when resuming)."""
    d, train = config.dpo, config.train
    if dpo.reference == "params":
        reference = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=jax.tree.map(
            lambda a: a.sharding, steps.reference))(start_params) if start_params is not None and not d.reference \
            else _reference_model(config, model_config, steps)
        return data.pair_batches(config, pairs, val_pairs, seed, None, None) + (reference,)
    if dpo.reference == "adapters_off":
        return data.pair_batches(config, pairs, val_pairs, seed, None, None) + (None,)
    key = json.dumps({"data": data_record, "reference": d.reference or config.model.name, "tokenize": d.tokenize,
                      "seq_len": int(pairs.tokens.shape[-1])}, sort_keys=True)
    path = run_dir / REFERENCE_LOGPS
    if path.is_file():
        with path.open("rb") as f, np.load(f) as stored:
            if str(stored["key"]) == key:
                tqdm.write(f"reference: the log-probs of {pairs.count} pairs, computed when the run started, "
                           f"from {path}")
                batches = data.pair_batches(config, pairs, val_pairs, seed, stored["train"], stored["validation"])
                return batches + (None,)
    if start_params is not None and not d.reference:  # the policy at step 0 is the reference
        params, reference_config = start_params, model_config
    else:
        params, reference_config = _reference_model(config, model_config, steps), dataclasses.replace(model_config,
                                                                                                        lora_rank=0)
    batch = train.batch_size * train.accumulate_gradients
    started = time.perf_counter()
    logps = dpo_module.reference_logps(params, reference_config, pairs.tokens, pairs.weights, steps.mesh, batch)
    val_logps = dpo_module.reference_logps(params, reference_config, val_pairs.tokens, val_pairs.weights, steps.mesh,
                                           batch) if val_pairs is not None else np.zeros((0, 2), np.float32)
    del params
    tqdm.write(f"reference: the log-probs of {pairs.count + (val_pairs.count if val_pairs else 0)} pairs computed "
               f"once in {time.perf_counter() - started:.1f} s (dpo.precompute_reference), kept in {path}")
    if is_main:
        storage.mkdir(run_dir)
        buffer = io.BytesIO()
        np.savez(buffer, train=logps, validation=val_logps, key=np.asarray(key))
        path.write_bytes(buffer.getvalue())
    return data.pair_batches(config, pairs, val_pairs, seed, logps, val_logps) + (None,)


def _restore(resume: Resume, model_config: GPT2Config, train: Any, steps: Steps) -> tuple[Any, Any, dict]:
    """Params, optimizer state and metadata of the newest candidate checkpoint that verifies, in this
    run's layout and shardings (restore_from=latest sets damaged newer steps aside).

    A checkpoint written with the other model.scan_layers setting is read as it was saved, then its
    blocks are stacked or unrolled on the devices.
    """
    saved = dataclasses.replace(model_config, scan_layers=checkpoints.saved_scan_layers(resume.run_dir))
    target = steps.abstract_state if saved == model_config else abstract_state(saved, train, steps.mesh)[1]
    _, p, o, meta = checkpoints.restore_newest(resume.run_dir, resume.candidates(), target.params, target.opt_state,
                                               set_aside=resume.latest, advice=checkpoints.RESUME_ADVICE)
    if saved.scan_layers != model_config.scan_layers:
        p, o = jax.jit(lambda t: convert_layout(t, model_config.scan_layers),
                       out_shardings=(steps.state_sharding.params, steps.state_sharding.opt_state))((p, o))
    return p, o, meta


def _postfix(metrics: dict[str, float]) -> str:
    parts = [f"loss={metrics['loss']:.3f}", f"avg={metrics['avg_loss']:.3f}"]
    if "rewards/accuracies" in metrics:  # DPO: how often chosen beats rejected, and by how much
        parts.append(f"acc={metrics['rewards/accuracies']:.2f} margin={metrics['rewards/margins']:.3f}")
    if "tokens_per_sec" in metrics:
        parts.append(f"tok/s={metrics['tokens_per_sec']:.0f}")
    parts.append(f"mfu={metrics['mfu']:.1%}" if "mfu" in metrics else "mfu=n/a")
    return " ".join(parts)


def _sample(config: Any, model_config: GPT2Config, params: Any, encoder: Encoder, step: int) -> list[str]:
    """Samples continuing sample.prompt (unconditional, from <|endoftext|>, when empty), each with its header."""
    s = config.sample
    prompt = encoder.encode(s.prompt)[-(model_config.n_ctx - 1):] or [encoder.eot_token]
    length = min(s.sample_length, model_config.n_ctx - len(prompt))
    out = generate(model_config, params, prompt, length=length, batch_size=s.sample_num,
                   rng=jax.random.fold_in(jax.random.key(config.seed + 1), step), temperature=s.temperature,
                   top_k=s.top_k, top_p=s.top_p, eot=encoder.eot_token)
    return [SAMPLE_HEADER.format(i + 1) + "\n" + s.prompt + encoder.decode(row[:n]) for i, (row, n) in
            enumerate(zip(out.tokens, out.lengths))]
