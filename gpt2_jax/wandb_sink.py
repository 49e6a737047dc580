"""Weights & Biases as one more sink of a run's logs (log.wandb; logs.RunLogs drives it on process 0).

The W&B run's id is a function of the run (its name and the absolute path or URL of its logs), so a resumed run
continues the same W&B run. Each step's record is handed to wandb's own background process, which uploads it (under
WANDB_MODE=offline it keeps it in a .wandb file for `wandb sync`). W&B unreachable or wandb broken: one warning,
and the run goes on without it; metrics.jsonl and TensorBoard have everything.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
from typing import Any

from tqdm import tqdm

from gpt2_jax import storage
from gpt2_jax.errors import UserError, reason

INIT_TIMEOUT_S = 30.0  # wandb.init giving up (W&B unreachable) after about this long: the run goes on without it
FINISH_TIMEOUT_S = 60.0  # at the run's end, what is not uploaded by then stays on disk for `wandb sync`


def check(log: Any) -> None:
    """log.wandb=True without wandb installed, or with a wandb older than the extra's (0.28.2, the first whose
    init_timeout holds when W&B is unreachable): one line, at config-check time."""
    if not log.wandb:
        return
    try:
        version = importlib.metadata.version("wandb")
    except importlib.metadata.PackageNotFoundError:
        raise UserError("log.wandb=True: Weights & Biases is not installed; pip install 'gpt2-jax[wandb]'") from None
    if tuple(int(n) for n in re.findall(r"\d+", version)[:3]) < (0, 28, 2):
        raise UserError(f"log.wandb=True: wandb {version} is older than 0.28.2 (its wandb.init waits on an unreachable "
                        "W&B past its timeout); pip install 'gpt2-jax[wandb]'")


def run_id(run_name: str, log_dir: str) -> str:
    """The W&B id of a run: its name in the characters W&B allows in an id, and a hash of its logs' absolute path
    or URL (runs of one name in two workdirs are two W&B runs); at most 61 characters."""
    name, digest = re.sub(r"[^A-Za-z0-9_-]+", "-", run_name)[:48].strip("-"), hashlib.sha256(log_dir.encode())
    return f"{name}-{digest.hexdigest()[:12]}" if name else digest.hexdigest()[:12]


class WandbSink:
    """One W&B run fed a run's records. A failure of wandb's is one warning, after which the sink logs nothing more
    (and only tries to finish the W&B run at the end)."""

    def __init__(self, run: Any):
        self.run, self.logging = run, True
        # A resumed W&B run's next step. The steps before it W&B holds already: those a run resumed after a crash
        # repeats are not sent again (W&B would drop each with a warning line); metrics.jsonl has them.
        self.starting_step = run.starting_step

    def log(self, step: int, record: dict[str, float]) -> None:
        """A record at `step` (two records of one step, as the end's validation after its last step, are merged)."""
        if not self.logging or step < self.starting_step:
            return
        try:
            self.run.log(dict(record), step=step)  # a copy: the loop adds to its dict after this
        except Exception as e:  # noqa: BLE001 - wandb broken mid-run: the run goes on without it
            self.logging = False
            _warn(f"W&B stopped logging at step {step}", e)

    def finish(self, failed: bool) -> None:
        """End the W&B run (marked failed when the run is); what is not uploaded in FINISH_TIMEOUT_S stays on disk."""
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish(exit_code=1 if failed else 0)
        except Exception as e:  # noqa: BLE001 - the run's own end is not W&B's to spoil
            if self.logging:  # else wandb's failure was already told
                _warn("could not finish the W&B run", e)
        self.logging = False


def start(log: Any, run_name: str, log_dir: Any, config: dict) -> WandbSink | None:
    """The run's W&B run, resumed if it exists, with `config` as its config; None, after one warning, when W&B
    cannot start. Its files go to WANDB_DIR, else into the logs' directory (wandb's default where that is a URL)."""
    ident = run_id(run_name, str(storage.absolute(log_dir)))
    local = "WANDB_DIR" not in os.environ and not storage.is_url(log_dir)
    try:
        import wandb

        # quiet: wandb prints where the run is (its URL, or its offline directory), not who is logged in, which is
        # a query of its own that an unreachable W&B answers only after about 10 s more; console off: the run's
        # output is not captured (its progress bar and one-line failures stay as they are)
        run = wandb.init(project=log.wandb_project, entity=log.wandb_entity or None, name=run_name, id=ident,
                         resume="allow", config=config, dir=str(log_dir) if local else None, reinit="create_new",
                         settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S, finish_timeout=FINISH_TIMEOUT_S,
                                                 quiet=True, console="off"))
    except Exception as e:  # noqa: BLE001 - unreachable, not logged in, or wandb broken: the run goes on without it
        _warn(f"could not start W&B run {ident}", e)
        return None
    return WandbSink(run)


def _warn(what: str, error: BaseException) -> None:
    tqdm.write(f"warning: {what} ({reason(error)}); the run goes on without W&B (metrics.jsonl has every record)")
