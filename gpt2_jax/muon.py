"""Muon (MomentUm Orthogonalized by Newton-Schulz) on the matrices inside the blocks, AdamW on the rest.

The update is torch.optim.Muon's (torch 2.13), per Muon matrix W with gradient g, momentum m, the
learning rate lr of this step and weight decay wd:

    buf = m * buf + (1 - m) * g                      (torch: buf.lerp_(g, 1 - m))
    u = (1 - m) * g + m * buf if nesterov else buf   (torch: g.lerp(buf, m))
    O = newton_schulz(u)                             (5 quintic steps on u / max(|u|_F, 1e-7), the wide way round)
    W = W * (1 - lr * wd) - lr * ratio * O           (ratio from the layer's fans: lr_ratio)

with the layer's true fans (our kernels are [in, out]: fan_in = shape[-2], fan_out = shape[-1]).
AdamW (optax.adamw) updates everything else: wte (also the tied head), wpe, biases and LayerNorms.
That grouping is modded-nanogpt's, nanochat's, levanter's and Keller Jordan's Muon README's.

Defaults and their sources: momentum 0.95, nesterov True, ns_steps 5, the coefficients
(3.4445, -4.7750, 2.0315) and the norm's clamp 1e-7: torch.optim.Muon and Keller Jordan's muon.py;
ns_dtype bfloat16: both (torch's is hard-wired to it); adjust_lr "original": torch's default (Keller's
sqrt(max(1, fan_out / fan_in))); weight_decay 0: Keller's muon.py (torch's default is 0.1). Keller's
learning rate is 0.02 (modded-nanogpt's GPT-2 records use 0.05): the caller's schedule sets it.
Keller's caution: Muon is tuned for training from scratch; it is not shown to help fine-tuning weights
trained with AdamW.

ns_dtype is the iteration's dtype only: the momentum and the update keep the gradient's (float32 here, also
under model.dtype=bfloat16, whose params stay float32). Gradient accumulation and clipping come before this
optimizer in the chain and need nothing of it.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from gpt2_jax.errors import UserError

# The dense layers inside a block whose kernels Muon updates, as module.layer (model.py's names).
BLOCK_MATRICES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
ADJUST_LR = ("original", "match_rms_adamw")
NS_DTYPES = ("bfloat16", "float32")
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # (a, b, c) of a*X + b*(X X^T)X + c*(X X^T)^2 X: torch's and Keller's
NS_EPS = 1e-7  # the Frobenius norm is clamped at this before dividing (torch.optim._muon.EPS)
# The muon section's defaults (experiments/base.py documents each; a test holds the two equal).
DEFAULTS = {"learning_rate": 0.02, "momentum": 0.95, "nesterov": True, "ns_steps": 5, "ns_dtype": "bfloat16",
            "adjust_lr": "original", "weight_decay": 0.0, "split_qkv": False}


def _keys(path: tuple) -> list:
    return [getattr(k, "key", None) for k in path]


def is_muon_path(path: tuple) -> bool:
    """Whether a params path (jax.tree_util key path) is a kernel of BLOCK_MATRICES inside a block (h_i or,
    stacked by scan_layers, h)."""
    keys = [str(k) for k in _keys(path)]
    in_block = any(k == "h" or k.startswith("h_") for k in keys)
    return in_block and len(keys) >= 3 and keys[-1] == "kernel" and f"{keys[-3]}.{keys[-2]}" in BLOCK_MATRICES


def labels(params: Any) -> Any:
    """The tree of params with each leaf's group: "muon" (the block matrices) or "adamw" (everything else).

    Works on any tree laid out as the params (either layer layout, ShapeDtypeStructs), so it is also the
    `param_labels` callable of optax.multi_transform.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: "muon" if is_muon_path(path) else "adamw", params)


def lr_ratio(fan_in: int, fan_out: int, adjust_lr: str = "original") -> float:
    """How much a Muon matrix's learning rate is scaled: sqrt(max(1, fan_out / fan_in)) ("original", Keller's)
    or 0.2 * sqrt(max(fan_in, fan_out)) ("match_rms_adamw", Moonshot's: an update of AdamW's RMS)."""
    if adjust_lr == "original":
        return math.sqrt(max(1.0, fan_out / fan_in))
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(fan_in, fan_out))
    raise UserError(f"muon.adjust_lr={adjust_lr!r}: use one of {', '.join(ADJUST_LR)}")


def _dot(x: jax.Array, y: jax.Array) -> jax.Array:
    # float32 accumulation whatever the inputs (as torch's bf16 matmuls); HIGHEST so that float32 means float32
    # where a backend would otherwise take bf16 passes (TPU) or TF32 (GPU).
    return jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _rounded(x: jax.Array, dtype: Any) -> jax.Array:
    """x (float32) rounded to dtype, as torch rounds each op's result. reduce_precision first: under
    xla_allow_excess_precision (on by default) XLA may drop a float32 -> bfloat16 -> float32 round trip (its GPU
    compiler simplifies such conversions), and the iteration would no longer be bfloat16's."""
    finfo = jnp.finfo(dtype)
    return jax.lax.reduce_precision(x, finfo.nexp, finfo.nmant).astype(dtype)


def _newton_schulz_2d(g: jax.Array, ns_steps: int, dtype: Any) -> jax.Array:
    """torch.optim._muon._zeropower_via_newtonschulz of one matrix g [rows, cols] in `dtype`."""
    a, b, c = NS_COEFFICIENTS
    x = _rounded(g.astype(jnp.float32), dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:  # the wide way round, [small, large]: the Gram matrices below are [small, small]
        x = x.T
    norm = _rounded(jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)))), dtype)
    denominator = jnp.maximum(norm, _rounded(jnp.float32(NS_EPS), dtype)).astype(jnp.float32)
    x = _rounded(x.astype(jnp.float32) / denominator, dtype)  # spectral norm <= Frobenius norm = 1
    for _ in range(ns_steps):
        # torch: gram = x @ x.T, then addmm(gram, gram, gram, beta=b, alpha=c) and addmm(x, that, x, beta=a):
        # each product accumulated and combined in float32, rounded to `dtype` once.
        gram = _rounded(_dot(x, x.T), dtype)  # [small, small]
        poly = _rounded(b * gram.astype(jnp.float32) + c * _dot(gram, gram), dtype)
        x = _rounded(a * x.astype(jnp.float32) + _dot(poly, x), dtype)
    return x.T if tall else x


def newton_schulz(g: jax.Array, ns_steps: int = 5, ns_dtype: str = "bfloat16") -> jax.Array:
    """The quintic Newton-Schulz orthogonalization of matrices g [..., rows, cols], each apart, computed in ns_dtype
    and returned in g's dtype.

    Leading axes (scan_layers' [n_layer], split_qkv's [3]) are looped over with lax.map, not vmapped: each matrix
    then runs the very program an unstacked one does, so both layer layouts give bitwise the same update (vmap's
    batched matmuls may sum in another order, and in bfloat16 the iteration amplifies such last-bit differences).
    """
    dtype = jnp.dtype(ns_dtype)
    if g.ndim == 2:
        return _newton_schulz_2d(g, ns_steps, dtype).astype(g.dtype)
    flat = g.reshape(-1, *g.shape[-2:])  # [matrices, rows, cols]
    out = jax.lax.map(lambda m: _newton_schulz_2d(m, ns_steps, dtype), flat)
    return out.reshape(g.shape).astype(g.dtype)


def _orthogonalized(ns_steps: int, ns_dtype: str, adjust_lr: str, split_qkv: bool) -> optax.GradientTransformation:
    """Stateless: each leaf [..., in, out] -> newton_schulz(leaf) * lr_ratio(in, out); with split_qkv the fused
    attn.c_attn kernel [..., C, 3C] as three [..., C, C] blocks (q, k, v) apart, each with its own ratio."""
    def one(path, u):
        if u.ndim < 2:
            raise UserError(f"Muon updates matrices; {jax.tree_util.keystr(path)} has shape {list(u.shape)}")
        if split_qkv and _keys(path)[-3:-1] == ["attn", "c_attn"]:
            C = u.shape[-1] // 3
            blocks = jnp.moveaxis(u.reshape(*u.shape[:-1], 3, C), -2, -3)  # [..., 3, C, C]: q, k, v
            o = newton_schulz(blocks, ns_steps, ns_dtype) * lr_ratio(C, C, adjust_lr)
            return jnp.moveaxis(o, -3, -2).reshape(u.shape)
        return newton_schulz(u, ns_steps, ns_dtype) * lr_ratio(u.shape[-2], u.shape[-1], adjust_lr)

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(one, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def check(momentum: float, ns_steps: int, ns_dtype: str, adjust_lr: str, weight_decay: float = 0.0) -> None:
    if not 0.0 <= momentum < 1.0:
        raise UserError(f"muon.momentum={momentum}: must be in [0, 1)")
    if not 1 <= ns_steps < 100:  # torch refuses 100 or more
        raise UserError(f"muon.ns_steps={ns_steps}: must be in [1, 100)")
    if ns_dtype not in NS_DTYPES:
        raise UserError(f"muon.ns_dtype={ns_dtype!r}: use one of {', '.join(NS_DTYPES)}")
    if adjust_lr not in ADJUST_LR:
        raise UserError(f"muon.adjust_lr={adjust_lr!r}: use one of {', '.join(ADJUST_LR)}")
    if weight_decay < 0:
        raise UserError(f"muon.weight_decay={weight_decay}: must be >= 0")


def scale_by_muon(*, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5, ns_dtype: str = "bfloat16",
                  adjust_lr: str = "original", split_qkv: bool = False) -> optax.GradientTransformation:
    """Muon's direction for every leaf it is given (matrices [..., in, out]): torch's momentum, Newton-Schulz,
    times the layer's lr_ratio; no learning rate or weight decay (muon adds them).

    Built from optax parts: optax.scale(1 - m) then optax.trace(decay=m, nesterov) is torch's lerp momentum
    exactly (trace keeps buf = m * buf + (1 - m) * g, torch's momentum_buffer, and with nesterov returns
    (1 - m) * g + m * buf), then a stateless transform for Newton-Schulz and the ratio. Not
    optax.contrib.muon: it divides its momentum by 1 - m^t (bias correction), adds eps to the norm instead
    of clamping it and runs the iteration in the gradient's dtype, so it is not torch's update.

    Under jit with FSDP-sharded params the iteration runs where the matrices are, on their shards: XLA
    partitions the matmuls (no manual collectives); parallel.py shards a kernel's longest axis, which the
    wide orientation makes the columns, so each device computes its part of the [small, small] Gram
    matrices, all-reduced, and keeps its own columns of the result; other shardings are gathered by XLA.
    """
    check(momentum, ns_steps, ns_dtype, adjust_lr)
    return optax.chain(optax.scale(1.0 - momentum), optax.trace(decay=momentum, nesterov=nesterov),
                       _orthogonalized(ns_steps, ns_dtype, adjust_lr, split_qkv))


def muon(learning_rate: optax.ScalarOrSchedule, *, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
         ns_dtype: str = "bfloat16", adjust_lr: str = "original", weight_decay: float = 0.0,
         split_qkv: bool = False) -> optax.GradientTransformation:
    """torch.optim.Muon's whole update for the leaves it is given: scale_by_muon, then decoupled weight decay
    with the unscaled learning rate (optax.add_decayed_weights before optax.scale_by_learning_rate:
    -lr * (ratio * O + wd * W)), the schedule evaluated at this transform's step count as optax does."""
    check(momentum, ns_steps, ns_dtype, adjust_lr, weight_decay)
    return optax.chain(scale_by_muon(momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, ns_dtype=ns_dtype,
                                     adjust_lr=adjust_lr, split_qkv=split_qkv),
                       optax.add_decayed_weights(weight_decay), optax.scale_by_learning_rate(learning_rate))


def muon_with_adamw(*, muon_lr: optax.ScalarOrSchedule, adamw_lr: optax.ScalarOrSchedule, b1: float, b2: float,
                    eps: float, adamw_weight_decay: float, decay_mask: Any | Callable[[Any], Any],
                    momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5, ns_dtype: str = "bfloat16",
                    adjust_lr: str = "original", weight_decay: float = 0.0,
                    split_qkv: bool = False) -> optax.GradientTransformation:
    """Muon (muon) on the block matrices and AdamW (optax.adamw) on the rest, as one optax.multi_transform
    over `labels`.

    muon_lr and adamw_lr are the two groups' schedules (the run's shape, each with its own peak); b1, b2,
    eps and adamw_weight_decay are AdamW's, decay_mask its mask (a tree of bools or a callable of the params:
    the run's, under which no leaf of the AdamW group is a kernel); the rest are Muon's (scale_by_muon, muon).
    The labels are computed from the tree the optimizer is given, so one optimizer serves either layer layout.
    Gradient clipping and accumulation belong before it in the chain.
    """
    return optax.multi_transform(
        {"muon": muon(muon_lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, ns_dtype=ns_dtype,
                      adjust_lr=adjust_lr, weight_decay=weight_decay, split_qkv=split_qkv),
         "adamw": optax.adamw(adamw_lr, b1=b1, b2=b2, eps=eps, weight_decay=adamw_weight_decay, mask=decay_mask)},
        labels)
