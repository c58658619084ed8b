"""What a run trains on: its kind and its batches, from the config and what `data.path` names:
shards (pretraining; data.py reads them), a file of conversations (instruction finetuning;
instruct.py) or of chosen/rejected pairs (DPO; dpo.py). The one place the three part ways:
`resolve_kind` decides the kind once, at start; `objective` maps it to the objective its module
builds; `open_data` reads its batches.

Everything here reads and checks before anything compiles, so bad input fails fast and nothing is
written. DPO's batches also need the reference model's log-probabilities, which need the run's
compiled forward pass: its objective's `prepare` (dpo.with_reference) completes them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np

from llmjax import data, dpo, instruct, loss, metrics
from llmjax.config import ConfigError
from llmjax.init_from import source_config
from llmjax.tokenizer import Tokenizer


def kind_of(path: str) -> str:
    """What a data path holds: a directory of shards (pretrain), a file of preference pairs
    (preference; parsed once here) or of conversations (instruct)."""
    if not os.path.isfile(path):
        return "pretrain"
    return "preference" if dpo.is_preference_file(path) else "instruct"


def resolve_kind(cfg: ml_collections.ConfigDict) -> str:
    """`data.kind`, or with `auto` what `data.path` holds: decided once, at start, and stored in
    the checkpoint record. A declared kind must match the path's form (shards are a directory,
    conversations and pairs a file); its records are checked as they are read."""
    d = cfg.data
    if d.kind == "auto":
        return kind_of(d.path)
    if os.path.exists(d.path) and os.path.isfile(d.path) != (d.kind != "pretrain"):
        want = "a directory of shards" if d.kind == "pretrain" else "a file"
        raise ConfigError(f"data.kind={d.kind} needs {want}, not data.path={d.path!r}")
    return d.kind


def objective(cfg: ml_collections.ConfigDict, kind: str) -> loss.Objective:
    """The objective of a run of this kind, built by the module that owns it."""
    if kind == "preference":
        return dpo.objective(cfg.optim.dpo_beta, cfg.optim.dpo_label_smoothing)
    if kind == "instruct":
        return instruct.objective(cfg.train.z_loss)
    return loss.language_model("pretrain", cfg.train.z_loss)


@dataclasses.dataclass
class Data:
    """This process's batches: `train(start)` from a step on, `val()` the same each call. DPO's
    are made by dpo.with_reference once the reference log-probabilities exist; until then `pairs`
    holds the encoded pairs per split."""

    train: Callable[[int], Iterator] | None
    val: Callable[[], Iterator] | None
    pairs: dict[str, np.ndarray] | None = None


def open_data(cfg: ml_collections.ConfigDict, kind: str, tok: Tokenizer, vocab_size: int) -> Data:
    """The batches of this process: shards for pretraining, an instruction file for finetuning, a
    preference file for DPO. Reads and checks the data (and for DPO the reference model's
    tokenizer) before anything compiles, so bad input fails fast and nothing is written."""
    d, t = cfg.data, cfg.train
    micro = d.batch_size // cfg.optim.grad_accum
    pid, n_proc = jax.process_index(), jax.process_count()
    if kind == "pretrain":
        read = data.check_dataset(d.path, d.tokenizer, d.seq_len, d.verify)
        if read["shards"]:
            metrics.console(
                f"verified {read['shards']} shards ({read['bytes'] / 1e6:,.1f} MB: sha256 and "
                f"token ids) in {read['seconds']:.1f}s (data.verify={d.verify})"
            )
        common = dict(
            seq_len=d.seq_len, vocab_size=vocab_size, process_index=pid, process_count=n_proc
        )
        train = lambda start: data.train_batches(
            d.path,
            batch=d.batch_size,
            seed=t.seed,
            start_step=start,
            steps=t.steps,
            workers=d.workers,
            prefetch=d.prefetch,
            **common,
        )
        val = lambda: data.val_batches(d.path, batch=micro, num_batches=t.eval_batches, **common)
        return Data(train, val)
    if not tok.chat:
        raise data.DataError(
            f"data.path={d.path!r} is an instruction dataset but data.tokenizer={d.tokenizer!r} "
            "has no chat tokens (use gpt2-chat or bytes-chat)"
        )
    if kind == "preference":
        check_reference_source(cfg)
        pairs, counts = dpo.encode_split(tok, d.path, d.seq_len)
        metrics.console(
            f"preference pairs: {counts['train']} train / {counts['val']} held out, "
            f"{counts['truncated']} truncated to {d.seq_len + 1} tokens"
        )
        return Data(None, None, pairs)
    rows, counts = instruct.encode_split(tok, d.path, d.seq_len, instruct.VAL_FRACTION)
    metrics.console(
        f"instructions: {counts['train']} train / {counts['val']} val examples, "
        f"{counts['truncated']} truncated to {d.seq_len + 1} tokens"
    )
    train = lambda start: instruct.train_batches(
        rows["train"],
        batch=d.batch_size,
        seed=t.seed,
        start_step=start,
        steps=t.steps,
        rows_slice=data.process_rows(d.batch_size, pid, n_proc),
    )
    val = lambda: instruct.val_batches(
        rows["val"], batch=micro, rows_slice=data.process_rows(micro, pid, n_proc)
    )
    return Data(train, val)


def check_reference_source(cfg: ml_collections.ConfigDict) -> None:
    """DPO starts from, and compares against, an instruction-finetuned model: `model.init_from`
    must name one, with the chat tokens the pairs are rendered with."""
    src = cfg.model.init_from
    if src == "scratch":
        raise data.DataError(
            f"data.path={cfg.data.path!r} holds preference pairs: DPO needs model.init_from=an "
            "instruction-finetuned workdir (its weights are the start and the frozen reference)"
        )
    tokenizer = source_config(src)[1]
    if not tokenizer.endswith("-chat"):
        raise data.DataError(
            f"model.init_from={src} has no chat tokens (tokenizer {tokenizer}): DPO starts from "
            "an instruction-finetuned model (see configs/sft_gpt2.py)"
        )
