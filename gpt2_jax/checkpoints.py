"""Training checkpoints with orbax: the state's trees (params, optimizer state, and what else the state
holds: `ITEMS`) and the run's metadata, one directory per step of a run directory (rundir.py names the rest).
Orbax writes each step under a temporary name and renames it when complete, so a run killed mid-save
restores from the last complete step.

Every saved array's checksum (two 32-bit sums of its words, computed on the devices) is stored in
the step's metadata and verified on every restore; a step that cannot be read or does not verify is
skipped for the newest one that does, and a resumed run sets it aside under `damaged/` (never
deleted, never counted towards `keep`). A save checks the free space first, and any write failure
becomes one StorageError line with the partial step removed.
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from gpt2_jax import faults, storage
from gpt2_jax.errors import StorageError, UserError, reason

# The trees a step may hold besides its metadata: the state's (train.TrainState), each saved as it is present.
ITEMS = ("params", "opt_state", "ema", "spikes")

def make_manager(run_dir: Path, *, keep: int = 5, keep_every_hours: float = 0.0, async_save: bool = True,
                 read_only: bool = False, timeout_s: float | None = None) -> ocp.CheckpointManager:
    """An orbax CheckpointManager keeping the last `keep` steps plus one every `keep_every_hours`; a background
    save, its barrier between processes included, gives up after `timeout_s` (default: orbax's 20 minutes)."""
    faults.quiet_orbax()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep or None,
        save_interval_steps=0 if read_only else 1,
        keep_time_interval=datetime.timedelta(hours=keep_every_hours) if keep_every_hours > 0 else None,
        enable_async_checkpointing=async_save,
        # In a store, the step's directories are made before save() returns: a store that fails then fails
        # the save at once, instead of leaving orbax's writer threads waiting for them until its timeout.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=not storage.is_url(run_dir),
                                       **({"timeout_secs": max(1, int(timeout_s))} if timeout_s else {})),
        # Remove what a killed save left behind. Not in a store, where orbax takes every folder without its
        # commit file for a partial step (damaged/, superseded/, best/): CheckpointWriter removes those there.
        cleanup_tmp_directories=not read_only and not storage.is_url(run_dir),
        create=not read_only,
        read_only=read_only,
        # A reader makes no barrier: whether a process reads a run directory can depend on what it sees of it
        # (process 0 may already be writing there), and unequal barriers abort a multi-process job.
        save_root_metadata=not read_only,
    )
    return ocp.CheckpointManager(storage.absolute(run_dir), options=options, item_names=(*ITEMS, "meta"))


def latest_step(run_dir: Path) -> int | None:
    """The newest complete step of a run directory (None: none)."""
    return make_manager(run_dir, read_only=True).latest_step()


def has_item(run_dir: Path, step: int, item: str) -> bool:
    """Whether a step holds a tree (an item of ITEMS: a run without train.ema_decay saves no "ema")."""
    return (storage.absolute(run_dir) / str(step) / item).exists()


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# --- Checksums -------------------------------------------------------------------------------------

def _checksum(x: jax.Array) -> jax.Array:
    """[2] uint32: the sum of an array's words and their sum weighted by (2 x position + 1), both mod 2^32.

    Any change to one word changes both (odd weights are invertible mod 2^32); the sums are exact in
    any order, so the result does not depend on how the array is sharded.
    """
    size = jnp.dtype(x.dtype).itemsize
    word = {1: jnp.uint8, 2: jnp.uint16}.get(size, jnp.uint32)
    w = jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32)  # 8-byte types gain a trailing [2]
    position = jnp.zeros(w.shape, jnp.uint32)
    for axis in range(w.ndim):  # row-major index, without a reshape that would move shards around
        position = position * jnp.uint32(w.shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis)
    return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * (2 * position + 1), dtype=jnp.uint32)])


_checksum_tree = jax.jit(lambda tree: jax.tree.map(_checksum, tree))


def checksums(tree: Any) -> dict[str, str]:
    """Path -> 16 hex digits for every array of a tree, computed where the arrays live."""
    sums = jax.device_get(_checksum_tree(tree))
    return {jax.tree_util.keystr(path): f"{int(s[0]):08x}{int(s[1]):08x}"
            for path, s in jax.tree_util.tree_leaves_with_path(sums)}


class Damaged(Exception):
    """A checkpoint step that cannot be read or does not match its recorded checksums."""


def _verify(tree: Any, recorded: dict[str, str], item: str) -> None:
    actual = checksums(tree)
    bad = [k for k in actual if recorded.get(k) != actual[k]]
    if bad:
        raise Damaged(f"{len(bad)} of {len(actual)} arrays do not match their checksums, first {item}{bad[0]}")


# --- Saving ----------------------------------------------------------------------------------------

class CheckpointWriter:
    """Saves steps through an orbax manager with checksums, a free-space check before each save, and
    every write failure (synchronous or asynchronous) turned into one StorageError line."""

    def __init__(self, run_dir: Path, *, keep: int = 5, keep_every_hours: float = 0.0, async_save: bool = True,
                 store_timeout_s: float | None = None):
        self.run_dir = storage.absolute(run_dir)
        if storage.is_url(self.run_dir) and jax.process_index() == 0 and self.run_dir.is_dir():
            for child in self.run_dir.iterdir():  # before any save: no process writes a step yet
                if child.name.isdigit():
                    _remove_partial_steps(self.run_dir, int(child.name))
        # In a store, a background save that has not finished in store_timeout_s fails (one process's write
        # failing leaves the others waiting for it at orbax's barrier: they give up then, not after 20 minutes).
        self.manager = make_manager(self.run_dir, keep=keep, keep_every_hours=keep_every_hours, async_save=async_save,
                                    timeout_s=store_timeout_s if storage.is_url(self.run_dir) else None)
        self._saving: tuple[int, int] | None = None  # (step, bytes it needs) of the save in flight
        self._failed = False

    def latest_step(self) -> int | None:
        """The newest complete step."""
        return self.manager.latest_step()

    def _needed_bytes(self, trees: dict[str, Any]) -> int:
        """The newest checkpoint's size on disk, else (first save) the bytes of its arrays."""
        latest = self.manager.latest_step()
        if latest is not None and (self.run_dir / str(latest)).is_dir():
            return storage.tree_bytes(self.run_dir / str(latest))
        return sum(x.nbytes for x in jax.tree.leaves(trees))

    def save(self, step: int, trees: dict[str, Any], meta: dict) -> None:
        """Start saving one step's trees (named by ITEMS; in the background when async) and its metadata, after
        checking they fit on the disk."""
        self.wait()  # a failure of the previous (background) save is reported as that step's
        needed = self._needed_bytes(trees)
        free = storage.free_bytes(self.run_dir)  # None in a store, which has no free space to ask for
        if not _all_agree(free is None or needed <= free):  # every process stops, or none (the save is collective)
            raise StorageError(f"not saving step {step} to {self.run_dir}: a checkpoint needs about "
                               f"{_size(needed)} but only {_size(free)} is free on that disk; nothing was written and "
                               f"{self.intact()}")
        meta = {**meta, "checksums": {item: checksums(tree) for item, tree in trees.items()}}
        self._saving = (step, needed)
        items = {item: ocp.args.StandardSave(tree) for item, tree in trees.items()}
        try:
            self.manager.save(step, args=ocp.args.Composite(**items, meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types for an I/O failure
            self._fail(e)

    def check(self) -> None:
        """Raise the StorageError of a background save that failed (cheap; call it every step)."""
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def wait(self) -> None:
        """Wait for the save in flight; a failure raises its StorageError."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def close(self) -> None:
        """Finish the save in flight and release orbax's threads (quietly after a reported failure)."""
        try:
            if not self._failed:
                self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - after a failure that was already reported
                if not self._failed:
                    raise

    def intact(self) -> str:
        """What a failed write left intact, as the end of a sentence."""
        latest = self.manager.latest_step()
        if latest is None:
            return "no earlier checkpoint exists"
        return f"earlier checkpoints are intact (restore_from=latest resumes from step {latest})"

    def _fail(self, error: Exception) -> None:
        """One line for a failed write: the path, what failed, the space needed and free; partial step removed."""
        if self._failed:
            raise StorageError("checkpoint writing failed earlier (see above)") from None
        self._failed = True
        step, needed = self._saving or (None, 0)
        try:
            self.manager.wait_until_finished()  # let orbax's threads end before the files go
        except Exception:  # noqa: BLE001 - the same failure, already in hand
            pass
        # In a store that may itself be what failed, an unfinished step that cannot be seen now is removed when
        # the run resumes (CheckpointWriter), and said so.
        removed = "the partial step was removed" if not storage.is_url(self.run_dir) else \
            "an unfinished step is removed when the run resumes"
        if jax.process_index() == 0 and step is not None:
            try:
                if _remove_partial_steps(self.run_dir, step):
                    removed = "the partial step was removed"
            except Exception:  # noqa: BLE001 - the store itself is failing
                removed = "an unfinished step is removed when the run resumes"
        cause = reason(error)
        free = storage.free_bytes(self.run_dir)
        space = f"; a checkpoint needs about {_size(needed)} and {_size(free)} is free" if free is not None else ""
        raise StorageError(f"could not write checkpoint step {step} to {self.run_dir}: {cause}{space}; {removed}, "
                           f"{self.intact()}") from None


def _remove_partial_steps(run_dir: Path, step: int, settle_s: float = 0.5, limit_s: float = 10.0) -> bool:
    """Remove what an unfinished save of `step` left, until nothing of it reappears for `settle_s` (on a disk):
    a thread of the failed save can still write a file into the temporary directory, re-creating it, after the
    save has raised. Whether there was anything to remove."""
    removed = False
    settle_s = 0.0 if storage.is_url(run_dir) else settle_s
    deadline = quiet_since = time.monotonic()
    deadline += limit_s
    while True:
        partials = _partial_steps(run_dir, step)
        for partial in partials:
            storage.rmtree(partial)
        if partials:
            removed, quiet_since = True, time.monotonic()
        if time.monotonic() - quiet_since >= settle_s or time.monotonic() > deadline:
            return removed
        time.sleep(0.05)


def _partial_steps(run_dir: Path, step: int) -> list:
    """The directories an unfinished save of `step` left: on a disk under orbax's temporary name; in a store
    the step's own directory, which orbax marks complete only with a commit_success.txt written last."""
    if not storage.is_url(run_dir):
        return list(run_dir.glob(f"{step}.orbax-checkpoint-tmp*"))
    d = run_dir / str(step)
    return [d] if d.is_dir() and not (d / "commit_success.txt").exists() else []


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# --- Restoring -------------------------------------------------------------------------------------

def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def _all_agree(ok: bool) -> bool:
    """Whether every process's `ok` is true (each process reads its own shards, so a read can fail on one)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def restore_verified(run_dir: Path, step: int, targets: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    """The trees named by `targets` (item -> an abstract or real tree giving each array's layout) and the
    metadata of one step, every array checked against its recorded checksum; raises Damaged."""
    items = {item: ocp.args.StandardRestore(_abstract(tree)) for item, tree in targets.items()}
    failure = None  # kept as text: the exception's traceback would keep orbax's abandoned coroutines alive
    try:
        restored = make_manager(run_dir, read_only=True).restore(
            step, args=ocp.args.Composite(**items, meta=ocp.args.JsonRestore()))
        meta = dict(restored.meta)
    except Exception as e:  # noqa: BLE001 - a damaged step fails inside orbax/tensorstore in many ways
        failure = reason(e)
    if failure and "do not match" in failure and "tree structure" in failure:  # a layout, not damage
        raise UserError(f"step {step} of {run_dir} holds state laid out for other settings ({failure}); resume with "
                        f"the settings it was trained with (run_config.json there)")
    if not _all_agree(failure is None):
        raise Damaged(f"cannot be read ({failure})" if failure else "cannot be read on another process")
    trees = {item: restored[item] for item in targets}
    recorded = meta.get("checksums")
    if recorded is None:
        _warn(f"step {step} of {run_dir} has no checksums (saved before gpt2-jax recorded them): not verified")
        return trees, meta
    for item, tree in trees.items():
        _verify(tree, recorded.get(item, {}), item)
    return trees, meta


# What to do when no step of a run verifies: for a run resuming (training), and for a command reading it.
RESUME_ADVICE = "Restore another run or step with checkpoint.restore_from=PATH, or start anew under another run_name"
READ_ADVICE = "give another run, or one of its step directories (RUN/STEP) that verifies"


def restore_newest(run_dir: Path, steps: list[int], targets: dict[str, Any], *, set_aside_to: Path | None = None,
                   advice: str = READ_ADVICE) -> tuple[int, dict[str, Any], dict]:
    """(step, trees, metadata) of the newest of `steps` that reads and verifies (restore_verified).

    Each one that fails is named in a warning; with `set_aside_to` (a run resuming itself: its damaged/) those
    newer than the one restored are moved there as STEP.TIME, never deleted and out of orbax's sight (so they
    never count towards `keep`). After a fallback, one line names the step used. When none verifies: a
    UserError ending in `advice`, and nothing is moved.
    """
    run_dir = storage.absolute(run_dir)
    failed = []
    for step in sorted(steps, reverse=True):
        try:
            trees, meta = restore_verified(run_dir, step, targets)
        except Damaged as e:
            failed.append((step, str(e)))
            more = "; trying an older one" if step != min(steps) else ""
            _warn(f"checkpoint step {step} in {run_dir} {e}{more}")
            continue
        if set_aside_to is not None and failed and jax.process_index() == 0:
            stamp = time.strftime("%Y%m%dT%H%M%S")
            for bad, _ in failed:
                storage.mkdir(set_aside_to)
                storage.move(run_dir / str(bad), set_aside_to / f"{bad}.{stamp}")
                _warn(f"moved the damaged step {bad} to {set_aside_to / f'{bad}.{stamp}'}")
        if set_aside_to is not None and failed and jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("damaged checkpoints set aside")
        if failed:
            newer = ", ".join(str(s) for s, _ in failed)
            _warn(f"using checkpoint step {step} of {run_dir} (step{'s' * (len(failed) > 1)} {newer} did not verify)")
        return step, trees, meta
    tried = "; ".join(f"step {s}: {why}" for s, why in failed)
    raise UserError(f"no checkpoint in {run_dir} can be used ({tried}); nothing was deleted or moved: {advice}")


def read_meta(run_dir: Path, step: int) -> dict:
    """The metadata (step, seed, ...) saved with one step, without reading any array."""
    manager = make_manager(run_dir, read_only=True)
    return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)


def read_seed(run_dir: Path, steps: list[int]) -> int | None:
    """The run's seed from the newest of `steps` whose metadata reads (every step of a run records the same)."""
    for step in sorted(steps, reverse=True):
        try:
            return int(read_meta(run_dir, step)["seed"])
        except Exception:  # noqa: BLE001 - a damaged step; restore_newest reports it
            continue
    return None


def steps_of(run_dir: Path) -> list[int]:
    """The complete steps of a run directory, oldest first."""
    return sorted(make_manager(run_dir, read_only=True).all_steps())
