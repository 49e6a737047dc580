"""GPT-2 as OpenAI released it, written as a pure-functional Flax linen module.

Read top to bottom: config and presets, remat policies, the attention layer (with an optional
fixed-size key/value cache for decoding), the MLP, the block, and the model. Shapes in comments:
B batch, T query length, S key/value length, C n_embd, N n_head, H head size (C // N), V n_vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from gpt2_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Hyperparameters as in OpenAI's hparams.json, plus how to compute."""

    n_vocab: int = 50257
    n_ctx: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # dtype the parameters are stored in
    remat: str = "none"  # a name from REMAT_POLICIES, applied to each block
    scan_layers: bool = False  # one nn.scan over the blocks: params stacked [n_layer, ...], one block compiled
    vocab_multiple: int = 0  # logits matmul over n_vocab padded to a multiple of this; 0: auto (vocab_padding)
    attention: str = "auto"  # training attention: "auto" (cuDNN's fused kernel on GPU in bf16/f16), "xla", "cudnn"
    lora_rank: int = 0  # > 0: a LoRA adapter of this rank beside each of lora_targets (the base weights frozen)
    lora_alpha: float = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank, as peft's
    lora_targets: tuple[str, ...] = ("attn.c_attn",)  # of LORA_TARGETS

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in ("float32", "bfloat16", "float16"):
                raise UserError(f"{field}={getattr(self, field)!r}: use float32, bfloat16 or float16")
        if self.vocab_multiple < 0:
            raise UserError(f"vocab_multiple={self.vocab_multiple}: must be >= 0 (0 = auto, 1 = no padding)")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise UserError(f"attention={self.attention!r}: use one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
        if self.remat not in REMAT_POLICIES:
            raise UserError(f"remat={self.remat!r} is not a known policy; use one of {sorted(REMAT_POLICIES)}")
        if self.lora_rank < 0:
            raise UserError(f"lora_rank={self.lora_rank}: must be >= 0 (0 = no adapters, full fine-tuning)")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if self.lora_rank and (unknown or not self.lora_targets):
            raise UserError(f"lora_targets={','.join(self.lora_targets)}: "
                            f"name one or more of {', '.join(LORA_TARGETS)}")

    def hparams(self) -> dict[str, int]:
        """The architecture fields, as OpenAI's hparams.json spells them."""
        return {k: getattr(self, k) for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")}

    def num_params(self) -> int:
        """Parameter count (the output projection is tied to wte, so counted once)."""
        C, L = self.n_embd, self.n_layer
        per_block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
        return self.n_vocab * C + self.n_ctx * C + L * per_block + 2 * C


# The four released sizes. OpenAI first called 355M "345M" and 124M "117M".
PRESETS: dict[str, dict[str, int]] = {
    "124M": dict(n_embd=768, n_head=12, n_layer=12),
    "355M": dict(n_embd=1024, n_head=16, n_layer=24),
    "774M": dict(n_embd=1280, n_head=20, n_layer=36),
    "1558M": dict(n_embd=1600, n_head=25, n_layer=48),
}


def preset(name: str, **overrides: Any) -> GPT2Config:
    """The config of a released size ('124M', '355M', '774M', '1558M'), with overrides."""
    if name not in PRESETS:
        raise UserError(f"unknown model size {name!r}; use one of {list(PRESETS)}")
    return GPT2Config(**{**PRESETS[name], **overrides})


# Rematerialisation: which activations a block keeps for the backward pass; the rest is recomputed.
# The names below are tagged with checkpoint_name inside the block.
ACTIVATION_NAMES = ("q", "k", "v", "attn_out", "mlp_hidden")
_policies = jax.checkpoint_policies
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # no jax.checkpoint at all: keep everything
    "full": _policies.nothing_saveable,  # keep only block inputs, recompute the rest
    "dots": _policies.checkpoint_dots,  # keep every matmul output
    "dots_no_batch": _policies.dots_with_no_batch_dims_saveable,  # keep the weight matmuls, not attention's
    "save_qkv": _policies.save_only_these_names("q", "k", "v"),
    "save_attn": _policies.save_only_these_names("q", "k", "v", "attn_out"),
    "save_named": _policies.save_only_these_names(*ACTIVATION_NAMES),
}


# How causal self-attention over a whole sequence is computed (decoding with a cache always uses XLA).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
ATTENTION_BLOCK = 256  # XLA's float32 attention: queries per block (blockwise_attention; BENCHMARKS.md)
# The dense layers LoRA can adapt, named as peft's target_modules name them (module path suffixes).
LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def attention_implementation(setting: str, dtype: Any, backend: str) -> str:
    """The implementation a setting means here: "auto" is cuDNN's fused kernel on GPU for 16-bit inputs
    (it supports no float32), else XLA's."""
    if setting != "auto":
        return setting
    return "cudnn" if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


def vocab_padding(setting: int, backend: str) -> int:
    """The multiple a vocab_multiple setting means here: 0 (auto) is 128 on an accelerator (tensor-core
    friendly shapes; BENCHMARKS.md has the measured gain) and 1, no padding, on CPU (where it gains nothing)."""
    return setting or (1 if backend == "cpu" else 128)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, setting: str = "auto",
                     mask: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(H) + causal mask) v for q, k, v [B, T, N, H], by the configured implementation;
    `mask` [B, 1, T, T] (True: may attend) narrows the causal mask further (documents: document_mask)."""
    implementation = attention_implementation(setting, q.dtype, jax.default_backend())
    if implementation == "cudnn":
        try:  # cuDNN takes the mask as a bias of 0 / -inf
            return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")
        except (RuntimeError, ValueError, NotImplementedError) as e:  # raised while tracing: no cuDNN, bad shape
            if setting == "cudnn":
                raise UserError(f"model.attention=cudnn: cuDNN's fused attention is not available here ({e}); "
                                "use auto or xla") from None
            warnings.warn(f"cuDNN fused attention unavailable ({e}); using XLA's attention", stacklevel=2)
    if q.dtype == jnp.float32:
        return blockwise_attention(q, k, v, mask, ATTENTION_BLOCK)
    # 16-bit: one block, as jax computes it (across blocks, the key and value gradients would be summed
    # in 16 bits)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="xla")


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                        block: int = ATTENTION_BLOCK) -> jax.Array:
    """Causal attention in float32, as XLA computes it: q, k, v [B, T, N, H] -> [B, T, N, H].

    jax.nn.dot_product_attention's arithmetic (its scale, mask value and max-subtracted softmax)
    with less memory traffic: each block of `block` queries meets only the keys at or before its last
    position (the fully masked blocks above the diagonal are never computed), and the softmax's
    division is applied to the [t, H] output instead of the [t, s] probabilities.
    """
    T, H = q.shape[1], q.shape[-1]
    large_negative = -0.7 * jnp.finfo(jnp.float32).max
    outputs = []
    for start in range(0, T, block):
        stop = min(start + block, T)
        logits = jnp.einsum("btnh,bsnh->bnts", q[:, start:stop], k[:, :stop]) * jnp.float32(1.0 / H**0.5)
        allowed = jnp.arange(stop)[None, :] <= jnp.arange(start, stop)[:, None]  # [t, s]
        if mask is not None:
            allowed = allowed & mask[:, :, start:stop, :stop]
        logits = jnp.where(allowed, logits, large_negative)  # [B, N, t, s]
        unnormalised = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
        total = jnp.sum(unnormalised, axis=-1, keepdims=True).transpose(0, 2, 1, 3)  # [B, t, N, 1]
        outputs.append(jnp.einsum("bnts,bsnh->btnh", unnormalised, v[:, :stop]) / total)
    return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)


def document_segments(tokens: jax.Array, eot: int) -> jax.Array:
    """Which document each position of windows [B, T] is in (0, 1, ...): a document starts at each
    end-of-text id, which opens the next document as it opens an unconditional sample."""
    return jnp.cumsum(tokens == eot, axis=1, dtype=jnp.int32)


# Logical axes of the residual stream [B, T, C]. Under a mesh, parallel.py maps "batch" onto the
# data-parallel mesh axes, which keeps activations batch-sharded while FSDP shards the weights;
# outside one, the constraint does nothing.
ACTIVATION_AXES = ("batch", "length", "embed")


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def _dense_kwargs(cfg: GPT2Config) -> dict:
    # OpenAI's init: weights normal(0.02), biases zero.
    return dict(dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype),
                kernel_init=nn.initializers.normal(0.02))


class LoRA(nn.Module):
    """A low-rank update beside a frozen dense layer: x @ a @ b * (alpha / rank), a [in, r] and b [r, out].

    Initialised as peft initialises its LoRA (a uniform in +-1/sqrt(in), b zero), so a model with fresh
    adapters computes exactly what its base does.
    """

    config: GPT2Config
    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        bound = 1.0 / math.sqrt(x.shape[-1])
        a = self.param("a", lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound),
                       (x.shape[-1], cfg.lora_rank), _dtype(cfg.param_dtype))
        b = self.param("b", nn.initializers.zeros, (cfg.lora_rank, self.features), _dtype(cfg.param_dtype))
        dtype = _dtype(cfg.dtype)
        return (x.astype(dtype) @ a.astype(dtype)) @ b.astype(dtype) * (cfg.lora_alpha / cfg.lora_rank)


def _dense(cfg: GPT2Config, x: jax.Array, features: int, name: str, target: str) -> jax.Array:
    """OpenAI's Conv1D (a dense layer) named `name`; with LoRA on `target`, plus its adapter `name`_lora."""
    y = nn.Dense(features, name=name, **_dense_kwargs(cfg))(x)
    if cfg.lora_rank and target in cfg.lora_targets:
        y = y + LoRA(cfg, features, name=f"{name}_lora")(x)
    return y


def is_lora_path(path: tuple) -> bool:
    """Whether a parameter path (jax key path or tuple of names) is inside a LoRA adapter."""
    return any(str(getattr(k, "key", k)).endswith("_lora") for k in path)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array | int) -> jax.Array:
    """Decoding attention: q [B, T, N, H] at positions start.. over a cache of keys k and values v, both
    [B, N, S, H] -> [B, T, N, H]; positions after each query's own are masked.

    The cache is heads-major, the layout both matmuls read as it is (laid out [B, S, N, H], XLA copied
    the whole cache into a transposed layout every step); the arithmetic is
    jax.nn.dot_product_attention's (float32 logits and softmax, the same scale and mask value), so the
    results match the training path's attention.
    """
    T, S, H = q.shape[1], k.shape[2], q.shape[-1]
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    precision = {jnp.dtype(jnp.bfloat16): jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
                 jnp.dtype(jnp.float16): jax.lax.DotAlgorithmPreset.F16_F16_F32}.get(jnp.dtype(q.dtype))
    logits = jnp.einsum("btnh,bnsh->bnts", q, k.astype(q.dtype), precision=precision,
                        preferred_element_type=logits_dtype)  # [B, N, T, S]
    logits *= jnp.array(1.0 / H**0.5, dtype=logits_dtype)
    mask = jnp.arange(S)[None, :] <= (start + jnp.arange(T))[:, None]  # [T, S]
    large_negative = -0.7 * min(jnp.finfo(logits_dtype).max, jnp.finfo(jnp.float32).max)
    logits = jnp.where(mask, logits, jnp.asarray(large_negative, logits_dtype))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
    return jnp.einsum("bnts,bnsh->btnh", probs, v.astype(q.dtype))


class Attention(nn.Module):
    """Causal multi-head self-attention; with `cache`, writes this step's keys/values into it."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array, cache: dict | None, start: jax.Array | int,
                 segments: jax.Array | None = None) -> tuple[jax.Array, dict | None]:
        cfg = self.config
        B, T, C = x.shape
        N, H = cfg.n_head, C // cfg.n_head
        qkv = nn.with_logical_constraint(_dense(cfg, x, 3 * C, "c_attn", "attn.c_attn"),
                                         ("batch", "length", "qkv"))  # [B, T, 3C]
        q, k, v = jnp.split(qkv, 3, axis=-1)
        q = checkpoint_name(q.reshape(B, T, N, H), "q")  # [B, T, N, H]
        k = checkpoint_name(k.reshape(B, T, N, H), "k")
        v = checkpoint_name(v.reshape(B, T, N, H), "v")
        if cache is None:
            # With documents, a position attends only to its own document's: mask [B, 1, T, T].
            mask = None if segments is None else segments[:, None, :, None] == segments[:, None, None, :]
            y = causal_attention(q, k, v, cfg.attention, mask)  # scale 1/sqrt(H)
        else:
            # Decoding: the cache holds S >= start + T positions ([B, N, S, H]); write ours at
            # [start, start + T), then attend to every cached position up to our own. Positions past a
            # query's own are masked, so stale or padded entries there never matter.
            write = lambda c, x: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
                c, x.transpose(0, 2, 1, 3).astype(c.dtype), start, axis=2)
            cache = {"k": write(cache["k"], k), "v": write(cache["v"], v)}
            y = cached_attention(q, cache["k"], cache["v"], start)
        y = checkpoint_name(y.reshape(B, T, C), "attn_out")
        return _dense(cfg, y, C, "c_proj", "attn.c_proj"), cache


class MLP(nn.Module):
    """Two dense layers around a tanh-approximated GELU, hidden size 4C."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = _dense(cfg, x, 4 * cfg.n_embd, "c_fc", "mlp.c_fc")  # [B, T, 4C]
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = checkpoint_name(jax.nn.gelu(h, approximate=True), "mlp_hidden")
        return _dense(cfg, h, cfg.n_embd, "c_proj", "mlp.c_proj")


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array, cache: dict | None, start: jax.Array | int,
                 segments: jax.Array | None = None) -> tuple[jax.Array, dict | None]:
        cfg = self.config
        ln = lambda name: nn.LayerNorm(  # noqa: E731
            epsilon=1e-5, dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype), name=name)
        a, cache = Attention(cfg, name="attn")(ln("ln_1")(x), cache, start, segments)
        x = x + a
        x = x + MLP(cfg, name="mlp")(ln("ln_2")(x))
        return nn.with_logical_constraint(x, ACTIVATION_AXES), cache


class GPT2(nn.Module):
    """The language model: tokens [B, T] -> next-token logits [B, T, V] (float32)."""

    config: GPT2Config

    def setup(self):
        cfg = self.config
        init = nn.initializers.normal(0.02)
        self.wte = self.param("wte", init, (cfg.n_vocab, cfg.n_embd), _dtype(cfg.param_dtype))
        self.wpe = self.param("wpe", nn.initializers.normal(0.01), (cfg.n_ctx, cfg.n_embd), _dtype(cfg.param_dtype))
        block = Block
        if cfg.remat != "none":
            # Inside a scan the loop itself keeps XLA from merging the recomputation away.
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            # One block traced and compiled once, looped n_layer times: params live under "h" with a
            # leading [n_layer] axis; the residual stream is the carry, each layer's cache slice an input.
            self.h = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                             in_axes=(0, nn.broadcast, nn.broadcast), length=cfg.n_layer)(cfg, name="h")
        else:
            self.h = [block(cfg, name=f"h_{i}") for i in range(cfg.n_layer)]
        self.ln_f = nn.LayerNorm(epsilon=1e-5, dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype))

    def hidden(self, tokens: jax.Array, cache: Any = None, start: jax.Array | int = 0,
               segments: jax.Array | None = None) -> tuple[jax.Array, Any]:
        """Final-LayerNorm hidden states [B, T, C] and the updated cache (laid out as init_cache's).

        With `segments` [B, T] (document_segments; no cache), each document sees only itself and its
        positions restart at 0, so a packed document is computed exactly as if it were alone.
        """
        cfg = self.config
        T = tokens.shape[1]
        positions = start + jnp.arange(T)  # absolute positions, offset by what the cache holds
        if segments is not None:  # minus where each position's document starts: [B, T]
            starts = jnp.where(jnp.diff(segments, axis=1, prepend=segments[:, :1]) != 0, jnp.arange(T), 0)
            positions = positions - jax.lax.cummax(starts, axis=1)
        x = (jnp.take(self.wte, tokens, axis=0) + jnp.take(self.wpe, positions, axis=0)).astype(_dtype(cfg.dtype))
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        if cfg.scan_layers:
            x, new_cache = self.h(x, cache, start, segments)
            return self.ln_f(x), new_cache
        new_cache = None if cache is None else []
        for i, block in enumerate(self.h):
            x, layer_cache = block(x, None if cache is None else cache[i], start, segments)
            if cache is not None:
                new_cache.append(layer_cache)
        return self.ln_f(x), new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Logits tied to the token embedding, accumulated and returned in float32."""
        return tied_logits(hidden, self.wte, self.config.vocab_multiple)

    def __call__(self, tokens: jax.Array, cache: Any = None, start: jax.Array | int = 0,
                 segments: jax.Array | None = None):
        """Logits [B, T, V]; with a cache, returns (logits, updated cache); segments as in hidden."""
        h, new_cache = self.hidden(tokens, cache, start, segments)
        logits = self.logits(h)
        return logits if cache is None else (logits, new_cache)


def tied_logits(hidden: jax.Array, wte: jax.Array, vocab_multiple: int = 1) -> jax.Array:
    """hidden [..., C] @ wte[V, C].T -> float32 logits [..., V].

    With vocab_multiple > 1 the matmul runs over wte zero-padded to a multiple of it rows (GPUs
    prefer such shapes: 50257 -> 50304 for 128), then the padded columns are sliced off, so the
    result is exactly the unpadded one; the padding is never stored in the params. 0 is auto
    (vocab_padding).
    """
    V = wte.shape[0]
    pad = (-V) % vocab_padding(vocab_multiple, jax.default_backend())
    w = jnp.pad(wte.astype(hidden.dtype), ((0, pad), (0, 0))) if pad else wte.astype(hidden.dtype)
    logits = _float32_logits(hidden, w)  # [..., V + pad]
    return logits[..., :V] if pad else logits


@jax.custom_vjp
def _float32_logits(hidden: jax.Array, w: jax.Array) -> jax.Array:
    """hidden [..., C] @ w[V, C].T, accumulated and returned in float32 [..., V]."""
    return jnp.einsum("...c,vc->...v", hidden, w, preferred_element_type=jnp.float32)


def _float32_logits_fwd(hidden: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple]:
    return _float32_logits(hidden, w), (hidden, w)


def _float32_logits_bwd(saved: tuple, d_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    # Autodiff would run both backward matmuls as float32 [..., V] x bf16 -> float32, off the bf16
    # tensor cores (the GPU profile in BENCHMARKS.md shows their cost). Rounding the cotangent to the
    # compute dtype first makes them bf16 x bf16 with float32 accumulation, as under torch autocast;
    # in float32 this is autodiff's computation (the weight gradient's dot in another orientation).
    hidden, w = saved
    d_logits = d_logits.astype(hidden.dtype)
    d_hidden = jnp.einsum("...v,vc->...c", d_logits, w, preferred_element_type=jnp.float32)
    if hidden.dtype == jnp.float32:  # XLA:CPU transposed the [..., V] cotangent for [V, C]: transpose [C, V] instead
        d_w = jnp.einsum("...c,...v->cv", hidden, d_logits).T
    else:  # (XLA:CPU runs no 16-bit dot in that orientation; GPUs lay out either alike)
        d_w = jnp.einsum("...v,...c->vc", d_logits, hidden, preferred_element_type=jnp.float32)
    return d_hidden.astype(hidden.dtype), d_w.astype(w.dtype)


_float32_logits.defvjp(_float32_logits_fwd, _float32_logits_bwd)


def init_cache(config: GPT2Config, batch_size: int, length: int) -> Any:
    """Zeroed key/value buffers of a fixed length S: one {k, v} of [B, N, S, H] per layer, or with
    scan_layers a single {k, v} of [n_layer, B, N, S, H]."""
    shape = (batch_size, config.n_head, length, config.n_embd // config.n_head)
    if config.scan_layers:
        zeros = jnp.zeros((config.n_layer, *shape), _dtype(config.dtype))
        return {"k": zeros, "v": zeros}
    zeros = jnp.zeros(shape, _dtype(config.dtype))
    return [{"k": zeros, "v": zeros} for _ in range(config.n_layer)]


def _is_model_params(tree: Any) -> bool:
    return isinstance(tree, dict) and "wte" in tree and ("h" in tree or "h_0" in tree)


def convert_layout(tree: Any, scan_layers: bool) -> Any:
    """Any tree holding model params (params, gradients, optimizer state) with its blocks stacked
    under "h" (scan_layers=True) or unrolled as h_0 ... h_{L-1}; a tree already so is returned as is."""
    def convert(p):
        if not _is_model_params(p) or scan_layers == ("h" in p):
            return p
        rest = {k: v for k, v in p.items() if k != "h" and not k.startswith("h_")}
        if scan_layers:
            blocks = [p[f"h_{i}"] for i in range(sum(k.startswith("h_") for k in p))]
            return {**rest, "h": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
        n_layer = jax.tree.leaves(p["h"])[0].shape[0]
        return {**rest, **{f"h_{i}": jax.tree.map(lambda x, i=i: x[i], p["h"]) for i in range(n_layer)}}
    return jax.tree.map(convert, tree, is_leaf=_is_model_params)


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: GPT2Config, rng: jax.Array) -> dict:
    """Fresh parameters (normal(0.02) weights as OpenAI's model.py; wpe normal(0.01)), in one compiled call.

    Drawn unrolled and then laid out, so a seed gives the same weights with or without scan_layers.
    """
    unrolled = dataclasses.replace(config, scan_layers=False)
    return convert_layout(GPT2(unrolled).init(rng, jnp.zeros((1, 1), jnp.int32)), config.scan_layers)


def param_shapes(config: GPT2Config) -> dict:
    """Shapes and dtypes of the parameters (ShapeDtypeStructs), computed without allocating them."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


# --- LoRA adapters: added to loaded weights, split from the base, merged into it -------------------

def split_lora(params: Any) -> tuple[dict, dict]:
    """(adapters, base): the leaves inside LoRA adapters and the rest, as two nested dicts."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(params)
    adapters = {k: v for k, v in flat.items() if is_lora_path(k)}
    return (traverse_util.unflatten_dict(adapters),
            traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in adapters}))


def join_lora(adapters: dict, base: dict) -> dict:
    """The params tree of split_lora's two parts."""
    from flax import traverse_util

    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(base), **traverse_util.flatten_dict(adapters)})


LORA_DEFAULTS = {"lora_alpha": 16.0, "lora_targets": "attn.c_attn"}  # documented in experiments/base.py


def lora_fields(train: Mapping[str, Any]) -> dict[str, Any]:
    """train.lora_* (of a config, or of a saved run_config.json's "train") as GPT2Config fields; {} without LoRA:
    the one reader of train.lora_*."""
    rank = int(train.get("lora_rank") or 0)
    if not rank:
        return {}
    targets = str(train.get("lora_targets", LORA_DEFAULTS["lora_targets"]))
    return {"lora_rank": rank, "lora_alpha": float(train.get("lora_alpha", LORA_DEFAULTS["lora_alpha"])),
            "lora_targets": tuple(t.strip() for t in targets.split(",") if t.strip())}


def add_lora(config: GPT2Config, params: Any, rng: jax.Array) -> dict:
    """Base params (a pretrained model's) with fresh adapters for config's LoRA settings (b zero: the
    model computes exactly what the base does)."""
    adapters, _ = split_lora(jax.eval_shape(lambda: init_params(config, rng)))
    keys = iter(jax.random.split(rng, len(jax.tree.leaves(adapters))))

    def fresh(path, leaf):
        if getattr(path[-1], "key", None) == "b":
            return jnp.zeros(leaf.shape, leaf.dtype)
        bound = 1.0 / math.sqrt(leaf.shape[-2])  # a [..., in, r]
        return jax.random.uniform(next(keys), leaf.shape, leaf.dtype, -bound, bound)
    return join_lora(jax.tree_util.tree_map_with_path(fresh, adapters), split_lora(params)[1])


def merge_lora(config: GPT2Config, params: Any) -> tuple[GPT2Config, dict]:
    """A plain GPT-2 (no adapters) computing what the adapted one does: each adapted kernel += a @ b * alpha / r."""
    from flax import traverse_util

    if not config.lora_rank:
        return config, params
    adapters, base = split_lora(params)
    merged, scale = traverse_util.flatten_dict(base), config.lora_alpha / config.lora_rank
    flat_adapters = traverse_util.flatten_dict(adapters)
    for path, a in flat_adapters.items():
        if path[-1] != "a":
            continue
        b = flat_adapters[path[:-1] + ("b",)]
        kernel = path[:-2] + (path[-2].removesuffix("_lora"), "kernel")  # [..., in, out], stacked or not
        delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32)) * scale
        merged[kernel] = (merged[kernel].astype(jnp.float32) + delta).astype(merged[kernel].dtype)
    return dataclasses.replace(config, lora_rank=0), traverse_util.unflatten_dict(merged)
