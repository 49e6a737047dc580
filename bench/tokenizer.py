"""Tokenizer throughput: gpt2_jax's encode vs tiktoken's "gpt2" encoding, ids checked identical.

    python bench/tokenizer.py [--corpus FILE] [--repeat N] [--smoke]

Prints a markdown table (MB/s, ratio) and appends it to BENCHMARKS.md unless --no_record.
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--no_record", action="store_true", help="do not append to BENCHMARKS.md")
    parser.add_argument("--out", type=Path, default=None, help="also append the table to this file")
    return parser


def main() -> None:
    """Run the benchmark, print its table and record it."""
    args = arguments().parse_args()
    shared = shared_path()
    corpus = args.corpus or shared / "data" / "tinyshakespeare.txt"
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
