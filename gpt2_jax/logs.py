"""What a run logs: a step's record (Meter) and where it goes (RunLogs).

WORKDIR/logs/RUN/: metrics.jsonl (one record a step, with its wall-clock time; in a store, numbered parts),
TensorBoard's events, the run's config and, at the end, curves.png. Process 0 writes them, and with log.wandb
sends each record to Weights & Biases too (wandb_sink.py).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import jax
from tqdm import tqdm

from gpt2_jax import report, storage, wandb_sink
from gpt2_jax.errors import StorageError, reason
from gpt2_jax.lock import LeaseLost
from gpt2_jax.start import Start
from gpt2_jax.targets import peak_bf16_flops


class RunLogs:
    """metrics.jsonl, TensorBoard, the run's config and, at the end, curves.png, and W&B with log.wandb; written by
    process 0 only (`enabled`)."""

    def __init__(self, log_dir: Any, enabled: bool, config: Any, begun: Start):
        self.log_dir, self.enabled, self.closed = log_dir, enabled, False
        self.wandb: wandb_sink.WandbSink | None = None
        if enabled:
            storage.mkdir(log_dir)
            (log_dir / report.RUN_CONFIG).write_text(config.to_json_best_effort(indent=2))
            self.jsonl = storage.AppendLog(log_dir / "metrics.jsonl")
            self.tb = storage.tensorboard_writer(log_dir)
            self.in_store, self.tb_flushed = storage.is_url(log_dir), -math.inf
            if config.log.wandb:
                self.wandb = wandb_sink.start(config.log, config.run_name, log_dir, wandb_config(config, begun))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """One step's record."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics, "time": round(time.time(), 3)}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(step, metrics)  # the record less its wall-clock time (W&B keeps its own)
        if self.in_store and time.monotonic() - self.tb_flushed >= self.jsonl.upload_every_s:
            self.tb.flush()  # in a store, TensorBoard's new records go as the metrics do: at once, then every 10 s
            self.tb_flushed = time.monotonic()

    def check(self) -> None:
        """Raise, as one line, a failure of the logs' background uploads to a store (every step)."""
        if self.enabled:
            storage.check_uploads(self.log_dir)

    def close(self, title: str, failing: BaseException | None = None) -> None:
        """Close the files and draw curves.png (loss, validation loss, learning rate) from metrics.jsonl.
        While the run is `failing` (already ending with its one line), a write that fails here is a warning;
        when the store holding the logs is what failed, or the run's lock was lost, nothing more is written."""
        if not self.enabled or self.closed:
            return
        self.closed = True  # once: the run closes its logs before its last agreement, or on its way out
        if self.wandb is not None:
            self.wandb.finish(failed=failing is not None)
        if isinstance(failing, (StorageError, LeaseLost, OSError, *storage.store_errors())) \
                and storage.is_url(self.log_dir):
            storage.abandon_uploads(self.log_dir)
            return
        errors = []
        for close in (self.jsonl.close, self.tb.close):  # each tried: a writer that failed writes no more
            try:
                close()
            except (StorageError, OSError, *storage.store_errors()) as e:
                errors.append(e)
        if errors:
            if not failing:
                raise errors[0]
            tqdm.write(f"warning: could not finish writing the logs in {self.log_dir}: {reason(errors[0])}")
            return
        try:
            report.plot_run(report.read_metrics(self.log_dir), self.log_dir / "curves.png", title)
        except Exception as e:  # noqa: BLE001 - a picture is not worth failing (or masking) the run's end for
            tqdm.write(f"warning: could not draw {self.log_dir / 'curves.png'}: {reason(e)}")


def wandb_config(config: Any, begun: Start) -> dict:
    """The W&B run's config: the resolved config's sections, and what the run derived from them (`run_settings`)."""
    model, settings = begun.model_config, begun.settings
    return {**json.loads(config.to_json_best_effort()),
            "run_settings": {"model": model.hparams(), "num_params": model.num_params(),
                             "tokens_per_step": settings.tokens_per_step, "seq_len": settings.seq_len,
                             "rows_per_step": settings.rows, "objective": config.train.objective,
                             "mesh": dict(begun.steps.mesh.shape), "processes": jax.process_count()}}


def peak_flops(config: Any) -> float | None:
    """The device's peak FLOP/s for MFU: train.peak_tflops, else a known accelerator's in bfloat16, else None."""
    if config.train.peak_tflops > 0:
        return config.train.peak_tflops * 1e12
    return peak_bf16_flops(jax.devices()[0].device_kind) if config.model.dtype == "bfloat16" else None


class Meter:
    """A step's record from its outputs: the loss and the original's running average of it, the learning
    rate, the gradient norm, the objective's metrics, and tokens/s and MFU since the step before."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float | None):
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak_flops
        self.average = (0.0, 0.0)  # decayed sum and weight
        self.last_time: float | None = None  # the first step's time is mostly compilation: not measured

    def read(self, out: dict) -> dict[str, float]:
        """The record of a step's outputs (reading them waits for the step)."""
        loss = float(out["loss"])
        now = time.perf_counter()
        self.average = (self.average[0] * 0.99 + loss, self.average[1] * 0.99 + 1)
        metrics = {"loss": loss, "avg_loss": self.average[0] / self.average[1],
                   **{k: float(v) for k, v in out.items() if k not in ("loss", "agreed")}}
        if self.last_time is not None:
            metrics["tokens_per_sec"] = self.tokens_per_step / (now - self.last_time)
            if self.peak:
                metrics["mfu"] = metrics["tokens_per_sec"] * self.flops_per_token / self.peak
        self.last_time = now
        return metrics

    def restart_clock(self) -> None:
        """After validating or sampling: the next step's time leaves them out."""
        self.last_time = time.perf_counter()
