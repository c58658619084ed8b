"""Where a run's first weights come from (`model.init_from`): another llmjax workdir's latest
checkpoint, or a Hugging Face GPT-2 (a local directory or a hub id). `adopt_architecture` gives
the config the source's shape before anything is built; `load_params` reads its weights.
"""

from __future__ import annotations

import os
from collections.abc import Collection

import numpy as np
from flax import nnx

from llmjax import checkpoint
from llmjax.config import ConfigError
from llmjax.hf_gpt2 import (
    ConvertError,
    config_from_hf,
    hf_to_params,
    normalize_keys,
    params_to_hf,
    read_hf,
    read_hf_config,
)
from llmjax.model import ARCH_FIELDS, GPTConfig, gpt2_departures


def is_workdir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints"))


def source_config(src: str) -> tuple[GPTConfig, str]:
    """The architecture of a `model.init_from` source and the tokenizer it was trained with,
    read without its weights: an llmjax workdir's checkpoint metadata, or a Hugging Face
    config.json (GPT-2's tokenizer)."""
    if is_workdir(src):
        mngr = checkpoint.manager(src, read_only=True)
        step = mngr.latest_step()
        if step is None:
            raise ConvertError(f"model.init_from={src}: no checkpoint in {mngr.directory}")
        record = checkpoint.read_record(mngr, step)
        return record.model_config(), record.tokenizer
    hf_cfg, path = read_hf_config(src)
    return config_from_hf(hf_cfg, os.path.join(path, "config.json")), "gpt2"


def adopt_architecture(cfg, explicit: Collection[str] = ()) -> str | None:
    """With `model.init_from` set, the model's shape comes from the source: n_layer, n_head and
    n_embd, block_size unless the config asks for less (a shorter context is cropped), the
    tokenizer's family (gpt2 or bytes; a chat config keeps its chat tokens), data.seq_len cut to
    the context, and the architecture options (model.ARCH_FIELDS: rope, rmsnorm, ...). Changes
    `cfg` in place and returns the one line that says so (None for a random init). A key in
    `explicit` (given on the command line) that contradicts the source is a ConfigError."""
    src = cfg.model.init_from
    if src == "scratch":
        return None
    m, d = cfg.model, cfg.data
    source, tok = source_config(src)
    chat = d.tokenizer.endswith("-chat") or tok.endswith("-chat")
    want = {
        "model.n_layer": source.n_layer,
        "model.n_head": source.n_head,
        "model.n_embd": source.n_embd,
        "model.block_size": min(m.block_size, source.block_size),
        "data.tokenizer": tok.removesuffix("-chat") + ("-chat" if chat else ""),
    }
    if "model.block_size" in explicit and m.block_size > source.block_size:
        want["model.block_size"] = source.block_size  # reported below as a contradiction
    want["data.seq_len"] = min(d.seq_len, want["model.block_size"])
    # What the network computes (rope, rmsnorm, an untied head, ...) is the source's too.
    want.update({f"model.{name}": getattr(source, name) for name in ARCH_FIELDS})
    for key, value in want.items():
        group, name = key.split(".")
        if key in explicit and cfg[group][name] != value:
            raise ConfigError(
                f"--config.{key}={cfg[group][name]} contradicts model.init_from={src} "
                f"({name} {value}); leave it out to take the source's"
            )
        cfg[group][name] = value
    return (
        f"model.init_from={src}: {source.n_layer} layers, {source.n_head} heads, width "
        f"{source.n_embd}, context {want['model.block_size']} (source {source.block_size}), "
        f"tokenizer {want['data.tokenizer']}, data.seq_len {want['data.seq_len']}"
        + "".join(f", {d}" for d in gpt2_departures(source))
    )


def load_params(src: str, cfg: GPTConfig) -> dict:
    """Params for a model of shape `cfg` from `src`: an llmjax workdir, a local HF dir or a hub id.

    This is `model.init_from`. The source must have the same layers, heads, width and vocabulary;
    a longer context is cropped to cfg.block_size (fine-tuning with shorter sequences).
    """
    if is_workdir(src):
        model = checkpoint.load_model(src)[0]
        src_cfg = model.cfg
        sd = params_to_hf(nnx.to_pure_dict(nnx.state(model, nnx.Param)), src_cfg)
    else:
        hf_cfg, sd, path = read_hf(src)
        src_cfg = config_from_hf(hf_cfg, os.path.join(path, "config.json"))
        sd = normalize_keys(sd, src)
    diff = [
        f"{k} {getattr(src_cfg, k)} != model.{k} {getattr(cfg, k)}"
        for k in ("n_layer", "n_head", "n_embd")
        if getattr(src_cfg, k) != getattr(cfg, k)
    ]
    if src_cfg.valid_vocab_size > cfg.valid_vocab_size:
        diff.append(
            f"vocabulary {src_cfg.valid_vocab_size} > the tokenizer's {cfg.valid_vocab_size}"
        )
    if src_cfg.block_size < cfg.block_size:
        diff.append(f"block_size {src_cfg.block_size} < model.block_size {cfg.block_size}")
    if diff:
        raise ConvertError(
            f"model.init_from={src} does not fit the configured model: {'; '.join(diff)}"
        )
    sd["wpe.weight"] = sd["wpe.weight"][: cfg.block_size]
    # Tokens the tokenizer adds (the chat template's, after GPT-2's 50257) start at the mean of
    # the pretrained rows: a neutral embedding, not noise whose logits could dominate early samples.
    wte = np.asarray(sd["wte.weight"], np.float32)
    new = np.broadcast_to(wte.mean(axis=0), (cfg.valid_vocab_size - len(wte), wte.shape[1]))
    sd["wte.weight"] = np.concatenate([wte, new])
    return hf_to_params(sd, cfg, src)
