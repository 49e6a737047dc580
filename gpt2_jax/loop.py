"""The training loop: everything with side effects (files, logs, progress, signals) lives here.

It runs what resolve.py (model, params, resume decision) and steps.py (the compiled steps) set up.

WORKDIR/checkpoint/RUN/  orbax steps + hparams.json, vocabulary, run_config.json (a model directory)
WORKDIR/samples/RUN/     samples-STEP text files
WORKDIR/logs/RUN/        metrics.jsonl, TensorBoard event files, run_config.json, curves.png
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import json
import logging
import math
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from gpt2_jax import autoremat, checkpoints, parallel, report, storage
from gpt2_jax import dpo as dpo_module
from gpt2_jax.data import (ExampleSampler, Examples, PairSampler, Pairs, WindowSampler, describe_change, fingerprint,
                           is_examples, layout_examples, layout_pairs, load_dataset, read_examples, read_pairs,
                           split_tail)
from gpt2_jax.encoder import Encoder
from gpt2_jax.errors import StorageError, UserError, reason
from gpt2_jax.model import GPT2Config, convert_layout
from gpt2_jax.optim import learning_rate_schedule
from gpt2_jax.resolve import Resume, check_resumable, compute_settings, decide_resume, initial_model
from gpt2_jax.sampling import SAMPLE_HEADER, check_settings, generate
from gpt2_jax.steps import Steps, abstract_state, build_steps, flops_per_token, peak_bf16_flops, reference_shapes
from gpt2_jax.train import TrainState


DATA_RECORD = "dataset.json"  # in the run directory: what the run's data was (data.fingerprint)


class _StopRequest:
    """SIGINT/SIGTERM set a flag the loop checks after each step; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
                   "(Ctrl-C again to abort without saving)")

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _BackgroundFailures:
    """While training, background writers' failures become the loop's one line instead of tracebacks.

    An exception in a background thread (TensorBoard's event writer) is kept for `check()` to raise;
    orbax's logged copies of the save errors that CheckpointWriter raises, the errors a store's client
    logs before it raises them to its caller (gcsfs, fsspec), and the unraisable leftovers of the
    coroutines an aborted save abandons ("Event loop is closed"), are dropped.
    """

    STORE_CLIENTS = ("gcsfs", "fsspec", "aiohttp", "google", "s3fs", "adlfs")

    def __init__(self):
        self.errors: list[BaseException] = []

    def _handlers(self) -> list[logging.Handler]:
        """Where records of every logger end (a filter on a logger misses its children's records)."""
        return [*logging.getLogger().handlers, *([logging.lastResort] if logging.lastResort else [])]

    def __enter__(self):
        self._hooks = threading.excepthook, sys.unraisablehook
        threading.excepthook = lambda args: self.errors.append(args.exc_value)
        sys.unraisablehook = self._unraisable
        for name in ("absl", "asyncio"):
            logging.getLogger(name).addFilter(self._filter)
        self._filtered = self._handlers()
        for handler in self._filtered:
            handler.addFilter(self._filter)
        return self

    def __exit__(self, *exc):
        gc.collect()  # abandoned coroutines are collected (and dropped) while the hooks are ours
        threading.excepthook, sys.unraisablehook = self._hooks
        for name in ("absl", "asyncio"):
            logging.getLogger(name).removeFilter(self._filter)
        for handler in self._filtered:
            handler.removeFilter(self._filter)

    @staticmethod
    def _from_checkpointing(error: BaseException | None) -> bool:
        frames = traceback.extract_tb(error.__traceback__) if error is not None else []
        return "Event loop is closed" in str(error) or any("orbax" in f.filename for f in frames)

    def _unraisable(self, unraisable) -> None:
        if not self._from_checkpointing(unraisable.exc_value):
            self._hooks[1](unraisable)

    @staticmethod
    def _filter(record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        return ("orbax" not in record.pathname and "exception was never retrieved" not in record.getMessage()
                and record.name.split(".")[0] not in _BackgroundFailures.STORE_CLIENTS)

    def check(self, intact: str) -> None:
        """Raise the first background failure as one line."""
        if self.errors:
            raise StorageError(f"a background writer failed: {reason(self.errors[0])}; {intact}")


@contextlib.contextmanager
def _write_errors_as_one_line(workdir: Path, intact: Callable[[], str]):
    """An OSError (disk full, permissions) or a store's error from writing logs, samples or run files as a
    StorageError."""
    try:
        yield
    except (OSError, *storage.store_errors()) as e:
        raise StorageError(f"a write under {workdir} failed: {reason(e)}; {intact()}") from None


class _Logs:
    """metrics.jsonl (each record with its wall-clock time), TensorBoard, the run's config and, at the end,
    curves.png; written by process 0 only."""

    def __init__(self, log_dir: Path, enabled: bool, config: Any):
        self.log_dir, self.enabled = log_dir, enabled
        if enabled:
            storage.mkdir(log_dir)
            (log_dir / checkpoints.RUN_CONFIG).write_text(config.to_json_best_effort(indent=2))
            self.jsonl = storage.AppendLog(log_dir / "metrics.jsonl")
            self.tb = storage.tensorboard_writer(log_dir)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics, "time": round(time.time(), 3)}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            self.tb.add_scalar(key, value, step)

    def close(self, title: str, failing: BaseException | None = None) -> None:
        """Close the files and draw curves.png (loss, validation loss, learning rate) from metrics.jsonl.
        While the run is `failing` (already ending with its one line), a write that fails here is a warning;
        when the store holding the logs is what failed, nothing more is written to it."""
        if not self.enabled:
            return
        if isinstance(failing, (StorageError, OSError, *storage.store_errors())) and storage.is_url(self.log_dir):
            storage.abandon_uploads(self.log_dir)
            return
        errors = []
        for close in (self.jsonl.close, self.tb.close):  # each tried: a writer that failed writes no more
            try:
                close()
            except (OSError, *storage.store_errors()) as e:
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


def _write_run_files(run_dir: Path, model_config: GPT2Config, encoder: Encoder, config: Any, data_record: dict
                     ) -> None:
    storage.mkdir(run_dir)
    (run_dir / DATA_RECORD).write_text(json.dumps(data_record, indent=2))
    (run_dir / "hparams.json").write_text(json.dumps(model_config.hparams(), indent=2))
    encoder.save(run_dir)
    (run_dir / checkpoints.RUN_CONFIG).write_text(config.to_json_best_effort(indent=2))


def run(config: Any, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train as the config says; returns the last step's metrics. `on_step(step, metrics)` is for tests."""
    parallel.init_distributed(config.parallel)  # before anything touches a device
    workdir = storage.path(config.workdir)
    storage.check_writable(workdir, "--workdir")  # a bucket that is missing or read-only: one line, exit 2
    if storage.is_url(workdir):
        storage.bound_retries(config.checkpoint.store_timeout_s)
    run_dir = storage.absolute(workdir / "checkpoint" / config.run_name)
    # The claim: one job per run, taken before anything is written. A stop asked for while the run starts
    # (a preemption during compilation) is acted on at the first step.
    with parallel.peer_loss_ends_the_job(), checkpoints.claim_run(run_dir, jax.process_index() == 0,
                                                                  config.checkpoint.lock_lease_s) as lease, \
            _StopRequest() as stop:
        return _train(config, run_dir, on_step, lease, stop)


def _stop_agreement(mesh: Any) -> Callable[[bool], jax.Array]:
    """A function of this process's stop flag giving whether any process's is set: a [devices] array of the
    processes' flags reduced by a jitted max (an all-reduce of one scalar, dispatched asynchronously)."""
    sharding, n = parallel.batch_sharding(mesh), mesh.devices.size
    reduce = jax.jit(lambda flags: flags.max(), out_shardings=parallel.replicated(mesh))
    return lambda flag: reduce(parallel.global_batch(np.full((n,), int(flag), np.int32), sharding))


def _train(config: Any, run_dir: Path, on_step: Callable[[int, dict], None] | None,
           lease: checkpoints.RunLease | None, stop: _StopRequest) -> dict:
    """run(), in a run directory this job holds (through `lease` in Cloud Storage)."""
    is_main = jax.process_index() == 0
    workdir = storage.path(config.workdir)
    resume = decide_resume(config.checkpoint.restore_from, run_dir)

    # A resumed run keeps the seed it started with: batches and noise continue exactly.
    seed = config.seed
    if resume:
        check_resumable(config, resume)
        seed = checkpoints.read_seed(resume.run_dir, resume.candidates())
        if seed is None:
            raise UserError(f"no checkpoint of {resume.run_dir} (steps {resume.candidates()}) has readable metadata; "
                            "nothing was deleted. Restore another run with checkpoint.restore_from=PATH")
    model_config, params, encoder = initial_model(config, resume.run_dir if resume else None)
    dpo = dpo_module.settings_of(config)  # None: the next-token loss
    seq_len = config.data.seq_len or model_config.n_ctx
    if not 1 <= seq_len <= model_config.n_ctx:
        raise UserError(f"data.seq_len={seq_len}: must be between 1 and the model's n_ctx={model_config.n_ctx}")
    train = config.train
    learning_rate_schedule(train)  # validates the schedule settings early
    if train.batch_size < 1 or train.accumulate_gradients < 1:
        raise UserError("train.batch_size and train.accumulate_gradients must be >= 1")
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    parallel.check_batch(train.batch_size, mesh)
    if config.data.val_every > 0:
        parallel.check_batch(config.data.val_batch_size, mesh)
    if not 0.0 <= train.noise < 1.0:
        raise UserError(f"train.noise={train.noise}: must be in [0, 1)")
    if config.sample.sample_every:
        check_settings(temperature=config.sample.temperature, top_k=config.sample.top_k, top_p=config.sample.top_p,
                       prefix="sample.")
    patience, min_delta, keep_best = train.early_stop_patience, train.early_stop_min_delta, config.checkpoint.keep_best
    if patience < 0 or min_delta < 0:
        raise UserError(f"train.early_stop_patience={patience} and train.early_stop_min_delta={min_delta} must be >= 0")
    if (patience or keep_best) and config.data.val_every <= 0:
        raise UserError(f"{'train.early_stop_patience' if patience else 'checkpoint.keep_best'} acts on validation: "
                        "set data.val_every > 0 (and data.val_dataset or data.val_split)")

    # Data first: every bad-input error comes before anything compiles.
    if dpo is None:
        sampler, val_batches, data_record = _datasets(config, encoder, seq_len, seed, is_main)
    else:  # the pairs' batches carry their reference log-probs, known once the reference has run
        pairs, val_pairs, data_record = _pair_datasets(config, encoder, seq_len)
    if resume and resume.run_dir in (run_dir, run_dir / checkpoints.BEST):
        _check_same_data(run_dir, data_record, config.data.allow_changed)

    if config.model.remat == "auto":  # the fastest policy and micro-batch split that fit the memory budget
        model_config, train, line = autoremat.resolve(config, model_config, mesh, seq_len, run_dir,
                                                      workdir / "logs" / config.run_name)
        tqdm.write(line)
    document_eot = encoder.eot_token if config.data.document_mask else None
    steps = build_steps(model_config, train, mesh, document_eot=document_eot, dpo=dpo)
    repl = parallel.replicated(mesh)
    if resume is None:
        state = steps.init_state(params)
        del params
    else:
        p, o, meta = _restore(resume, model_config, train, steps)
        state = TrainState(step=parallel.put_tree(np.int32(meta["step"]), repl), params=p, opt_state=o)
        tqdm.write(f"restored step {meta['step']} from {resume.run_dir}")
        if is_main:  # steps after this one, of a future this run no longer has, are set aside (never deleted)
            def after(d: Path) -> list[tuple[Path, int]]:  # a listing: orbax's manager would sync every process
                return sorted((d, int(x.name)) for x in d.iterdir() if x.name.isdigit() and int(x.name) > meta["step"])
            best_dir = run_dir / checkpoints.BEST
            newer = after(run_dir) if resume.run_dir == best_dir else []
            newer += after(best_dir) if best_dir.is_dir() else []
            for where, s in newer:
                storage.mkdir(run_dir / checkpoints.SUPERSEDED)
                aside = run_dir / checkpoints.SUPERSEDED / f"{where.name}-{s}.{time.strftime('%Y%m%dT%H%M%S')}"
                storage.move(where / str(s), aside)
                tqdm.write(f"set aside {where / str(s)}, which is after the restored step, as {aside}")
    reference_params = None  # dpo.reference "params": the frozen reference, given to every step
    if dpo is not None:
        sampler, val_batches, reference_params = _preference_batches(
            config, dpo, model_config, steps, state.params if resume is None else None, pairs, val_pairs, seed,
            run_dir, data_record, is_main)
    # From here on, a failed write (checkpoints, logs, samples; in the background or not) ends the run
    # with one line saying what failed and what is intact.
    writer: checkpoints.CheckpointWriter | None = None
    intact = lambda: writer.intact() if writer else "no checkpoint was written by this run"  # noqa: E731
    with _BackgroundFailures() as background, _write_errors_as_one_line(workdir, intact):
        if is_main:
            _write_run_files(run_dir, model_config, encoder, config, data_record)
        writer = checkpoints.CheckpointWriter(run_dir, keep=config.checkpoint.keep,
                                              keep_every_hours=config.checkpoint.keep_every_hours,
                                              async_save=config.checkpoint.async_save)
        best_writer = None
        if keep_best:  # the best step, outside the keep rotation, in a run directory of its own
            if is_main:
                _write_run_files(run_dir / checkpoints.BEST, model_config, encoder, config, data_record)
            best_writer = checkpoints.CheckpointWriter(run_dir / checkpoints.BEST, keep=1,
                                                       async_save=config.checkpoint.async_save)

        train_step, eval_step, batch_sh = steps.train_step, steps.eval_step, steps.batch_sharding
        if reference_params is not None:
            train_step = lambda s, b, k: steps.train_step(s, b, k, reference_params)  # noqa: E731
            eval_step = lambda p, b: steps.eval_step(p, b, reference_params)  # noqa: E731
        step_key = jax.jit(lambda s: jax.random.fold_in(jax.random.key(seed), s), out_shardings=repl)
        # tokens a step trains on: a pair's chosen and rejected sequences both
        tokens_per_step = train.batch_size * train.accumulate_gradients * seq_len * (2 if dpo else 1)
        peak = _peak_flops(config)
        logs = _Logs(workdir / "logs" / config.run_name, is_main, config)

        step = int(state.step)
        last_saved = step if resume else None
        # Validation that acts (keep_best, early stopping): the best loss so far, its step, and the
        # validations since without an improvement of more than min_delta; saved with every checkpoint.
        saved_best = meta.get("best_val_loss") if resume else None
        best = {"val_loss": math.inf if saved_best is None else float(saved_best),
                "step": meta.get("best_step") if resume else None,
                "stale": int(meta.get("validations_without_improvement", 0)) if resume else 0}

        def step_meta() -> dict:
            return {"step": step, "seed": seed, "batches_drawn": step, "best_step": best["step"],
                    "best_val_loss": None if math.isinf(best["val_loss"]) else best["val_loss"],
                    "validations_without_improvement": best["stale"]}

        def save_now():
            nonlocal last_saved
            if last_saved != step:
                writer.save(step, state.params, state.opt_state, step_meta())
                last_saved = step

        def judge(loss: float) -> None:
            """After validating at `step`: a new best (kept with keep_best), or one more stale validation."""
            if loss < best["val_loss"] - min_delta:
                best.update(val_loss=loss, step=step, stale=0)
                if best_writer is not None:
                    best_writer.save(step, state.params, state.opt_state, step_meta())
            else:
                best["stale"] += 1

        def stopped_early() -> bool:
            return bool(patience) and best["stale"] >= patience

        # Each validation batch's mean counts by its targets: all its tokens, or the weighted ones of examples
        # (pairs: every batch alike).
        val_counts = [float(np.sum(b[1][:, 1:])) if isinstance(b, tuple) and dpo is None else 1.0 for b in val_batches]
        val_batches = [parallel.global_batch(b, batch_sh) for b in val_batches]

        def validate() -> dict[str, float]:
            """val_loss (and with DPO val_ and each metric) over the validation batches."""
            outs = [eval_step(state.params, b) for b in val_batches]
            outs = [{k: float(v) for k, v in o.items()} if isinstance(o, dict) else {"loss": float(o)} for o in outs]
            total = max(np.sum(val_counts), 1.0)
            names = ["loss", *(k for k in dpo_module.METRICS if k in outs[0])]
            result = {f"val_{k}": float(np.sum([o[k] * c for o, c in zip(outs, val_counts)]) / total) for k in names}
            tqdm.write(f"[{step} | validation] " + " ".join(f"{k}={v:.4f}" for k, v in result.items()))
            return result

        validated_at = None  # the last step validated
        if val_batches:  # the starting point, so the log shows how far validation loss falls
            start, validated_at = validate(), step
            logs.write(step, start)
            if resume is None:  # a resumed step was judged when it was first validated
                judge(start["val_loss"])
        total = train.total_steps
        bar = tqdm(total=total or None, initial=step, desc=config.run_name, unit="step", disable=not is_main,
                   dynamic_ncols=True)
        avg_loss = (0.0, 0.0)  # the original's running average: decayed sum and weight
        metrics: dict[str, float] = {}
        last_time = None
        rows = train.batch_size * train.accumulate_gradients

        def due(n: int, every: int) -> bool:
            return every > 0 and n % every == 0

        def actions_due(n: int) -> bool:
            return ((bool(val_batches) and due(n, config.data.val_every)) or due(n, config.sample.sample_every)
                    or due(n, config.checkpoint.save_every))

        def record(n: int, out: dict, actions: bool) -> None:
            """Step n's metrics (waiting for it), logged; with `actions` (state is step n's): validation,
            samples and the checkpoint due at n."""
            nonlocal avg_loss, metrics, last_time, validated_at
            loss, grad_norm = float(out["loss"]), float(out["grad_norm"])
            if "stop" in out:
                agreed_stop[0] = agreed_stop[0] or bool(out["stop"])
            now = time.perf_counter()
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
                raise UserError(f"the {what} became {value} at step {n}; stopped without saving it. The last good "
                                f"checkpoint (step {writer.latest_step()}) is kept in {run_dir}; lower "
                                "train.learning_rate or set train.grad_clip")
            avg_loss = (avg_loss[0] * 0.99 + loss, avg_loss[1] * 0.99 + 1)
            metrics = {"loss": loss, "avg_loss": avg_loss[0] / avg_loss[1],
                       "learning_rate": float(out["learning_rate"]), "grad_norm": grad_norm,
                       **{k: float(out[k]) for k in dpo_module.METRICS if k in out}}
            if last_time is not None:  # the first step's time is mostly compilation
                metrics["tokens_per_sec"] = tokens_per_step / (now - last_time)
                if peak:
                    metrics["mfu"] = metrics["tokens_per_sec"] * flops_per_token(model_config, seq_len) / peak
            last_time = now
            if actions and val_batches and due(n, config.data.val_every):
                metrics.update(validate())
                validated_at = n
                judge(metrics["val_loss"])
                last_time = time.perf_counter()
            logs.write(n, metrics)
            bar.set_postfix_str(_postfix(metrics), refresh=False)  # drawn by update(), at most 10 times a second
            bar.update(1)
            if actions and due(n, config.sample.sample_every):
                _sample(config, model_config, state.params, encoder, workdir, n, is_main)
                last_time = time.perf_counter()
            if actions and due(n, config.checkpoint.save_every):
                save_now()
            writer.check()  # a background save that failed stops the run now, not at the end
            background.check(intact())
            if lease is not None:
                lease.check()
            if on_step is not None:
                on_step(n, metrics)

        # SIGTERM or Ctrl-C to any one process of a multi-process job stops every process after the same step:
        # each step carries the processes' stop flags, combined by a tiny collective read with its metrics.
        agree = _stop_agreement(steps.mesh) if jax.process_count() > 1 else None
        agreed_stop = [False]

        def stopping() -> bool:
            return agreed_stop[0] if agree is not None else stop.requested

        next_batch = parallel.global_batch(sampler.batch(step, rows), batch_sh)
        pending: tuple[int, dict] | None = None  # (step, metrics on the device) not yet read: dispatch_ahead
        try:
            while not (total and step >= total) and not stopping() and not stopped_early():
                state, out = train_step(state, next_batch, step_key(step))  # dispatched, runs asynchronously
                if agree is not None:  # every process's stop flag, combined on the devices after this step
                    out = {**out, "stop": agree(stop.requested)}
                step += 1
                next_batch = parallel.global_batch(sampler.batch(step, rows), batch_sh)  # meanwhile, on the host
                if pending is not None:  # the previous step's metrics, read while this one runs
                    record(*pending, actions=False)
                    pending = None
                if train.dispatch_ahead and not actions_due(step):
                    pending = (step, out)
                else:
                    record(step, out, actions=True)
            if pending is not None:
                record(*pending, actions=False)
            if val_batches and total and step >= total and validated_at != step:  # a run ends validated
                last = validate()
                metrics.update(last)
                validated_at = step
                logs.write(step, last)
                judge(metrics["val_loss"])
            if stopping():
                tqdm.write(f"stopped at step {step}: saving a checkpoint to {run_dir}")
            if stopped_early():
                kept = f", kept in {run_dir / checkpoints.BEST}" if best_writer is not None else ""
                tqdm.write(f"early stop at step {step}: validation loss has not improved by more than "
                           f"train.early_stop_min_delta={min_delta:g} for {best['stale']} validations "
                           f"(train.early_stop_patience={patience}); the best, {best['val_loss']:.4f}, was at "
                           f"step {best['step']}{kept}")
            save_now()
            writer.wait()
            if best_writer is not None:
                best_writer.wait()
        finally:
            failing = sys.exc_info()[1]
            bar.close()
            writer.close()
            if best_writer is not None:
                best_writer.close()
            logs.close(config.run_name, failing)
        return {"step": step, "run_dir": str(run_dir), **metrics}


def _datasets(config: Any, encoder: Encoder, seq_len: int, seed: int, is_main: bool
              ) -> tuple[WindowSampler, list[np.ndarray], dict]:
    """The training sampler, the fixed validation batches (none when data.val_every is 0) and the
    fingerprints of both datasets (for DATA_RECORD).

    Validation data is data.val_dataset, else the last data.val_split of the training data (held out:
    never trained on), else, with a warning, windows of the training data itself.
    """
    data = config.data
    if not data.dataset:
        raise UserError("data.dataset is empty: set --config.data.dataset=PATH (a file, directory, glob or .npz)")
    if not 0.0 <= data.val_split < 1.0:
        raise UserError(f"data.val_split={data.val_split}: must be in [0, 1) (0 = no held-out split)")
    if data.val_split and data.val_dataset:
        raise UserError("data.val_split and data.val_dataset are both set: use one (val_dataset, or a split of the "
                        "training data)")
    if is_examples(data.dataset):
        return _example_datasets(config, encoder, seq_len, seed)
    data_kw = dict(combine=data.combine, encoding=data.encoding, encoding_errors=data.encoding_errors, progress=is_main)
    chunks = load_dataset(data.dataset, encoder, **data_kw)
    val_chunks, val_name = chunks, f"validation data (the training data {data.dataset!r})"
    if data.val_split:
        chunks, val_chunks = split_tail(chunks, data.val_split)
        val_name = f"validation split (the last {data.val_split:g} of {data.dataset!r})"
    elif data.val_dataset:
        val_chunks = load_dataset(data.val_dataset, encoder, **data_kw)
        val_name = f"validation dataset {data.val_dataset!r}"
    sampler = WindowSampler(chunks, seq_len + 1, seed, f"dataset {data.dataset!r}")
    record = {"train": fingerprint(data.dataset, chunks), "validation": None}
    if data.val_every <= 0:
        return sampler, [], record
    if not (data.val_split or data.val_dataset):
        tqdm.write("validation: neither data.val_dataset nor data.val_split is set, validating on batches drawn "
                   "from the training data")
    record["validation"] = fingerprint(data.val_dataset or data.dataset, val_chunks)
    val_sampler = WindowSampler(val_chunks, seq_len + 1, seed=1, what=val_name)
    return sampler, [val_sampler.batch(i, data.val_batch_size) for i in range(data.val_batch_count)], record


def _example_datasets(config: Any, encoder: Encoder, seq_len: int, seed: int
                      ) -> tuple[ExampleSampler, list[tuple[np.ndarray, np.ndarray]], dict]:
    """_datasets for prompt/completion examples (.jsonl): rows of seq_len + 1 tokens, packed with
    data.document_mask (which keeps them apart), else one example a row; the loss on the completions."""
    data = config.data
    examples = read_examples(data.dataset, encoder)
    val_examples, val_name = examples, f"the training examples {data.dataset!r}"
    if data.val_split:
        cut = len(examples) - math.ceil(len(examples) * data.val_split)
        if cut < 1:
            raise UserError(f"data.val_split={data.val_split} of {len(examples)} examples leaves none to train on")
        examples, val_examples = examples[:cut], examples[cut:]
        val_name = f"the last {len(val_examples)} examples of {data.dataset!r}"
    elif data.val_dataset:
        if not is_examples(data.val_dataset):
            raise UserError(f"data.val_dataset={data.val_dataset!r}: the training data are examples (.jsonl), so "
                            "the validation data must be too")
        val_examples, val_name = read_examples(data.val_dataset, encoder), repr(data.val_dataset)

    def rows_of(these: list) -> Examples:
        return layout_examples(these, seq_len + 1, encoder.eot_token, pack=data.document_mask)

    def record_of(spec: str, rows: Examples) -> dict:
        return fingerprint(spec, [rows.tokens.ravel(), rows.weights.ravel().astype(np.uint8)])

    train_rows = rows_of(examples)
    tqdm.write(f"examples: {train_rows.count} in {len(train_rows.tokens)} rows of {seq_len + 1} tokens "
               f"({'packed: data.document_mask' if data.document_mask else 'one a row, padded'}), "
               f"{int(train_rows.weights.sum())} target tokens; {train_rows.truncated} longer than a row, cut from "
               "the prompt's left")
    record = {"train": record_of(data.dataset, train_rows), "validation": None}
    if data.val_every <= 0:
        return ExampleSampler(train_rows, seed), [], record
    if val_examples is examples:
        tqdm.write("validation: neither data.val_dataset nor data.val_split is set, validating on the training "
                   "examples")
    val_rows = rows_of(val_examples)
    record["validation"] = record_of(data.val_dataset or data.dataset, val_rows)
    tqdm.write(f"validation: {val_rows.count} examples ({val_name})")
    val_sampler = ExampleSampler(val_rows, seed=1)
    return (ExampleSampler(train_rows, seed), [val_sampler.batch(i, data.val_batch_size)
                                                for i in range(data.val_batch_count)], record)


def _pair_datasets(config: Any, encoder: Encoder, seq_len: int) -> tuple[Pairs, Pairs | None, dict]:
    """The training pairs, the validation pairs (None when data.val_every is 0) and their fingerprints:
    data.val_dataset, else the last data.val_split of the file, else, with a warning, the training pairs."""
    data, tokenize = config.data, config.dpo.tokenize
    if not is_examples(data.dataset):
        raise UserError(f"data.dataset={data.dataset!r}: train.objective=dpo trains on preference pairs, a .jsonl of "
                        '{"prompt", "chosen", "rejected"} lines')
    pairs = read_pairs(data.dataset, encoder, tokenize)
    val_pairs, val_name = pairs, f"the training pairs {data.dataset!r}"
    if data.val_split:
        cut = len(pairs) - math.ceil(len(pairs) * data.val_split)
        if cut < 1:
            raise UserError(f"data.val_split={data.val_split} of {len(pairs)} pairs leaves none to train on")
        pairs, val_pairs = pairs[:cut], pairs[cut:]
        val_name = f"the last {len(val_pairs)} pairs of {data.dataset!r}"
    elif data.val_dataset:
        val_pairs, val_name = read_pairs(data.val_dataset, encoder, tokenize), repr(data.val_dataset)

    def rows_of(these: list) -> Pairs:
        return layout_pairs(these, seq_len + 1, encoder.eot_token, start_with_eot=tokenize == "apart")

    def record_of(spec: str, rows: Pairs) -> dict:
        return fingerprint(spec, [rows.tokens.ravel(), rows.weights.ravel().astype(np.uint8)])

    train_rows = rows_of(pairs)
    tqdm.write(f"pairs: {train_rows.count}, each as two rows of {seq_len + 1} tokens (dpo.tokenize={tokenize}), "
               f"{int(train_rows.weights.sum())} completion tokens; {train_rows.truncated} longer than a row, cut "
               "from the prompt's left")
    record = {"train": record_of(data.dataset, train_rows), "validation": None}
    if data.val_every <= 0:
        return train_rows, None, record
    if val_pairs is pairs:
        tqdm.write("validation: neither data.val_dataset nor data.val_split is set, validating on the training pairs")
    val_rows = rows_of(val_pairs)
    record["validation"] = record_of(data.val_dataset or data.dataset, val_rows)
    tqdm.write(f"validation: {val_rows.count} pairs ({val_name})")
    return train_rows, val_rows, record


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
        return _pair_batches(config, pairs, val_pairs, seed, None, None) + (reference,)
    if dpo.reference == "adapters_off":
        return _pair_batches(config, pairs, val_pairs, seed, None, None) + (None,)
    key = json.dumps({"data": data_record, "reference": d.reference or config.model.name, "tokenize": d.tokenize,
                      "seq_len": int(pairs.tokens.shape[-1])}, sort_keys=True)
    path = run_dir / REFERENCE_LOGPS
    if path.is_file():
        with path.open("rb") as f, np.load(f) as stored:
            if str(stored["key"]) == key:
                tqdm.write(f"reference: the log-probs of {pairs.count} pairs, computed when the run started, "
                           f"from {path}")
                return _pair_batches(config, pairs, val_pairs, seed, stored["train"], stored["validation"]) + (None,)
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
    return _pair_batches(config, pairs, val_pairs, seed, logps, val_logps) + (None,)


def _pair_batches(config: Any, pairs: Pairs, val_pairs: Pairs | None, seed: int, reference: np.ndarray | None,
                  val_reference: np.ndarray | None) -> tuple[PairSampler, list]:
    """The training sampler and the fixed validation batches (drawn once with seed 1) of pairs."""
    data = config.data
    if val_pairs is None:
        return PairSampler(pairs, seed, reference), []
    val_sampler = PairSampler(val_pairs, 1, val_reference)
    return PairSampler(pairs, seed, reference), [val_sampler.batch(i, data.val_batch_size)
                                                 for i in range(data.val_batch_count)]


def _check_same_data(run_dir: Path, record: dict, allow_changed: bool) -> None:
    """A run resumes on the data it started on (DATA_RECORD), unless data.allow_changed says otherwise."""
    path = run_dir / DATA_RECORD
    if not path.is_file():  # a run from before the record existed: nothing to compare
        return
    recorded = json.loads(path.read_text())
    for part, setting in (("train", "data.dataset"), ("validation", "the validation data")):
        before, after = recorded.get(part), record.get(part)
        change = describe_change(before, after) if before and after else None
        if change is None:
            continue
        if not allow_changed:
            raise UserError(f"{setting} changed since this run started (recorded in {path}): {change}; the resumed "
                            "run would not continue exactly. Set data.allow_changed=True to resume on the new data, "
                            "or start anew under another run_name")
        tqdm.write(f"warning: {setting} changed since this run started ({change}); resuming on it "
                   "(data.allow_changed=True), so batches differ from an uninterrupted run")


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


def _sample(config: Any, model_config: GPT2Config, params: Any, encoder: Encoder, workdir: Path, step: int,
            is_main: bool) -> None:
    """Samples continuing sample.prompt (unconditional, from <|endoftext|>, when empty), printed and written
    to samples/RUN/samples-STEP."""
    s = config.sample
    prompt = encoder.encode(s.prompt)[-(model_config.n_ctx - 1):] or [encoder.eot_token]
    length = min(s.sample_length, model_config.n_ctx - len(prompt))
    out = generate(model_config, params, prompt, length=length, batch_size=s.sample_num,
                   rng=jax.random.fold_in(jax.random.key(config.seed + 1), step), temperature=s.temperature,
                   top_k=s.top_k, top_p=s.top_p, eot=encoder.eot_token)
    if not is_main:
        return
    texts = [SAMPLE_HEADER.format(i + 1) + "\n" + s.prompt + encoder.decode(row[:n]) for i, (row, n) in
             enumerate(zip(out.tokens, out.lengths))]
    tqdm.write("\n".join(texts))
    directory = workdir / "samples" / config.run_name
    storage.mkdir(directory)
    (directory / f"samples-{step}").write_text("\n".join(texts) + "\n", encoding="utf-8")
