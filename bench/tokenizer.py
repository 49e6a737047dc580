"""Tokenizer throughput: gpt2_jax's encode vs tiktoken's "gpt2" encoding, ids checked identical.

    python bench/tokenizer.py [--corpus FILE] [--repeat N] [--smoke]
    python bench/tokenizer.py --file_mb 300     # `gpt2-jax encode` of a 300 MB file: MB/s and peak memory

Prints a markdown table (MB/s, ratio) and appends it to bench/results/DATE.md unless --no_record. --file_mb
writes the corpus repeated to that size, runs `gpt2-jax encode FILE OUT.bin` (streamed, every core)
while sampling the resident memory of its whole process tree, and times tiktoken's batch API with
all cores on the same text; the ids must be identical.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from conftest import shared_path  # noqa: E402  (the tests' one setting for ../shared)

from gpt2_jax import encoder as encoder_module  # noqa: E402
from gpt2_jax.encoder import get_encoder  # noqa: E402


def tiktoken_gpt2(vocab_dir: Path):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(vocab_dir / "vocab.bpe"),
                                            encoder_json_file=str(vocab_dir / "encoder.json"))
    pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding("gpt2", pat_str=pattern, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})


def arguments() -> argparse.ArgumentParser:
    """The command line (also parsed by tests/test_bench.py against bench/gpu.sh)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=None, help="text file (default: shared tinyshakespeare)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per row (median reported)")
    parser.add_argument("--large_factor", type=int, default=16, help="the large corpus is the corpus repeated N times")
    parser.add_argument("--file_mb", type=float, default=0, help="instead: encode a file of this many MB to .bin")
    common.add_record_flags(parser, "tiny sizes, to check the script runs")
    return parser


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (Linux /proc)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS:"))) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total


def encode_file(args, corpus: Path, shared: Path, theirs) -> None:
    """`gpt2-jax encode` of a large file: MB/s and the process tree's peak memory, against tiktoken's batch API."""
    import subprocess
    import tempfile
    import threading
    import time

    import numpy as np

    text = corpus.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(dir=args.out.parent if args.out else None) as tmp:
        big = Path(tmp) / "corpus.txt"
        target = int(args.file_mb * 1e6)
        with open(big, "w", encoding="utf-8") as f:
            written = 0
            while written < target:
                f.write(text)
                written += len(text.encode("utf-8"))
        mb = big.stat().st_size / 1e6
        proc = subprocess.Popen([sys.executable, "-m", "gpt2_jax", "encode", str(big), str(Path(tmp) / "out.bin"),
                                 "--model_dir", str(shared / "gpt2")], cwd=common.REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        peak = [0]

        def sample() -> None:
            while proc.poll() is None:
                peak[0] = max(peak[0], tree_rss_bytes(proc.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        t0 = time.perf_counter()
        sampler.start()
        assert proc.wait() == 0, "gpt2-jax encode failed"
        ours_s = time.perf_counter() - t0
        sampler.join()
        # tiktoken on the same text, a batch of blocks at a time (cut where no pre-token crosses, so the
        # ids concatenate to the whole file's), compared with ours as it goes: memory stays bounded
        from gpt2_jax.data import read_blocks

        ours = np.memmap(Path(tmp) / "out.bin", np.uint16, mode="r")
        tik_s, at, batch = 0.0, 0, []
        blocks = read_blocks(big, block_chars=1 << 20)
        for block in itertools.chain(blocks, [None]):
            if block is not None:
                batch.append(block[0])
            if len(batch) == 64 or (block is None and batch):
                t0 = time.perf_counter()
                ids = theirs.encode_ordinary_batch(batch, num_threads=os.cpu_count() or 1)
                tik_s += time.perf_counter() - t0
                for x in ids:
                    assert np.array_equal(ours[at:at + len(x)], x), "ids differ from tiktoken"
                    at += len(x)
                batch = []
        assert at == len(ours), "ids differ from tiktoken"
    rows = [(f"{corpus.name} repeated to {mb:,.0f} MB", f"{mb / ours_s:.2f}", f"{peak[0] / 2**20:,.0f}",
             f"{mb / tik_s:.2f}", f"{tik_s / ours_s:.2f}", "yes")]
    table = common.table(f"Streaming encode to .bin, all {os.cpu_count()} cores (gpt2-jax encode FILE OUT.bin)",
                         ["input", "gpt2_jax MB/s", "peak RSS of its processes MiB",
                          "tiktoken MB/s (batch, all cores)", "ratio", "ids identical"], rows)
    common.report(table, record=not args.no_record and not args.smoke, out=args.out)


def main() -> None:
    """Run the benchmark, print its table and record it."""
    args = arguments().parse_args()
    shared = shared_path()
    corpus = args.corpus or shared / "data" / "tinyshakespeare.txt"
    if args.file_mb:
        return encode_file(args, corpus, shared, tiktoken_gpt2(shared / "gpt2"))
    text = corpus.read_text(encoding="utf-8")
    if args.smoke:
        text, args.repeat, args.large_factor = text[:20000], 1, 2
    ours, theirs = get_encoder(shared / "gpt2"), tiktoken_gpt2(shared / "gpt2")
    rows = []
    for label, sample in ((corpus.name, text), (f"{corpus.name} x{args.large_factor}", text * args.large_factor)):
        # Parallel encoding kicks in by size; tiktoken gets its own batch API over the same pieces.
        ids = ours.encode(sample)
        assert ids == theirs.encode_ordinary(sample), "ids differ from tiktoken"
        mb = len(sample.encode("utf-8")) / 1e6
        t_ours = common.median_seconds(lambda s=sample: ours.encode(s), args.repeat, warmup=0)
        t_tik = common.median_seconds(lambda s=sample: theirs.encode_ordinary(s), args.repeat, warmup=0)
        parts = encoder_module.split_for_parallel(sample, (os.cpu_count() or 1) * 4)
        t_tik_par = common.median_seconds(
            lambda p=parts: theirs.encode_ordinary_batch(p, num_threads=os.cpu_count() or 1), args.repeat, warmup=0)
        rows.append((label, mb, mb / t_ours, mb / t_tik, mb / t_tik_par))
    table = common.table("Tokenizer throughput, ids identical to tiktoken's",
                         ["corpus", "MB", "gpt2_jax MB/s", "tiktoken MB/s (1 thread)",
                          "tiktoken MB/s (batch, all cores)", "ratio vs 1 thread", "ratio vs all cores"],
                         [(r[0], f"{r[1]:.2f}", f"{r[2]:.2f}", f"{r[3]:.2f}", f"{r[4]:.2f}", f"{r[2] / r[3]:.2f}",
                           f"{r[2] / r[4]:.2f}") for r in rows])
    common.report(table, record=not args.no_record and not args.smoke, out=args.out)


if __name__ == "__main__":
    main()
