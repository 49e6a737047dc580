"""Model directories in and out: OpenAI's release layout, transformers' layout, export to transformers;
a Hugging Face hub id (`gpt2`, `openai-community/gpt2-medium`, ...) names its snapshot in the local hub cache.

Every layout is mapped through one table (`_tensor_names`) from this project's parameter paths to
OpenAI's TensorFlow variable names and transformers' state-dict keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import jax
import numpy as np

from gpt2_jax import storage
from gpt2_jax.rundir import files_dir, is_run_dir, load_run_params
from gpt2_jax.encoder import find_vocab, get_encoder
from gpt2_jax.errors import UserError
from gpt2_jax.model import GPT2Config, convert_layout, param_shapes
from gpt2_jax.tf_checkpoint import checkpoint_prefix, read_checkpoint

Params = dict  # {"params": {...}} as returned by GPT2(config).init


class TensorName(NamedTuple):
    path: tuple[str, ...]  # path inside params["params"]
    openai: str  # TensorFlow variable of OpenAI's checkpoint
    hf: str  # transformers' GPT2LMHeadModel key, without the "transformer." prefix


def _tensor_names(n_layer: int) -> Iterator[TensorName]:
    yield TensorName(("wte",), "model/wte", "wte.weight")
    yield TensorName(("wpe",), "model/wpe", "wpe.weight")
    for i in range(n_layer):
        for ours, theirs in (("ln_1", "ln_1"), ("ln_2", "ln_2")):
            yield TensorName((f"h_{i}", ours, "scale"), f"model/h{i}/{theirs}/g", f"h.{i}.{theirs}.weight")
            yield TensorName((f"h_{i}", ours, "bias"), f"model/h{i}/{theirs}/b", f"h.{i}.{theirs}.bias")
        for module, layer in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")):
            tf, hf = f"model/h{i}/{module}/{layer}", f"h.{i}.{module}.{layer}"
            yield TensorName((f"h_{i}", module, layer, "kernel"), f"{tf}/w", f"{hf}.weight")
            yield TensorName((f"h_{i}", module, layer, "bias"), f"{tf}/b", f"{hf}.bias")
    yield TensorName(("ln_f", "scale"), "model/ln_f/g", "ln_f.weight")
    yield TensorName(("ln_f", "bias"), "model/ln_f/b", "ln_f.bias")


def _assemble(config: GPT2Config, fetch: Callable[[TensorName], np.ndarray | None], source: str) -> Params:
    """Build params by fetching each tensor, checking it exists and has the expected shape."""
    shapes = param_shapes(dataclasses.replace(config, scan_layers=False))["params"]
    out: dict = {}
    for name in _tensor_names(config.n_layer):
        expected = shapes
        for key in name.path:
            expected = expected[key]
        value = fetch(name)
        if value is None:
            raise UserError(f"{source}: tensor {name.openai} / {name.hf} is missing")
        value = np.asarray(value)
        if value.shape != expected.shape:
            value_squeezed = value.reshape(value.shape[1:]) if value.ndim == 3 and value.shape[0] == 1 else value
            if value_squeezed.shape != expected.shape:
                raise UserError(f"{source}: tensor {name.hf} has shape {list(value.shape)} but the config "
                                f"(n_vocab={config.n_vocab}, n_ctx={config.n_ctx}, n_embd={config.n_embd}) "
                                f"needs {list(expected.shape)}")
            value = value_squeezed
        node = out
        for key in name.path[:-1]:
            node = node.setdefault(key, {})
        node[name.path[-1]] = jax.numpy.asarray(value, dtype=expected.dtype)
    return convert_layout({"params": out}, config.scan_layers)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); the file is damaged: restore it (download or export the "
                        "model again)") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: not a JSON object; the file is damaged: restore it (download or export the model "
                        "again)")
    return value


def _config_from(hparams: dict, source: Path, **overrides) -> GPT2Config:
    missing = [k for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer") if hparams.get(k) is None]
    if missing:
        raise UserError(f"{source}: missing key(s) {', '.join(missing)}")
    return GPT2Config(**{k: int(hparams[k]) for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")}, **overrides)


def _load_openai(model_dir: Path, **overrides) -> tuple[GPT2Config, Params]:
    config = read_config(model_dir, **overrides)
    prefix = checkpoint_prefix(model_dir)
    variables = read_checkpoint(prefix)
    return config, _assemble(config, lambda n: variables.get(n.openai), f"{prefix}")


def _hf_state_dict(model_dir: Path) -> tuple[dict[str, np.ndarray], str]:
    """transformers' tensors by key (any "transformer." prefix removed) and the file they came from."""
    from safetensors import safe_open

    files: list[Path]
    if (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    elif (model_dir / "model.safetensors.index.json").is_file():
        index_path = model_dir / "model.safetensors.index.json"
        weight_map = _read_json(index_path).get("weight_map")
        if not (isinstance(weight_map, dict) and weight_map and all(isinstance(f, str) for f in weight_map.values())):
            raise UserError(f"{index_path}: no weight_map naming the weight files; the file is damaged: restore it "
                            "(download or export the model again)")
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{index_path}: names {', '.join(missing)}, which does not exist; download or export "
                            "the model again")
    else:
        bin_path = model_dir / "pytorch_model.bin"
        try:
            import torch
        except ImportError:
            raise UserError(f"{bin_path}: reading PyTorch weights needs torch installed; or save the model "
                            "as model.safetensors") from None
        with storage.local_copy(bin_path) as local:
            state = torch.load(local, map_location="cpu", weights_only=True)
        return {k.removeprefix("transformer."): v.float().numpy() for k, v in state.items()}, str(bin_path)
    tensors = {}
    for f in files:
        try:
            with storage.local_copy(f) as local, safe_open(str(local), framework="flax") as st:
                for key in st.keys():
                    tensors[key.removeprefix("transformer.")] = np.asarray(st.get_tensor(key).astype("float32"))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type, and OSError
            if isinstance(e, UserError):
                raise
            raise UserError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0][:120]}); the file is "
                            "damaged or incomplete: download or export the model again") from None
    return tensors, str(files[0])


def _load_hf(model_dir: Path, **overrides) -> tuple[GPT2Config, Params]:
    config = read_config(model_dir, **overrides)
    tensors, source = _hf_state_dict(model_dir)
    return config, _assemble(config, lambda n: tensors.get(n.hf), source)


def _is_openai(d: Path) -> bool:
    return (d / "hparams.json").is_file() and checkpoint_prefix(d) is not None


def _is_hf(d: Path) -> bool:
    return (d / "config.json").is_file() and any(
        (d / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"))


# (description, detector, loader), tried in order.
LAYOUTS: list[tuple[str, Callable[[Path], bool], Callable[..., tuple[GPT2Config, Params]]]] = [
    ("gpt2-jax training run (run_config.json + orbax step directories)", is_run_dir, load_run_params),
    ("OpenAI release (hparams.json + model.ckpt.index/.data-*)", _is_openai, _load_openai),
    ("transformers (config.json + model.safetensors or pytorch_model.bin)", _is_hf, _load_hf),
]


def read_config(model_dir: str | Path, **overrides) -> GPT2Config:
    """The config of a model directory in any supported layout, without reading its weights."""
    d = files_dir(model_dir)  # a run's step directory: its run's hparams.json
    if (d / "hparams.json").is_file():  # OpenAI's layout and training runs
        return _config_from(_read_json(d / "hparams.json"), d / "hparams.json", **overrides)
    if (d / "config.json").is_file():
        hf = _read_json(d / "config.json")
        return _config_from({"n_vocab": hf.get("vocab_size"), "n_ctx": hf.get("n_positions", hf.get("n_ctx")),
                             "n_embd": hf.get("n_embd"), "n_head": hf.get("n_head"), "n_layer": hf.get("n_layer")},
                            d / "config.json", **overrides)
    return load_weights(d, **overrides)[0]  # raises the unknown-layout error


# The hub's names of OpenAI's GPT-2 sizes (also under openai-community/), and the release each one is.
HUB_SIZES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home) / "hub"


def from_hub_cache(name: str) -> Path | None:
    """The snapshot directory of a hub model id in the local cache (read offline; `gpt2` and
    `openai-community/gpt2` are the same model, cached under either name), or None."""
    if not _HUB_ID.match(name):
        return None
    from huggingface_hub import try_to_load_from_cache

    short = name.removeprefix("openai-community/")
    names = [name] + ([f"openai-community/{short}"] if "/" not in name else [short] if short != name else [])
    for repo in names:
        try:
            found = try_to_load_from_cache(repo, "config.json", cache_dir=str(hub_cache_dir()))
        except Exception:  # noqa: BLE001 - an id the hub library rejects is simply not in the cache
            continue
        if isinstance(found, str):
            return Path(found).parent
    return None


def find_model_dir(name: str | os.PathLike) -> Path:
    """A model directory given as a path or URL, or as a hub id found in the local hub cache (never the network)."""
    path = storage.path(name)
    if path.is_dir():
        return path
    if storage.is_url(path):
        raise UserError(f"model directory {path} does not exist")
    snapshot = from_hub_cache(str(name))
    if snapshot is not None:
        return snapshot
    short = str(name).removeprefix("openai-community/")
    if short in HUB_SIZES:
        raise UserError(f"{name}: not in the local Hugging Face cache ({hub_cache_dir()}); get it with "
                        f"`huggingface-cli download openai-community/{short}` (or `gpt2-jax download "
                        f"{HUB_SIZES[short]}` for OpenAI's release)")
    raise UserError(f"model directory {path} does not exist (nor a hub id in {hub_cache_dir()}); download one with "
                    "`gpt2-jax download 124M`")


def load_weights(model_dir: str | Path, ema: bool = False, **config_overrides) -> tuple[GPT2Config, Params]:
    """Config and params of a model directory (or cached hub id) in any supported layout (detected); with `ema`,
    a training run's moving average of its weights (train.ema_decay) instead of the weights."""
    d = find_model_dir(model_dir)
    if ema:
        if not is_run_dir(d):
            raise UserError(f"--ema: {d} is not a gpt2-jax training run, so it holds no moving average of the weights")
        return load_run_params(d, ema=True, **config_overrides)
    for _, detect, load in LAYOUTS:
        if detect(d):
            return load(d, **config_overrides)
    known = "; ".join(desc for desc, _, _ in LAYOUTS)
    raise UserError(f"{d}: not a model directory in a known layout. Known layouts: {known}")


def _save_safetensors(tensors: dict[str, np.ndarray], dest: storage.AnyPath) -> None:
    """A safetensors file with the mode a plain write gives (0666 less the umask: safetensors writes 0600); at a
    URL, written to a local temporary file and uploaded (the object appears whole)."""
    from safetensors.numpy import save_file

    if storage.is_url(dest):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="gpt2_jax_export_") as tmp:
            local = os.path.join(tmp, dest.name)
            save_file(tensors, local, metadata={"format": "pt"})
            storage.upload(local, dest)
        return
    save_file(tensors, str(dest), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(dest, 0o666 & ~umask)


def export_transformers(config: GPT2Config, params: Params, vocab_dir: str | Path,
                        out_dir: str | os.PathLike) -> storage.AnyPath:
    """Write `out_dir` (a local directory or a URL) in transformers' layout so
    GPT2LMHeadModel.from_pretrained(out_dir) loads it (from a local copy, for a URL)."""
    get_encoder(vocab_dir)  # the vocabulary parses (or one line naming its file) before anything is written
    vocab = find_vocab(vocab_dir)
    out = storage.path(out_dir)
    storage.mkdir(out)
    p = convert_layout(params, False)["params"]
    tensors = {}
    for name in _tensor_names(config.n_layer):
        value = p
        for key in name.path:
            value = value[key]
        tensors["transformer." + name.hf] = np.ascontiguousarray(np.asarray(value, dtype=np.float32))
    _save_safetensors(tensors, out / "model.safetensors")
    hf_config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.n_vocab, "n_positions": config.n_ctx, "n_ctx": config.n_ctx,
        "n_embd": config.n_embd, "n_head": config.n_head, "n_layer": config.n_layer, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "scale_attn_weights": True,
        "bos_token_id": config.n_vocab - 1, "eos_token_id": config.n_vocab - 1,
        "tie_word_embeddings": True, "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    (out / "vocab.json").write_bytes(vocab[0].read_bytes())
    (out / "merges.txt").write_bytes(vocab[1].read_bytes())
    return out


def export_peft(config: GPT2Config, params: Params, out_dir: str | os.PathLike, base_model: str) -> storage.AnyPath:
    """A LoRA model's adapters in peft's format (adapter_config.json + adapter_model.safetensors) in a local
    directory or a URL, so PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base_model), out_dir) loads
    them (from a local copy, for a URL)."""
    if not config.lora_rank:
        raise UserError("--adapter_only: this model has no LoRA adapters (it was trained with train.lora_rank=0); "
                        "export it whole, without --adapter_only")
    out = storage.path(out_dir)
    storage.mkdir(out)
    p = convert_layout(params, False)["params"]
    tensors = {}
    for i in range(config.n_layer):
        for target in config.lora_targets:
            module, layer = target.split(".")
            adapter = p[f"h_{i}"][module][f"{layer}_lora"]
            key = f"base_model.model.transformer.h.{i}.{target}"  # peft's Linear: A [r, in], B [out, r]
            tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(np.asarray(adapter["a"], np.float32).T)
            tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(np.asarray(adapter["b"], np.float32).T)
    _save_safetensors(tensors, out / "adapter_model.safetensors")
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": config.lora_rank, "lora_alpha": config.lora_alpha, "lora_dropout": 0.0,
        "target_modules": list(config.lora_targets), "fan_in_fan_out": True,  # GPT-2's Conv1D: [in, out] weights
        "bias": "none", "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out
