"""Preference optimisation (DPO) on prompt/chosen/rejected pairs, with the losses and metrics of trl's DPOTrainer.

A pair is two rows (data.layout_pairs): the prompt then the chosen completion and its end-of-text, and
the prompt then the rejected one. A sequence's log-probability, ℓ, is the sum of its completion
tokens' log-probabilities (the end-of-text included); with the reference model's ℓ_ref, a pair's
scores are the log-ratios s = ℓ - ℓ_ref, and with Δ = s_chosen - s_rejected the losses are trl's:

    sigmoid  -log σ(βΔ)                                  (DPO)
    hinge    max(0, 1 - βΔ)                              (SLiC)
    ipo      (s_chosen / n_chosen - s_rejected / n_rejected - 1/(2β))²  (each score per completion token)
    robust   (-(1-ε) log σ(βΔ) + ε log σ(-βΔ)) / (1 - 2ε)  (ε = dpo.label_smoothing, the flipped labels)

averaged over the pairs. Metrics, as trl logs them: rewards/chosen and rewards/rejected (β s, averaged),
rewards/accuracies (the fraction with reward chosen > rejected), rewards/margins, logps/chosen and
logps/rejected (ℓ, averaged).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax.errors import UserError
from gpt2_jax.model import GPT2, GPT2Config, split_lora

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
# Where a step takes the reference's log-probabilities from.
REFERENCE_MODES = ("batch", "params", "adapters_off")


@dataclasses.dataclass(frozen=True)
class DPOSettings:
    """The objective's settings, and where the step finds the reference: "batch" (precomputed, carried by
    each batch), "params" (a frozen copy given to the step) or "adapters_off" (LoRA: the base itself)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    reference: str = "batch"


def settings_of(config: Any) -> DPOSettings:
    """The DPO settings of an experiment config (train.objective=dpo), checked."""
    d = config.dpo
    check(d.beta, d.loss_type, d.label_smoothing, prefix="dpo.")
    if config.train.loss_chunk:
        raise UserError("train.loss_chunk does not apply to train.objective=dpo (its log-probabilities need the "
                        "logits of both completions); set it to 0")
    if config.train.noise:
        raise UserError("train.noise does not apply to train.objective=dpo; set it to 0")
    if config.data.document_mask:
        raise UserError("data.document_mask does not apply to train.objective=dpo (one pair's sequences a row); "
                        "set it to False")
    if d.tokenize not in ("apart", "trl"):
        raise UserError(f"dpo.tokenize={d.tokenize!r}: use apart (as SFT examples) or trl (as trl's DPOTrainer)")
    lora = bool(config.train.get("lora_rank"))
    reference = "batch" if d.precompute_reference else "adapters_off" if lora and not d.reference else "params"
    return DPOSettings(float(d.beta), d.loss_type, float(d.label_smoothing), reference)


def check(beta: float, loss_type: str, label_smoothing: float, prefix: str = "--") -> None:
    """One line for a setting trl's DPOTrainer would not take."""
    if loss_type not in LOSS_TYPES:
        raise UserError(f"{prefix}loss_type={loss_type!r}: use one of {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise UserError(f"{prefix}beta={beta}: must be > 0")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise UserError(f"{prefix}label_smoothing={label_smoothing}: the robust loss needs it in [0, 0.5)")
    if loss_type != "robust" and label_smoothing:
        raise UserError(f"{prefix}label_smoothing={label_smoothing}: only loss_type=robust uses it (as in trl's "
                        "DPOTrainer); set it to 0 or use loss_type=robust")


def sequence_logps(params: Any, config: GPT2Config, tokens: jax.Array, weights: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
    """(ℓ [N], completion tokens [N]) of rows tokens [N, T+1]: the summed float32 log-probabilities of the
    targets tokens[:, 1:] that `weights[:, 1:]` marks."""
    logits = GPT2(config).apply(params, tokens[:, :-1]).astype(jnp.float32)
    targets, marks = tokens[:, 1:], weights[:, 1:].astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logps = target_logit - jax.nn.logsumexp(logits, axis=-1)
    return jnp.sum(logps * marks, axis=-1), jnp.sum(marks, axis=-1)


def pair_logps(params: Any, config: GPT2Config, tokens: jax.Array, weights: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """(ℓ [B, 2], completion tokens [B, 2]) of pairs tokens [B, 2, T+1] (chosen, rejected): both sequences of
    every pair in one forward pass, the chosen rows first."""
    B, _, W = tokens.shape
    flat = lambda x: x.swapaxes(0, 1).reshape(2 * B, W)  # noqa: E731 - [chosen rows; rejected rows]
    logps, counts = sequence_logps(params, config, flat(tokens), flat(weights))
    return logps.reshape(2, B).T, counts.reshape(2, B).T


def base_of(config: GPT2Config, params: Any) -> tuple[GPT2Config, Any]:
    """A LoRA model's base: its config without adapters and its params without them (the reference when
    dpo.reference is empty; computes what the adapted model computed before training)."""
    return dataclasses.replace(config, lora_rank=0), split_lora(params)[1]


def preference_loss(settings: DPOSettings, policy: Any, reference: Any, counts: Any, xp: Any = jnp
                    ) -> tuple[Any, dict[str, Any]]:
    """(mean loss, METRICS averaged over the pairs) of ℓ [B, 2] (chosen, rejected) for policy and reference,
    in jax.numpy (a step) or numpy (gpt2-jax evaluate, in float64)."""
    beta, eps = settings.beta, settings.label_smoothing
    log_sigmoid = lambda x: -xp.logaddexp(0.0, -x)  # noqa: E731 - the same formula in both array modules
    scores = policy - reference  # log-ratios [B, 2]
    delta = scores[:, 0] - scores[:, 1]
    if settings.loss_type == "sigmoid":
        losses = -log_sigmoid(beta * delta)
    elif settings.loss_type == "hinge":
        losses = xp.maximum(1 - beta * delta, 0.0)
    elif settings.loss_type == "ipo":
        per_token = scores / xp.maximum(counts, 1.0)
        losses = (per_token[:, 0] - per_token[:, 1] - 1 / (2 * beta)) ** 2
    else:  # robust
        losses = (-(1 - eps) * log_sigmoid(beta * delta) + eps * log_sigmoid(-beta * delta)) / (1 - 2 * eps)
    rewards = beta * scores  # metrics only: a step differentiates the loss alone
    metrics = {"rewards/chosen": xp.mean(rewards[:, 0]), "rewards/rejected": xp.mean(rewards[:, 1]),
               "rewards/accuracies": xp.mean((rewards[:, 0] > rewards[:, 1]).astype(policy.dtype)),
               "rewards/margins": xp.mean(rewards[:, 0] - rewards[:, 1]),
               "logps/chosen": xp.mean(policy[:, 0]), "logps/rejected": xp.mean(policy[:, 1])}
    return xp.mean(losses), metrics


def dpo_loss(params: Any, batch: tuple, config: GPT2Config, settings: DPOSettings, reference_params: Any = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss and metrics of a batch of pairs (tokens [B, 2, T+1], weights [B, 2, T+1], reference ℓ [B, 2]),
    the reference's ℓ taken as settings.reference says."""
    tokens, weights, reference = batch
    policy, counts = pair_logps(params, config, tokens, weights)
    if settings.reference == "params":  # a plain GPT-2 (a LoRA run's reference has no adapters)
        reference_config = dataclasses.replace(config, lora_rank=0)
        reference = pair_logps(jax.lax.stop_gradient(reference_params), reference_config, tokens, weights)[0]
    elif settings.reference == "adapters_off":
        base_config, base_params = base_of(config, jax.lax.stop_gradient(params))
        reference = pair_logps(base_params, base_config, tokens, weights)[0]
    return preference_loss(settings, policy, jax.lax.stop_gradient(reference), counts)


def reference_logps(params: Any, config: GPT2Config, tokens: np.ndarray, weights: np.ndarray, mesh: Any,
                    batch_size: int) -> np.ndarray:
    """ℓ [N, 2] of every pair (tokens and weights [N, 2, T+1]) under params, `batch_size` pairs at a time
    over the mesh's devices (the last batch padded with copies of the first pair, then dropped)."""
    from gpt2_jax import parallel

    sharding = parallel.batch_sharding(mesh)
    run = jax.jit(parallel.with_mesh_rules(lambda p, t, w: pair_logps(p, config, t, w)[0], mesh),
                  in_shardings=(None, sharding, sharding), out_shardings=parallel.replicated(mesh))
    out = []
    for start in range(0, len(tokens), batch_size):
        t, w = tokens[start:start + batch_size], weights[start:start + batch_size]
        pad = batch_size - len(t)
        t, w = np.concatenate([t, np.repeat(t[:1], pad, 0)]), np.concatenate([w, np.repeat(w[:1], pad, 0)])
        logps = run(params, parallel.global_batch(t, sharding), parallel.global_batch(w, sharding))
        out.append(np.asarray(jax.device_get(logps))[:batch_size - pad])
    return np.concatenate(out).astype(np.float32)
