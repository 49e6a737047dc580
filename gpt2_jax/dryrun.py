"""`launch.py --dry_run`: the resolved config, the parameter count and the compiled step's FLOPs and memory,
without training; with `--target`, compiled for an accelerator that is not attached, and whether it fits."""

from __future__ import annotations

from typing import Any

import jax

from gpt2_jax import parallel
from gpt2_jax.model import attention_implementation, vocab_padding
from gpt2_jax.resolve import model_config_of
from gpt2_jax.settings import check_config, settings_of
from gpt2_jax.steps import build_steps, compile_falling_back_to_xla_attention, compile_with_stats, flops_per_token


def dry_run(config: Any, target: Any = None) -> None:
    """Print the resolved config, the parameter count and the compiled step's FLOPs and memory; for a
    compile target (targets.Target), compiled for it, with the line saying whether it fits."""
    check_config(config)
    model_config = model_config_of(config)
    if target is None:
        parallel.init_distributed(config.parallel)
        mesh, backend = parallel.make_mesh(config.mesh.data, config.mesh.fsdp), jax.default_backend()
    else:
        from gpt2_jax import targets

        model_config = targets.for_target(model_config, target)
        mesh, backend = targets.make_mesh(target, config.mesh.data, config.mesh.fsdp), target.platform
    # The masked step compiles the same for any end-of-text id: settings_of's default, the vocabulary's last.
    settings = settings_of(config, model_config, mesh)
    seq_len, rows, objective = settings.seq_len, settings.rows, settings.objective
    train = config.train
    if config.model.remat == "auto":  # prints the candidates and the one line scripts read
        from gpt2_jax import autoremat

        model_config, train, _ = autoremat.resolve(config, model_config, mesh, settings, target=target)
    if config.model.attention == "auto":  # auto may give way to XLA's where cuDNN's does not partition
        model_config, stats, why = compile_falling_back_to_xla_attention(model_config, train, mesh, rows, seq_len,
                                                                          objective, settings.sections)
        if why:
            print(f"attention: cuDNN's fused attention does not partition on this mesh ({why}); compiled with "
                  "XLA's attention: train with --config.model.attention=xla", flush=True)
    else:
        _, stats = compile_with_stats(build_steps(model_config, train, mesh, objective, sections=settings.sections),
                                      rows, seq_len)
    shown = config.copy_and_resolve_references()
    if not config.model.from_scratch:  # the shape comes from model.name: the from-scratch fields do not apply
        with shown.unlocked():
            for field in ("n_ctx", "n_embd", "n_head", "n_layer"):
                del shown.model[field]
    print(shown)
    print(f"model: {model_config.hparams()} dtype={model_config.dtype} remat={model_config.remat} "
          f"scan_layers={model_config.scan_layers} "
          f"vocab_multiple={vocab_padding(model_config.vocab_multiple, backend)} "
          f"attention={attention_implementation(model_config.attention, model_config.dtype, backend)}")
    print(f"parameters: {model_config.num_params():,}")
    print(f"mesh: data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} over {mesh.devices.size} "
          f"{mesh.devices.flat[0].device_kind} device(s)" + (" (compile-only)" if target is not None else ""))
    if stats["flops"] is not None:
        flops = f"{stats['flops'] / 1e9:,.1f} GFLOP per device"
    else:  # XLA's GPU compiler reports no FLOPs without a device: the formula's, remat's recompute not counted
        sequences = rows * objective.sequences_per_row
        flops = f"{flops_per_token(model_config, seq_len) * sequences * seq_len / mesh.devices.size / 1e9:,.1f} " \
                "GFLOP per device (6N + attention formula; the compiler reports none)"
    print(f"compiled step ({objective.describe(rows, seq_len)}): {flops}, "
          f"peak memory {stats['peak_bytes'] / 2**30:.3f} GiB per device "
          f"(arguments {stats['argument_bytes'] / 2**30:.3f}, temporaries {stats['temp_bytes'] / 2**30:.3f})"
          + ("; the compiler refused it: out of memory" if stats.get("refused") else ""))
    if target is not None:
        print(targets.fit_line(target, mesh, stats["peak_bytes"], target.budget_bytes(config.model.memory_budget_gb)))
