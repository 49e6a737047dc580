"""The training loop: everything with side effects (files, logs, progress, signals) lives here.

WORKDIR/checkpoint/RUN/  orbax steps + hparams.json, vocabulary, run_config.json (a model directory)
WORKDIR/samples/RUN/     samples-STEP text files
WORKDIR/logs/RUN/        metrics.jsonl and TensorBoard event files
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from gpt2_jax import checkpoints, parallel
from gpt2_jax.data import WindowSampler, load_dataset
from gpt2_jax.encoder import Encoder, byte_level_encoder, get_encoder
from gpt2_jax.errors import UserError
from gpt2_jax.model import PRESETS, GPT2Config, convert_layout, init_params, preset
from gpt2_jax.optim import learning_rate_schedule, make_optimizer
from gpt2_jax.sampling import SAMPLE_HEADER, generate
from gpt2_jax.train import TrainState, make_eval_step, make_train_step
from gpt2_jax.weights import load_weights, read_config

# Dense bf16 peak FLOP/s by device kind, for model FLOPs utilisation (MFU).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12,
                   "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v6 lite": 918e12}


def find_vocab_dir(config: Any) -> Path | None:
    """For training from scratch: the configured vocabulary, else a GPT-2 vocabulary found locally."""
    if config.model.vocab:
        return None if config.model.vocab == "bytes" else Path(config.model.vocab)
    candidates = sorted(Path(config.model.models_dir).glob("*/encoder.json"))
    shared = os.environ.get("GPT2_JAX_SHARED")
    candidates += [Path(shared) / "gpt2" / "encoder.json"] if shared else []
    candidates += [Path("../shared/gpt2/encoder.json")]
    return next((c.parent for c in candidates if c.is_file() and (c.parent / "vocab.bpe").is_file()), None)


def model_dir_of(config: Any) -> Path:
    """The pretrained model directory named by model.name: a path, or a size under model.models_dir."""
    name = config.model.name
    path = Path(name) if Path(name).is_dir() or name not in PRESETS else Path(config.model.models_dir) / name
    if not path.is_dir():
        hint = f"; run `gpt2-jax download {name} --models_dir {config.model.models_dir}`" if name in PRESETS else ""
        raise UserError(f"model.name={name!r}: no model directory at {path}{hint}")
    return path


def _compute_settings(config: Any) -> dict[str, Any]:
    """The GPT2Config fields that say how to compute, not what the model is."""
    m = config.model
    return dict(dtype=m.dtype, remat=m.remat, scan_layers=m.scan_layers, vocab_multiple=m.vocab_multiple,
                attention=m.attention)


def model_config_of(config: Any) -> GPT2Config:
    """The model's config as the experiment would train it, without loading any weights."""
    overrides = _compute_settings(config)
    if config.model.from_scratch:
        vocab_dir = find_vocab_dir(config)
        n_vocab = get_encoder(vocab_dir).n_vocab if vocab_dir else byte_level_encoder().n_vocab
        return GPT2Config(n_vocab=n_vocab, n_ctx=config.model.n_ctx, n_embd=config.model.n_embd,
                          n_head=config.model.n_head, n_layer=config.model.n_layer, **overrides)
    name = config.model.name
    if name in PRESETS and not (Path(config.model.models_dir) / name).is_dir() and not Path(name).is_dir():
        return preset(name, **overrides)  # the released shape, before it is downloaded
    return read_config(model_dir_of(config), **overrides)


def initial_model(config: Any, resume_dir: Path | None) -> tuple[GPT2Config, Any, Encoder]:
    """Model config, starting params (None when resuming: the checkpoint supplies them) and tokenizer."""
    overrides = _compute_settings(config)
    if resume_dir is not None:
        hparams = json.loads((resume_dir / "hparams.json").read_text())
        return GPT2Config(**hparams, **overrides), None, get_encoder(resume_dir)
    if config.model.from_scratch:
        vocab_dir = find_vocab_dir(config)
        encoder = get_encoder(vocab_dir) if vocab_dir else byte_level_encoder()
        model_config = GPT2Config(n_vocab=encoder.n_vocab, n_ctx=config.model.n_ctx, n_embd=config.model.n_embd,
                                  n_head=config.model.n_head, n_layer=config.model.n_layer, **overrides)
        return model_config, init_params(model_config, jax.random.key(config.seed)), encoder
    model_dir = model_dir_of(config)
    model_config, params = load_weights(model_dir, **overrides)
    return model_config, params, get_encoder(model_dir)


class _StopRequest:
    """SIGINT/SIGTERM set a flag the loop checks after each step; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
                   "(Ctrl-C again to abort without saving)")

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Logs:
    """metrics.jsonl and TensorBoard, written by process 0 only."""

    def __init__(self, log_dir: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter

            log_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(log_dir / "metrics.jsonl", "a", encoding="utf-8")
            self.tb = SummaryWriter(str(log_dir))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def _peak_flops(config: Any) -> float | None:
    if config.train.peak_tflops > 0:
        return config.train.peak_tflops * 1e12
    if config.model.dtype != "bfloat16":
        return None
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in kind), None)


def flops_per_token(model_config: GPT2Config, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus 12·L·T·C for attention (PaLM's formula)."""
    return 6 * model_config.num_params() + 12 * model_config.n_layer * seq_len * model_config.n_embd


def _write_run_files(run_dir: Path, model_config: GPT2Config, encoder: Encoder, config: Any) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "hparams.json").write_text(json.dumps(model_config.hparams(), indent=2))
    encoder.save(run_dir)
    (run_dir / checkpoints.RUN_CONFIG).write_text(config.to_json_best_effort(indent=2))


def run(config: Any, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train as the config says; returns the last step's metrics. `on_step(step, metrics)` is for tests."""
    parallel.init_distributed(config.parallel)  # before anything touches a device
    is_main = jax.process_index() == 0
    workdir = Path(config.workdir)
    run_dir = (workdir / "checkpoint" / config.run_name).absolute()
    restore_from = config.checkpoint.restore_from
    existing = checkpoints.make_manager(run_dir, read_only=True).latest_step() if run_dir.is_dir() else None
    if restore_from == "fresh" and existing is not None:
        raise UserError(f"checkpoint.restore_from=fresh but {run_dir} already holds checkpoints up to step "
                        f"{existing}; pick another run_name, or restore_from=latest to resume (nothing was deleted)")
    resume: tuple[Path, int] | None = None
    if restore_from == "latest" and existing is not None:
        resume = (run_dir, existing)
    elif restore_from not in ("latest", "fresh"):
        resume = checkpoints.resolve_checkpoint(Path(restore_from))
        if existing is not None and resume[0] != run_dir:
            raise UserError(f"{run_dir} already holds checkpoints; restore {restore_from} under a new run_name")

    # A resumed run keeps the seed it started with: batches and noise continue exactly.
    seed = checkpoints.read_meta(*resume)["seed"] if resume else config.seed
    model_config, params, encoder = initial_model(config, resume[0] if resume else None)
    seq_len = config.data.seq_len or model_config.n_ctx
    if not 1 <= seq_len <= model_config.n_ctx:
        raise UserError(f"data.seq_len={seq_len}: must be between 1 and the model's n_ctx={model_config.n_ctx}")
    train = config.train
    schedule = learning_rate_schedule(train)  # validates the schedule settings early
    if train.batch_size < 1 or train.accumulate_gradients < 1:
        raise UserError("train.batch_size and train.accumulate_gradients must be >= 1")
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    parallel.check_batch(train.batch_size, mesh)
    if config.data.val_every > 0:
        parallel.check_batch(config.data.val_batch_size, mesh)
    if not 0.0 <= train.noise < 1.0:
        raise UserError(f"train.noise={train.noise}: must be in [0, 1)")

    # Data first: every bad-input error comes before anything compiles.
    if not config.data.dataset:
        raise UserError("data.dataset is empty: set --config.data.dataset=PATH (a file, directory, glob or .npz)")
    data_kw = dict(combine=config.data.combine, encoding=config.data.encoding,
                   encoding_errors=config.data.encoding_errors, progress=is_main)
    chunks = load_dataset(config.data.dataset, encoder, **data_kw)
    sampler = WindowSampler(chunks, seq_len + 1, seed, f"dataset {config.data.dataset!r}")
    val_batches = []
    if config.data.val_every > 0:
        if config.data.val_dataset:
            val_chunks, val_name = load_dataset(config.data.val_dataset, encoder, **data_kw), config.data.val_dataset
        else:
            val_chunks, val_name = chunks, config.data.dataset
            tqdm.write("validation: no data.val_dataset given, validating on batches drawn from the training data")
        val_sampler = WindowSampler(val_chunks, seq_len + 1, seed=1, what=f"validation dataset {val_name!r}")
        val_batches = [val_sampler.batch(i, config.data.val_batch_size) for i in range(config.data.val_batch_count)]

    abstract_params = jax.eval_shape(lambda: init_params(model_config, jax.random.key(0)))
    optimizer = make_optimizer(train, abstract_params)
    # Shardings: params and optimizer state replicated (data) or sharded (fsdp); batches split by rows.
    abstract_state = jax.eval_shape(lambda: TrainState.create(init_params(model_config, jax.random.key(0)), optimizer))
    step_fn = make_train_step(model_config, optimizer, schedule, accumulate=train.accumulate_gradients,
                              noise=train.noise, loss_chunk=train.loss_chunk)
    train_step, state_sh, batch_sh = parallel.shard_train_step(step_fn, mesh, abstract_state)
    repl = parallel.replicated(mesh)
    if resume is None:
        params = parallel.put_tree(params, state_sh.params)
        state = jax.jit(lambda p: TrainState.create(p, optimizer), out_shardings=state_sh)(params)
        del params
    else:
        p, o, meta = _restore(resume, model_config, train, mesh, state_sh, read_only=resume[0] != run_dir)
        state = TrainState(step=parallel.put_tree(np.int32(meta["step"]), repl), params=p, opt_state=o)
        tqdm.write(f"restored step {meta['step']} from {resume[0]}")
    if is_main:
        _write_run_files(run_dir, model_config, encoder, config)
    manager = checkpoints.make_manager(run_dir, keep=config.checkpoint.keep,
                                       keep_every_hours=config.checkpoint.keep_every_hours,
                                       async_save=config.checkpoint.async_save)

    eval_step = jax.jit(parallel.with_mesh_rules(make_eval_step(model_config), mesh),
                        in_shardings=(state_sh.params, batch_sh), out_shardings=repl)
    step_key = jax.jit(lambda s: jax.random.fold_in(jax.random.key(seed), s), out_shardings=repl)
    val_batches = [parallel.global_batch(b, batch_sh) for b in val_batches]
    tokens_per_step = train.batch_size * train.accumulate_gradients * seq_len
    peak = _peak_flops(config)
    logs = _Logs(workdir / "logs" / config.run_name, is_main)

    step = int(state.step)
    last_saved = step if resume else None

    def save_now():
        nonlocal last_saved
        if last_saved != step:
            checkpoints.save(manager, step, state.params, state.opt_state,
                             {"step": step, "seed": seed, "batches_drawn": step})
            last_saved = step

    def validate() -> float:
        loss = float(np.mean([float(eval_step(state.params, b)) for b in val_batches]))
        tqdm.write(f"[{step} | validation] val_loss={loss:.4f}")
        return loss

    if val_batches:  # the starting point, so the log shows how far validation loss falls
        logs.write(step, {"val_loss": validate()})
    total = train.total_steps
    bar = tqdm(total=total or None, initial=step, desc=config.run_name, unit="step", disable=not is_main,
               dynamic_ncols=True)
    avg_loss = (0.0, 0.0)  # the original's running average: decayed sum and weight
    metrics: dict[str, float] = {}
    last_time = None
    rows = train.batch_size * train.accumulate_gradients
    next_batch = parallel.global_batch(sampler.batch(step, rows), batch_sh)
    try:
        with _StopRequest() as stop:
            while not (total and step >= total) and not stop.requested:
                state, out = train_step(state, next_batch, step_key(step))  # dispatched, runs asynchronously
                next_batch = parallel.global_batch(sampler.batch(step + 1, rows), batch_sh)  # meanwhile, on the host
                loss = float(out["loss"])  # waits for the step
                step += 1
                now = time.perf_counter()
                if not math.isfinite(loss):
                    raise UserError(f"the loss became {loss} at step {step}; stopped without saving it. The last good "
                                    f"checkpoint (step {manager.latest_step()}) is kept in {run_dir}; lower "
                                    "train.learning_rate or set train.grad_clip")
                avg_loss = (avg_loss[0] * 0.99 + loss, avg_loss[1] * 0.99 + 1)
                metrics = {"loss": loss, "avg_loss": avg_loss[0] / avg_loss[1],
                           "learning_rate": float(out["learning_rate"]), "grad_norm": float(out["grad_norm"])}
                if last_time is not None:  # the first step's time is mostly compilation
                    metrics["tokens_per_sec"] = tokens_per_step / (now - last_time)
                    if peak:
                        metrics["mfu"] = metrics["tokens_per_sec"] * flops_per_token(model_config, seq_len) / peak
                last_time = now
                if val_batches and step % config.data.val_every == 0:
                    metrics["val_loss"] = validate()
                    last_time = time.perf_counter()
                logs.write(step, metrics)
                bar.update(1)
                bar.set_postfix_str(_postfix(metrics))
                if config.sample.sample_every and step % config.sample.sample_every == 0:
                    _sample(config, model_config, state.params, encoder, workdir, step, is_main)
                    last_time = time.perf_counter()
                if config.checkpoint.save_every and step % config.checkpoint.save_every == 0:
                    save_now()
                if on_step is not None:
                    on_step(step, metrics)
            if stop.requested:
                tqdm.write(f"stopped at step {step}: saving a checkpoint to {run_dir}")
            save_now()
            manager.wait_until_finished()
    finally:
        bar.close()
        logs.close()
        manager.wait_until_finished()
        manager.close()
    return {"step": step, "run_dir": str(run_dir), **metrics}


def _restore(resume: tuple[Path, int], model_config: GPT2Config, train: Any, mesh: Any, state_sh: Any,
             read_only: bool) -> tuple[Any, Any, dict]:
    """Params, optimizer state and metadata of a checkpoint, in this run's layout and shardings.

    A checkpoint written with the other model.scan_layers setting is read as it was saved, then its
    blocks are stacked or unrolled on the devices.
    """
    run_dir, step = resume
    manager = checkpoints.make_manager(run_dir, read_only=read_only)
    saved = dataclasses.replace(model_config, scan_layers=checkpoints.saved_scan_layers(run_dir))
    params = jax.eval_shape(lambda: init_params(saved, jax.random.key(0)))
    opt_state = jax.eval_shape(make_optimizer(train, params).init, params)
    target = lambda tree: jax.tree.map(  # noqa: E731
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree, parallel.state_shardings(mesh, tree))
    p, o, meta = checkpoints.restore(manager, step, target(params), target(opt_state))
    if saved.scan_layers != model_config.scan_layers:
        p, o = jax.jit(lambda t: convert_layout(t, model_config.scan_layers),
                       out_shardings=(state_sh.params, state_sh.opt_state))((p, o))
    return p, o, meta


def _postfix(metrics: dict[str, float]) -> str:
    parts = [f"loss={metrics['loss']:.3f}", f"avg={metrics['avg_loss']:.3f}"]
    if "tokens_per_sec" in metrics:
        parts.append(f"tok/s={metrics['tokens_per_sec']:.0f}")
    parts.append(f"mfu={metrics['mfu']:.1%}" if "mfu" in metrics else "mfu=n/a")
    return " ".join(parts)


def _sample(config: Any, model_config: GPT2Config, params: Any, encoder: Encoder, workdir: Path, step: int,
            is_main: bool) -> None:
    """Unconditional samples from <|endoftext|>, printed and written to samples/RUN/samples-STEP."""
    s = config.sample
    length = min(s.sample_length, model_config.n_ctx - 1)
    out = generate(model_config, params, [encoder.eot_token], length=length, batch_size=s.sample_num,
                   rng=jax.random.fold_in(jax.random.key(config.seed + 1), step), temperature=s.temperature,
                   top_k=s.top_k, top_p=s.top_p, eot=encoder.eot_token)
    if not is_main:
        return
    texts = [SAMPLE_HEADER.format(i + 1) + "\n" + encoder.decode(row[:n]) for i, (row, n) in
             enumerate(zip(out.tokens, out.lengths))]
    tqdm.write("\n".join(texts))
    directory = workdir / "samples" / config.run_name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"samples-{step}").write_text("\n".join(texts) + "\n", encoding="utf-8")
