"""lm-eval requests through gpt2-jax against lm-eval's own transformers backend (`hf`), in one process.

    python bench/harness.py [--requests 64] [--rolling_texts 4] [--rolling_tokens 4096] [--batch_size 16] [--smoke]

A GPT-2 124M with random weights (no download; the speed does not depend on the values) in transformers'
layout with the real vocabulary (from $GPT2_JAX_SHARED or ../shared), then: loglikelihood requests (a
context of 100-400 tokens of tinyshakespeare and a one-word continuation, as LAMBADA's) per second,
and rolling log-likelihood (wikitext's request type) tokens per second. Each backend runs the requests
once to warm up (our compiles, torch's allocator), then the timed time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def arguments() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rolling_texts", type=int, default=4)
    parser.add_argument("--rolling_tokens", type=int, default=4096, help="tokens per rolling text (about)")
    parser.add_argument("--batch_size", type=int, default=16)
    common.add_record_flags(parser, "a tiny model and a few requests, to check the script runs")
    return parser


def main() -> None:
    """Build the model, time both backends on both request types, print and record the table."""
    args = arguments().parse_args()
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2_jax.api import load
    from gpt2_jax.harness import GPT2JaxLM

    torch.set_num_threads(os.cpu_count() or 1)
    shared = Path(os.environ.get("GPT2_JAX_SHARED", common.REPO.parent / "shared"))
    text = (shared / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    size = dict(n_embd=64, n_layer=2, n_head=4, n_positions=256) if args.smoke else {}
    if args.smoke:
        args.requests, args.rolling_texts, args.rolling_tokens, args.batch_size, args.no_record = 8, 1, 600, 4, True
    directory = Path(tempfile.mkdtemp())
    try:
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(**size)).save_pretrained(directory)
        shutil.copyfile(shared / "gpt2" / "encoder.json", directory / "vocab.json")
        shutil.copyfile(shared / "gpt2" / "vocab.bpe", directory / "merges.txt")
        words = text.split()
        starts = range(0, len(words) - 400, max(1, (len(words) - 400) // args.requests))
        pairs = [(" ".join(words[s:s + 60 + (s * 7) % 200]), " " + words[s + 60 + (s * 7) % 200])
                 for s in starts][:args.requests]
        loglikelihood = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
        chars = args.rolling_tokens * 4  # ~4 characters a token in this text
        rolling = [Instance("loglikelihood_rolling", {}, (text[i * chars:(i + 1) * chars],), i)
                   for i in range(args.rolling_texts)]
        backends = {"gpt2-jax": GPT2JaxLM(load(directory), batch_size=args.batch_size),
                    "lm-eval hf (torch, CPU)": HFLM(pretrained=str(directory), batch_size=args.batch_size,
                                                    device="cpu")}
        n_tokens = sum(len(backends["gpt2-jax"].tok_encode(r.args[0])) for r in rolling)
        rows, rates = [], {}
        for name, lm in backends.items():
            for kind, requests, unit in (("loglikelihood", loglikelihood, len(loglikelihood)),
                                         ("loglikelihood_rolling", rolling, n_tokens)):
                run = getattr(lm, kind)
                run(requests, disable_tqdm=True)  # warm-up
                t0 = time.perf_counter()
                run(requests, disable_tqdm=True)
                rate = unit / (time.perf_counter() - t0)
                rates[(name, kind)] = rate
                print(name, kind, f"{rate:.1f}", flush=True)
        for kind, what in (("loglikelihood", "requests/s"), ("loglikelihood_rolling", "tokens/s")):
            ours, theirs = rates[("gpt2-jax", kind)], rates[("lm-eval hf (torch, CPU)", kind)]
            rows.append((kind, what, f"{ours:.1f}", f"{theirs:.1f}", f"{ours / theirs:.2f}x"))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    shape = "tiny" if args.smoke else "124M"
    text_out = common.table(
        f"lm-eval requests, GPT-2 {shape} (random weights), batch {args.batch_size}: gpt2-jax's harness model vs "
        f"lm-eval's hf backend in one process ({args.requests} LAMBADA-like requests; {args.rolling_texts} rolling "
        f"texts, {n_tokens} tokens)",
        ["request type", "unit", "gpt2-jax", "lm-eval hf", "gpt2-jax / hf"], rows)
    common.report(text_out, not args.no_record, args.out)


if __name__ == "__main__":
    main()
