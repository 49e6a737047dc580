"""Training throughput: this project's jitted step vs transformers' GPT2LMHeadModel + torch.optim.Adam.

    python bench/train.py [--size 124M | --shape LxCxN --vocab V] [--batch 4] [--seq_len 256] [--dtype float32]
                          [--optimizer adam|adamw] [--grad_clip G] [--smoke]

Same model shape, batch, sequence length, dtype and optimizer (Adam or AdamW, with or without clipping
to a global norm) in one process; after warm-up the
peers alternate (A/B) for --rounds rounds of --steps steps, and medians are reported with the ratio.
Our step runs twice, with the blocks unrolled and scanned (model.scan_layers), each with the time
its first step took to trace and compile.
MFU = tokens/s x (6·N + 12·L·T·C) / peak, N the parameter count, L layers, T the sequence length,
C the width; the peak comes from --peak_tflops, else --device (h100, h200, a100, ...: dense bf16, the table
in gpt2_jax/steps.py), else the device JAX runs on when computing in bfloat16.
On a GPU the torch peer runs under bf16 autocast with SDPA attention; --compile adds torch.compile.
--profile N traces N of our steps with jax.profiler and sums the device time of their ops by place in
the step (forward/backward/update x model part, named from the compiled HLO's JAX name stacks) and kind;
it turns XLA's GPU command buffers off for the whole run (the table's title says so), so that the
profiler sees each op.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

def _layouts(text: str) -> list[str]:
    """--layouts: a comma-separated subset of unrolled, scan."""
    layouts = [x for x in text.split(",") if x]
    if not layouts or set(layouts) - {"unrolled", "scan"}:
        raise argparse.ArgumentTypeError(f"{text!r}: use unrolled, scan or both")
    return layouts


def arguments() -> argparse.ArgumentParser:
    """The command line (also parsed by tests/test_bench.py against bench/gpu.sh)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_flags(parser)
    parser.add_argument("--batch", type=int, default=None, help="default 4 on CPU, 16 on GPU")
    parser.add_argument("--seq_len", type=int, default=None, help="default 256 on CPU, 1024 on GPU")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round and peer")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (GPU)")
    parser.add_argument("--loss_chunk", type=int, default=0, help="our step with the chunked loss (0 = off)")
    parser.add_argument("--vocab_multiple", type=int, default=0,
                        help="our logits matmul over the vocabulary padded to a multiple of this (0: auto, 1: none)")
    parser.add_argument("--layouts", type=_layouts, default="unrolled,scan", help="our block layouts: unrolled, scan")
    parser.add_argument("--device", default="", help="h100, h200 or a100, for MFU")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="device peak for MFU (overrides --device)")
    parser.add_argument("--logits_backward", choices=("custom", "autodiff"), default="custom",
                        help="the tied logits' backward: the model's custom VJP (compute dtype) or plain autodiff")
    parser.add_argument("--flat_optimizer", action="store_true",
                        help="Adam's moments as one flat vector (train.flat_optimizer), for fewer, larger fusions")
    parser.add_argument("--no_torch", action="store_true", help="skip the transformers peer (ratios vs our first row)")
    parser.add_argument("--jax_optimizers", default="",
                        help="our step with each of these optimizers (e.g. adamw,muon; default: --optimizer's)")
    parser.add_argument("--profile", type=int, default=0,
                        help="then trace this many of our steps (first layout) and tabulate where the time goes")
    common.add_record_flags(parser)
    return parser


def main() -> None:
    """Run the benchmark, print its table and record it."""
    args = arguments().parse_args()
    if args.profile:  # XLA's command buffers (CUDA graphs) would show the profiler one event for many ops
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_enable_command_buffer=".strip()

    import jax
    import numpy as np
    import torch

    from experiments import base
    from gpt2_jax import parallel, profiling
    from gpt2_jax.model import GPT2Config, attention_implementation, init_params, vocab_padding
    from gpt2_jax.steps import build_steps, flops_per_token
    from gpt2_jax.targets import peak_bf16_flops

    if args.logits_backward == "autodiff":  # measure what the custom VJP saves: the einsum differentiated by JAX
        import jax.numpy as jnp

        from gpt2_jax import model as model_module

        model_module._float32_logits = lambda h, w: jnp.einsum("...c,vc->...v", h, w,
                                                               preferred_element_type=jnp.float32)
    on_gpu = jax.default_backend() == "gpu"
    batch = args.batch or (16 if on_gpu else 4)
    seq_len = args.seq_len or (1024 if on_gpu else 256)
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    args.size, shape = common.model_shape(args)
    config = GPT2Config(n_vocab=args.vocab, n_ctx=seq_len if args.shape else 1024, **shape, dtype=dtype,
                        vocab_multiple=args.vocab_multiple)
    if args.smoke:
        config = GPT2Config(n_vocab=500, n_ctx=64, n_embd=64, n_head=4, n_layer=2, dtype=dtype,
                            vocab_multiple=args.vocab_multiple)
        batch, seq_len, args.rounds, args.steps, args.no_record = 2, 32, 1, 1, True
        args.profile = min(args.profile, 2)
    train = base.get_config().train
    train.learning_rate, train.loss_chunk, train.flat_optimizer = 1e-4, args.loss_chunk, args.flat_optimizer
    train.optimizer, train.grad_clip = args.optimizer, args.grad_clip

    # A: this project's step, exactly as the loop compiles it (one-device mesh), per block layout.
    mesh = parallel.make_mesh(1, 1)
    tokens = np.random.default_rng(0).integers(0, config.n_vocab, (batch, seq_len + 1), dtype=np.int32)
    key = jax.device_put(jax.random.key(0), parallel.replicated(mesh))
    compile_s: dict[str, float] = {}  # tracing + XLA compilation, then the first call
    first_step_s: dict[str, float] = {}
    hlo_text: dict[str, str] = {}  # the profiled layout's compiled step, to name the ops of its trace

    def jax_peer(layout: str, optimizer: str):
        cfg = dataclasses.replace(config, scan_layers=layout == "scan")
        t0 = time.perf_counter()
        own = train.copy_and_resolve_references()
        own.optimizer = optimizer
        steps = build_steps(cfg, own, mesh)
        compiled = steps.compile(batch, seq_len)
        compile_s[_name(layout, optimizer)] = time.perf_counter() - t0
        if args.profile and layout == args.layouts[0]:
            hlo_text[layout] = compiled.as_text()
        state = steps.init_state(init_params(cfg, jax.random.key(0)))
        jax_batch = parallel.global_batch(tokens, steps.batch_sharding)

        def step():
            nonlocal state
            state, metrics = compiled(state, jax_batch, key)
            metrics["loss"].block_until_ready()

        t0 = time.perf_counter()
        step()  # what remains after AOT compilation
        first_step_s[_name(layout, optimizer)] = time.perf_counter() - t0
        return step

    if not args.no_torch:  # B: transformers + torch Adam on the same shapes
        from transformers import GPT2Config as HFConfig, GPT2LMHeadModel

        device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
        hf_config = HFConfig(vocab_size=config.n_vocab, n_positions=config.n_ctx, n_embd=config.n_embd,
                             n_head=config.n_head, n_layer=config.n_layer, attn_implementation="sdpa")
        torch.manual_seed(0)
        model = GPT2LMHeadModel(hf_config).to(device).train()
        # torch's AdamW decays every parameter; ours skips biases, LayerNorms and embeddings: the work is alike
        opt = (torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam)(model.parameters(), lr=1e-4)
        inputs = torch.tensor(tokens[:, :-1].astype(np.int64), device=device)
        labels = torch.tensor(tokens[:, 1:].astype(np.int64), device=device)
        autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

        def torch_step_of(m):
            def step():
                with autocast:
                    logits = m(inputs).logits
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
                loss.backward()
                if args.grad_clip:
                    torch.nn.utils.clip_grad_norm_(m.parameters(), args.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if device == "cuda":
                    torch.cuda.synchronize()
            return step

    optimizers = [o for o in args.jax_optimizers.split(",") if o] or [args.optimizer]
    _name = (lambda layout, optimizer: f"{layout}, {optimizer}") if len(optimizers) > 1 else \
        (lambda layout, optimizer: layout)
    peers = {f"gpt2_jax ({_name(layout, o)})": jax_peer(layout, o) for layout in args.layouts for o in optimizers}
    if not args.no_torch:
        peers["transformers + torch"] = torch_step_of(model)
    for fn in peers.values():
        fn()  # warm-up
    if args.compile and not args.no_torch:  # optional: a machine where torch.compile fails still gets the rest
        try:
            compiled_torch = torch_step_of(torch.compile(model))
            compiled_torch()  # warm-up, and compilation
            peers["transformers + torch.compile"] = compiled_torch
        except Exception as e:  # noqa: BLE001 - inductor fails in many ways (no compiler, no triton, ...)
            print(f"torch.compile peer skipped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    times: dict[str, list[float]] = {name: [] for name in peers}
    for _ in range(args.rounds):  # alternate A/B so drift hits both
        for name, fn in peers.items():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    peak = args.peak_tflops * 1e12 or peak_bf16_flops(args.device or (jax.devices()[0].device_kind
                                                                       if dtype == "bfloat16" else ""))
    flops = flops_per_token(config, seq_len)
    ref = statistics.median(times["transformers + torch" if not args.no_torch else next(iter(times))])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        tps = batch * seq_len / med
        layout = name[len("gpt2_jax ("):-1] if name.startswith("gpt2_jax") else None
        compiled = f"{compile_s[layout]:.1f} + {first_step_s[layout]:.2f}" if layout else "n/a"
        rows.append((name, compiled, f"{med * 1e3:.1f}", f"{tps:,.0f}", f"{ref / med:.2f}",
                     f"{tps * flops / peak:.1%}" if peak else "n/a"))
    chunked = f", loss chunk {args.loss_chunk}" if args.loss_chunk else ""
    chunked += f", {attention_implementation(config.attention, dtype, jax.default_backend())} attention"
    multiple = vocab_padding(args.vocab_multiple, jax.default_backend())
    chunked += f", vocabulary padded to a multiple of {multiple}" if multiple > 1 else ", vocabulary not padded"
    chunked += ", logits backward by autodiff (no custom VJP)" if args.logits_backward == "autodiff" else ""
    chunked += ", Adam over one flat vector (train.flat_optimizer)" if args.flat_optimizer else ""
    chunked += ", JAX compilation cache on (compile s may be a load)" if jax.config.jax_compilation_cache_dir else ""
    chunked += f", XLA_FLAGS={os.environ['XLA_FLAGS']}" if os.environ.get("XLA_FLAGS") else ""
    vocab = f", vocabulary {config.n_vocab}" if config.n_vocab != 50257 else ""
    title = (f"Training step, {args.size if not args.smoke else 'smoke'} shape, batch {batch} x {seq_len}, {dtype}, "
             f"{common.optimizer_words(args) if len(optimizers) == 1 else 'optimizers ' + ' and '.join(optimizers)}"
             f"{vocab}{chunked} (torch threads {torch.get_num_threads()})")
    header = ["peer", "compile s + first call s", "median step ms", "tokens/s",
              "speed vs transformers" if not args.no_torch else "speed vs first row", "MFU"]
    common.report(common.table(title, header, rows), record=not args.no_record, out=args.out)
    if args.profile:
        name = next(iter(peers))
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir):
                t0 = time.perf_counter()
                for _ in range(args.profile):
                    peers[name]()
                wall_s = time.perf_counter() - t0
            trace = profiling.read_trace(profiling.newest_trace(trace_dir)[0])
            rows = profiling.time_breakdown(trace, args.profile, wall_s, hlo_text[args.layouts[0]])
        header = ["place in the step (top by time)", "category", "ms per step", "share"]
        common.report(common.table(f"Where the time goes: {name}, {title}", header, rows),
                      record=not args.no_record, out=args.out)


if __name__ == "__main__":
    main()
