"""Weighted mixtures of datasets (data.mixture), block-deterministic as levanter's MixtureDataset, with weights that
change at given steps (data.mixture_stages); every batch a pure function of (seed, step).

The rows of a stage are numbered from the stage's first row, which is the first row of the step it names, and
cut into blocks of data.mixture_block rows. Each block holds exactly its share of every source (the weights
times the block, rounded by largest remainder, ties to the earlier source), at positions permuted by a generator
seeded by (seed, stage, block). Numbering rows from the stage's step, not from the run's first row, is what
makes the weights switch exactly at that step (levanter's bug #876: indexed by rows, a stage began at the first
block boundary after its step).

Source i's rows are its own sampler's rows in order: the n-th row of source i in the whole run (its counter,
known in closed form from the stages and blocks before) is row n % block of that sampler's batch n // block,
drawn from (source_seed(seed, i), n // block). Only the rows a process asks for are read.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple, Sequence

import numpy as np

from gpt2_jax.errors import UserError

NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a source's name, also the suffix of its metric: val_loss/NAME
USAGE = ('data.mixture is NAME:WEIGHT=SPEC sources separated by ";" (SPEC: a file, directory, glob or URL), '
         'e.g. "web:0.7=gs://bucket/fineweb/*.bin;code:0.3=data/code/"')
STAGE_USAGE = ('data.mixture_stages is STEP:NAME=WEIGHT,NAME=WEIGHT stages separated by ";", steps increasing, '
               'e.g. "2000:web=0.5,code=0.5;8000:web=0.2,code=0.8" (a source a stage leaves out weighs 0)')
_PERMUTATION_STREAM = 0x6D6978  # "mix": the blocks' generators apart from every sampler's


class Source(NamedTuple):
    """One source of a mixture: its name, its weight from step 0 and its dataset."""

    name: str
    weight: float
    spec: str


def _weight(text: str, where: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        raise UserError(f"{where}: weight {text.strip()!r} is not a number") from None
    if not math.isfinite(weight) or weight < 0:
        raise UserError(f"{where}: weight {text.strip()} must be a finite number >= 0")
    return weight


def parse_mixture(text: str) -> list[Source]:
    """data.mixture's sources, in order: NAME:WEIGHT=SPEC separated by ';'. The name ends at the first ':' and
    the weight at the first '=', so a SPEC keeps its own ':' and '=' (gs://, globs); it cannot hold ';'."""
    sources: list[Source] = []
    for part in filter(str.strip, text.split(";")):
        head, eq, spec = part.partition("=")
        name, colon, weight = head.partition(":")
        name, spec = name.strip(), spec.strip()
        if not (eq and colon and spec and NAME.fullmatch(name)):
            raise UserError(f"data.mixture: {part.strip()!r} is not NAME:WEIGHT=SPEC (a name of letters, digits, "
                            f"'_', '.', '-'); {USAGE}")
        if any(s.name == name for s in sources):
            raise UserError(f"data.mixture: the source name {name!r} is given twice; {USAGE}")
        sources.append(Source(name, _weight(weight, f"data.mixture source {name!r}"), spec))
    if not sources:
        raise UserError(f"data.mixture={text!r} names no source; {USAGE}")
    _check_total([s.weight for s in sources], "data.mixture")
    return sources


def _check_total(weights: Sequence[float], where: str) -> None:
    if not sum(weights) > 0:
        raise UserError(f"{where}: the weights are all zero; give at least one source a weight > 0")


def parse_stages(text: str, sources: Sequence[Source]) -> list[tuple[int, np.ndarray]]:
    """The weights from each step on, [(first step, weights [sources])]: data.mixture's from step 0, then each
    stage of data.mixture_stages (STEP:NAME=WEIGHT,... separated by ';'), its steps increasing."""
    names = [s.name for s in sources]
    schedule = [(0, np.asarray([s.weight for s in sources], np.float64))]
    for part in filter(str.strip, text.split(";")):
        step_text, colon, assignments = part.partition(":")
        try:
            step = int(step_text)
        except ValueError:
            raise UserError(f"data.mixture_stages: {part.strip()!r} does not start with a step; "
                            f"{STAGE_USAGE}") from None
        if not colon or step <= schedule[-1][0]:
            what = "has no NAME=WEIGHT" if not colon else f"step {step} is not after step {schedule[-1][0]}"
            raise UserError(f"data.mixture_stages: {part.strip()!r}: {what} (stages start after step 0, in "
                            f"increasing order); {STAGE_USAGE}")
        weights = np.zeros(len(names))
        for assignment in filter(str.strip, assignments.split(",")):
            name, eq, weight = (x.strip() for x in assignment.partition("="))
            if not eq or name not in names:
                known = ", ".join(names)
                raise UserError(f"data.mixture_stages: stage {step}: {assignment.strip()!r} names no source of "
                                f"data.mixture ({known}); {STAGE_USAGE}")
            weights[names.index(name)] = _weight(weight, f"data.mixture_stages stage {step} source {name!r}")
        _check_total(weights, f"data.mixture_stages stage {step}")
        schedule.append((step, weights))
    return schedule


def block_counts(weights: np.ndarray, block: int) -> np.ndarray:
    """Rows of each source in a block of `block` rows: the weights' shares of it rounded by largest remainder
    (floors first, then one more to the largest remainders, ties to the earlier source); they sum to `block`."""
    quota = np.asarray(weights, np.float64) / np.sum(weights) * block
    counts = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - counts), kind="stable")
    counts[order[:block - counts.sum()]] += 1
    return counts


def source_seed(seed: int, source: int) -> int:
    """The seed of source `source`'s sampler in a mixture run with `seed`: one stream per source."""
    return int(np.random.SeedSequence([seed, source]).generate_state(1, np.uint64)[0])


class MixtureSampler:
    """Batches of a mixture: each row from the source its block assigns it, drawn by that source's sampler.

    `samplers` are the sources' (data.WindowSampler: batch(index, batch_size, rows) -> [rows, window], and
    `window`), seeded apart (source_seed); `schedule` is parse_stages'; batch k is a pure function of (seed, k,
    batch size).
    """

    def __init__(self, samplers: Sequence[Any], schedule: list[tuple[int, np.ndarray]], block: int, seed: int):
        if block < 1:
            raise UserError(f"data.mixture_block={block}: must be >= 1 (rows per block)")
        self.samplers, self.block, self.seed = list(samplers), block, seed
        self.starts = [step for step, _ in schedule]
        self.counts = [block_counts(w, block) for _, w in schedule]  # [stage][source]
        self._blocks: dict[tuple[int, int], np.ndarray] = {}  # the last batches' blocks, kept a while

    def _assignment(self, stage: int, block: int) -> np.ndarray:
        """The sources of a block's rows [block]: each source's count, permuted."""
        if (stage, block) not in self._blocks:
            if len(self._blocks) >= 64:
                self._blocks.clear()
            rng = np.random.default_rng([self.seed, _PERMUTATION_STREAM, stage, block])
            self._blocks[stage, block] = rng.permutation(np.repeat(np.arange(len(self.samplers)), self.counts[stage]))
        return self._blocks[stage, block]

    def _rows_of_sources(self, stage: int, rows: int) -> np.ndarray:
        """How many of a stage's first `rows` rows each source holds [sources]."""
        full, rest = divmod(rows, self.block)
        partial = np.bincount(self._assignment(stage, full)[:rest], minlength=len(self.samplers)) if rest else 0
        return full * self.counts[stage] + partial

    def sources_of(self, index: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(source [batch_size], that source's counter [batch_size]) of each row of batch `index`."""
        stage = int(np.searchsorted(self.starts, index, side="right")) - 1
        counter = sum((self._rows_of_sources(s, (self.starts[s + 1] - self.starts[s]) * batch_size)
                       for s in range(stage)), np.zeros(len(self.samplers), np.int64))
        first = (index - self.starts[stage]) * batch_size  # the batch's first row, counted from the stage's
        counter = counter + self._rows_of_sources(stage, first)
        blocks = range(first // self.block, (first + batch_size - 1) // self.block + 1)  # those the batch touches
        sources = np.concatenate([self._assignment(stage, b) for b in blocks])
        sources = sources[first % self.block:first % self.block + batch_size]
        counters = np.zeros(batch_size, np.int64)
        for i in range(len(self.samplers)):  # a source's rows in a batch take its next counters in order
            mine = sources == i
            counters[mine] = counter[i] + np.arange(np.count_nonzero(mine))
        return sources, counters

    def batch(self, index: int, batch_size: int, rows: slice | None = None) -> np.ndarray:
        """Batch number `index`: [batch_size, window] token ids; with `rows`, only those rows (only theirs read)."""
        sources, counters = self.sources_of(index, batch_size)
        wanted = np.arange(batch_size)[rows if rows is not None else slice(None)]
        sources, counters = sources[wanted], counters[wanted]
        out = np.zeros((len(wanted), self.samplers[0].window), np.int32)
        for i, sampler in enumerate(self.samplers):
            for k in np.unique(counters[sources == i] // self.block):  # that source's batches these rows are in
                mine = np.flatnonzero((sources == i) & (counters // self.block == k))
                at = counters[mine] - k * self.block  # rows of its batch k: consecutive for a slice of rows
                out[mine] = sampler.batch(int(k), self.block, slice(int(at[0]), int(at[-1]) + 1))[at - at[0]]
        return out
