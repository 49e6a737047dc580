"""Periodic actions of a training run. Each is a Hook: an interval (`every` N steps), taken after the step's
metrics are read, on that step's state, and, as it says, also at the run's start and forced once at its end
(levanter's `add_hook(every=N)` and `run_hooks(force=True)`). The loop makes every hook the config asks for
from its table `loop.HOOKS`: a new periodic action is one class (here, or a module of its own) and a row there.

Validation, sampling and checkpointing are hooks here; benchmarks (eval_tasks.py) and the profiler window
(profiling.py) are hooks of their own modules.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from tqdm import tqdm

from gpt2_jax import checkpoints, faults, parallel, storage
from gpt2_jax.sampling import SAMPLE_HEADER, generate
from gpt2_jax.train import TrainState


class Hook:
    """An action every `every` steps (0: never periodically) on the step's state. `at_start`: also at the
    run's first step, before training; `at_end`: forced once at the last step, when the run "completed"
    train.total_steps or "always" (a stop too), unless it acted at that step already; `logged`: what it
    returns goes into the step's record; `pauses`: it takes time the next step's throughput leaves out."""

    every: int = 0
    at_start: bool = False
    at_end: str = "never"  # "never", "completed" or "always"
    logged: bool = False
    pauses: bool = False
    acted_at: int | None = None  # the step it last acted at

    def due(self, step: int) -> bool:
        """Whether it acts at this step periodically."""
        return self.every > 0 and step % self.every == 0

    def forced_at_end(self, step: int, completed: bool) -> bool:
        """Whether it acts at the run's last step (`completed`: train.total_steps was reached)."""
        wanted = self.at_end == "always" or (self.at_end == "completed" and completed)
        return wanted and self.acted_at != step

    def __call__(self, step: int, state: TrainState) -> dict[str, float]:
        """Act on step `step`'s state; the metrics to log (when `logged`)."""
        raise NotImplementedError

    def start(self, step: int, state: TrainState, resumed: bool) -> dict[str, float]:
        """At the run's first step (when `at_start`); `resumed`: the step was restored."""
        return self(step, state)

    def stops(self) -> bool:
        """Whether the run should stop here (early stopping)."""
        return False

    def why_stopped(self, step: int) -> str:
        """The line that says why, when it stopped the run."""
        return ""

    def meta(self) -> dict:
        """What it saves with every checkpoint, to continue from on resume."""
        return {}


class Run(NamedTuple):
    """What the hooks act with: the run's start (start.Start), its directory, the compiled eval step (given
    the frozen reference where the step takes one), the checkpoint writers (best: checkpoint.keep_best),
    the job's agreement (faults.JobAgreement: a failure on one process is the job's) and the checkpoints'
    metadata (a function of the step)."""

    start: Any
    run_dir: Any
    eval_step: Callable
    writer: checkpoints.CheckpointWriter
    best_writer: checkpoints.CheckpointWriter | None
    agreement: faults.JobAgreement
    meta: Callable[[int], dict]
    is_main: bool


def save(writer: checkpoints.CheckpointWriter, agreement: faults.JobAgreement, step: int, state: TrainState,
         meta: dict) -> None:
    """Save a step once the previous save has ended on every process: in a multi-process job, one process's
    failed background save is the job's failure before any process starts the next (orbax's save is collective)."""
    agreement.hold(writer.wait)
    agreement.settle()
    writer.save(step, state.trees(), meta)


class Validation(Hook):
    """Validation on fixed batches every data.val_every steps, at the first step and at the last of
    train.total_steps, and what acts on it: the best loss so far and its step (kept in RUN/best with
    checkpoint.keep_best), and the validations since without an improvement of more than min_delta (early
    stopping). That state is saved with every checkpoint (`meta`). A mixture's sources are validated apart
    (val_loss/SOURCE); val_loss is over all of their batches."""

    at_start, at_end, logged, pauses = True, "completed", True, True

    def __init__(self, config: Any, run: Run):
        start = run.start
        self.every = config.data.val_every if start.data.validation else 0
        self.eval_step, self.run, self.settings = run.eval_step, run, start.settings
        validation = start.data.validation
        by_source = validation if isinstance(validation, dict) else {"": validation}
        self.sources = [name for name in by_source for _ in by_source[name]]  # each batch's source
        objective = start.settings.objective
        self.counts = [objective.validation_weight(b) for batches in by_source.values() for b in batches]
        self.batches = [parallel.global_batch(b, start.steps.batch_sharding) for batches in by_source.values()
                        for b in batches]
        saved = start.meta.get("best_val_loss")
        self.best_loss = math.inf if saved is None else float(saved)
        self.best_step = start.meta.get("best_step")
        self.stale = int(start.meta.get("validations_without_improvement", 0))

    def __call__(self, step: int, state: TrainState) -> dict[str, float]:
        result = self.validate(step, state)
        self.judge(step, state, result["val_loss"])
        return result

    def start(self, step: int, state: TrainState, resumed: bool) -> dict[str, float]:
        """The starting point, so the log shows how far validation loss falls (a resumed step was judged when it
        was first validated)."""
        result = self.validate(step, state)
        if not resumed:
            self.judge(step, state, result["val_loss"])
        return result

    def _means(self, params: Any) -> tuple[list[dict[str, float]], Callable[..., float]]:
        """Each validation batch's outputs under params, and their weighted mean of a key (over one source)."""
        outs = [{k: float(v) for k, v in self.eval_step(params, b).items()} for b in self.batches]

        def mean(key: str, source: str | None = None) -> float:
            pairs = [(o[key], c) for o, c, s in zip(outs, self.counts, self.sources) if source in (None, s)]
            return float(np.sum([v * c for v, c in pairs]) / max(np.sum([c for _, c in pairs]), 1.0))

        return outs, mean

    def validate(self, step: int, state: TrainState) -> dict[str, float]:
        """val_loss (and val_ each of the objective's metrics) over the validation batches; with an average of the
        weights (train.ema_decay), its val_loss_ema beside."""
        outs, mean = self._means(state.params)
        result = {f"val_{k}": mean(k) for k in outs[0]}
        result.update({f"val_loss/{s}": mean("loss", s) for s in dict.fromkeys(self.sources) if s})
        if state.ema is not None:
            result["val_loss_ema"] = self._means(state.ema)[1]("loss")
        tqdm.write(f"[{step} | validation] " + " ".join(f"{k}={v:.4f}" for k, v in result.items()))
        self.acted_at = step
        return result

    def judge(self, step: int, state: TrainState, loss: float) -> None:
        """A new best (kept with keep_best), or one more validation without an improvement."""
        if loss < self.best_loss - self.settings.min_delta:
            self.best_loss, self.best_step, self.stale = loss, step, 0
            if self.run.best_writer is not None:
                save(self.run.best_writer, self.run.agreement, step, state, self.run.meta(step))
        else:
            self.stale += 1

    def stops(self) -> bool:
        return bool(self.settings.patience) and self.stale >= self.settings.patience

    def meta(self) -> dict:
        return {"best_step": self.best_step, "best_val_loss": None if math.isinf(self.best_loss) else self.best_loss,
                "validations_without_improvement": self.stale}

    def why_stopped(self, step: int) -> str:
        """The early stop's line."""
        s = self.settings
        kept = f", kept in {self.run.run_dir.best}" if self.run.best_writer is not None else ""
        return (f"early stop at step {step}: validation loss has not improved by more than "
                f"train.early_stop_min_delta={s.min_delta:g} for {self.stale} validations "
                f"(train.early_stop_patience={s.patience}); the best, {self.best_loss:.4f}, was at "
                f"step {self.best_step}{kept}")


class Sampling(Hook):
    """Samples continuing sample.prompt every sample.sample_every steps (printed, and written by process 0 to
    samples/RUN/samples-STEP)."""

    pauses = True

    def __init__(self, config: Any, run: Run):
        self.every, self.config, self.run = config.sample.sample_every, config, run

    def __call__(self, step: int, state: TrainState) -> dict[str, float]:
        s, start = self.config.sample, self.run.start
        model_config, encoder = start.model_config, start.encoder
        prompt = encoder.encode(s.prompt)[-(model_config.n_ctx - 1):] or [encoder.eot_token]
        length = min(s.sample_length, model_config.n_ctx - len(prompt))
        out = generate(model_config, state.params, prompt, length=length, batch_size=s.sample_num,
                       rng=jax.random.fold_in(jax.random.key(self.config.seed + 1), step), temperature=s.temperature,
                       top_k=s.top_k, top_p=s.top_p, eot=encoder.eot_token)
        self.acted_at = step
        if not self.run.is_main:
            return {}
        texts = [SAMPLE_HEADER.format(i + 1) + "\n" + s.prompt + encoder.decode(row[:n]) for i, (row, n) in
                 enumerate(zip(out.tokens, out.lengths))]
        tqdm.write("\n".join(texts))
        directory = storage.path(self.config.workdir) / "samples" / self.config.run_name

        def write() -> None:
            storage.mkdir(directory)
            (directory / f"samples-{step}").write_text("\n".join(texts) + "\n", encoding="utf-8")

        self.run.agreement.hold(write)  # a failed write is the job's failure
        return {}


class Checkpointing(Hook):
    """A checkpoint every checkpoint.save_every steps, and always at the end (a stop too)."""

    at_end = "always"

    def __init__(self, config: Any, run: Run):
        self.every, self.run = config.checkpoint.save_every, run
        self.acted_at = int(run.start.state.step) if run.start.meta else None  # a restored step is saved

    def __call__(self, step: int, state: TrainState) -> dict[str, float]:
        if self.acted_at != step:
            save(self.run.writer, self.run.agreement, step, state, self.run.meta(step))
            self.acted_at = step
        return {}
