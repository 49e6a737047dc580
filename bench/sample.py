"""Decoding throughput with the KV cache: gpt2_jax's compiled loop vs transformers' generate (greedy, cache on).

    python bench/sample.py [--size 124M] [--batches 1,8,64] [--new_tokens 64] [--smoke]

Same random weights (transformers' model saved and loaded here), the same prompt and length; greedy
tokens are checked identical at batch 1. Reports new tokens/s (batch x new tokens / time) and the
ratio, medians over --repeat runs after a warm-up (which includes our compile), and the rate at
which our loop reads the weights (decode steps/s x bytes of the weights in the compute dtype):
batch-1 decoding is bound by it, so compare it with the device's memory bandwidth.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def arguments() -> argparse.ArgumentParser:
    """The command line (also parsed by tests/test_bench.py against bench/gpu.sh)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="124M")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (both peers)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--unroll", type=int, default=1, help="tokens per iteration of our decode loop")
    parser.add_argument("--sampling", action="store_true",
                        help="also time our loop with top-k 40 and top-p 0.9 sampling, as a ratio to our greedy")
    parser.add_argument("--bandwidth", action="store_true",
                        help="measure the device's copy bandwidth (bytes read + written) and report the batch-1 "
                             "floor: weight bytes / bandwidth per token")
    common.add_record_flags(parser)
    return parser


def main() -> None:
    """Run the benchmark, print its table and record it."""
    args = arguments().parse_args()

    import jax
    import numpy as np
    import torch
    from transformers import GPT2Config as HFConfig, GPT2LMHeadModel

    from gpt2_jax.model import GPT2Config, preset
    from gpt2_jax.sampling import generate
    from gpt2_jax.weights import load_weights

    shape = preset(args.size).hparams()
    if args.smoke:
        shape = GPT2Config(n_vocab=512, n_ctx=128, n_embd=64, n_head=4, n_layer=2).hparams()
        args.batches, args.new_tokens, args.repeat, args.no_record = "1,2", 8, 1, True
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(HFConfig(vocab_size=shape["n_vocab"], n_positions=shape["n_ctx"], n_embd=shape["n_embd"],
                                  n_head=shape["n_head"], n_layer=shape["n_layer"])).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        config, params = load_weights(tmp, dtype=args.dtype)
    params = jax.device_put(params)  # once, as the sampling CLI does: no weight upload inside the timed calls
    hf = hf.to(device, dtype=torch.bfloat16 if args.dtype == "bfloat16" else torch.float32)
    weight_bytes = config.num_params() * np.dtype(np.float32 if args.dtype == "float32" else np.float16).itemsize
    prompt = np.random.default_rng(0).integers(0, shape["n_vocab"], args.prompt_len).tolist()

    def ours(b):
        out = generate(config, params, prompt, length=args.new_tokens, batch_size=b, top_k=1, eot=-1,
                       unroll=args.unroll)
        return out.tokens

    def theirs(b):
        ids = torch.tensor([prompt] * b, device=device)
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                              use_cache=True, pad_token_id=0, eos_token_id=None)
        if device == "cuda":
            torch.cuda.synchronize()
        return out[:, len(prompt):].cpu().numpy()

    bandwidth = None
    if args.bandwidth:  # a large device-to-device copy, counting bytes read plus bytes written
        x = jax.device_put(np.random.default_rng(0).random((1 << 28) if not args.smoke else (1 << 20),
                                                            dtype=np.float32))
        copy = jax.jit(lambda a: a * 1.0001)
        copy(x).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(10):
            y = copy(x)
        y.block_until_ready()
        bandwidth = 2 * x.nbytes * 10 / (time.perf_counter() - t0)
        print(f"copy bandwidth {bandwidth / 1e9:,.0f} GB/s (read + write)", flush=True)

    def sampled(b, **kw):
        return generate(config, params, prompt, length=args.new_tokens, batch_size=b, eot=-1, unroll=args.unroll,
                        rng=jax.random.key(0), **kw).tokens

    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        t0 = time.perf_counter()
        same = np.array_equal(ours(b)[:1], theirs(b)[:1])  # warm-up both; our first call compiles
        print(f"batch {b}: warm-up (our compile, their first call) {time.perf_counter() - t0:.1f} s", flush=True)
        if b == 1 and args.dtype == "float32":
            assert same, "greedy tokens differ from transformers"
        t = {}
        for name, fn in (("gpt2_jax", ours), ("transformers", theirs)):
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                fn(b)
                times.append(time.perf_counter() - t0)
            t[name] = statistics.median(times)
        rate = lambda s: b * args.new_tokens / s  # noqa: E731
        weight_gbs = args.new_tokens / t["gpt2_jax"] * weight_bytes / 1e9
        extra = []
        if bandwidth:
            extra.append(f"{weight_gbs * 1e9 / bandwidth:.0%}")
        if args.sampling:
            for kw in ({"top_k": 40}, {"top_p": 0.9}):
                sampled(b, **kw)  # compile
                extra.append(f"{t['gpt2_jax'] / common.median_seconds(lambda: sampled(b, **kw), args.repeat, 0):.2f}")
        rows.append((b, f"{rate(t['gpt2_jax']):,.0f}", f"{rate(t['transformers']):,.0f}",
                     f"{t['transformers'] / t['gpt2_jax']:.2f}", f"{weight_gbs:,.1f}", "yes" if same else "no (bf16)",
                     *extra))
        print(" | ".join(str(x) for x in rows[-1]), flush=True)  # kept in the log if the run is cut
    title = (f"Greedy decoding, {args.size if not args.smoke else 'smoke'} shape, prompt {args.prompt_len}, "
             f"{args.new_tokens} new tokens, {args.dtype}" + (f", {args.unroll} tokens per loop iteration"
                                                             if args.unroll > 1 else ""))
    header = ["batch", "gpt2_jax tokens/s", "transformers tokens/s", "ratio", "gpt2_jax weight reads GB/s",
              "same tokens (row 0)"]
    if bandwidth:
        title += f", copy bandwidth {bandwidth / 1e9:,.0f} GB/s"
        header.append("share of the weight-read floor")
    if args.sampling:
        header += ["top-k 40 speed vs greedy", "top-p 0.9 speed vs greedy"]
    common.report(common.table(title, header, rows), record=not args.no_record, out=args.out)


if __name__ == "__main__":
    main()
