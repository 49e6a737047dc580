"""Muon + AdamW (gpt2_jax/muon.py) against transformers' GPT-2 trained by torch.optim.Muon + torch.optim.AdamW."""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from conftest import random_hf_model, save_hf_model
from gpt2_jax.errors import UserError
from gpt2_jax.model import convert_layout
from gpt2_jax.muon import labels, lr_ratio, muon_with_adamw, newton_schulz
from gpt2_jax.train import loss_fn
from gpt2_jax.weights import _tensor_names, load_weights

# Kernels c_attn [32, 96], attn.c_proj [32, 32], c_fc [32, 128], mlp.c_proj [128, 32]: every orientation and ratio.
N_VOCAB, N_CTX, C, N_LAYER = 128, 16, 32, 2
MUON_LR, ADAMW_LR, B1, B2, EPS = 0.02, 3e-3, 0.9, 0.95, 1e-8
MUON_WD, ADAMW_WD, MOMENTUM = 0.1, 0.1, 0.95
NS = (3.4445, -4.7750, 2.0315)
# transformers' names of the block matrices (Conv1D weights, stored [in, out] as our kernels).
MUON_HF = re.compile(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")


def schedule(peak: float) -> optax.Schedule:
    """A schedule whose value changes every step, so a step evaluated at the wrong count shows."""
    return optax.linear_schedule(peak, 0.25 * peak, 4)


def decay_mask(params):
    """The run's mask (kernels decayed) plus wpe, so that AdamW's weight decay is exercised here too: under the
    run's own mask no leaf of the AdamW group is decayed."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) in ("kernel", "wpe"), params)


def is_decayed_hf(name: str) -> bool:
    return name.endswith(".weight") and (".c_" in name or "wpe" in name)


def float32_newtonschulz(grad, ns_coefficients, ns_steps, eps):
    """torch 2.13's torch.optim._muon._zeropower_via_newtonschulz with float32 for its hard-wired bfloat16."""
    a, b, c = ns_coefficients
    ortho_grad = grad.to(torch.float32, copy=True)  # (.float() of a float32 tensor is itself, and div_ is in place)
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    ortho_grad.div_(ortho_grad.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram_matrix = ortho_grad @ ortho_grad.T
        gram_update = torch.addmm(gram_matrix, gram_matrix, gram_matrix, beta=b, alpha=c)
        ortho_grad = torch.addmm(ortho_grad, gram_update, ortho_grad, beta=a)
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    return ortho_grad


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_hf_model(random_hf_model(n_vocab=N_VOCAB, n_ctx=N_CTX, n_embd=C, n_layer=N_LAYER, seed=3),
                         tmp_path_factory.mktemp("muon") / "model")


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, N_VOCAB, (4, N_CTX + 1)).astype(np.int32)  # one window, every step


class Run(NamedTuple):
    losses: list[float]  # before each step
    weights: dict[str, np.ndarray]  # after the last, by transformers' name without "transformer."
    momentum: dict[str, np.ndarray]  # Muon's momentum buffers by their weights' names (not split_qkv's q, k, v)


def run_torch(model_dir, tokens, steps: int, adjust_lr: str = "original", split_qkv: bool = False) -> Run:
    """torch.optim.Muon on the block matrices and AdamW on the rest of transformers' GPT2LMHeadModel (lm_head is
    wte: one parameter, in the AdamW group)."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()  # no dropout: gpt2_jax's model has none
    named = dict(model.named_parameters())  # the tied lm_head.weight appears once, as transformer.wte.weight
    # torch.optim.Muon reads a weight as [out, in] (nn.Linear's layout) and scales the lr by
    # sqrt(max(1, shape[0] / shape[1])); Conv1D's weight is [in, out], so it would compute the inverse ratio.
    # Each matrix gets its own group whose lr is multiplied by kappa = (the layer's true ratio) / (torch's) and
    # whose weight decay is divided by it: torch's adjusted lr is then ours, and its decay lr * wd unchanged.
    muon_groups, blocks = [], []  # blocks: (fused c_attn weight, its three [C, C] parameters q, k, v)

    def muon_group(p: torch.Tensor) -> dict:
        kappa = lr_ratio(p.shape[0], p.shape[1], adjust_lr) / torch.optim._muon._adjust_lr(1.0, adjust_lr, p.shape)
        return {"params": [p], "kappa": kappa, "weight_decay": MUON_WD / kappa}

    for name, p in named.items():
        if not MUON_HF.fullmatch(name):
            continue
        if split_qkv and ".c_attn." in name:  # Muon on q, k and v as three parameters, copied back after each step
            parts = [torch.nn.Parameter(p.detach()[:, i * C:(i + 1) * C].clone()) for i in range(3)]
            blocks.append((p, parts))
            muon_groups += [muon_group(q) for q in parts]
        else:
            muon_groups.append(muon_group(p))
    rest = [n for n in named if not MUON_HF.fullmatch(n)]
    adamw_groups = [{"params": [named[n] for n in rest if is_decayed_hf(n) == decayed],
                     "weight_decay": ADAMW_WD if decayed else 0.0} for decayed in (True, False)]
    muon_opt = torch.optim.Muon(muon_groups, lr=MUON_LR, momentum=MOMENTUM, nesterov=True, adjust_lr_fn=adjust_lr)
    adamw_opt = torch.optim.AdamW(adamw_groups, lr=ADAMW_LR, betas=(B1, B2), eps=EPS)
    inputs, targets = torch.tensor(tokens[:, :-1], dtype=torch.long), torch.tensor(tokens[:, 1:], dtype=torch.long)
    muon_lr, adamw_lr, losses = schedule(MUON_LR), schedule(ADAMW_LR), []
    for t in range(steps):  # the lr of step t is the schedule at t, as optax evaluates it at its count
        for group in muon_opt.param_groups:
            group["lr"] = float(muon_lr(t)) * group["kappa"]
        for group in adamw_opt.param_groups:
            group["lr"] = float(adamw_lr(t))
        model.zero_grad()
        logits = model(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, N_VOCAB), targets.reshape(-1))
        loss.backward()
        losses.append(loss.item())
        for fused, parts in blocks:
            for i, q in enumerate(parts):
                q.grad = fused.grad[:, i * C:(i + 1) * C].clone()
        muon_opt.step()
        adamw_opt.step()
        with torch.no_grad():
            for fused, parts in blocks:
                fused.copy_(torch.cat([q.detach() for q in parts], dim=1))
    weights = {k.removeprefix("transformer."): v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return Run(losses, weights, {name.removeprefix("transformer."): muon_opt.state[p]["momentum_buffer"].numpy().copy()
                                 for name, p in named.items() if p in muon_opt.state})


def run_jax(model_dir, tokens, steps: int, **muon_settings) -> Run:
    """gpt2_jax's next-token loss and muon_with_adamw."""
    config, params = load_weights(model_dir)
    optimizer = muon_with_adamw(muon_lr=schedule(MUON_LR), adamw_lr=schedule(ADAMW_LR), b1=B1, b2=B2, eps=EPS,
                                adamw_weight_decay=ADAMW_WD, decay_mask=decay_mask, momentum=MOMENTUM,
                                weight_decay=MUON_WD, **muon_settings)

    @jax.jit
    def step(params, opt_state):  # train.py's next-token loss, differentiated and updated as its train step does
        loss, grads = jax.value_and_grad(loss_fn)(params, jnp.asarray(tokens), jax.random.key(0), config)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = optimizer.init(params), []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    # optax.trace's state is torch's momentum_buffer: a params tree, with optax.MaskedNode outside the Muon group
    trace = next(s.trace for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.TraceState))
                 if isinstance(s, optax.TraceState))
    return Run(losses, by_hf_name(params),
               {n: b for n, b in by_hf_name(trace).items() if MUON_HF.fullmatch("transformer." + n)})


def by_hf_name(params) -> dict[str, np.ndarray]:
    """Unrolled params as numpy arrays by transformers' names (without "transformer.")."""
    weights = {}
    for name in _tensor_names(N_LAYER):
        leaf = params["params"]
        for key in name.path:
            leaf = leaf[key]
        weights[name.hf] = np.asarray(leaf)
    return weights


def without_key_bias(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weights with the key third [C:2C] of each attn.c_attn.bias zeroed. Adding a key bias shifts each query's
    logits by one constant, which softmax ignores: its gradient is rounding noise, which AdamW's m / sqrt(v) turns
    into full steps of either sign on either side."""
    out = dict(weights)
    for name in out:
        if name.endswith("attn.c_attn.bias"):
            out[name] = out[name].copy()
            out[name][C:2 * C] = 0
    return out


def compare(ours: dict, theirs: dict, initial: dict, weight_tol: float, change_tol: float) -> None:
    """Every weight within weight_tol of its tensor's largest value, and what the steps changed within change_tol
    of the tensor's largest change."""
    ours, theirs, initial = without_key_bias(ours), without_key_bias(theirs), without_key_bias(initial)
    for name, reference in theirs.items():
        if name == "lm_head.weight":  # wte itself, tied
            continue
        np.testing.assert_allclose(ours[name], reference, rtol=0, atol=weight_tol * np.abs(reference).max(),
                                   err_msg=name)
        change = reference - initial[name]
        np.testing.assert_allclose(ours[name] - initial[name], change, rtol=0, atol=change_tol * np.abs(change).max(),
                                   err_msg=name)


@pytest.fixture(scope="module")
def initial(model_dir):
    return by_hf_name(load_weights(model_dir)[1])


def test_five_steps_equal_torch_muon_and_adamw_with_float32_newton_schulz(model_dir, tokens, initial, monkeypatch):
    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", float32_newtonschulz)
    theirs, ours = run_torch(model_dir, tokens, 5), run_jax(model_dir, tokens, 5, ns_dtype="float32")
    np.testing.assert_allclose(ours.losses, theirs.losses, rtol=1e-5)  # measured: <= 2.3e-7
    assert theirs.losses[-1] < theirs.losses[0] - 0.5
    # Measured: weights <= 1.6e-6 of their tensor's largest value, changes <= 1.2e-5 of the largest change.
    compare(ours.weights, theirs.weights, initial, weight_tol=1e-5, change_tol=1e-4)
    for name, weight in theirs.weights.items():  # the block matrices moved by 3-20% of their largest value
        if MUON_HF.fullmatch("transformer." + name):
            assert np.abs(weight - initial[name]).max() > 0.02 * np.abs(initial[name]).max()
    # The momentum (which Newton-Schulz's normalisation would hide a scale of): torch's lerp, not a plain sum.
    assert sorted(ours.momentum) == sorted(theirs.momentum) and len(theirs.momentum) == 4 * N_LAYER
    for name, buffer in theirs.momentum.items():
        np.testing.assert_allclose(ours.momentum[name], buffer, rtol=0, atol=1e-5 * np.abs(buffer).max(), err_msg=name)


def test_bfloat16_newton_schulz_is_torchs():
    # The same matrices in, torch's bfloat16 iteration and ours round alike but where a float32 sum is accumulated in
    # another order (most elements come out bitwise equal). Measured: the mean |ours - torch's| relative to the
    # largest element, averaged over the four shapes, 1.6e-4; ns_dtype=float32 is 3.7e-3 from torch's bfloat16.
    generator = torch.Generator().manual_seed(0)
    ours_bf16, ours_f32 = [], []
    for shape in [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)]:
        g = torch.randn(shape, generator=generator)
        reference = torch.optim._muon._zeropower_via_newtonschulz(g, NS, 5, 1e-7).float().numpy()
        scale = np.abs(reference).max()
        for dtype, distances in (("bfloat16", ours_bf16), ("float32", ours_f32)):
            ours = np.asarray(newton_schulz(jnp.asarray(g.numpy()), 5, dtype))
            distances.append(np.abs(ours - reference).mean() / scale)
        np.testing.assert_allclose(np.asarray(newton_schulz(jnp.asarray(g.numpy()), 5, "float32")),
                                   float32_newtonschulz(g, NS, 5, 1e-7).numpy(), rtol=0, atol=1e-5 * scale)
    assert np.mean(ours_bf16) < 1e-3 < 2e-3 < np.mean(ours_f32)


def test_five_steps_with_bfloat16_newton_schulz_within_its_rounding_of_torch(model_dir, tokens, initial):
    # torch unchanged (its iteration in bfloat16) against ns_dtype=bfloat16. The gradients differ in their last
    # float32 bits, which moves some elements across a bfloat16 rounding boundary, and Newton-Schulz amplifies the
    # directions of the gradient's small singular values (down to 1e-8 of the largest here) by up to 3.4445^5.
    # Measured, as the tests compile (conftest's fast-compile flag) and without it: losses 1.1e-5 and 2.1e-5,
    # weights 4.6e-3 and 1.5e-2 of their largest value, changes 2.3e-2 and 7.7e-2 of the largest change: as far as
    # ns_dtype=float32 is from torch's bfloat16 (test_bfloat16_newton_schulz_is_torchs tells those two apart).
    theirs, ours = run_torch(model_dir, tokens, 5), run_jax(model_dir, tokens, 5, ns_dtype="bfloat16")
    np.testing.assert_allclose(ours.losses, theirs.losses, rtol=1e-4)
    compare(ours.weights, theirs.weights, initial, weight_tol=5e-2, change_tol=0.25)


def test_split_qkv_orthogonalizes_q_k_and_v_apart(model_dir, tokens, initial, monkeypatch):
    # The reference runs torch.optim.Muon on q, k and v as three [C, C] parameters (run_torch). Measured: weights
    # <= 1.4e-6, changes <= 1.2e-5; the fused update (split_qkv=False) is 0.13 and 0.93 away.
    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", float32_newtonschulz)
    theirs = run_torch(model_dir, tokens, 3, split_qkv=True)
    ours = run_jax(model_dir, tokens, 3, ns_dtype="float32", split_qkv=True)
    np.testing.assert_allclose(ours.losses, theirs.losses, rtol=1e-5)
    compare(ours.weights, theirs.weights, initial, weight_tol=1e-5, change_tol=1e-4)


def test_match_rms_adamw_equals_torch(model_dir, tokens, initial, monkeypatch):
    # 0.2 * sqrt(max(fan_in, fan_out)) is symmetric in the fans: torch's reading of Conv1D weights as [out, in] gives
    # the layer's own ratio here (run_torch's kappa is 1). Measured: weights <= 1.3e-6, changes <= 1.3e-5.
    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", float32_newtonschulz)
    theirs = run_torch(model_dir, tokens, 3, adjust_lr="match_rms_adamw")
    ours = run_jax(model_dir, tokens, 3, ns_dtype="float32", adjust_lr="match_rms_adamw")
    np.testing.assert_allclose(ours.losses, theirs.losses, rtol=1e-5)
    compare(ours.weights, theirs.weights, initial, weight_tol=1e-5, change_tol=1e-4)


def test_scan_layers_updates_equal_unrolled(model_dir, tokens):
    # In bfloat16 (the default), where a last-bit difference would grow, and with split_qkv (c_attn's [n_layer, C, 3C]
    # as [n_layer * 3] matrices [C, C]; the other kernels as [n_layer] matrices).
    config, unrolled = load_weights(model_dir)
    grads = jax.jit(jax.grad(loss_fn), static_argnums=3)(unrolled, jnp.asarray(tokens), jax.random.key(0), config)
    optimizer = muon_with_adamw(muon_lr=schedule(MUON_LR), adamw_lr=schedule(ADAMW_LR), b1=B1, b2=B2, eps=EPS,
                                adamw_weight_decay=ADAMW_WD, decay_mask=decay_mask, weight_decay=MUON_WD,
                                split_qkv=True)
    update = jax.jit(optimizer.update)
    stacked = convert_layout(unrolled, True)
    assert stacked["params"]["h"]["attn"]["c_attn"]["kernel"].shape == (N_LAYER, C, 3 * C)
    state_u, state_s = optimizer.init(unrolled), optimizer.init(stacked)
    for i in range(2):  # the second step meets momentum
        g = jax.tree.map(lambda x: x * (1.0 - 0.3 * i), grads)
        updates_u, state_u = update(g, state_u, unrolled)
        updates_s, state_s = update(convert_layout(g, True), state_s, stacked)
        jax.tree.map(np.testing.assert_array_equal, convert_layout(updates_s, False), updates_u)
        unrolled, stacked = optax.apply_updates(unrolled, updates_u), optax.apply_updates(stacked, updates_s)
    jax.tree.map(np.testing.assert_array_equal, convert_layout(state_s, False), state_u)


def test_labels_put_the_block_matrices_in_muon(model_dir):
    _, unrolled = load_weights(model_dir)
    for params in (unrolled, convert_layout(unrolled, True)):
        flat = {jax.tree_util.keystr(path): label
                for path, label in jax.tree_util.tree_flatten_with_path(labels(params))[0]}
        muon = sorted(path for path, label in flat.items() if label == "muon")
        assert set(flat.values()) == {"muon", "adamw"}
        blocks = ["h"] if "h" in params["params"] else [f"h_{i}" for i in range(N_LAYER)]
        assert muon == sorted(f"['params']['{block}']['{layer.split('.')[0]}']['{layer.split('.')[1]}']['kernel']"
                              for block in blocks for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))


def test_lr_ratio_of_the_kernels_from_their_fans():
    # Kernels are [in, out]: fan_in = C, fan_out = 3C for c_attn, 4C for c_fc; mlp.c_proj [4C, C] fans out less.
    assert lr_ratio(C, 3 * C) == pytest.approx(math.sqrt(3))
    assert lr_ratio(C, 4 * C) == pytest.approx(2.0)
    assert lr_ratio(4 * C, C) == 1.0
    assert lr_ratio(C, C) == 1.0
    assert lr_ratio(C, 3 * C, "match_rms_adamw") == pytest.approx(0.2 * math.sqrt(3 * C))
    assert lr_ratio(4 * C, C, "match_rms_adamw") == pytest.approx(0.2 * math.sqrt(4 * C))
    # torch reads the same [in, out] weights as [out, in]: the inverse ratio (run_torch corrects it)
    assert torch.optim._muon._adjust_lr(1.0, "original", (C, 4 * C)) == 1.0
    assert torch.optim._muon._adjust_lr(1.0, "original", (4 * C, C)) == pytest.approx(2.0)


@pytest.mark.parametrize("setting, message", [
    (dict(ns_steps=0), "muon.ns_steps=0"), (dict(momentum=1.0), "muon.momentum=1.0"),
    (dict(momentum=-0.1), "muon.momentum=-0.1"), (dict(adjust_lr="spectral"), "muon.adjust_lr='spectral'"),
    (dict(ns_dtype="float16"), "muon.ns_dtype='float16'"), (dict(weight_decay=-1.0), "muon.weight_decay=-1.0")])
def test_bad_settings_are_one_line_errors(setting, message):
    with pytest.raises(UserError, match=re.escape(message)) as error:
        muon_with_adamw(muon_lr=0.02, adamw_lr=3e-4, b1=B1, b2=B2, eps=EPS, adamw_weight_decay=0.0, decay_mask=None,
                        **setting)
    assert "\n" not in str(error.value)


# --- Through the run: train.optimizer=muon --------------------------------------------------------------------

def _run_config(tmp_path, **more):
    from conftest import FIXTURES
    from test_loop import tiny_config

    fields = {"train.optimizer": "muon", "muon.learning_rate": 0.01, "train.learning_rate": 1e-3,
              "train.lr_schedule": "wsd", "train.total_steps": 6, "checkpoint.save_every": 3, "train.noise": 0.1}
    return tiny_config(tmp_path, FIXTURES / "make_openai_checkpoint.py", **{**fields, **more})


def test_a_muon_run_resumes_bitwise_and_its_state_is_muons(tmp_path):
    from gpt2_jax import loop
    from gpt2_jax.rundir import load_run_params

    loop.run(_run_config(tmp_path / "straight"))
    loop.run(_run_config(tmp_path / "resumed", **{"train.total_steps": 3}))
    loop.run(_run_config(tmp_path / "resumed"))
    straight = load_run_params(tmp_path / "straight" / "checkpoint" / "run1")[1]
    resumed = load_run_params(tmp_path / "resumed" / "checkpoint" / "run1")[1]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), straight, resumed)
    from test_loop import TINY_MODEL

    start = load_weights(TINY_MODEL)[1]
    moved = float(np.abs(np.asarray(straight["params"]["h_0"]["attn"]["c_proj"]["kernel"])
                         - np.asarray(start["params"]["h_0"]["attn"]["c_proj"]["kernel"])).max())
    assert moved > 1e-3  # Muon's orthogonal update moved the block matrix


def test_switching_to_muon_on_resume_or_with_flat_state_or_lora_is_one_line(tmp_path):
    from gpt2_jax import loop

    loop.run(_run_config(tmp_path, **{"train.optimizer": "adam", "train.total_steps": 2,
                                      "train.lr_schedule": "constant"}))
    with pytest.raises(UserError, match=r"trained with train.optimizer: adam \(now muon\)"):
        loop.run(_run_config(tmp_path, **{"train.total_steps": 4}))
    with pytest.raises(UserError, match="train.optimizer=muon .* train.flat_optimizer=False"):
        loop.run(_run_config(tmp_path / "flat", **{"train.flat_optimizer": True}))
    with pytest.raises(UserError, match=r"train.optimizer=muon with LoRA"):
        loop.run(_run_config(tmp_path / "lora", **{"train.lora_rank": 2}))
    with pytest.raises(UserError, match=r"muon.ns_dtype='float16': use one of bfloat16, float32"):
        loop.run(_run_config(tmp_path / "dtype", **{"muon.ns_dtype": "float16"}))


def test_the_muon_section_documents_muons_defaults():
    from experiments import base
    from gpt2_jax.muon import DEFAULTS

    assert dict(base.get_config().muon) == DEFAULTS
