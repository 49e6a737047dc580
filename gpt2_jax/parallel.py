"""Parallelism, resolved in one place: the device mesh, shardings, global batches, multi-host start-up.

The mesh has two axes: `data` (parameters replicated, the batch split, gradients all-reduced by
XLA) and `fsdp` (the batch split too, and parameters plus optimizer state sharded along their
largest divisible axis, gathered by XLA inside the step: ZeRO-3). steps.py jits the train step
once with these shardings; XLA inserts every collective.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NoReturn

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gpt2_jax.errors import UserError

AXES = ("data", "fsdp")
BATCH_AXES = AXES  # the batch is split over both axes
PEER_LOST_EXIT = 4  # a process of a multi-process job was lost: restart every process with the same command


def init_distributed(parallel: Any) -> None:
    """Join a multi-process job when configured: explicit settings, or 'auto' (SLURM, Kubernetes, TPU...)."""
    mode = parallel.distributed
    if not mode or jax.distributed.is_initialized():
        return
    # Collectives between CPU devices of different processes (harmless when training on accelerators).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # The coordination service declares a process lost after heartbeat_s without its heartbeat (JAX's
    # default is 100 s); the shutdown barrier at exit waits no longer than one heartbeat.
    heartbeat = int(parallel.heartbeat_s)
    if heartbeat < 1:
        raise UserError(f"parallel.heartbeat_s={parallel.heartbeat_s}: must be >= 1 (seconds)")
    kwargs: dict[str, Any] = {"initialization_timeout": int(parallel.timeout_s), "heartbeat_timeout_seconds": heartbeat,
                              "shutdown_timeout_seconds": heartbeat}
    jax.config.update("jax_enable_preemption_service", False)  # its poller would log a dead peer's errors too
    if mode != "auto":
        if mode != "explicit":
            raise UserError(f"parallel.distributed={mode!r}: use '' (single process), 'auto' or 'explicit'")
        kwargs.update(coordinator_address=parallel.coordinator_address, num_processes=parallel.num_processes,
                      process_id=parallel.process_id)
        if parallel.process_id != 0:
            _wait_for_coordinator(parallel.coordinator_address, float(parallel.timeout_s))
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - jax raises several types; all mean "could not join"
        if mode == "auto" and "coordinator_address should be defined" in str(e):
            raise UserError("parallel.distributed=auto found no cluster to join (SLURM's srun, a TPU VM slice, a "
                            "Kubernetes indexed job); start every process through one, or use "
                            "distributed=explicit") from None
        where = parallel.coordinator_address or "the auto-detected coordinator"
        raise UserError(f"could not join the distributed job at {where} within {parallel.timeout_s}s "
                        f"({str(e).splitlines()[0][:200]}); check parallel.coordinator_address, num_processes "
                        "and process_id, and that process 0 is running") from None
    found = "explicit" if mode == "explicit" else \
        next((name for name, v in CLUSTER_VARIABLES.items() if os.environ.get(v)), "a TPU VM slice")
    print(f"distributed: process {jax.process_index()} of {jax.process_count()} ({found}), "
          f"{jax.local_device_count()} local device{'s' * (jax.local_device_count() != 1)}", flush=True)


# How JAX's auto-detection found the job, for the start-up line (a TPU VM slice is found through its metadata).
CLUSTER_VARIABLES = {"SLURM": "SLURM_JOB_ID", "Kubernetes": "KUBERNETES_SERVICE_HOST",
                     "Open MPI": "OMPI_MCA_orte_hnp_uri"}


def peer_lost(who: str, detail: str) -> NoReturn:
    """End this process of a multi-process job at once with one line and PEER_LOST_EXIT: without
    JAX's shutdown barrier, which would wait for the lost peer, then abort."""
    print(f"{Path(sys.argv[0]).name}: error: lost {who} of this {jax.process_count()}-process job ({detail}); "
          "restart every process with the same command: it resumes from the last complete checkpoint",
          file=sys.stderr, flush=True)
    os._exit(PEER_LOST_EXIT)


# Errors of a collective or of the coordination service whose cause is a process that went away.
PEER_ERRORS = ("gloo", "connection closed by peer", "connection reset by peer", "unavailable:", "deadline_exceeded",
                "heartbeat", "coordination service", "barrier timed out", "nccl")


@contextlib.contextmanager
def peer_loss_ends_the_job():
    """In a multi-process job, an exception caused by a lost peer (a collective that failed) ends the
    process through peer_lost instead of a traceback and a hung shutdown."""
    try:
        yield
    except Exception as e:
        if jax.process_count() > 1:
            chain, x = [], e
            while x is not None and x not in chain:
                chain.append(x)
                x = x.__cause__ or x.__context__
            text = " ".join(str(x) for x in chain).lower()
            if any(marker in text for marker in PEER_ERRORS):
                peer_lost("a peer", str(chain[-1]).strip().splitlines()[0][:160] if str(chain[-1]).strip()
                          else type(chain[-1]).__name__)
        raise


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Poll process 0's coordinator port: JAX itself aborts the process when it cannot connect."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"parallel.coordinator_address={address!r}: use host:port of process 0")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise UserError(f"could not join the distributed job at {address} within {timeout_s:g}s ({e}); "
                                "check parallel.coordinator_address and that process 0 is running") from None
            time.sleep(0.5)


def make_mesh(data: int = -1, fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A (data, fsdp) mesh over all devices; one axis may be -1 for 'all the remaining devices'."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise UserError("mesh.data and mesh.fsdp cannot both be -1")
    if data == -1:
        data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
    if fsdp == -1:
        fsdp = n // data if data > 0 and n % data == 0 else 0
    if data < 1 or fsdp < 1 or data * fsdp != n:
        raise UserError(f"mesh data={data} x fsdp={fsdp} does not match the {n} available devices; "
                        f"make the product {n} (or set one axis to -1)")
    # jax.devices() lists each process's devices together, so every host holds a contiguous block of
    # batch rows. A plain Mesh keeps sharding automatic (XLA propagates it through the model).
    return Mesh(np.asarray(devices, dtype=object).reshape(data, fsdp), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches [rows, ...] split by rows over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same value on every device (scalars, rng keys, metrics)."""
    return NamedSharding(mesh, P())


def _leaf_spec(shape: tuple[int, ...], fsdp: int, stacked: bool = False) -> P:
    """Shard the largest axis that the fsdp size divides; replicate small or indivisible leaves.

    A stacked leaf (scan_layers: [n_layer, ...]) never shards its layer axis, so each scan step
    gathers one layer's weights, not every layer's.
    """
    if fsdp <= 1 or not shape:
        return P()
    candidates = [i for i, size in enumerate(shape) if size % fsdp == 0 and size >= fsdp and not (stacked and i == 0)]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda i: shape[i])
    return P(*[("fsdp" if i == axis else None) for i in range(len(shape))])


def state_shardings(mesh: Mesh, tree: Any) -> Any:
    """NamedShardings for params or optimizer state (real or abstract arrays): FSDP-sharded or replicated."""
    fsdp = mesh.shape["fsdp"]
    def spec(path, x):
        stacked = any(getattr(k, "key", None) == "h" for k in path)
        return NamedSharding(mesh, _leaf_spec(tuple(x.shape), fsdp, stacked))
    return jax.tree_util.tree_map_with_path(spec, tree)


# How the model's logical activation axes map onto mesh axes (see model.ACTIVATION_AXES).
LOGICAL_RULES = (("batch", BATCH_AXES), ("length", None), ("embed", None), ("mlp", None), ("qkv", None))


def with_mesh_rules(fn: Callable, mesh: Mesh) -> Callable:
    """fn traced inside the mesh and the logical-axis rules, so the model's constraints resolve."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        # The classic `with mesh` (jax.set_mesh cannot be entered while tracing); newer JAX warns.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*with mesh.*", category=DeprecationWarning)
            with mesh, nn.logical_axis_rules(LOGICAL_RULES):
                return fn(*args, **kwargs)
    return wrapped


def check_batch(batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over the data shards."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards:
        raise UserError(f"train.batch_size={batch_size} must be divisible by the {shards} data shards "
                        f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); use a multiple of {shards}")


def process_rows(sharding: NamedSharding, rows: int) -> slice:
    """The rows of a global batch of `rows` that this process's devices hold: one contiguous block, as the mesh
    lists each process's devices together (all of them in a single-process run)."""
    if jax.process_count() == 1:
        return slice(0, rows)
    index_map = sharding.addressable_devices_indices_map((rows,))
    starts = [idx[0].start or 0 for idx in index_map.values()]
    stops = [idx[0].stop if idx[0].stop is not None else rows for idx in index_map.values()]
    return slice(min(starts), max(stops))


def global_batch(batch: np.ndarray | tuple, sharding: NamedSharding, rows: int | None = None) -> jax.Array | tuple:
    """A global array from a host batch (a tuple of arrays, such as windows and their weights, array by array):
    the full batch, of which each process contributes the rows its devices hold; or, given the global batch's
    `rows`, only this process's rows (process_rows), which is all a process then reads."""
    if isinstance(batch, tuple):
        return tuple(global_batch(b, sharding, rows) for b in batch)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    if rows is None:
        rows = batch.shape[0]
        batch = batch[process_rows(sharding, rows)]
    return jax.make_array_from_process_local_data(sharding, batch, (rows, *batch.shape[1:]))


def put_tree(tree: Any, shardings: Any) -> Any:
    """Place host (numpy or single-device) arrays onto the mesh, every process giving the same values."""
    def put(x, sharding):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.tree.map(put, tree, shardings)
