"""HellaSwag scored as llm.c scores it (dev/data/hellaswag.py): each of an item's 4 endings is a completion of its
context, and the model picks the one it finds likeliest.

An item's context is tokenised as it stands and each ending with a leading space (`encode(ctx)`,
`encode(" " + ending)`, concatenated); the loss counts on the ending's tokens only. `acc` picks the ending of
lowest summed loss, `acc_norm` the lowest mean loss per ending token. Unlike lm-eval's `hellaswag` task, the
context is not rewritten (no activity label, no removal of WikiHow's bracketed artifacts) and acc_norm
divides by tokens, not characters (docs/evaluation.md).

`score` runs on any params, the live ones of a training run included: one jitted function over batches of
items' 4 rows each, padded to a few bucket lengths; only the endings' positions reach the logits, a few at a
time; on a device mesh the rows are split over its devices.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from gpt2_jax import parallel, storage
from gpt2_jax.encoder import Encoder
from gpt2_jax.errors import UserError
from gpt2_jax.evaluate import LOGITS_PER_CHUNK
from gpt2_jax.harness import buckets
from gpt2_jax.model import GPT2, GPT2Config
from gpt2_jax.train import cross_entropy

ENDINGS = 4


class Item(NamedTuple):
    """One HellaSwag question: the context, its 4 endings and the index of the right one."""

    ctx: str
    endings: tuple[str, ...]
    label: int


def read_items(path: str | os.PathLike, limit: int | None = None) -> list[Item]:
    """The items of a HellaSwag jsonl (llm.c's hellaswag_val.jsonl: "ctx", "endings", "label" per line; other
    keys ignored), the first `limit` of them when given. A bad line is one UserError naming the file and line."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit={limit}: must be at least 1")
    file = storage.path(path)
    if not file.is_file():
        raise UserError(f"HellaSwag file {path} is not a file (llm.c's dev/data/hellaswag.py downloads "
                        "hellaswag_val.jsonl)")
    items: list[Item] = []
    with file.open("rb") as lines:  # bytes: a line that is not UTF-8 is reported as a bad line
        for number, line in enumerate(lines, 1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            try:
                items.append(_item(json.loads(line)))
            except ValueError as e:  # bad JSON or UTF-8, or a bad item
                raise UserError(f"{path}, line {number}: {e}") from None
    if not items:
        raise UserError(f"HellaSwag file {path} holds no items")
    return items


def _item(doc: Any) -> Item:
    """An Item from one parsed line, or ValueError saying what is wrong with it."""
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    ctx, endings, label = doc.get("ctx"), doc.get("endings"), doc.get("label")
    if not isinstance(ctx, str) or not ctx:
        raise ValueError('"ctx" must be a non-empty string')
    if not isinstance(endings, list) or len(endings) != ENDINGS or not all(isinstance(e, str) for e in endings):
        raise ValueError(f'"endings" must be a list of {ENDINGS} strings')
    if isinstance(label, str) and label.isdigit():  # the hub's copy writes the label as a string
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < ENDINGS:
        raise ValueError(f'"label" must be an integer from 0 to {ENDINGS - 1}, not {label!r}')
    return Item(ctx, tuple(endings), label)


def render(encoder: Encoder, item: Item) -> tuple[list[int], list[list[int]]]:
    """llm.c's render_example: the context's tokens, and each ending's tokens encoded with a leading space."""
    return encoder.encode(item.ctx), [encoder.encode(" " + ending) for ending in item.endings]


@functools.partial(jax.jit, static_argnames="config")
def _ending_losses(params: Any, tokens: jax.Array, lengths: jax.Array, targets: jax.Array, weights: jax.Array, *,
                   config: GPT2Config) -> jax.Array:
    """Per row, the summed loss of its weighted targets.

    tokens [R, L] hold each row's inputs from position 0 (lengths [R] of them, zero-padded after); targets and
    weights [R, K] are those of the row's last K inputs. Only those K positions reach the logits, a few
    positions (of every row) at a time.
    """
    hidden, _ = GPT2(config).apply(params, tokens, method=GPT2.hidden)  # [R, L, C]
    rows, K = targets.shape
    positions = jnp.clip(lengths[:, None] - K + jnp.arange(K), 0, tokens.shape[1] - 1)
    picked = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # [R, K, C]

    def losses_at(args: tuple[jax.Array, jax.Array]) -> jax.Array:  # one position of every row: [R, C] -> [R]
        h, t = args
        return cross_entropy(GPT2(config).apply(params, h, method=GPT2.logits), t)

    per_chunk = max(1, LOGITS_PER_CHUNK // (rows * config.n_vocab))
    losses = jax.lax.map(losses_at, (picked.swapaxes(0, 1), targets.T), batch_size=per_chunk)  # [K, R]
    return jnp.sum(losses.T * weights, axis=1)


def ending_losses(config: GPT2Config, params: Any, encoder: Encoder, items: Sequence[Item], *, batch_size: int = 8,
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Each ending's summed loss [N, 4] (float32, nats) and its number of scored tokens [N, 4].

    A row longer than the model's context keeps its last n_ctx + 1 tokens (the context cut from the left, as
    lm-eval does). `batch_size` items (4 rows each) are scored at once; params on a device mesh (jax.Arrays
    with a NamedSharding) have the rows split over its devices.
    """
    if batch_size < 1:
        raise UserError(f"--batch_size={batch_size}: must be at least 1")
    rows = []  # (inputs, targets, scored) per ending, item after item
    for item in items:
        context, endings = render(encoder, item)
        for ending in endings:
            whole = (context + ending)[-(config.n_ctx + 1):]
            rows.append((whole[:-1], whole[1:], min(len(ending), len(whole) - 1)))
    sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    mesh = sharding.mesh if isinstance(sharding, NamedSharding) else None
    shards = mesh.devices.size if mesh is not None else 1
    put = (lambda a: parallel.global_batch(a, NamedSharding(mesh, PartitionSpec(mesh.axis_names)))) if mesh \
        else jnp.asarray
    n_rows = -(-ENDINGS * batch_size // shards) * shards  # every batch one size, split evenly over the devices
    order = sorted(range(len(items)), key=lambda i: -max(len(rows[ENDINGS * i + j][0]) for j in range(ENDINGS)))
    sums = np.zeros(len(rows), np.float32)
    for start in tqdm(range(0, len(order), batch_size), desc="hellaswag", unit="batch", disable=not progress):
        chunk = [ENDINGS * i + j for i in order[start:start + batch_size] for j in range(ENDINGS)]
        length = next(s for s in buckets(config.n_ctx) if s >= max(len(rows[r][0]) for r in chunk))
        scored = next(s for s in buckets(config.n_ctx, smallest=1) if s >= max(rows[r][2] for r in chunk))
        tokens, lengths = np.zeros((n_rows, length), np.int32), np.ones(n_rows, np.int32)
        targets, weights = np.zeros((n_rows, scored), np.int32), np.zeros((n_rows, scored), np.float32)
        for k, r in enumerate(chunk):
            inputs, next_ids, n_scored = rows[r]
            tokens[k, :len(inputs)], lengths[k] = inputs, len(inputs)
            tail = min(scored, len(inputs))  # the row's last `tail` targets, right-aligned in the scored window
            targets[k, scored - tail:] = next_ids[len(inputs) - tail:]
            weights[k, scored - n_scored:] = 1.0
        out = _ending_losses(params, put(tokens), put(lengths), put(targets), put(weights), config=config)
        if not out.is_fully_addressable:  # rows held by other processes' devices
            from jax.experimental import multihost_utils

            out = multihost_utils.process_allgather(out, tiled=True)
        sums[chunk] = np.asarray(out)[:len(chunk)]
    counts = np.asarray([scored for _, _, scored in rows], np.int32)
    return sums.reshape(-1, ENDINGS), counts.reshape(-1, ENDINGS)


def score(config: GPT2Config, params: Any, encoder: Encoder, items: Sequence[Item], *, batch_size: int = 8,
          progress: bool = False) -> dict[str, float]:
    """llm.c's HellaSwag metrics over `items`: {"acc": the fraction whose lowest summed ending loss is the label's,
    "acc_norm": the same by the lowest mean loss per ending token, "n": the number of items}. Runs on the given
    params as they are (a training run's live ones: nothing is reloaded or copied); ties go to the first ending."""
    if not items:
        raise UserError("no HellaSwag items to score")
    sums, counts = ending_losses(config, params, encoder, items, batch_size=batch_size, progress=progress)
    labels = np.asarray([item.label for item in items])
    return {"acc": float(np.mean(np.argmin(sums, axis=1) == labels)),
            "acc_norm": float(np.mean(np.argmin(sums / counts, axis=1) == labels)), "n": len(items)}
