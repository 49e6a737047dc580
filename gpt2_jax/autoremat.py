"""model.remat=auto: the fastest remat policy and micro-batch split whose compiled peak fits the memory budget.

For each policy, least recompute first, the largest micro-batch (a divisor of the global batch that
the data shards divide) whose compiled peak fits is found by bisection (peak memory grows with the
micro-batch), among the micro-batches larger than the best an earlier policy reached: a policy that
fits no larger one than a policy with less recompute cannot be faster, so it is not even searched.
The survivors are timed for a few steps on the device and the fastest is chosen; with
timed_steps=0 the largest micro-batch is taken (ties: the least recompute), a heuristic kept for
tests and for machines where timing is not wanted. Compiles are bounded (max_compiles) and reuse
JAX's compilation cache.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np

from gpt2_jax import parallel, storage
from gpt2_jax.errors import UserError
from gpt2_jax.model import GPT2Config, init_params, split_lora
from gpt2_jax.objectives import Objective
from gpt2_jax.rundir import RunDir
from gpt2_jax.settings import RunSettings, rows_of
from gpt2_jax.steps import build_steps, compile_with_stats
from gpt2_jax.targets import HEADROOM  # the default budget leaves this fraction of the device's memory free

GiB = 2**30
# Least recompute first: a policy later in the list keeps less, so it fits larger micro-batches.
POLICY_ORDER = ("none", "dots", "dots_no_batch", "save_attn", "save_named", "save_qkv", "full")


@dataclasses.dataclass
class Candidate:
    """One (policy, split) tried: its compiled peak and, when timed, its step time."""

    policy: str
    micro_batch: int
    accumulate: int
    peak_bytes: float
    fits: bool
    step_s: float | None = None
    chosen: bool = False


def default_budget_bytes() -> float:
    """The device's memory (its allocator's limit; physical memory on CPU) less HEADROOM."""
    stats = jax.local_devices()[0].memory_stats() or {}
    total = stats.get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return float(total) * (1 - HEADROOM)


def _splits(global_batch: int, shards: int) -> list[int]:
    """Micro-batch sizes, largest first: divisors of the global batch that the data shards divide."""
    return [m for m in range(global_batch, 0, -1) if global_batch % m == 0 and m % shards == 0]


def choose(model_config: GPT2Config, train: Any, mesh: Any, seq_len: int, budget_bytes: float, *,
           objective: Objective, sections: dict | None = None, timed_steps: int = 3, max_compiles: int = 24,
           seed: int = 0
           ) -> tuple[Candidate, list[Candidate]]:
    """(the chosen candidate, every candidate tried) for the global batch train.batch_size x accumulate_gradients
    (of the objective's rows: windows, examples or preference pairs)."""
    global_batch = rows_of(train)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    splits = _splits(global_batch, shards)
    tried: dict[tuple[str, int], Candidate] = {}
    compiled: dict[tuple[str, int], Any] = {}

    def probe(policy: str, m: int) -> Candidate:
        if (policy, m) not in tried:
            if len(tried) >= max_compiles:
                raise _OutOfCompiles
            steps = build_steps(dataclasses.replace(model_config, remat=policy), split_train(train, m, global_batch),
                                mesh, objective, sections=sections)
            exe, stats = compile_with_stats(steps, global_batch, seq_len)
            peak = stats["peak_bytes"] if exe is not None else max(stats["peak_bytes"], budget_bytes + 1)
            tried[policy, m] = Candidate(policy, m, global_batch // m, peak, peak <= budget_bytes)
            compiled[policy, m] = (steps, exe)
        return tried[policy, m]

    best: list[Candidate] = []  # per policy, its largest fitting split, kept only if larger than every earlier one
    try:
        for policy in POLICY_ORDER:
            # Only a micro-batch larger than the best so far makes more recompute worth it.
            options = [m for m in splits if not best or m > best[-1].micro_batch]  # largest first
            if not options:
                break  # the whole batch already fits with less recompute
            if probe(policy, options[0]).fits:
                found = options[0]
            elif not probe(policy, options[-1]).fits:
                continue
            else:  # bisect: options[lo] does not fit, options[hi] does (peak memory grows with the micro-batch)
                lo, hi = 0, len(options) - 1
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (lo, mid) if probe(policy, options[mid]).fits else (mid, hi)
                found = options[hi]
            best.append(tried[policy, found])
    except _OutOfCompiles:
        pass
    candidates = sorted(tried.values(), key=lambda c: (POLICY_ORDER.index(c.policy), -c.micro_batch))
    if not best:
        smallest = min(candidates, key=lambda c: c.peak_bytes)
        raise UserError(f"model.remat=auto: nothing fits the memory budget of {budget_bytes / GiB:.3f} GiB; "
                        "the smallest "
                        f"compiled peak found is {smallest.peak_bytes / GiB:.3f} GiB ({smallest.policy}, micro-batch "
                        f"{smallest.micro_batch}); raise model.memory_budget_gb, lower data.seq_len, or use more "
                        "devices (mesh.fsdp)")
    if timed_steps > 0 and len(best) > 1:
        for c in best:
            steps, exe = compiled[c.policy, c.micro_batch]
            c.step_s = _time_steps(steps, exe, model_config, global_batch, seq_len, timed_steps, seed)
        fastest = min(range(len(best)), key=lambda i: best[i].step_s)
        if jax.process_count() > 1:  # timings differ by process: every process takes process 0's choice
            from jax.experimental import multihost_utils

            fastest = int(multihost_utils.broadcast_one_to_all(np.int32(fastest)))
        chosen = best[fastest]
    else:
        chosen = best[-1]  # the largest micro-batch that fits (ties went to less recompute)
    chosen.chosen = True
    return chosen, candidates


class _OutOfCompiles(Exception):
    """The compile budget (max_compiles) is spent: choose among what was measured."""


def split_train(train: Any, micro_batch: int, global_batch: int) -> Any:
    """The train config section with the global batch split into micro-batch x accumulate."""
    split = copy.deepcopy(train)
    split.batch_size, split.accumulate_gradients = micro_batch, global_batch // micro_batch
    return split


def _time_steps(steps: Any, exe: Any, model_config: GPT2Config, rows: int, seq_len: int, n: int, seed: int) -> float:
    """Median seconds of n steps of a compiled candidate, after one warm-up, on random tokens (every target
    counted), with the step's frozen reference, if it takes one, at the starting weights."""
    params = init_params(model_config, jax.random.key(seed))
    state = steps.init_state(params)
    rng = np.random.default_rng(seed)
    batch = jax.tree.map(lambda a: parallel.global_batch(
        rng.integers(0, model_config.n_vocab, a.shape, dtype=np.int32) if a.dtype == np.int32
        else np.ones(a.shape, a.dtype), steps.batch_sharding), steps.abstract_batch(rows, seq_len))
    key = jax.device_put(jax.random.key(seed), parallel.replicated(steps.mesh))
    reference = () if steps.reference is None else \
        (parallel.put_tree(split_lora(params)[1], jax.tree.map(lambda a: a.sharding, steps.reference)),)
    state, metrics = exe(state, batch, key, *reference)
    float(metrics["loss"])
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        state, metrics = exe(state, batch, key, *reference)
        float(metrics["loss"])
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def table(candidates: list[Candidate], budget_bytes: float) -> str:
    """The candidates as a markdown table."""
    lines = [f"remat auto: candidates for a budget of {budget_bytes / GiB:.3f} GiB",
             "| policy | micro-batch | accumulate | peak GiB | fits | step ms | chosen |",
             "|---|---|---|---|---|---|---|"]
    for c in candidates:
        step = f"{c.step_s * 1e3:.1f}" if c.step_s is not None else "-"
        lines.append(f"| {c.policy} | {c.micro_batch} | {c.accumulate} | {c.peak_bytes / GiB:.3f} | "
                     f"{'yes' if c.fits else 'no'} | {step} | {'*' if c.chosen else ''} |")
    return "\n".join(lines)


def summary(chosen: Candidate, budget_bytes: float) -> str:
    """The one line scripts read: policy, split, peak and budget (GiB, 3 decimals)."""
    return (f"remat auto: {chosen.policy}, micro-batch {chosen.micro_batch} x accumulate {chosen.accumulate}, "
            f"peak {chosen.peak_bytes / GiB:.3f} GiB of budget {budget_bytes / GiB:.3f} GiB")


def resolve(config: Any, model_config: GPT2Config, mesh: Any, settings: RunSettings, run_dir: RunDir | None = None,
            log_dir: Any = None, target: Any = None) -> tuple[GPT2Config, Any, str]:
    """The model config and train section with model.remat=auto resolved, and the summary line.

    A run that chose before (its remat_auto.json) keeps its choice, so that it resumes exactly; a
    new choice is written there, and the candidates' table to log_dir/remat_auto.md. For a compile
    target (targets.Target, whose devices `mesh` holds) the budget is the target's and nothing is
    timed: nothing can run on it, so the largest micro-batch that fits is taken.
    """
    global_batch = settings.rows
    saved = run_dir.remat_auto if run_dir is not None else None
    if saved is not None and saved.is_file():
        record = json.loads(saved.read_text())
        if record["global_batch"] == global_batch:
            chosen = Candidate(**record["chosen"])
            return (dataclasses.replace(model_config, remat=chosen.policy),
                    split_train(config.train, chosen.micro_batch, global_batch),
                    summary(chosen, record["budget_bytes"]) + " (as chosen when the run started)")
    if target is not None:
        budget, timed_steps = target.budget_bytes(config.model.memory_budget_gb), 0
        print(f"remat auto: compiling for target {target.name}, where nothing can run, so candidates are not timed: "
              "it takes the largest micro-batch that fits (fewest accumulation steps), least recompute on ties",
              flush=True)
    else:
        budget = config.model.memory_budget_gb * GiB if config.model.memory_budget_gb > 0 else default_budget_bytes()
        timed_steps = config.model.remat_auto_steps
    chosen, candidates = choose(model_config, config.train, mesh, settings.seq_len, budget, timed_steps=timed_steps,
                                seed=config.seed, objective=settings.objective, sections=settings.sections)
    text, line = table(candidates, budget), summary(chosen, budget)
    print(text + "\n" + line, flush=True)
    if jax.process_index() == 0:
        if saved is not None:
            storage.mkdir(saved.parent)
            saved.write_text(json.dumps({"global_batch": global_batch, "budget_bytes": budget,
                                         "chosen": dataclasses.asdict(chosen),
                                         "candidates": [dataclasses.asdict(c) for c in candidates]}, indent=2))
        if log_dir is not None:
            storage.mkdir(log_dir)
            (log_dir / "remat_auto.md").write_text(text + "\n\n" + line + "\n")
    return dataclasses.replace(model_config, remat=chosen.policy), split_train(config.train, chosen.micro_batch,
                                                                               global_batch), line
