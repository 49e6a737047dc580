"""Training objectives: what a run trains on and how a step scores it, one object each (levanter hands its
trainer a loss the same way).

An Objective owns its batch layout (`abstract_batch`), its loss and evaluation of a batch (pure functions the
step builder jits), the metric names beside the loss, the sequences a row trains on, its data (the samplers
and validation batches, `data`), how a validation batch counts, its progress-bar words and, for preference
pairs, the frozen reference (`prepare`). `OBJECTIVES` is the table train.objective names; `objective_of(config)`
builds a run's. A new objective is one class here and a row of the table.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from typing import Any, Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from gpt2_jax import data, dpo, storage
from gpt2_jax.errors import UserError
from gpt2_jax.model import GPT2Config
from gpt2_jax.train import loss_fn


class RunData(NamedTuple):
    """What a run trains and validates on: the training sampler (batch k a function of (seed, k)), the fixed
    validation batches on the host (a list, or for a mixture a dict by source), what the data was (the
    run directory's dataset.json), and what `prepare` still needs (preference pairs before their reference)."""

    sampler: Any
    validation: list | dict
    record: dict
    pending: Any = None


@dataclasses.dataclass(frozen=True)
class Objective:
    """The base: a next-token objective's defaults. Subclasses set `name` and what differs."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]] = ()  # what a step returns beside "loss"
    sequences_per_row: ClassVar[int] = 1  # a preference pair is two
    takes_reference: ClassVar[bool] = False  # the step takes a frozen reference's params (DPO's "params")

    def abstract_batch(self, rows: int, seq_len: int, sharding: Any) -> Any:
        """A batch of `rows` as ShapeDtypeStructs (windows [rows, seq_len + 1] int32 here)."""
        return jax.ShapeDtypeStruct((rows, seq_len + 1), np.int32, sharding=sharding)

    def normalizer(self, batch: Any) -> jax.Array | None:
        """What every micro-batch's summed loss is divided by (weighted targets: the whole batch's count), so
        that the summed micro-batch losses are the batch's mean; None: each micro-batch's loss is its mean."""
        return None

    def loss(self, params: Any, batch: Any, rng: jax.Array, config: GPT2Config, normalizer: jax.Array | None,
             reference: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(the loss to differentiate, the metrics beside it) of one micro-batch."""
        raise NotImplementedError

    def evaluate(self, params: Any, batch: Any, config: GPT2Config, reference: Any) -> dict[str, jax.Array]:
        """{"loss", *metrics} of one validation batch (no noise)."""
        raise NotImplementedError

    def validation_weight(self, batch: Any) -> float:
        """How much one validation batch's mean counts in the validation loss (its targets)."""
        return 1.0

    def data(self, config: Any, encoder: Any, seq_len: int, seed: int, is_main: bool) -> RunData:
        """The run's data, read and checked (every bad-input error before anything compiles)."""
        raise NotImplementedError

    def prepare(self, run_data: RunData, context: ReferenceContext) -> tuple[RunData, Any]:
        """(the data ready to train on, the frozen reference's params the step takes, or None), once the steps
        are built: only preference pairs need anything here."""
        return run_data, None

    def describe(self, rows: int, seq_len: int) -> str:
        """A batch, in words (the dry run)."""
        return f"{rows} windows of {seq_len} tokens"

    def postfix(self, metrics: dict[str, float]) -> list[str]:
        """What the progress bar shows of a step's metrics beside the loss."""
        return []

    def evaluate_dataset(self, model: Any, dataset: str, options: EvalOptions, reference: Any = None) -> dict:
        """`gpt2-jax evaluate`: the objective's loss (and metrics) of a model (api.Model) over a whole dataset."""
        raise NotImplementedError

    def result_line(self, result: dict) -> str:
        """`gpt2-jax evaluate`'s line for a result of evaluate_dataset."""
        return f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  over {result['tokens']} tokens"


class EvalOptions(NamedTuple):
    """`gpt2-jax evaluate`'s options for every objective."""

    window: int | None = None  # tokens per window (default: the model's context)
    stride: int | None = None  # tokens between window starts (windows of text only)
    batch_size: int = 8
    combine: int = 50000  # characters per chunk when encoding text
    encoding: str = "utf-8"
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class NextToken(Objective):
    """The next-token loss on windows of text (the original's): `noise` replaces input ids at random,
    `loss_chunk` never holds the whole logits, `document_eot` keeps a window's documents apart."""

    name: ClassVar[str] = "lm"
    noise: float = 0.0
    loss_chunk: int = 0
    document_eot: int | None = None

    def loss(self, params, batch, rng, config, normalizer, reference):
        return loss_fn(params, batch, rng, config, self.noise, self.loss_chunk, self.document_eot, normalizer), {}

    def evaluate(self, params, batch, config, reference):
        return {"loss": loss_fn(params, batch, jax.random.key(0), config, document_eot=self.document_eot)}

    def data(self, config, encoder, seq_len, seed, is_main):
        return RunData(*data.datasets(config, encoder, seq_len, seed, is_main))

    def evaluate_dataset(self, model, dataset, options, reference=None):
        """The mean next-token loss over every token, each predicted once from up to a window before it."""
        from gpt2_jax.evaluate import evaluate

        chunks = data.load_dataset(dataset, model.encoder, combine=options.combine, encoding=options.encoding)
        return evaluate(model.config, model.params, chunks, window=options.window, stride=options.stride,
                        batch_size=options.batch_size, progress=options.progress)._asdict()


@dataclasses.dataclass(frozen=True)
class Examples(NextToken):
    """Prompt/completion examples (.jsonl): rows with their target weights, the loss on the completions; packed
    rows (data.document_mask) keep their examples apart."""

    name: ClassVar[str] = "sft"

    def abstract_batch(self, rows, seq_len, sharding):
        shape = (rows, seq_len + 1)
        return (jax.ShapeDtypeStruct(shape, np.int32, sharding=sharding),
                jax.ShapeDtypeStruct(shape, np.float32, sharding=sharding))

    def normalizer(self, batch):
        return jnp.maximum(jnp.sum(batch[1][:, 1:]), 1.0)

    def validation_weight(self, batch):
        return float(np.sum(batch[1][:, 1:]))

    def data(self, config, encoder, seq_len, seed, is_main):
        return RunData(*data.example_datasets(config, encoder, seq_len, seed))

    def describe(self, rows, seq_len):
        return f"{rows} example rows of {seq_len} tokens"

    def evaluate_dataset(self, model, dataset, options, reference=None):
        """Each example on its own, one a row: the completions' summed loss over their tokens."""
        from gpt2_jax.evaluate import evaluate_examples

        window = options.window or model.config.n_ctx
        rows = data.layout_examples(data.read_examples(dataset, model.encoder), window + 1, model.encoder.eot_token,
                                    pack=False)
        return evaluate_examples(model.config, model.params, rows, batch_size=options.batch_size,
                                 progress=options.progress)._asdict()


class ReferenceContext(NamedTuple):
    """What preparing a frozen reference needs from the run's start (objectives cannot import resolve.py)."""

    config: Any
    model_config: GPT2Config
    mesh: Any
    reference_shapes: Callable[[], Any]  # the reference's params as sharded ShapeDtypeStructs
    start_params: Any  # the policy's params at step 0; None when resuming
    load_reference: Callable[[], tuple[GPT2Config, Any]]  # resolve.dpo_reference: dpo.reference, else the start
    cache: Any  # the run directory's reference_logps.npz
    seed: int
    is_main: bool


@dataclasses.dataclass(frozen=True)
class Preferences(Objective):
    """Preference pairs (.jsonl of prompt/chosen/rejected) and trl's DPO losses and metrics (dpo.py); the
    reference's log-probs precomputed once (dpo.precompute_reference) or computed every step."""

    name: ClassVar[str] = "dpo"
    metrics: ClassVar[tuple[str, ...]] = dpo.METRICS
    sequences_per_row: ClassVar[int] = 2
    settings: dpo.DPOSettings = dpo.DPOSettings()
    tokenize: str = "apart"

    @property
    def takes_reference(self) -> bool:  # type: ignore[override]
        return self.settings.reference == "params"

    def abstract_batch(self, rows, seq_len, sharding):
        pairs = (rows, 2, seq_len + 1)
        return (jax.ShapeDtypeStruct(pairs, np.int32, sharding=sharding),
                jax.ShapeDtypeStruct(pairs, np.float32, sharding=sharding),
                jax.ShapeDtypeStruct((rows, 2), np.float32, sharding=sharding))

    def loss(self, params, batch, rng, config, normalizer, reference):
        return dpo.dpo_loss(params, batch, config, self.settings, reference)

    def evaluate(self, params, batch, config, reference):
        loss, metrics = dpo.dpo_loss(params, batch, config, self.settings, reference)
        return {"loss": loss, **metrics}

    def data(self, config, encoder, seq_len, seed, is_main):
        pairs, val_pairs, record = data.pair_datasets(config, encoder, seq_len)
        return RunData(None, [], record, pending=(pairs, val_pairs))

    def prepare(self, run_data, context):
        """The sampler and validation batches carrying the reference's log-probs when they are precomputed
        (read from the run directory when it holds those of this data and reference, else computed once and
        kept there), and the frozen reference's params when every step computes them ("params")."""
        c = context
        if self.settings.reference == "params":
            own = c.start_params is not None and not c.config.dpo.reference  # the policy at step 0 is the reference
            shardings = jax.tree.map(lambda a: a.sharding, c.reference_shapes())
            reference = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)(c.start_params) if own \
                else _put(_reference(c)[1], shardings)
            return self._batches(c, run_data, None, None), reference
        if self.settings.reference == "adapters_off":
            return self._batches(c, run_data, None, None), None
        logps, val_logps = self._precomputed(run_data, c)
        return self._batches(c, run_data, logps, val_logps), None

    def _precomputed(self, run_data: RunData, c: ReferenceContext) -> tuple[np.ndarray, np.ndarray]:
        (pairs, val_pairs) = run_data.pending
        key = json.dumps({"data": run_data.record, "reference": c.config.dpo.reference or c.config.model.name,
                          "tokenize": self.tokenize, "seq_len": int(pairs.tokens.shape[-1])}, sort_keys=True)
        if c.cache.is_file():
            with c.cache.open("rb") as f, np.load(f) as stored:
                if str(stored["key"]) == key:
                    tqdm.write(f"reference: the log-probs of {pairs.count} pairs, computed when the run started, "
                               f"from {c.cache}")
                    return stored["train"], stored["validation"]
        if c.start_params is not None and not c.config.dpo.reference:  # the policy at step 0 is the reference
            params, reference_config = c.start_params, c.model_config
        else:
            reference_config, params = _reference(c)
            params = _put(params, jax.tree.map(lambda a: a.sharding, c.reference_shapes()))
        batch = c.config.train.batch_size * c.config.train.accumulate_gradients
        started = time.perf_counter()
        logps = dpo.reference_logps(params, reference_config, pairs.tokens, pairs.weights, c.mesh, batch)
        val_logps = dpo.reference_logps(params, reference_config, val_pairs.tokens, val_pairs.weights, c.mesh,
                                        batch) if val_pairs is not None else np.zeros((0, 2), np.float32)
        del params
        tqdm.write(f"reference: the log-probs of {pairs.count + (val_pairs.count if val_pairs else 0)} pairs computed "
                   f"once in {time.perf_counter() - started:.1f} s (dpo.precompute_reference), kept in {c.cache}")
        if c.is_main:
            storage.mkdir(c.cache.parent)
            buffer = io.BytesIO()
            np.savez(buffer, train=logps, validation=val_logps, key=np.asarray(key))
            c.cache.write_bytes(buffer.getvalue())
        return logps, val_logps

    @staticmethod
    def _batches(c: ReferenceContext, run_data: RunData, logps: np.ndarray | None, val_logps: np.ndarray | None
                 ) -> RunData:
        pairs, val_pairs = run_data.pending
        sampler, validation = data.pair_batches(c.config, pairs, val_pairs, c.seed, logps, val_logps)
        return RunData(sampler, validation, run_data.record)

    def describe(self, rows, seq_len):
        return f"{rows} DPO pairs of 2 x {seq_len} tokens, reference: {REFERENCE_WORDS[self.settings.reference]}"

    def postfix(self, metrics):
        if "rewards/accuracies" not in metrics:
            return []
        return [f"acc={metrics['rewards/accuracies']:.2f} margin={metrics['rewards/margins']:.3f}"]

    def evaluate_dataset(self, model, dataset, options, reference=None):
        """The DPO loss and metrics of every pair against `reference` ((config, params) of the reference model)."""
        from gpt2_jax.evaluate import evaluate_pairs

        window = options.window or model.config.n_ctx
        pairs = data.layout_pairs(data.read_pairs(dataset, model.encoder, self.tokenize), window + 1,
                                  model.encoder.eot_token, start_with_eot=self.tokenize == "apart")
        return evaluate_pairs(model.config, model.params, *reference, pairs, self.settings,
                              batch_size=options.batch_size, progress=options.progress)

    def result_line(self, result):
        s = self.settings
        return (f"DPO loss {result['loss']:.4f} ({s.loss_type}, beta {s.beta:g}) over {result['pairs']} pairs; "
                + "  ".join(f"{k} {result[k]:.4f}" for k in dpo.METRICS))


# How a DPO step finds its reference, for the dry run's line.
REFERENCE_WORDS = {"batch": "precomputed log-probs", "params": "a frozen copy of the weights",
                   "adapters_off": "the LoRA base, adapters off"}


def _reference(c: ReferenceContext) -> tuple[GPT2Config, Any]:
    """The reference model, checked to be the policy's shape."""
    reference_config, params = c.load_reference()
    shape = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
    if [getattr(reference_config, k) for k in shape] != [getattr(c.model_config, k) for k in shape]:
        raise UserError(f"dpo.reference={c.config.dpo.reference!r}: a {reference_config.hparams()} model, but the "
                        f"policy is {c.model_config.hparams()}; the reference must be the same shape")
    return reference_config, params


def _put(params: Any, shardings: Any) -> Any:
    """Host or single-device params placed on the mesh as `shardings` say."""
    from gpt2_jax import parallel

    return parallel.put_tree(params, shardings)


def _next_token(config: Any, eot: int) -> Objective:
    """lm: the next-token loss; on a .jsonl of prompt/completion examples, those (sft)."""
    t, d = config.train, config.data
    kind = Examples if d.dataset and data.is_examples(d.dataset) else NextToken
    return kind(noise=float(t.noise), loss_chunk=int(t.loss_chunk), document_eot=eot if d.document_mask else None)


def _examples(config: Any, eot: int) -> Objective:
    if not data.is_examples(config.data.dataset):
        raise UserError(f"data.dataset={config.data.dataset!r}: train.objective=sft trains on prompt/completion "
                        'examples, a .jsonl of {"prompt", "completion"} (or {"text"}) lines')
    return _next_token(config, eot)


def _preferences(config: Any, eot: int) -> Objective:
    return Preferences(settings=dpo.settings_of(config), tokenize=config.dpo.tokenize)


# train.objective -> (builder from the config and the end-of-text id, what it trains on).
OBJECTIVES: dict[str, tuple[Callable[[Any, int], Objective], str]] = {
    "lm": (_next_token, "the next-token loss on windows of text (on a .jsonl of examples: sft)"),
    "sft": (_examples, "prompt/completion examples (.jsonl), the loss on the completions"),
    "dpo": (_preferences, "preference pairs (.jsonl of prompt/chosen/rejected), trl's DPO losses"),
}


def for_file(dataset: str) -> str:
    """The objective a dataset file's rows are for: "dpo" (preference pairs), "sft" (examples) or "lm" (text)."""
    return "dpo" if data.is_pairs(dataset) else "sft" if data.is_examples(dataset) else "lm"


def objective_of(config: Any, eot: int) -> Objective:
    """The run's objective (train.objective) with its settings checked; `eot`, the end-of-text id, ends
    documents under data.document_mask."""
    name = config.train.get("objective", "lm")
    if name not in OBJECTIVES:
        raise UserError(f"train.objective={name!r}: use one of {', '.join(OBJECTIVES)} "
                        f"({'; '.join(f'{k}: {v[1]}' for k, v in OBJECTIVES.items())})")
    return OBJECTIVES[name][0](config, eot)
