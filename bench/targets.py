"""Compiled memory per device of the training step for accelerators that are not attached.

    python bench/targets.py [--sizes 124M,355M,774M,1558M] [--targets h100,h100x8:fsdp,v5e-8,v5e-8:fsdp,v5p-8,v4-8]
                            [--batch 8] [--seq_len 1024] [--ablation_size 355M] [--ablation_targets h100,v5e-8]
                            [--h200_check] [--smoke]

Each (size, target) is compiled as `launch.py --dry_run --target=...` compiles it (the same builder,
the target's defaults), with Adam, bfloat16 compute and float32 weights, scanned blocks, the global
batch --batch, and the remat of experiments/finetune.py's variant (none at 124M, full above). A target
written NAME:fsdp shards over all its devices (mesh.fsdp = its device count), otherwise the mesh is
data parallel. Nothing runs: TPU figures are libtpu's compiled layout, GPU figures XLA's without
autotuning (an estimate). --h200_check compiles the step measured on a real H200 (BENCHMARKS.md:
1558M, batch 1, remat full, loss chunk 1024) for the h200 target.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GiB = 2**30


def arguments() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="124M,355M,774M,1558M")
    parser.add_argument("--targets", default="h100,h100x8:fsdp,v5e-8,v5e-8:fsdp,v5p-8,v4-8")
    parser.add_argument("--batch", type=int, default=8, help="global batch (windows per step, across devices)")
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--ablation_size", default="355M", help="the remat ablation's model ('' = none)")
    parser.add_argument("--ablation_targets", default="h100,v5e-8")
    parser.add_argument("--ablation_batches", default="8,16",
                        help="the ablation's global micro-batches (each a multiple of every target's device count)")
    parser.add_argument("--ablation_policies", default="", help="comma-separated remat policies ('' = every one)")
    parser.add_argument("--h200_check", action="store_true", help="the 1558M step measured on a real H200")
    common.add_record_flags(parser, "tiny shapes on one TPU and one GPU target, to check the script runs")
    return parser


def main() -> None:
    """Compile every row, print the tables and record them."""
    args = arguments().parse_args()
    from gpt2_jax import targets

    targets.prepare_host()

    from experiments import base, finetune
    from gpt2_jax.model import REMAT_POLICIES, GPT2Config, preset
    from gpt2_jax.steps import compile_falling_back_to_xla_attention

    if args.smoke:
        args.sizes, args.targets, args.batch, args.seq_len = "124M,355M", "v5e-4:fsdp,h100x2:fsdp", 4, 64
        args.ablation_size, args.ablation_targets, args.ablation_batches = "124M", "v5e-4", "4"
        args.ablation_policies, args.no_record = "full", True

    def model_of(size: str, remat: str) -> GPT2Config:
        if args.smoke:
            width = 64 * (1 + ["124M", "355M"].index(size))
            # an odd vocabulary, as GPT-2's 50257: FSDP shards wte along its width (docs/targets.md on cuDNN and FSDP)
            return GPT2Config(n_vocab=509, n_ctx=args.seq_len, n_embd=width, n_head=4, n_layer=2, dtype="bfloat16",
                              remat=remat, scan_layers=True)
        return preset(size, dtype="bfloat16", remat=remat, scan_layers=True)

    def compile_for(spec: str, model: GPT2Config, train, batch: int, seq_len: int) -> tuple:
        name, _, layout = spec.partition(":")
        target = targets.parse_target(name)
        fsdp = target.num_devices if layout == "fsdp" else 1
        mesh = targets.make_mesh(target, -1, fsdp)
        t0 = time.perf_counter()
        _, stats, why = compile_falling_back_to_xla_attention(targets.for_target(model, target), train, mesh, batch,
                                                              seq_len)
        if why:
            print(f"{spec}: cuDNN attention did not partition ({why}); XLA's instead")
            stats["note"] = "xla attention (cuDNN's did not partition)"
        return target, mesh, stats, time.perf_counter() - t0

    train = base.get_config().train
    rows = []
    for size in filter(None, args.sizes.split(",")):
        remat = finetune.get_config(size).model.remat
        for spec in args.targets.split(","):
            target, mesh, stats, seconds = compile_for(spec, model_of(size, remat), train, args.batch, args.seq_len)
            peak, budget = stats["peak_bytes"], target.budget_bytes()
            verdict = "yes" if peak <= budget else ("no (refused)" if stats.get("refused") else "no")
            verdict += f"; {stats['note']}" if "note" in stats else ""
            rows.append((size, remat, spec, f"data={mesh.shape['data']} fsdp={mesh.shape['fsdp']}",
                         f"{stats['argument_bytes'] / GiB:.3f}", f"{stats['temp_bytes'] / GiB:.3f}", f"{peak / GiB:.3f}",
                         f"{target.memory_bytes / GiB:.1f}", verdict, f"{seconds:.0f}"))
            print(" | ".join(rows[-1]), flush=True)
    text = "" if not rows else common.table(
        f"Compiled for targets that are not attached: training step, Adam, bf16 compute (float32 weights and "
        f"state), scanned blocks, global batch {args.batch} x {args.seq_len} tokens (compiled on this machine's CPU)",
        ["size", "remat", "target", "mesh", "arguments GiB", "temporaries GiB", "peak GiB per device",
         "memory GiB", "fits (90%)", "compile s"], rows)

    if args.ablation_size:
        ab_rows = []
        for spec in args.ablation_targets.split(","):
            for policy in (args.ablation_policies.split(",") if args.ablation_policies else REMAT_POLICIES):
                for batch in map(int, args.ablation_batches.split(",")):
                    _, _, stats, _ = compile_for(spec, model_of(args.ablation_size, policy), train, batch, args.seq_len)
                    flops = "n/a" if stats["flops"] is None else f"{stats['flops'] / 1e9:,.1f}"
                    refused = (" (refused)" if stats.get("refused") else "") + (
                        f" ({stats['note']})" if "note" in stats else "")
                    ab_rows.append((spec, policy, batch, f"{stats['temp_bytes'] / GiB:.3f}",
                                    f"{stats['peak_bytes'] / GiB:.3f}{refused}", flops))
                    print(" | ".join(map(str, ab_rows[-1])), flush=True)
        text += ("\n" if text else "") + common.table(
            f"Remat ablation compiled for targets, {args.ablation_size}, Adam, bf16, scanned blocks, T={args.seq_len}, "
            "data parallel",
            ["target", "policy", "global micro-batch", "temporaries GiB", "peak GiB per device", "GFLOP per device"],
            ab_rows)

    if args.h200_check:
        check = base.get_config().train
        check.loss_chunk = 1024
        target, mesh, stats, seconds = compile_for("h200", preset("1558M", dtype="bfloat16", remat="full",
                                                                  scan_layers=True), check, 1, 1024)
        text += "\n" + common.table(
            "1558M + Adam for one H200: compiled deviceless here vs compiled on the real H200 (2026-11-27)",
            ["where", "arguments GiB", "temporaries GiB", "peak GiB per device"],
            [("deviceless, target h200 (this run)", f"{stats['argument_bytes'] / GiB:.3f}",
              f"{stats['temp_bytes'] / GiB:.3f}", f"{stats['peak_bytes'] / GiB:.3f}"),
             ("on the H200 (jax 0.11.2, BENCHMARKS.md)", "17.408", "5.994", "23.402")])
    common.report(text, not args.no_record, args.out)


if __name__ == "__main__":
    main()
