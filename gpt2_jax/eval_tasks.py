"""Benchmarks watched while a run trains: two periodic actions (hooks, rows of hooks.HOOKS) on the live params.

- EvalTasks: lm-evaluation-harness tasks (eval.tasks, local task YAMLs through eval.include_path) every
  eval.every steps and at the last of train.total_steps, through gpt2-jax's lm-eval adapter (harness.py) on
  the params as they are on the run's mesh (no reload, no second copy), on every process as the adapter runs.
  Each task's metrics are logged as `eval/TASK/METRIC` (lm-eval's metric name without its filter), and equal
  what `gpt2-jax lm-eval` reports on the checkpoint of that step.
- HellaSwag: llm.c's scoring of HellaSwag's validation jsonl (eval.hellaswag, a local path: hellaswag.py),
  logged as `eval/hellaswag_llmc/acc` and `eval/hellaswag_llmc/acc_norm`, for a pretraining run with no lm-eval
  tasks set up.
"""

from __future__ import annotations

import math
from typing import Any

from tqdm import tqdm

from gpt2_jax.errors import UserError
from gpt2_jax.hooks import Hook, Run
from gpt2_jax.train import TrainState


def check(config: Any) -> None:
    """One line for eval settings that cannot run (settings.check_config calls it)."""
    e = config.eval
    if (e.tasks or e.hellaswag) and e.every <= 0:
        raise UserError(f"eval.tasks={e.tasks!r} / eval.hellaswag={e.hellaswag!r} are set but eval.every="
                        f"{e.every}: set eval.every > 0 (steps between evaluations)")
    if e.limit < 0 or e.batch_size < 1:
        raise UserError(f"eval.limit={e.limit} and eval.batch_size={e.batch_size}: need limit >= 0 (0 = every item) "
                        "and batch_size >= 1")
    if e.tasks:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise UserError(f"eval.tasks={e.tasks!r} needs lm-eval: pip install 'gpt2-jax[eval]'") from None


def _limit(limit: float) -> int | float | None:
    """lm-eval's limit: None (every item), a count, or a fraction below 1."""
    return None if not limit else int(limit) if limit >= 1 else float(limit)


def hellaswag_items(path: str, limit: float) -> list:
    """HellaSwag's items under eval.limit as lm-eval reads its limit: every item (0), the first N, or the first
    ceil(share x items) for a share below 1."""
    from gpt2_jax import hellaswag

    count = _limit(limit)
    items = hellaswag.read_items(path, count if isinstance(count, int) else None)
    return items[:math.ceil(len(items) * count)] if isinstance(count, float) else items


class _Benchmark(Hook):
    """A benchmark on the live params every eval.every steps and at the end of train.total_steps, when the
    eval field `turned_on_by` is set."""

    at_end, logged, pauses = "completed", True, True
    turned_on_by = ""

    def __init__(self, config: Any, run: Run):
        self.every = config.eval.every if config.eval[self.turned_on_by] else 0
        self.run, self.config = run, config


class EvalTasks(_Benchmark):
    """lm-eval's tasks (eval.tasks)."""

    turned_on_by = "tasks"

    def __init__(self, config: Any, run: Run):
        super().__init__(config, run)
        e = config.eval
        self.names = [t.strip() for t in e.tasks.split(",") if t.strip()]
        self.manager = None  # lm-eval's task index, made at the first evaluation (it takes seconds)

    def __call__(self, step: int, state: TrainState) -> dict[str, float]:
        import lm_eval

        from gpt2_jax.api import Model
        from gpt2_jax.harness import GPT2JaxLM, task_manager

        e, start = self.config.eval, self.run.start
        if self.manager is None:
            self.manager = task_manager(self.names, e.include_path or None, ("eval.tasks", "eval.include_path=DIR"))
        lm = GPT2JaxLM(Model(start.model_config, state.params, start.encoder), batch_size=e.batch_size,
                       mesh=start.steps.mesh)
        results = lm_eval.simple_evaluate(model=lm, tasks=self.names, limit=_limit(e.limit), bootstrap_iters=0,
                                          task_manager=self.manager, verbosity="ERROR")
        metrics = metrics_of(results)
        tqdm.write(f"[{step} | eval] " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics


def metrics_of(results: dict) -> dict[str, float]:
    """lm-eval's results as {"eval/TASK/METRIC": value}: each metric's name without its filter (acc,none ->
    acc), its standard errors and what is not a metric (a key without a filter: alias, sample_len) left out."""
    out = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            metric, filtered, _ = key.partition(",")
            if not filtered or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            out[f"eval/{task}/{metric}"] = float(value)
    return out


class HellaSwag(_Benchmark):
    """llm.c's HellaSwag (eval.hellaswag)."""

    turned_on_by = "hellaswag"

    def __init__(self, config: Any, run: Run):
        super().__init__(config, run)
        self.items: list | None = None  # read at the first evaluation (a bad file: one line, before training)

    def __call__(self, step: int, state: TrainState) -> dict[str, float]:
        from gpt2_jax import hellaswag

        e, start = self.config.eval, self.run.start
        if self.items is None:
            self.items = hellaswag_items(e.hellaswag, e.limit)
        result = hellaswag.score(start.model_config, state.params, start.encoder, self.items,
                                 batch_size=e.batch_size)
        metrics = {"eval/hellaswag_llmc/acc": float(result["acc"]),
                   "eval/hellaswag_llmc/acc_norm": float(result["acc_norm"])}
        tqdm.write(f"[{step} | hellaswag] acc={result['acc']:.4f} acc_norm={result['acc_norm']:.4f} "
                   f"over {result['n']} items")
        return metrics
