"""The one place the training step is assembled, and what XLA says a compiled step costs.

`build_steps(model config, train config, mesh)` makes the optimizer, the abstract sharded state,
the jitted train and eval steps and their shardings; the loop, resume, `launch.py --dry_run`, the
remat ablation and the benchmarks all call it, so a change to the step's signature is made here and
in train.py only. Below it: XLA's FLOPs and memory of a compiled step, device peaks for MFU.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from gpt2_jax import parallel
from gpt2_jax.model import GPT2Config, param_shapes
from gpt2_jax.objectives import NextToken, Objective
from gpt2_jax.optim import learning_rate_schedule, make_optimizer
from gpt2_jax.train import TrainState, make_eval_step, make_train_step


def abstract_state(model_config: GPT2Config, train: Any, mesh: Mesh, sections: Mapping[str, Any] | None = None
                   ) -> tuple[optax.GradientTransformation, TrainState]:
    """The optimizer and the train state as ShapeDtypeStructs carrying their shardings on the mesh
    (params, optimizer state and the weights' average replicated, or FSDP-sharded; the step counter and the
    spike detector replicated). `sections`: the config sections an optimizer reads beside train
    (optim.OPTIMIZERS)."""
    params = param_shapes(model_config)
    optimizer = make_optimizer(train, params, sections)
    ema, window = train.get("ema_decay", 0.0) > 0, train.get("spike_window") if train.get("skip_spikes") else None
    state = jax.eval_shape(lambda p: TrainState.create(p, optimizer, ema, window), params)  # nothing allocated
    repl = parallel.replicated(mesh)
    shardings = state.replace(step=repl, params=parallel.state_shardings(mesh, state.params),
                              opt_state=parallel.state_shardings(mesh, state.opt_state),
                              ema=parallel.state_shardings(mesh, state.ema) if ema else None,
                              spikes=jax.tree.map(lambda _: repl, state.spikes))
    return optimizer, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)


@dataclasses.dataclass(frozen=True)
class Steps:
    """The compiled-on-first-call train and eval steps of one (model config, train config, mesh)."""

    mesh: Mesh
    optimizer: optax.GradientTransformation
    abstract_state: TrainState  # ShapeDtypeStructs with shardings
    state_sharding: TrainState  # NamedShardings, one per leaf
    batch_sharding: NamedSharding  # windows [rows, T+1] split by rows over every device
    step_fn: Callable  # the pure step (state, batch, rng[, reference]) -> (state, metrics), before jit
    train_step: Callable  # jitted over the mesh; donates the state it is given
    eval_step: Callable  # jitted (params, batch[, reference]) -> {"loss", *metrics} (replicated)
    objective: Objective  # what a batch is and how a step scores it
    reference: Any = None  # the frozen reference's params (objective.takes_reference), ShapeDtypeStructs with shardings

    def init_state(self, params: Any) -> TrainState:
        """A step-0 state on the mesh from params (host or device arrays), the optimizer freshly initialised (and
        the weights' average and the spike detector where the state holds them)."""
        params = parallel.put_tree(params, self.state_sharding.params)
        ema, spikes = self.abstract_state.ema is not None, self.abstract_state.spikes
        window = spikes.losses.shape[0] if spikes is not None else None
        return jax.jit(lambda p: TrainState.create(p, self.optimizer, ema, window),
                       out_shardings=self.state_sharding)(params)

    def abstract_batch(self, rows: int, seq_len: int) -> Any:
        """A batch of `rows` rows (windows, examples or pairs) of seq_len + 1 tokens as ShapeDtypeStructs."""
        return self.objective.abstract_batch(rows, seq_len, self.batch_sharding)

    def abstract_inputs(self, rows: int, seq_len: int) -> tuple:
        """The train step's arguments as ShapeDtypeStructs: state, a batch of `rows` windows (or pairs), an rng key
        (and the frozen reference's params)."""
        inputs = (self.abstract_state, self.abstract_batch(rows, seq_len), jax.eval_shape(lambda: jax.random.key(0)))
        return inputs + ((self.reference,) if self.reference is not None else ())

    def compile(self, rows: int, seq_len: int) -> Any:
        """The train step compiled ahead of time for `rows` windows of `seq_len` tokens, allocating nothing."""
        return self.train_step.lower(*self.abstract_inputs(rows, seq_len)).compile()


def reference_shapes(model_config: GPT2Config, mesh: Mesh) -> Any:
    """The params of a frozen DPO reference (a plain GPT-2 of this shape and layout) as ShapeDtypeStructs
    sharded as the policy's are."""
    shapes = param_shapes(dataclasses.replace(model_config, lora_rank=0))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                        parallel.state_shardings(mesh, shapes))


def build_steps(model_config: GPT2Config, train: Any, mesh: Mesh, objective: Objective = NextToken(), *,
                sections: Mapping[str, Any] | None = None, donate: bool = True) -> Steps:
    """The sharded train and eval steps for a model, the `train` config section, a device mesh and the run's
    objective (objectives.py: the batches and how a step scores them; default the plain next-token loss);
    `sections`: the config sections an optimizer reads beside train (settings.optimizer_sections)."""
    optimizer, state = abstract_state(model_config, train, mesh, sections)
    step_fn = make_train_step(model_config, optimizer, learning_rate_schedule(train), objective,
                              accumulate=train.accumulate_gradients, ema_decay=float(train.get("ema_decay", 0.0)),
                              spike_sigma=float(train.get("spike_sigma", 6.0)))
    state_sh = jax.tree.map(lambda a: a.sharding, state)
    batch_sh, repl = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    reference = reference_shapes(model_config, mesh) if objective.takes_reference else None
    reference_sh = (jax.tree.map(lambda a: a.sharding, reference),) if reference is not None else ()
    train_step = jax.jit(parallel.with_mesh_rules(step_fn, mesh),
                         in_shardings=(state_sh, batch_sh, repl, *reference_sh), out_shardings=(state_sh, repl),
                         donate_argnums=0 if donate else ())
    eval_step = jax.jit(parallel.with_mesh_rules(make_eval_step(model_config, objective), mesh),
                        in_shardings=(state_sh.params, batch_sh, *reference_sh), out_shardings=repl)
    return Steps(mesh, optimizer, state, state_sh, batch_sh, step_fn, train_step, eval_step, objective, reference)


# --- What a compiled step costs -------------------------------------------------------------------

def compiled_stats(compiled: Any) -> dict[str, float | None]:
    """XLA's FLOPs and per-device memory (bytes) of a compiled executable; flops is None where the
    compiler reports none (XLA's GPU compiler without a device)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    return {"flops": float(cost.get("flops", 0.0)) if cost else None, "argument_bytes": mem.argument_size_in_bytes,
            "output_bytes": mem.output_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
            "alias_bytes": mem.alias_size_in_bytes,
            "peak_bytes": mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes}


def compile_with_stats(steps: Steps, rows: int, seq_len: int) -> tuple[Any, dict[str, float | None]]:
    """(the compiled step, compiled_stats) of `rows` windows; a compiler that refuses the step for want
    of memory (a TPU's: RESOURCE_EXHAUSTED) gives (None, its figures): the arguments per device plus the
    temporaries it said it needed, with "refused" set."""
    try:
        exe = steps.compile(rows, seq_len)
    except jax.errors.JaxRuntimeError as e:
        needed = re.search(r"RESOURCE_EXHAUSTED.*?required[^(]*\((\d+(?:\.\d+)?)([KMGT])", str(e), re.S)
        if needed is None:
            raise
        temp = float(needed.group(1)) * 1024 ** " KMGT".index(needed.group(2))
        args = sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                   for x in jax.tree.leaves(steps.abstract_inputs(rows, seq_len)) if getattr(x, "sharding", None))
        return None, {"flops": None, "argument_bytes": float(args), "output_bytes": 0.0, "temp_bytes": temp,
                      "alias_bytes": 0.0, "peak_bytes": float(args) + temp, "refused": True}
    return exe, compiled_stats(exe)


def compile_falling_back_to_xla_attention(model_config: GPT2Config, train: Any, mesh: Mesh, rows: int, seq_len: int,
                                          objective: Objective = NextToken(), sections: Mapping[str, Any] | None = None
                                          ) -> tuple[GPT2Config, dict[str, float | None], str | None]:
    """compile_with_stats of the built step; where JAX's partitioning rule for cuDNN's fused attention
    refuses the mesh (some FSDP layouts: docs/targets.md), the step with XLA's
    attention instead. Returns the model config compiled, its stats, and why it fell back (or None)."""
    try:
        steps = build_steps(model_config, train, mesh, objective, sections=sections)
        return model_config, compile_with_stats(steps, rows, seq_len)[1], None
    except jax.errors.JaxRuntimeError as e:
        if model_config.attention != "cudnn" or "custom_partitioner" not in str(e):
            raise
        why = next((line.strip()[:120] for line in str(e).splitlines()
                    if line.strip().split(":")[0].endswith("Error") and not line.strip().startswith("jax")),
                   "custom_partitioner")
    model_config = dataclasses.replace(model_config, attention="xla")
    steps = build_steps(model_config, train, mesh, objective, sections=sections)
    return model_config, compile_with_stats(steps, rows, seq_len)[1], why


def bytes_per_device(tree: Any) -> int:
    """Bytes of the first local device's shards of every array in the tree."""
    device = jax.local_devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)


# XLA's CPU backend schedules for concurrency by default, keeping activations alive that remat frees;
# its memory-minimising scheduler gives memory figures that reflect remat, as accelerators' do.
MEMORY_FAITHFUL_CPU_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def use_memory_faithful_cpu_scheduler() -> None:
    """Compile CPU programs with the memory-minimising scheduler; call before JAX starts its backend."""
    flags = os.environ.get("XLA_FLAGS", "")
    if MEMORY_FAITHFUL_CPU_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {MEMORY_FAITHFUL_CPU_FLAG}".strip()


def enable_compilation_cache() -> str | None:
    """JAX's persistent compilation cache for the CLIs and launch.py, so a second launch loads what the
    first compiled: $GPT2_JAX_COMPILATION_CACHE (a directory; "off" disables it), else
    $XDG_CACHE_HOME/gpt2_jax/xla (~/.cache/...). A cache already configured (JAX_COMPILATION_CACHE_DIR)
    is left as it is. Entries are written atomically, so several processes can share it."""
    setting = os.environ.get("GPT2_JAX_COMPILATION_CACHE", "")
    if setting.lower() in ("off", "0", "none", "false") or jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir or None
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = Path(setting) if setting else home / "gpt2_jax" / "xla"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # an unwritable home: run without a cache rather than fail
    jax.config.update("jax_compilation_cache_dir", str(path))
    return str(path)


def flops_per_token(model_config: GPT2Config, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus 12·L·T·C for attention (PaLM's formula)."""
    return 6 * model_config.num_params() + 12 * model_config.n_layer * seq_len * model_config.n_embd
