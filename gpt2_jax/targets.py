"""Compile targets: accelerators that are not attached, for ahead-of-time ("deviceless") compiles.

`launch.py --target=NAME` makes `--dry_run`, `model.remat=auto` and the compile-only remat ablation
answer for the named accelerator instead of this machine: XLA's compiler for that chip (libtpu for
TPUs, the CUDA plugin for NVIDIA GPUs) compiles the training step for compile-only devices, and its
memory analysis says what one device would hold. Nothing is allocated and nothing runs.

Names: TPU slices as Google Cloud names them (v4-8 and v5p-8 count TensorCores, two per chip, one JAX
device each chip; v5e-8 and v6e-8 count chips), or a topology (`v5e:2x4`); GPUs as `h100`, `h200`,
`a100-80gb`, `a100-40gb`, `xN` for N of them (`h100x8`), or a text-format GpuTargetConfigProto file
(`my_gpu.txtpb`, `my_gpu.txtpb x8`). The GPU descriptions below are written from each GPU's published
facts; XLA reads them as it would read a real device's.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Any

from gpt2_jax import storage
from gpt2_jax.errors import UserError

GiB = 2**30
HEADROOM = 0.10  # a default memory budget (a target's, remat=auto's on a device) leaves this fraction free
TPU_EXTRA = 'pip install -e ".[tpu-aot]" (libtpu, matched to jax)'
GPU_EXTRA = 'pip install -e ".[gpu-aot]" (the CUDA plugin matched to jaxlib, ptxas and cuDNN)'


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """One TPU generation: how GCP counts a slice, its chips' memory and dense bf16 peak."""

    topology_prefix: str  # as libtpu names it in a topology ("v5e:2x4")
    device_kind: str  # as jax names its devices
    cores_per_chip: int  # what GCP's slice size counts per chip (v4-8 = 4 chips)
    hbm_gib: float  # per chip (one JAX device per chip: megacore on v4/v5p)
    peak_bf16_flops: float  # per chip
    dims: int  # topology dimensions: 3 (torus) or 2
    chip_config: str  # libtpu's chip config: "megacore" fuses a chip's two TensorCores into one device
    sizes: tuple[int, ...]  # slice sizes GCP offers, in its count


_TORUS_SIZES = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)  # v4, v5p: GCP counts TensorCores
_FLAT_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)  # v5e, v6e: GCP counts chips
TPU_GENERATIONS = {
    "v4": TpuGeneration("v4", "TPU v4", 2, 32, 275e12, 3, "megacore", _TORUS_SIZES),
    "v5p": TpuGeneration("v5p", "TPU v5", 2, 95, 459e12, 3, "megacore", _TORUS_SIZES),
    "v5e": TpuGeneration("v5e", "TPU v5 lite", 1, 16, 197e12, 2, "default", _FLAT_SIZES),
    "v6e": TpuGeneration("v6e", "TPU v6 lite", 1, 32, 918e12, 2, "default", _FLAT_SIZES),
}


@dataclasses.dataclass(frozen=True)
class GpuFacts:
    """What a GPU's spec sheet and `nvidia-smi` say about it, enough for XLA's compiler to target it."""

    name: str  # the CUDA device name (jax's device_kind)
    compute_capability: tuple[int, int]
    sms: int  # streaming multiprocessors
    fp32_lanes_per_sm: int
    boost_clock_ghz: float
    memory_mib: int  # nvidia-smi's memory.total
    bandwidth_bytes_s: float  # HBM
    l2_bytes: int
    pcie_bytes_s: float
    nvlink_links: int
    peak_bf16_flops: float  # dense


# Per compute capability, from CUDA's "technical specifications per compute capability" table:
# shared memory per SM and the most one block may opt into.
_SHARED_MEMORY = {(8, 0): (164 * 1024, 163 * 1024), (9, 0): (228 * 1024, 227 * 1024)}

GPUS = {
    "h100": GpuFacts("NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 1.98, 81559, 3.35e12, 50 * 2**20, 64e9, 18, 989e12),
    "h200": GpuFacts("NVIDIA H200", (9, 0), 132, 128, 1.98, 143771, 4.8e12, 50 * 2**20, 64e9, 18, 989e12),
    "a100-80gb": GpuFacts("NVIDIA A100-SXM4-80GB", (8, 0), 108, 64, 1.41, 81920, 2.039e12, 40 * 2**20, 32e9, 12,
                          312e12),
    "a100-40gb": GpuFacts("NVIDIA A100-SXM4-40GB", (8, 0), 108, 64, 1.41, 40960, 1.555e12, 40 * 2**20, 32e9, 12,
                          312e12),
}


def peak_bf16_flops(device_kind: str) -> float | None:
    """The dense bf16 peak of a device kind ('NVIDIA H100 80GB HBM3', 'h200', 'TPU v5 lite', ...) from the tables
    above; None when unknown."""
    kind = device_kind.lower()
    # The longest name first: "TPU v5 lite" (v5e) before "TPU v5" (v5p).
    tpus = sorted(((g.device_kind.lower(), g.peak_bf16_flops) for g in TPU_GENERATIONS.values()),
                  key=lambda x: -len(x[0]))
    gpus = [(name.split("-")[0], gpu.peak_bf16_flops) for name, gpu in GPUS.items()]  # "a100-80gb": any A100
    return next((peak for name, peak in tpus + gpus if name in kind), None)


def gpu_target_config(gpu: GpuFacts, cudnn: tuple[int, int, int]) -> str:
    """A text-format GpuTargetConfigProto for `gpu`, assuming cuDNN `cudnn` (major, minor, patch) on it."""
    major, minor = gpu.compute_capability
    smem_per_sm, smem_optin = _SHARED_MEMORY[gpu.compute_capability]
    # Hopper's wgmma and TMA need the arch-specific target (sm_90a), as a real H100 reports it.
    extension = "\n    feature_extension: ACCELERATED_FEATURES" if major >= 9 else ""
    version = ".".join(map(str, cudnn))
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {smem_per_sm}
  shared_memory_per_block_optin: {smem_optin}
  threads_per_core_limit: 2048
  core_count: {gpu.sms}
  fpus_per_core: {gpu.fp32_lanes_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  memory_bandwidth: {int(gpu.bandwidth_bytes_s)}
  l2_cache_size: {gpu.l2_bytes}
  clock_rate_ghz: {gpu.boost_clock_ghz}
  device_memory_size: {gpu.memory_mib * 2**20}
  cuda_compute_capability {{
    major: {major}
    minor: {minor}{extension}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  device_address_bits: 64
  pcie_bandwidth: {int(gpu.pcie_bytes_s)}
  name: "{gpu.name}"
  dnn_version: "{version}"
  device_interconnect_info {{
    active_links: {gpu.nvlink_links}
  }}
}}
platform_name: "CUDA"
dnn_version_info {{
  major: {cudnn[0]}
  minor: {cudnn[1]}
  patch: {cudnn[2]}
}}
device_description_str: "{gpu.name}"
"""


@dataclasses.dataclass(frozen=True)
class Target:
    """A named accelerator to compile for: its platform, device count, memory and peak per device."""

    name: str  # as the user gave it
    platform: str  # "tpu" or "gpu": what device-dependent defaults follow
    num_devices: int
    memory_bytes: float  # per device
    peak_bf16_flops: float | None  # per device, dense
    topology: str  # libtpu's topology name, or the GPU plugin's PARTITIONSxHOSTSxDEVICES_PER_HOST
    tpu: TpuGeneration | None = None
    gpu: GpuFacts | None = None  # a named GPU: its description is written when compiling
    gpu_config: str = ""  # a user's GPU file: its GpuTargetConfigProto text

    def budget_bytes(self, memory_budget_gb: float = 0.0) -> float:
        """The memory a compiled step may use per device: memory_budget_gb when set, else memory less HEADROOM."""
        return memory_budget_gb * GiB if memory_budget_gb > 0 else self.memory_bytes * (1 - HEADROOM)

    def devices(self) -> list:
        """Compile-only devices of the target (libtpu or the CUDA plugin must be installed)."""
        from jax.experimental import topologies

        if self.platform == "tpu":
            _require("libtpu", TPU_EXTRA)
            # libtpu reads the slice from the environment of a TPU VM: say there is none to look up; and it
            # locks /tmp/libtpu_lockfile against a second process, which only matters when chips are attached
            for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5litepod-8"),
                               ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"),
                               ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
                os.environ.setdefault(key, value)
            per_host = [2, 2, 1] if self.num_devices >= 4 else [1, 1, 1]
            topology = topologies.get_topology_desc(topology_name=self.topology, platform="tpu",
                                                    chip_config_name=self.tpu.chip_config,
                                                    chips_per_host_bounds=per_host, wrap=[False, False, False])
        else:
            _require("jax_cuda12_plugin", GPU_EXTRA)
            text = self.gpu_config or gpu_target_config(self.gpu, _cudnn_version())
            topology = topologies.get_topology_desc("any", "cuda", target_config=text, topology=self.topology)
        return list(topology.devices)


def _require(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise UserError(f"--target needs {module}, which is not installed: {install}")


def _tpu_dims(chips: int, dims: int) -> list[int]:
    """The topology of a slice of `chips` chips as GCP lays it out: double the smallest axis, last first."""
    shape = [1] * dims if chips == 1 else ([2, 2] if dims == 2 else [2, 2, 1])
    while shape[0] * shape[1] * (shape[2] if dims == 3 else 1) < chips:
        smallest = min(shape)
        shape[max(i for i, s in enumerate(shape) if s == smallest)] *= 2
    return shape


def _tpu(name: str) -> Target | None:
    """A TPU target from a slice name (v5e-8) or a topology (v5e:2x4), or None if `name` is neither."""
    slice_match = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name)
    topo_match = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+){1,2})", name)
    if not (slice_match or topo_match):
        return None
    gen = TPU_GENERATIONS[(slice_match or topo_match).group(1)]
    if slice_match:
        size = int(slice_match.group(2))
        if size not in gen.sizes:
            raise UserError(f"--target={name}: {gen.topology_prefix} slices come in sizes "
                            f"{', '.join(map(str, gen.sizes))}; or name a topology, e.g. {gen.topology_prefix}:"
                            f"{'x'.join(map(str, _tpu_dims(4, gen.dims)))}")
        shape = _tpu_dims(size // gen.cores_per_chip, gen.dims)
    else:
        shape = [int(s) for s in topo_match.group(2).split("x")]
        if len(shape) != gen.dims or 0 in shape:
            example = "x".join(map(str, _tpu_dims(4, gen.dims)))
            raise UserError(f"--target={name}: a {gen.topology_prefix} topology has {gen.dims} axes, e.g. "
                            f"{gen.topology_prefix}:{example}")
    chips = shape[0] * shape[1] * (shape[2] if len(shape) == 3 else 1)
    return Target(name, "tpu", chips, gen.hbm_gib * GiB, gen.peak_bf16_flops,
                  f"{gen.topology_prefix}:{'x'.join(map(str, shape))}", tpu=gen)


def _gpu_topology(name: str, count: int) -> str:
    """The CUDA plugin's PARTITIONSxHOSTSxDEVICES_PER_HOST for `count` GPUs, 8 to a host."""
    if count <= 8:
        return f"1x1x{count}"
    if count % 8:
        raise UserError(f"--target={name}: more than 8 GPUs come 8 to a host; use a multiple of 8")
    return f"1x{count // 8}x8"


def _cudnn_version() -> tuple[int, int, int]:
    """The cuDNN the CUDA plugin would run with (what a GPU machine installing the same wheels gets)."""
    try:
        from jax_cuda12_plugin import _versions

        v = _versions.cudnn_get_version()
    except Exception:  # noqa: BLE001 - no loadable cuDNN here: assume a current cuDNN 9
        v = 90800
    return v // 10000, (v // 100) % 100, v % 100


def _gpu(name: str) -> Target | None:
    """A GPU target (h100, h100x8, a user's .txtpb[xN]), or None if `name` is not one."""
    match = re.fullmatch(r"(.+?)(?:\s*x(\d+))?", name)
    base, count = match.group(1), int(match.group(2) or 1)
    if count < 1:
        raise UserError(f"--target={name}: the GPU count after 'x' must be at least 1")
    if base.lower() in GPUS:
        gpu = GPUS[base.lower()]
        return Target(name, "gpu", count, gpu.memory_mib * 2**20, gpu.peak_bf16_flops, _gpu_topology(name, count),
                      gpu=gpu)
    if not base.endswith((".txtpb", ".pbtxt", ".textproto")):
        return None
    path = storage.path(base)  # a local file or a URL
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError, *storage.store_errors()) as e:
        raise UserError(f"--target={name}: cannot read the GPU description {path} ({e.__class__.__name__}); "
                        "give a text-format GpuTargetConfigProto file") from None
    memory = re.search(r"device_memory_size:\s*(\d+)", text)
    if not memory or "gpu_device_info" not in text:
        raise UserError(f"--target={name}: {path} is not a text-format GpuTargetConfigProto (it needs "
                        "gpu_device_info with device_memory_size); see `launch.py --target=list`")
    kind = re.search(r'\bname:\s*"([^"]*)"', text)
    return Target(name, "gpu", count, float(memory.group(1)), peak_bf16_flops(kind.group(1) if kind else ""),
                  _gpu_topology(name, count), gpu_config=text)


def parse_target(name: str) -> Target:
    """The Target a --target value names; one line listing the names when it names none."""
    name = name.strip()
    target = _tpu(name.lower()) or _gpu(name)
    if target is None:
        raise UserError(f"--target={name}: unknown target; use a TPU slice (v4-8, v5e-1 ... v5e-256, v5p-8, "
                        f"v6e-8), a topology (v5e:2x4), a GPU ({', '.join(GPUS)}, with xN for N of them) or a "
                        "GpuTargetConfigProto file (my_gpu.txtpb[xN]); `--target=list` lists them")
    return target


def list_targets() -> str:
    """The named targets with their devices and memory, one per line."""
    lines = ["TPU slices (v4/v5p sizes count TensorCores, two per chip, one JAX device per chip; v5e/v6e count "
             "chips), or any topology as GEN:AxB[xC]:"]
    for gen in TPU_GENERATIONS.values():
        examples = ", ".join(f"{gen.topology_prefix}-{s}" for s in gen.sizes[:4])
        lines.append(f"  {gen.topology_prefix:<4} {gen.hbm_gib:g} GiB per chip, {gen.peak_bf16_flops / 1e12:g} "
                     f"TFLOP/s bf16: {examples} ... {gen.topology_prefix}-{gen.sizes[-1]} "
                     f"(e.g. {gen.topology_prefix}-{gen.sizes[2]} = {gen.topology_prefix}:"
                     f"{'x'.join(map(str, _tpu_dims(gen.sizes[2] // gen.cores_per_chip, gen.dims)))})")
    lines.append("NVIDIA GPUs (NAME or NAMExN for N of them, 8 to a host):")
    for key, gpu in GPUS.items():
        lines.append(f"  {key:<10} {gpu.name}, sm_{gpu.compute_capability[0]}{gpu.compute_capability[1]}, "
                     f"{gpu.memory_mib / 1024:.1f} GiB, {gpu.peak_bf16_flops / 1e12:g} TFLOP/s bf16")
    lines.append("  FILE.txtpb[xN]  a text-format GpuTargetConfigProto of your own GPU")
    lines.append(f"Install: {TPU_EXTRA}; {GPU_EXTRA}")
    return "\n".join(lines)


def prepare_host() -> None:
    """Before JAX starts its backends: compile on the CPU host, never trying to open an accelerator here."""
    import jax

    jax.config.update("jax_platforms", "cpu")


def for_target(model_config: Any, target: Target) -> Any:
    """The model config with its device-dependent defaults (attention, vocabulary padding) resolved for the target."""
    from gpt2_jax.model import attention_implementation, vocab_padding

    return dataclasses.replace(model_config,
                               attention=attention_implementation(model_config.attention, model_config.dtype,
                                                                  target.platform),
                               vocab_multiple=vocab_padding(model_config.vocab_multiple, target.platform))


def fit_line(target: Target, mesh: Any, peak_bytes: float, budget_bytes: float) -> str:
    """The one line scripts read: `target T: N devices, mesh data=D fsdp=F, peak P GiB of M GiB per device, fits`."""
    verdict = "fits" if peak_bytes <= budget_bytes else "does not fit"
    return (f"target {target.name}: {mesh.devices.size} devices, mesh data={mesh.shape['data']} "
            f"fsdp={mesh.shape['fsdp']}, peak {peak_bytes / GiB:.3f} GiB of {target.memory_bytes / GiB:.3f} GiB "
            f"per device, {verdict}")


def make_mesh(target: Target, data: int, fsdp: int) -> Any:
    """The (data, fsdp) mesh over the target's compile-only devices; one line when the count does not fit."""
    from gpt2_jax import parallel

    devices = target.devices()
    try:
        return parallel.make_mesh(data, fsdp, devices)
    except UserError as e:
        raise UserError(f"--target={target.name} ({len(devices)} devices): {e}") from None
