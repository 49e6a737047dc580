"""EleutherAI's lm-evaluation-harness on a gpt2-jax model: an `lm_eval` LM backed by our compiled forward pass.

Requests are tokenised exactly as lm-eval's transformers backend (`hf`) tokenises them (its
TemplateLM: trailing context spaces moved to the continuation, an empty context replaced by the
end-of-text id, rolling windows from lm_eval.utils), then scored in batches padded to a few bucket
lengths (each (rows, length) shape compiled once), split over every device of a data-parallel mesh.
`lm-eval` is an optional extra (`pip install -e ".[eval]"`).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from gpt2_jax import parallel
from gpt2_jax.api import Model
from gpt2_jax.errors import UserError
from gpt2_jax.model import GPT2, GPT2Config

try:
    from lm_eval.api.model import TemplateLM
except ImportError:  # the extra is missing: run_tasks says what to install
    TemplateLM = object


def buckets(n_ctx: int, smallest: int = 8) -> list[int]:
    """The padded lengths a batch may have: powers of two from `smallest` up to 64, then every multiple
    of 64 (little padding wasted, a bounded number of shapes), and n_ctx."""
    sizes, size = [], smallest
    while size < min(64, n_ctx):
        sizes.append(size)
        size *= 2
    return sorted({*sizes, *range(64, n_ctx, 64), n_ctx})


def batch_rows(total: int, batch_size: int, shards: int) -> list[int]:
    """The rows of each batch that scores `total` requests: full batches of batch_size (a multiple of
    shards), then the rest as power-of-two multiples of shards, largest first, so that no row is
    padding where the devices allow and the batch shapes stay few (the last batch alone may be padded
    up to `shards` rows)."""
    counts = [batch_size] * (total // batch_size)
    rest = total % batch_size
    while rest > 0:
        units = max(rest // shards, 1)
        counts.append(shards << (units.bit_length() - 1))
        rest -= counts[-1]
    return counts


@functools.partial(jax.jit, static_argnames="config")
def _score(params: Any, tokens: jax.Array, lengths: jax.Array, targets: jax.Array, weights: jax.Array, *,
           config: GPT2Config) -> tuple[jax.Array, jax.Array]:
    """Per row: the summed log-probability of the weighted targets, and whether each was the argmax.

    tokens [B, L] hold each row's inputs from position 0 (lengths [B] of them, zero-padded after);
    targets and weights [B, K] are those of the row's last K inputs. Only those K positions' logits are
    computed, not L of them.
    """
    hidden, _ = GPT2(config).apply(params, tokens, method=GPT2.hidden)  # [B, L, C]
    K = targets.shape[1]
    positions = jnp.clip(lengths[:, None] - K + jnp.arange(K), 0, tokens.shape[1] - 1)  # [B, K]
    picked_hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)
    logits = GPT2(config).apply(params, picked_hidden, method=GPT2.logits).astype(jnp.float32)  # [B, K, V]
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    greedy = (jnp.argmax(logits, axis=-1) == targets) | (weights == 0)
    return jnp.sum(picked * weights, axis=1), jnp.all(greedy, axis=1)


def _to_host(rows: jax.Array) -> np.ndarray:
    """Every row of a batch's result on this process, the rows other processes' devices hold included."""
    if not rows.is_fully_addressable:
        from jax.experimental import multihost_utils

        rows = multihost_utils.process_allgather(rows, tiled=True)
    return np.asarray(rows)


class GPT2JaxLM(TemplateLM):
    """lm-eval's LM interface (loglikelihood, loglikelihood_rolling, generate_until) on a loaded model."""

    def __init__(self, model: Model, batch_size: int = 8, max_gen_toks: int = 256, mesh: Any = None):
        """`mesh`: the mesh the model's params already live on (a training run's: they are used as they are,
        no copy); None: a data-parallel mesh of every device, the params replicated onto it."""
        super().__init__()
        self.model, self.max_gen_toks = model, max_gen_toks
        self.mesh = mesh if mesh is not None else parallel.make_mesh(-1, 1)
        shards = self.mesh.devices.size
        self.batch_size = -(-max(1, batch_size) // shards) * shards  # rows split evenly over the devices
        self.params = model.params if mesh is not None else parallel.put_tree(
            model.params, jax.tree.map(lambda _: parallel.replicated(self.mesh), model.params))
        self.rows = parallel.batch_sharding(self.mesh)

    @property
    def eot_token_id(self) -> int:
        return self.model.encoder.eot_token

    @property
    def max_length(self) -> int:
        return self.model.config.n_ctx

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # transformers' GPT-2 tokenizer reads a literal <|endoftext|> as the special token: so do we here
        return self.model.encoder.encode(string, allowed_special="all")

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.model.encoder.decode([t for t in tokens if t != self.eot_token_id])

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log-probability of the continuation, whether greedy decoding gives it) per (key, context, continuation)."""
        rows = []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]  # left-truncated, as hf does
            rows.append((whole[:-1], whole[1:], len(continuation)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a bucket
        sizes = buckets(self.max_length, smallest=1)
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        counts = batch_rows(len(order), self.batch_size, self.mesh.devices.size)
        starts = np.cumsum([0, *counts[:-1]])
        for start, n_rows in tqdm(list(zip(starts, counts)), desc="scoring", unit="batch", disable=disable_tqdm):
            chunk = order[start:start + n_rows]  # the last one may be short of n_rows: padded
            length = next(s for s in buckets(self.max_length) if s >= max(len(rows[i][0]) for i in chunk))
            scored = next(s for s in sizes if s >= min(length, max(rows[i][2] for i in chunk)))
            tokens = np.zeros((n_rows, length), np.int32)
            lengths = np.ones(n_rows, np.int32)
            targets = np.zeros((n_rows, scored), np.int32)
            weights = np.zeros((n_rows, scored), np.float32)
            for r, i in enumerate(chunk):
                inputs, next_ids, n_cont = rows[i]
                tokens[r, :len(inputs)], lengths[r] = inputs, len(inputs)
                k = min(scored, len(inputs))  # the row's last k inputs are the scored window's tail
                targets[r, scored - k:] = next_ids[len(inputs) - k:]
                weights[r, scored - n_cont:] = 1.0
            put = lambda a: parallel.global_batch(a, self.rows)  # noqa: E731
            logprob, greedy = _score(self.params, put(tokens), put(lengths), put(targets), put(weights),
                                     config=self.model.config)
            logprob, greedy = _to_host(logprob), _to_host(greedy)
            for r, i in enumerate(chunk):
                out[i] = (float(logprob[r]), bool(greedy[r]))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over lm-eval's rolling windows of the model's context."""
        from lm_eval import utils

        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut where a stop string (or end-of-text) begins, as lm-eval's hf backend."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        results = []
        for context, gen_kwargs in tqdm([req.args for req in requests], desc="generating", disable=disable_tqdm):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise UserError(f"a task asks for sampled generation ({gen_kwargs}); gpt2-jax lm-eval decodes "
                                "greedily only")
            until = handle_stop_sequences(kwargs.get("until"), eos=self.model.encoder.decode([self.eot_token_id]))
            max_gen = int(kwargs["max_gen_toks"])
            if max_gen >= self.max_length:
                raise UserError(f"max_gen_toks={max_gen} must be below the model's context of {self.max_length}")
            prompt = self.tok_encode(context)[-(self.max_length - max_gen):] or [self.eot_token_id]
            generated = self.model.generate(prompt, max_gen, top_k=1)
            text = self.tok_decode(generated.tokens[0, :generated.lengths[0]].tolist())
            results.append(postprocess_generated_text(text, until, None))
        return results


def task_manager(names: Sequence[str], include_path: str | None, settings: tuple[str, str]) -> Any:
    """lm-eval's index of tasks: the folder's own alone when it holds every task named (indexing lm-eval's few
    thousand tasks takes seconds), else with lm-eval's. A task it does not hold (or none named) is one line naming
    `settings`: where the tasks and the folder were given (a flag or a config field)."""
    from lm_eval.tasks import TaskManager

    manager = None
    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(name in local.all_tasks for name in names):
            manager = local
    manager = manager or TaskManager(include_path=include_path)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown or not names:
        tasks_setting, folder_setting = settings
        raise UserError(f"{tasks_setting}: unknown task(s) {', '.join(unknown) or '(none given)'}; lm-eval --tasks "
                        "list shows them" + ("" if include_path else f", and {folder_setting} adds a folder of task "
                                                                    "YAMLs"))
    return manager


def run_tasks(model_dir: str, tasks: str, *, num_fewshot: int | None = None, limit: float | None = None,
              batch_size: int = 8, include_path: str | None = None, output: str | None = None,
              log_samples: bool = False, dtype: str = "float32") -> dict:
    """lm-eval's simple_evaluate of `tasks` (comma-separated) on a model directory, run or hub id."""
    try:
        import lm_eval
    except ImportError:
        raise UserError('lm-eval is not installed: pip install -e ".[eval]" (or pip install lm-eval)') from None
    from gpt2_jax.api import load

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    manager = task_manager(names, include_path, ("--tasks", "--include_path DIR"))
    lm = GPT2JaxLM(load(model_dir, dtype=dtype), batch_size=batch_size)
    # bootstrap_iters=0: lm-eval bootstraps some metrics' standard errors in a process pool it forks, which a JAX
    # process (multithreaded) must not do; those errors are left out
    results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, bootstrap_iters=0,
                                      task_manager=manager, log_samples=log_samples or bool(output))
    if output:
        from lm_eval.loggers import EvaluationTracker

        tracker = EvaluationTracker(output_path=output)
        samples = results.pop("samples", None)
        tracker.save_results_aggregated(results=results, samples=samples)
        if samples:
            for task in results["configs"]:
                tracker.save_results_samples(task, samples[task])  # positional: its names changed across releases
        results["samples"] = samples
    return results
