"""The remat ablation: compile the train step per (policy, micro-batch), measure, and report.

For each pair it records XLA's compiled memory (memory_analysis) and FLOPs (cost_analysis), and,
unless compile-only, the median step time after warm-up and the first step's loss (every policy
must give no-remat's loss). Writes ablation.json, ablation.md and ablation.png to the output dir (a local
path or a URL).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from typing import Any

import jax
import numpy as np

from gpt2_jax import parallel, storage
from gpt2_jax.errors import UserError
from gpt2_jax.model import REMAT_POLICIES, GPT2Config, init_params
from gpt2_jax.settings import seq_len_of
from gpt2_jax.steps import build_steps, compile_with_stats

GiB = 2**30


def _compile(model_config: GPT2Config, train: Any, mesh, batch: int, seq_len: int) -> tuple[Any, Any, dict]:
    """(built steps, compiled step, row with compile time and XLA's compiled figures) of one candidate."""
    t0 = time.perf_counter()
    built = build_steps(model_config, train, mesh)
    compiled, stats = compile_with_stats(built, batch, seq_len)  # None: the target's compiler refused it
    return built, compiled, {"compile_s": time.perf_counter() - t0, **stats}


def _device_peak() -> int | None:
    """The first local device's peak bytes in use so far (None where the backend keeps no count, e.g. CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    return stats.get("peak_bytes_in_use") if stats else None


def _time(built: Any, compiled: Any, model_config: GPT2Config, mesh, batch: int, seq_len: int, steps: int,
          seed: int) -> dict[str, float]:
    """Loss of the first step, median step time and tokens/s of a compiled candidate."""
    state = built.init_state(init_params(model_config, jax.random.key(seed)))
    tokens = np.random.default_rng(seed).integers(0, model_config.n_vocab, (batch, seq_len + 1), dtype=np.int32)
    batch_arr = parallel.global_batch(tokens, built.batch_sharding)
    key = jax.device_put(jax.random.key(seed), parallel.replicated(mesh))
    state, metrics = compiled(state, batch_arr, key)  # warm-up; the first loss is of the initial params
    row = {"loss": float(metrics["loss"])}
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch_arr, key)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t0)
    row["step_s"] = float(np.median(times))
    row["tokens_per_s"] = batch * seq_len / row["step_s"]
    return row


def largest_batch_within(rows: list[dict], budget_bytes: float) -> int | None:
    """Largest micro-batch whose peak memory fits the budget, extrapolated linearly from the measured ones."""
    points = sorted((r["micro_batch"], r["peak_bytes"], r["temp_bytes"]) for r in rows)
    if len(points) == 1:  # one measurement: temporaries grow with the batch, the rest is fixed
        b, m, temp = points[0]
        per_row, fixed = max(temp / b, 1.0), m - temp
    else:
        (b0, m0, _), (b1, m1, _) = points[-2], points[-1]
        per_row = max((m1 - m0) / (b1 - b0), 1.0)
        fixed = m1 - per_row * b1
    return max(0, int((budget_bytes - fixed) // per_row))


def run_ablation(config: Any, model_config: GPT2Config, out_dir: str | os.PathLike, target: Any = None) -> list[dict]:
    """Measure every (policy, micro-batch) and write ablation.json/.md/.png into out_dir; for a compile
    target (targets.Target) every row is compiled for it and none is run."""
    ab = config.ablation
    policies = [p for p in ab.policies.split(",") if p]
    unknown = [p for p in policies if p not in REMAT_POLICIES]
    if unknown:
        raise UserError(f"ablation.policies: unknown {unknown}; use names from {sorted(REMAT_POLICIES)}")
    micro_batches = sorted(int(b) for b in str(ab.micro_batches).split(",") if b)
    seq_len = seq_len_of(config, model_config)
    if target is not None:
        from gpt2_jax import targets

        model_config = targets.for_target(model_config, target)
        mesh = targets.make_mesh(target, config.mesh.data, config.mesh.fsdp)
    else:
        mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    for b in micro_batches:
        parallel.check_batch(b, mesh)
    rows, compiled = [], []
    for policy in policies:
        cfg = dataclasses.replace(model_config, remat=policy)
        for b in micro_batches:
            built, step, stats = _compile(cfg, config.train, mesh, b, seq_len)
            rows.append({"policy": policy, "micro_batch": b, **stats})
            compiled.append((cfg, built, step))
            print(f"{policy:>14} micro-batch {b:>3}: compiled peak {stats['peak_bytes'] / GiB:.3f} GiB, "
                  f"{_gflop(stats)} GFLOP", flush=True)
    if not ab.compile_only and target is None:
        # The device's peak cannot be reset, so candidates run from the smallest compiled peak up: a row's
        # device peak is its own when it rises above the rows before it, else only a bound (device_peak_exact).
        seen = _device_peak()
        fitting = [i for i in range(len(rows)) if rows[i]["peak_bytes"] <= ab.memory_budget_gb * GiB
                   and compiled[i][2] is not None]
        for i in sorted(fitting, key=lambda i: rows[i]["peak_bytes"]):  # the rest would run out of memory
            (cfg, built, step), row = compiled[i], rows[i]
            row.update(_time(built, step, cfg, mesh, row["micro_batch"], seq_len, ab.steps, config.seed))
            peak = _device_peak()
            row["device_peak_bytes"], row["device_peak_exact"] = peak, peak is not None and peak > (seen or 0)
            seen = peak
            print(f"{row['policy']:>14} micro-batch {row['micro_batch']:>3}: {row['step_s'] * 1e3:.1f} ms/step"
                  + (f", device peak {peak / GiB:.3f} GiB" if peak is not None else ""), flush=True)
    del compiled
    baseline = {r["micro_batch"]: r for r in rows if r["policy"] == "none"}
    for r in rows:
        ref = baseline.get(r["micro_batch"])
        r["recompute_overhead"] = r["flops"] / ref["flops"] - 1 if ref and r["flops"] and ref["flops"] else None
        r["time_overhead"] = r["step_s"] / ref["step_s"] - 1 if ref and "step_s" in r and "step_s" in ref else None
    meta = {"model": model_config.hparams(), "dtype": model_config.dtype, "seq_len": seq_len,
            "device": mesh.devices.flat[0].device_kind, "devices": mesh.devices.size,
            "memory_budget_gb": ab.memory_budget_gb, "target": target.name if target is not None else None}
    write_report(rows, meta, out_dir)
    return rows


def write_report(rows: list[dict], meta: dict, out_dir: str | os.PathLike) -> None:
    """ablation.json, ablation.md and ablation.png from the measured rows, in a local directory or a URL."""
    budget = meta["memory_budget_gb"] * GiB
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    meta["largest_micro_batch_within_budget"] = {
        p: largest_batch_within([r for r in rows if r["policy"] == p], budget) for p in policies}
    out_dir = storage.path(out_dir)
    storage.mkdir(out_dir)
    (out_dir / "ablation.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out_dir / "ablation.md").write_text(_markdown(rows, meta))
    _plot(rows, out_dir / "ablation.png", meta)


def _gflop(row: dict) -> str:
    return "n/a" if row["flops"] is None else f"{row['flops'] / 1e9:.1f}"


def _markdown(rows: list[dict], meta: dict) -> str:
    m = meta["model"]
    lines = [f"# Remat ablation: L={m['n_layer']}, C={m['n_embd']}, V={m['n_vocab']}, T={meta['seq_len']}, "
             f"{meta['dtype']}, {meta['devices']} x {meta['device']}"
             + (f" (compiled for target {meta['target']}: nothing ran)" if meta.get("target") else ""), "",
             "| policy | micro-batch | peak memory (GiB) | device peak (GiB) | temp (GiB) | GFLOP | recompute overhead "
             "| step ms | time overhead | tokens/s | loss | largest micro-batch within "
             f"{meta['memory_budget_gb']:g} GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    pct = lambda v: "n/a" if v is None else f"{v:+.1%}"  # noqa: E731

    def device(r: dict) -> str:  # measured; "<=" where an earlier row's higher peak hides this one's
        if r.get("device_peak_bytes") is None:
            return "n/a"
        return ("" if r["device_peak_exact"] else "<= ") + f"{r['device_peak_bytes'] / GiB:.3f}"

    for r in rows:
        refused = " (refused: out of memory)" if r.get("refused") else ""
        lines.append(f"| {r['policy']} | {r['micro_batch']} | {r['peak_bytes'] / GiB:.3f}{refused} | {device(r)} "
                     f"| {r['temp_bytes'] / GiB:.3f} | {_gflop(r)} | {pct(r['recompute_overhead'])} | "
                     f"{r['step_s'] * 1e3:.1f} | {pct(r['time_overhead'])} | {r['tokens_per_s']:.0f} | {r['loss']:.6f} "
                     if "step_s" in r else
                     f"| {r['policy']} | {r['micro_batch']} | {r['peak_bytes'] / GiB:.3f}{refused} | n/a "
                     f"| {r['temp_bytes'] / GiB:.3f} | {_gflop(r)} | {pct(r['recompute_overhead'])} "
                     "| n/a | n/a | n/a | n/a ")
        lines[-1] += f"| {meta['largest_micro_batch_within_budget'][r['policy']]} (est.) |"
    lines += ["", "Peak memory and FLOPs are XLA's compiled figures per device (memory_analysis, cost_analysis); "
              "the device peak is measured (memory_stats()['peak_bytes_in_use'], n/a where the backend keeps none, "
              "as on CPU): it cannot be reset, so the rows run from the smallest compiled peak up and a row "
              "that does not raise it shows only a bound (<=); rows whose compiled peak exceeds the budget are "
              "not timed (n/a); "
              "on CPU the step is compiled with XLA's memory-minimising scheduler "
              "(xla_cpu_enable_concurrency_optimized_scheduler=false), as the default one hides remat's savings. "
              "The largest micro-batch is extrapolated linearly from the two largest measured ones (from a single one: "
              "arguments fixed, temporaries proportional to the batch)."]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: storage.AnyPath, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["micro_batch"] for r in rows})
    all_timed = [b for b in batches if all("step_s" in r for r in rows if r["micro_batch"] == b)]
    top = max(all_timed or batches)  # the largest micro-batch every policy was timed at, if any
    chosen = [r for r in rows if r["micro_batch"] == top]
    timed = bool(all_timed)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in chosen:
        x = r["peak_bytes"] / GiB
        y = r["step_s"] * 1e3 if timed else (r["flops"] or 0) / 1e9
        ax.scatter(x, y)
        ax.annotate(r["policy"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=9)
    ax.set_xlabel("compiled peak memory per device (GiB)")
    ax.set_ylabel("step time (ms)" if timed else "GFLOP per step (compile-only)")
    m = meta["model"]
    ax.set_title(f"Remat policies: L={m['n_layer']} C={m['n_embd']}, micro-batch {top}, T={meta['seq_len']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()  # written whole, so that a store's object is too
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    path.write_bytes(buffer.getvalue())
