"""Hugging Face's GPT-2 format (OpenAI's weights as the hub serves them) <-> llmjax's model:
parameter names and layouts, config.json, reading a directory or a hub id, writing a directory
that `transformers` loads. convert.py is its command line; init_from.py reads it for
`model.init_from`.

Hugging Face's GPT-2 keeps its Conv1D weights as [in, out], the layout of nnx.Linear kernels, so
nothing is transposed; c_attn's [D, 3D] becomes llmjax's [D, 3, D] by a reshape. The token embedding
gains zero rows up to the padded vocabulary on the way in and loses them on the way out.

Weights are read from safetensors, or from a PyTorch pickle with `torch.load(weights_only=True)`;
nothing is ever unpickled unsafely. Both key layouts seen in the wild load: with or without the
`transformer.` prefix, with or without the `attn.bias`/`attn.masked_bias` buffers, with or without
the (tied) `lm_head.weight`.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax import errors
from llmjax.checkpoint import CheckpointError
from llmjax.model import GPT, GPTConfig, gpt2_departures, pad_vocab, stack_layers, unstack_layers
from llmjax.tokenizer import TOKENIZERS, get_tokenizer

# Vocabulary size -> the llmjax tokenizer whose ids those rows are.
# A checkpoint's tokenizer, told by its vocabulary size (every llmjax tokenizer's size is distinct).
TOKENIZER_FOR_VOCAB = {get_tokenizer(name).vocab_size: name for name in TOKENIZERS}
HUB_FILES = ("config.json", "model.safetensors")
_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers, not weights
_LIST_LIMIT = 8  # names listed in an error before "... and N more"


class ConvertError(CheckpointError):
    """Weights that cannot be converted; the message names the path, key or value."""


def _listing(names: list[str]) -> str:
    more = f" ... and {len(names) - _LIST_LIMIT} more" if len(names) > _LIST_LIMIT else ""
    return ", ".join(names[:_LIST_LIMIT]) + more


# ---------------------------------------------------------------------------------------------
# Names and shapes


def param_mapping(cfg: GPTConfig) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """Hugging Face name (no prefix) -> (path in the llmjax param dict, Hugging Face shape)."""
    D, V, P = cfg.n_embd, cfg.valid_vocab_size, cfg.block_size
    m = {
        "wte.weight": (("wte", "embedding"), (V, D)),
        "wpe.weight": (("wpe", "embedding"), (P, D)),
        "ln_f.weight": (("ln_f", "scale"), (D,)),
        "ln_f.bias": (("ln_f", "bias"), (D,)),
    }
    per_layer = [
        ("ln_1.weight", ("ln_1", "scale"), (D,)),
        ("ln_1.bias", ("ln_1", "bias"), (D,)),
        ("attn.c_attn.weight", ("attn", "c_attn", "kernel"), (D, 3 * D)),
        ("attn.c_attn.bias", ("attn", "c_attn", "bias"), (3 * D,)),
        ("attn.c_proj.weight", ("attn", "c_proj", "kernel"), (D, D)),
        ("attn.c_proj.bias", ("attn", "c_proj", "bias"), (D,)),
        ("ln_2.weight", ("ln_2", "scale"), (D,)),
        ("ln_2.bias", ("ln_2", "bias"), (D,)),
        ("mlp.c_fc.weight", ("mlp", "c_fc", "kernel"), (D, 4 * D)),
        ("mlp.c_fc.bias", ("mlp", "c_fc", "bias"), (4 * D,)),
        ("mlp.c_proj.weight", ("mlp", "c_proj", "kernel"), (4 * D, D)),
        ("mlp.c_proj.bias", ("mlp", "c_proj", "bias"), (D,)),
    ]
    for i in range(cfg.n_layer):
        for name, path, shape in per_layer:
            m[f"h.{i}.{name}"] = (("h", i, *path), shape)
    return m


def normalize_keys(sd: dict[str, np.ndarray], source: str = "checkpoint") -> dict[str, np.ndarray]:
    """Strips the `transformer.` prefix, drops mask buffers and a tied `lm_head.weight`."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("transformer.")
        if k.endswith(_BUFFERS):
            continue
        out[k] = v
    if "lm_head.weight" in out:
        head = out.pop("lm_head.weight")
        if "wte.weight" in out and not np.array_equal(head, out["wte.weight"]):
            raise ConvertError(
                f"{source}: lm_head.weight differs from wte.weight; llmjax ties the "
                "output projection to the token embedding"
            )
    return out


def hf_to_params(sd: dict[str, np.ndarray], cfg: GPTConfig, source: str = "checkpoint") -> dict:
    """A Hugging Face GPT-2 state dict (numpy) -> the llmjax pure param dict for `cfg`."""
    sd = normalize_keys(sd, source)
    mapping = param_mapping(cfg)
    missing = sorted(set(mapping) - set(sd), key=_natural)
    unexpected = sorted(set(sd) - set(mapping), key=_natural)
    shapes = [
        f"{k} {tuple(sd[k].shape)} != {shape}"
        for k, (_, shape) in mapping.items()
        if k in sd and tuple(sd[k].shape) != shape
    ]
    problems = [
        f"{label}: {_listing(names)}"
        for label, names in [
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("wrong shapes", shapes),
        ]
        if names
    ]
    if problems:
        raise ConvertError(
            f"{source} does not match a GPT-2 with n_layer={cfg.n_layer}, "
            f"n_embd={cfg.n_embd}, vocab={cfg.valid_vocab_size}, "
            f"n_positions={cfg.block_size}: {'; '.join(problems)}"
        )
    dtype = jnp.dtype(cfg.param_dtype)
    params: dict = {}
    for name, (path, _) in mapping.items():
        x = np.asarray(sd[name], np.float32)
        if name == "wte.weight":
            x = np.concatenate([x, np.zeros((cfg.vocab_size - x.shape[0], x.shape[1]), x.dtype)])
        elif name.endswith("c_attn.weight"):
            x = x.reshape(cfg.n_embd, 3, cfg.n_embd)
        elif name.endswith("c_attn.bias"):
            x = x.reshape(3, cfg.n_embd)
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = x.astype(dtype)
    return stack_layers(params) if cfg.scan_layers else params


def params_to_hf(params: dict, cfg: GPTConfig) -> dict[str, np.ndarray]:
    """The llmjax pure param dict -> Hugging Face GPT-2 tensors (no prefix, padding removed)."""
    if cfg.scan_layers:
        params = unstack_layers(params)
    out = {}
    for name, (path, shape) in param_mapping(cfg).items():
        x = params
        for key in path:
            x = x[key]
        x = np.asarray(jax.device_get(x))
        if name == "wte.weight":
            x = x[: cfg.valid_vocab_size]
        out[name] = x.reshape(shape)
    return out


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


# ---------------------------------------------------------------------------------------------
# Hugging Face configs and files


def config_from_hf(hf: dict, source: str = "config.json", *, vocab_multiple: int = 64) -> GPTConfig:
    """GPTConfig for a Hugging Face GPT-2 config.json; refuses variants llmjax does not compute."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ConvertError(f"{source}: model_type={hf['model_type']!r} is not gpt2")
    D = hf["n_embd"]
    checks = [
        (
            "activation_function",
            hf.get("activation_function", "gelu_new"),
            ("gelu_new", "gelu_pytorch_tanh"),
        ),
        ("layer_norm_epsilon", hf.get("layer_norm_epsilon", 1e-5), (1e-5,)),
        ("n_inner", hf.get("n_inner"), (None, 4 * D)),
        ("scale_attn_weights", hf.get("scale_attn_weights", True), (True,)),
        (
            "scale_attn_by_inverse_layer_idx",
            hf.get("scale_attn_by_inverse_layer_idx", False),
            (False,),
        ),
        ("reorder_and_upcast_attn", hf.get("reorder_and_upcast_attn", False), (False,)),
        ("tie_word_embeddings", hf.get("tie_word_embeddings", True), (True,)),
    ]
    for key, value, allowed in checks:
        if value not in allowed:
            raise ConvertError(
                f"{source}: {key}={value!r} is not supported (llmjax computes "
                f"GPT-2 with {key} in {allowed})"
            )
    if D % hf["n_head"]:
        raise ConvertError(f"{source}: n_embd={D} is not divisible by n_head={hf['n_head']}")
    V = hf["vocab_size"]
    return GPTConfig(
        vocab_size=pad_vocab(V, vocab_multiple),
        valid_vocab_size=V,
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=D,
        block_size=hf["n_positions"],
    )


def config_to_hf(cfg: GPTConfig) -> dict:
    eot = cfg.valid_vocab_size - 1  # both llmjax tokenizers put end-of-text last
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.valid_vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "tie_word_embeddings": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "torch_dtype": "float32",
    }


def _hub_download(repo_id: str) -> str:
    """Fetches config.json and the weights of a hub model (or finds them in the local HF cache)."""
    try:
        import huggingface_hub as hub
    except ImportError as e:
        raise ConvertError(
            f"{repo_id!r} is not a directory and huggingface_hub is not installed"
        ) from e
    try:
        path = hub.snapshot_download(repo_id, allow_patterns=list(HUB_FILES))
        if not os.path.exists(os.path.join(path, "model.safetensors")):
            path = hub.snapshot_download(
                repo_id, allow_patterns=["config.json", "pytorch_model.bin"]
            )
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for users
        raise ConvertError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub ({errors.one_line(e)}); pass "
            "a local directory with config.json and model.safetensors"
        ) from e
    return path


def read_hf_config(src: str) -> tuple[dict, str]:
    """(config.json, directory) of a local HF directory or a hub id (fetched once, then cached)."""
    path = src if os.path.isdir(src) else None
    if path is None:
        if os.path.exists(src) or src.startswith((".", "/")) or src.count("/") > 1:
            raise ConvertError(
                f"{src}: not a directory in Hugging Face format (config.json + "
                "model.safetensors) nor a hub id"
            )
        path = _hub_download(src)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ConvertError(f"{path}: no config.json (expected a Hugging Face GPT-2 directory)")
    with open(cfg_path) as f:
        return json.load(f), path


def read_hf(src: str) -> tuple[dict, dict[str, np.ndarray], str]:
    """(config.json, float32 numpy state dict, directory) of a local HF directory or a hub id."""
    hf_cfg, path = read_hf_config(src)
    st, pt = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    if os.path.exists(st):
        from safetensors import safe_open

        sd = {}
        # The flax framework reads bfloat16 too (numpy cannot); everything becomes float32 here.
        with safe_open(st, framework="flax") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sd[k] = np.asarray(f.get_tensor(k).astype(jnp.float32))
    elif os.path.exists(pt):
        try:
            import torch
        except ImportError as e:
            raise ConvertError(
                f"{pt}: reading PyTorch files needs torch; or convert it to model.safetensors"
            ) from e
        try:
            loaded = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:  # e.g. a pickle holding arbitrary objects: refused, never run
            raise ConvertError(
                f"{pt}: not loadable with torch.load(weights_only=True) ({e})"
            ) from e
        sd = {k: v.float().numpy() for k, v in loaded.items() if hasattr(v, "float")}
    else:
        raise ConvertError(f"{path}: no model.safetensors or pytorch_model.bin")
    return hf_cfg, sd, path


def from_hf(src: str) -> GPT:
    """The NNX GPT of a Hugging Face GPT-2 (hub id or local directory), in float32."""
    hf_cfg, sd, path = read_hf(src)
    return from_state_dict(hf_cfg, sd, path)


def from_state_dict(hf_cfg: dict, sd: dict[str, np.ndarray], source: str = "checkpoint") -> GPT:
    """The NNX GPT of a Hugging Face GPT-2 config.json dict and state dict (numpy arrays)."""
    cfg = config_from_hf(hf_cfg, source)
    params = hf_to_params(sd, cfg, source)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0))))
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))


def to_hf(model: GPT, out: str) -> None:
    """Writes `out/` as a Hugging Face GPT-2 directory that `transformers` loads directly."""
    cfg = model.cfg
    if departures := gpt2_departures(cfg):
        raise ConvertError(
            f"--to_hf={out}: the model departs from GPT-2 ({', '.join(departures)}), which "
            "Hugging Face's GPT2LMHeadModel cannot compute"
        )
    if os.path.exists(os.path.join(out, "model.safetensors")):
        raise ConvertError(f"--to_hf={out} already holds model.safetensors; choose an empty folder")
    from safetensors.numpy import save_file

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tensors = {
        f"transformer.{k}": np.ascontiguousarray(v, np.float32)
        for k, v in params_to_hf(params, cfg).items()
    }
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg), f, indent=2)
    if TOKENIZER_FOR_VOCAB.get(cfg.valid_vocab_size) == "gpt2":
        # GPT2Tokenizer's own files are OpenAI's encoder.json and vocab.bpe under other names.
        assets = resources.files("llmjax") / "assets" / "gpt2"
        for theirs, ours in [("vocab.json", "encoder.json"), ("merges.txt", "vocab.bpe")]:
            with resources.as_file(assets / ours) as p:
                shutil.copyfile(p, os.path.join(out, theirs))
