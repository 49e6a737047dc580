"""A run's start: resume or not, the model, the run's settings, the data and the compiled steps, the state
restored or initialised. Every bad-input error is raised here, the data's before anything compiles, and
nothing of the run is written yet (but a DPO run's reference log-probs, kept in the run directory)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from gpt2_jax import autoremat, checkpoints, data, parallel, storage
from gpt2_jax.encoder import Encoder
from gpt2_jax.errors import UserError
from gpt2_jax.model import GPT2Config, convert_layout
from gpt2_jax.objectives import ReferenceContext, RunData
from gpt2_jax.resolve import Resume, check_resumable, decide_resume, dpo_reference, find_vocab_dir, initial_model
from gpt2_jax.rundir import RunDir
from gpt2_jax.settings import RunSettings, settings_of
from gpt2_jax.steps import Steps, abstract_state, build_steps, reference_shapes
from gpt2_jax.train import TrainState


@dataclasses.dataclass
class Start:
    """What the steps start from, after every check."""

    settings: RunSettings  # its objective says what a batch is and how a step scores it
    model_config: GPT2Config  # with remat=auto's choice
    encoder: Encoder
    steps: Steps
    state: TrainState  # restored, or initialised from the starting params
    seed: int  # a resumed run's own: its batches and noise continue exactly
    meta: dict  # the restored step's metadata; {} for a new run
    data: RunData  # the training sampler (a function of the step), the validation batches, what the data was
    reference_params: Any  # the frozen reference every step takes (objective.takes_reference), else None


def start(config: Any, run: RunDir, is_main: bool) -> Start:
    """Resume or not, the model, the run's settings, the data and the compiled steps, and the state."""
    resume = decide_resume(config.checkpoint.restore_from, run)
    seed = config.seed
    if resume:
        check_resumable(config, resume)
        seed = checkpoints.read_seed(resume.run_dir.path, resume.candidates())
        if seed is None:
            raise UserError(f"no checkpoint of {resume.run_dir} (steps {resume.candidates()}) has readable metadata; "
                            "nothing was deleted. Restore another run with checkpoint.restore_from=PATH")
    model_config, params, encoder = initial_model(config, resume.run_dir if resume else None)
    if config.model.from_scratch and resume is None:
        vocab = find_vocab_dir(config)
        tqdm.write(f"vocabulary: {f'GPT-2 BPE from {vocab}' if vocab else 'byte-level'}, {encoder.n_vocab} tokens "
                   "(model.vocab: a directory, or bytes)")
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    settings = settings_of(config, model_config, mesh, encoder.eot_token)
    objective = settings.objective
    run_data = objective.data(config, encoder, settings.seq_len, seed, is_main)
    if resume and resume.run_dir in (run, run.best):
        data.check_same_data(run, run_data.record, config.data.allow_changed)

    train = config.train
    if config.model.remat == "auto":  # the fastest policy and micro-batch split that fit the memory budget
        model_config, train, line = autoremat.resolve(config, model_config, mesh, settings, run,
                                                      storage.path(config.workdir) / "logs" / config.run_name)
        tqdm.write(line)
    steps = build_steps(model_config, train, mesh, objective, sections=settings.sections)
    meta: dict = {}
    if resume is None:
        state = steps.init_state(params)
    else:
        trees, meta = restore(resume, model_config, train, steps, settings.sections)
        state = TrainState(step=parallel.put_tree(np.int32(meta["step"]), parallel.replicated(mesh)), **trees)
        tqdm.write(f"restored step {meta['step']} from {resume.run_dir}")
        if is_main:
            for line in run.set_aside_after(resume.run_dir, meta["step"]):
                tqdm.write(line)
    def shapes() -> Any:  # the reference's params on the mesh: the step's, else a plain GPT-2 of this shape
        return steps.reference if steps.reference is not None else reference_shapes(model_config, mesh)

    context = ReferenceContext(config, model_config, mesh, shapes, params if resume is None else None,
                               lambda: dpo_reference(config), run.reference_logps, seed, is_main)
    run_data, reference = objective.prepare(run_data, context)
    del params, context
    return Start(settings, model_config, encoder, steps, state, seed, meta, run_data, reference)


def restore(resume: Resume, model_config: GPT2Config, train: Any, steps: Steps, sections: dict
            ) -> tuple[dict[str, Any], dict]:
    """The state's trees (TrainState's but the step) and the metadata of the newest candidate checkpoint that
    verifies, in this run's layout and shardings (restore_from=latest sets damaged newer steps aside).

    A checkpoint written with the other model.scan_layers setting is read as it was saved, then its blocks
    are stacked or unrolled on the devices.
    """
    saved = dataclasses.replace(model_config, scan_layers=resume.run_dir.scan_layers())
    target = steps.abstract_state if saved == model_config else \
        abstract_state(saved, train, steps.mesh, sections)[1]
    targets = target.trees()
    _, trees, meta = checkpoints.restore_newest(resume.run_dir.path, resume.candidates(), targets,
                                                set_aside_to=resume.run_dir.damaged if resume.latest else None,
                                                advice=checkpoints.RESUME_ADVICE)
    if saved.scan_layers != model_config.scan_layers:
        shardings = steps.state_sharding.trees()
        trees = jax.jit(lambda t: convert_layout(t, model_config.scan_layers), out_shardings=shardings)(trees)
    return trees, meta
