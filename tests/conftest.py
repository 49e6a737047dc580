"""Shared fixtures. Reference data lives outside the repo: set GPT2_JAX_SHARED (default ../shared).

Tests that need it skip when it is absent on a developer's machine, and fail under CI (CI=true),
so they never skip silently there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
# tests/multidevice needs 8 CPU devices, fixed before JAX starts: tests/test_parallel.py runs it
# in its own process with XLA_FLAGS set, and GPT2_JAX_MULTIDEVICE=1 lets that run collect it.
collect_ignore = [] if os.environ.get("GPT2_JAX_MULTIDEVICE") else ["multidevice"]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# The tests run on the CPU. With the compile-target extras installed (libtpu, the CUDA plugin), JAX
# would otherwise try to open a TPU or GPU here at start-up in every process the tests start.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


# The tests compile hundreds of tiny programs and run each a few times: LLVM's optimisation of the
# CPU code is most of their compile time and buys them nothing (about a third of the suite's time).
# Every tolerance is unchanged; runs that are compared bitwise are compiled alike (the flag is inherited
# by the workers and every subprocess); benchmarks never set it.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def pytest_configure(config) -> None:
    """One JAX compilation cache for the whole run (workers and subprocesses inherit it): the many
    identical tiny programs the tests compile are compiled once. Fresh per run, removed after it.
    Also the fast-compile flag above, for this process (JAX starts after this) and all it starts."""
    if FAST_COMPILE_FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAG}".strip()
    if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        config._jax_cache_dir = tempfile.mkdtemp(prefix="gpt2_jax_test_xla_cache_")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = config._jax_cache_dir
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


# The modules with the longest tests run first: on two workers a long test started last leaves a core idle
# while it ends (the order within each module is kept).
FIRST = ("test_parallel.py", "test_gcs.py", "test_bench.py", "test_docs.py", "test_loop.py")


def pytest_collection_modifyitems(config, items) -> None:
    items.sort(key=lambda item: FIRST.index(item.path.name) if item.path.name in FIRST else len(FIRST))


def pytest_unconfigure(config) -> None:
    if getattr(config, "_jax_cache_dir", None):
        shutil.rmtree(config._jax_cache_dir, ignore_errors=True)


def shared_path() -> Path:
    """The shared data directory: $GPT2_JAX_SHARED, else ../shared beside the checkout."""
    return Path(os.environ.get("GPT2_JAX_SHARED", REPO.parent / "shared"))


def needs_module(module: str, extra: str) -> None:
    """Skip (fail under CI, which installs every extra) when an optional extra's module is not installed."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        message = f"{module} is not installed (pip install -e '.[{extra}]')"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, below the kernel's ephemeral range: a port bind(0) hands out is one
    the kernel may give a connection of another test (gloo's, a store client's) before the server told of
    it binds it."""
    import random
    import socket

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    choose = random.SystemRandom()
    for _ in range(100):
        port = choose.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def environment(variables: dict[str, str]):
    """These environment variables set in this process (and what it starts) for a while, then restored."""
    previous = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class GCS:
    """A local Google Cloud Storage (tests/gcs_emulator.py): `bucket`, the `env` that points orbax, tensorstore,
    gcsfs and google-cloud-storage at it, and stop()/start() (with `data`, what it holds survives a stop). `raw`:
    without the generation headers and preconditions of real GCS; `faults`: a file whose lines are object-name
    prefixes whose writes the store refuses (403), for a test to write mid-run."""

    BUCKET = "gpt2-jax-test"

    def __init__(self, data: Path | None = None, raw: bool = False, faults: Path | None = None):
        self.port, self.data, self.bucket, self.proc = free_port(), data, self.BUCKET, None
        self.options = [*(["--raw"] if raw else []), *(["--faults", str(faults)] if faults else [])]
        url = f"http://127.0.0.1:{self.port}"
        # gcsfs asks a new bucket's type over gRPC, which the emulator cannot answer (60 s per file system).
        self.env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        self.start()

    def start(self) -> None:
        import subprocess
        import sys

        extra = (["--data", str(self.data)] if self.data is not None else []) + self.options
        for _ in range(20):  # a restart may find the port not yet free
            with tempfile.TemporaryFile() as err:
                self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "gcs_emulator.py"), str(self.port),
                                              self.bucket, *extra], stdout=subprocess.PIPE, stderr=err)
                if self.proc.stdout.readline().strip() == b"ready":
                    return
                self.proc.wait()
                err.seek(0)
                error = err.read().decode(errors="replace")
            time.sleep(0.5)
        raise AssertionError(f"the GCS emulator did not start: {error[-2000:]}")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()

    @contextlib.contextmanager
    def active(self):
        """This emulator in this process's environment for a while (gcsfs's cached file systems forgotten on the
        way in and out: each keeps the address it was made with)."""
        import gcsfs

        with environment(self.env):
            gcsfs.GCSFileSystem.clear_instance_cache()
            try:
                yield self
            finally:
                gcsfs.GCSFileSystem.clear_instance_cache()

    def url(self, *parts: str) -> str:
        """gs://BUCKET/PART/..."""
        return "/".join([f"gs://{self.bucket}", *parts])


@pytest.fixture(scope="session")
def gcs():
    """The emulator for the whole session, its address in this process's environment (and so in every
    process a test starts)."""
    needs_module("gcp_storage_emulator", "test")
    needs_module("gcsfs", "gcs")
    store = GCS()
    with environment(store.env):
        yield store
        store.stop()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = shared_path()
    if not (path / "gpt2" / "encoder.json").is_file():
        message = f"shared data not found at {path} (set GPT2_JAX_SHARED)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def gpt2_vocab_dir(shared_dir: Path) -> Path:
    return shared_dir / "gpt2"


@pytest.fixture(scope="session")
def real_encoder(gpt2_vocab_dir: Path):
    from gpt2_jax.encoder import get_encoder

    return get_encoder(gpt2_vocab_dir)


@pytest.fixture(scope="session")
def tiktoken_gpt2(gpt2_vocab_dir: Path):
    """tiktoken's "gpt2" encoding built offline from the shared vocabulary files."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(gpt2_vocab_dir / "vocab.bpe"),
                                            encoder_json_file=str(gpt2_vocab_dir / "encoder.json"))
    pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding("gpt2", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def random_hf_model(n_vocab=300, n_ctx=64, n_embd=32, n_head=4, n_layer=2, seed=0):
    """transformers' GPT2LMHeadModel with random weights, every tensor moved off its init values."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=n_vocab, n_positions=n_ctx, n_embd=n_embd, n_head=n_head, n_layer=n_layer,
                        bos_token_id=n_vocab - 1, eos_token_id=n_vocab - 1)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # LayerNorm ones and zero biases become distinct values
    return model


def save_hf_model(model, directory: Path, safe: bool = True) -> Path:
    """transformers' layout: config.json + model.safetensors, or + pytorch_model.bin when not `safe`."""
    import torch

    if safe:
        model.save_pretrained(directory)
    else:  # transformers 5 writes only safetensors; the older .bin layout is a torch.save'd state dict
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return directory


def write_byte_vocab(directory: Path, n_vocab: int) -> None:
    """encoder.json/vocab.bpe of a byte-level vocabulary padded to n_vocab ids (eot = n_vocab - 1)."""
    import json

    from gpt2_jax.encoder import bytes_to_unicode

    symbols = bytes_to_unicode()
    enc = {symbols[b]: b for b in range(256)}
    enc.update({f"<|extra_{i}|>": i for i in range(256, n_vocab - 1)})
    enc["<|endoftext|>"] = n_vocab - 1
    (directory / "encoder.json").write_text(json.dumps(enc))
    (directory / "vocab.bpe").write_text("#version: 0.2\n")


def tiny_hf_dir(directory: Path, seed: int = 0) -> Path:
    """A random 300-token, 64-context GPT-2 in transformers' layout with a byte-level vocabulary (end-of-text
    299), both as encoder.json/vocab.bpe and as transformers' tokenizer files vocab.json/merges.txt."""
    import shutil

    save_hf_model(random_hf_model(n_vocab=300, n_ctx=64, seed=seed), directory)
    write_byte_vocab(directory, 300)
    shutil.copyfile(directory / "encoder.json", directory / "vocab.json")
    shutil.copyfile(directory / "vocab.bpe", directory / "merges.txt")
    return directory


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()
