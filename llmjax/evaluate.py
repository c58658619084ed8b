"""Evaluation of a checkpoint: validation loss and perplexity, HellaSwag accuracy.

    python -m llmjax.evaluate --workdir=DIR --data=PREPARED_DIR [--hellaswag=PATH|download] \
        [--max_batches=N]
    python -m llmjax.evaluate --workdir=DPO_RUN --data=PREFS.json [--reference=WORKDIR]

Prints one JSON object. Validation loss is the mean of the same `eval_step` that training runs, over
every non-overlapping seq_len window of the val split (or the first --max_batches batches).

HellaSwag is scored completion-style, as the GPT-2 reproductions (nanoGPT's build-nanogpt, llm.c)
do: each of the four endings is appended to the context (with a leading space), and the model's
log-likelihood of the ending tokens given the context picks the answer. `acc` takes the largest
sum, `acc_norm` the largest mean per token (the length-normalised score).

A preference file (chosen/rejected pairs, dpo.py) as --data is scored on its held-out pairs (the
split training uses): reward accuracy, rewards and margin against the reference model, which is
the run's model.init_from unless --reference names another workdir.
"""

from __future__ import annotations

import functools
import json
import math
import os
import urllib.request
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import nnx

from llmjax import batches, checkpoint, data, dpo, errors
from llmjax.loss import CHUNK_TOKENS, lm_loss
from llmjax.tokenizer import Tokenizer

# The validation split (10,042 items) as published with the paper's code.
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_ITEMS_PER_BATCH = 8  # four rows each: 32 sequences per forward pass


class EvalError(data.DataError):
    """Evaluation input that cannot be used; the message names the path and the problem."""


# ---------------------------------------------------------------------------------------------
# Validation loss


def eval_step(
    params, batch_BT1: jax.Array, *, graphdef, chunk: int = CHUNK_TOKENS
) -> tuple[jax.Array, jax.Array]:
    """(summed loss, scored targets) of one batch: summed over batches, their ratio is the exact
    mean. Training jits it with the run's shardings (and its train.loss_chunk); `val_loss` jits it
    as it is. `chunk` changes memory and speed, never the loss (z-loss is training's alone)."""
    return lm_loss(params, graphdef, batch_BT1, None, True, chunk=chunk)


def mean_loss(step, params, batches: Iterable) -> float:
    """Mean loss per scored target over `batches`, from `step` (a jitted `eval_step`): the one
    validation loss, in the training loop and on the command line alike. Sums are added in
    float64 on the host, so the order and number of batches cost no precision."""

    def objective(p, b):
        loss_sum, n = step(p, b)
        return loss_sum, (n, {})

    return mean_metrics(objective, params, batches)["loss"]


class Stopped(Exception):
    """An evaluation given up between two batches because a stop was requested (SIGTERM)."""


def stop_point(in_flight: list | None = None) -> None:
    """Raises Stopped if a stop was requested (checkpoint.stop_requested: SIGTERM or SIGINT to the
    trainer): every evaluation's batch loop calls it after each batch, so a preemption's grace
    period is not spent on evaluations. `in_flight`: the batches dispatched so far, of which at
    most two are left running, so the stop waits for the current batch only. One process only:
    with several, a stop is agreed at a training step (a cut here would part the collectives)."""
    if in_flight is not None and len(in_flight) >= 2:
        jax.block_until_ready(in_flight[-2])
    if jax.process_count() == 1 and checkpoint.stop_requested():
        raise Stopped


def mean_metrics(step, params, batches: Iterable) -> dict[str, float]:
    """{loss, and each metric the objective sums} as means per unit (scored target, or pair)
    over `batches`, from `step`: (params, batch) -> (loss sum, (units, {metric: sum})), the
    training loop's eval step. Added in float64 on the host, as `mean_loss`. Stops between
    batches (stop_point)."""
    outs = []
    for b in batches:
        outs.append(step(params, b))
        stop_point(outs)
    outs = jax.device_get(outs)
    names = sorted(outs[0][1][1]) if outs else []
    table = np.array([[s, n, *(m[k] for k in names)] for s, (n, m) in outs], np.float32)
    total, count, *sums = np.sum(table.reshape(-1, 2 + len(names)), axis=0, dtype=np.float64)
    count = max(count, 1.0)
    return {
        "loss": float(total / count),
        **{k: float(v / count) for k, v in zip(names, sums, strict=True)},
    }


def val_loss(
    graphdef, params, path: str, *, seq_len: int, batch: int, vocab_size: int, max_batches: int = 0
) -> dict:
    """Mean loss per target over the val split, all of it (whole batches) or `max_batches`."""
    windows = data.count_val_windows(path, seq_len)
    batch = max(1, min(batch, windows))
    n = max(1, windows // batch)
    n = min(n, max_batches) if max_batches else n
    batches = data.val_batches(
        path, seq_len=seq_len, batch=batch, vocab_size=vocab_size, num_batches=n
    )
    loss = mean_loss(_jitted_eval_step(graphdef), params, map(jnp.asarray, batches))
    return {
        "val_loss": loss,
        "val_perplexity": math.exp(min(loss, 700.0)),
        "val_batches": n,
        "val_tokens": n * batch * seq_len,
    }


@functools.cache
def _jitted_eval_step(graphdef):
    return jax.jit(functools.partial(eval_step, graphdef=graphdef))


# ---------------------------------------------------------------------------------------------
# HellaSwag


def fetch(url: str, dest: str) -> str:
    """Downloads `url` to `dest` once (atomically: a partial download is never left as `dest`)."""
    if os.path.exists(dest):
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = f"{dest}.part{os.getpid()}"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, dest)
    except OSError as e:  # URLError, timeouts and disk errors are all OSErrors
        if os.path.exists(tmp):
            os.remove(tmp)
        raise EvalError(
            f"cannot download {url} ({getattr(e, 'reason', e)}); pass "
            "--hellaswag=PATH to a local copy of hellaswag_val.jsonl"
        ) from e
    return dest


def hellaswag_path(spec: str, cache_dir: str | None = None, url: str = HELLASWAG_URL) -> str:
    """`download` -> the official val jsonl (fetched into the cache once); anything else a path."""
    if spec != "download":
        return spec
    cache_dir = cache_dir or os.environ.get("LLMJAX_CACHE", os.path.expanduser("~/.cache/llmjax"))
    return fetch(url, os.path.join(cache_dir, "hellaswag_val.jsonl"))


def load_hellaswag(path: str, limit: int = 0) -> list[dict]:
    """Items {ctx, endings[4], label} of an official-format HellaSwag jsonl (first `limit`)."""
    if not os.path.isfile(path):
        raise EvalError(f"hellaswag={path!r}: no such file (or use 'download')")
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                ok = (
                    isinstance(item["ctx"], str)
                    and len(item["endings"]) == 4
                    and all(isinstance(e, str) for e in item["endings"])
                    and item["label"] in (0, 1, 2, 3)
                )
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise EvalError(f"{path}:{n}: not a HellaSwag item ({e})") from e
            if not ok:
                raise EvalError(
                    f"{path}:{n}: a HellaSwag item needs ctx, 4 string endings and a label in 0..3"
                )
            items.append({"ctx": item["ctx"], "endings": item["endings"], "label": item["label"]})
            if limit and len(items) == limit:
                break
    if not items:
        raise EvalError(f"{path}: no HellaSwag items")
    return items


def hellaswag_rows(item: dict, tok: Tokenizer, block_size: int) -> list[tuple[list[int], int]]:
    """Per ending: (context + ending tokens, number of ending tokens scored).

    A row longer than block_size + 1 tokens loses its oldest tokens (the model sees block_size of
    them and predicts the last); only ending tokens that are still predicted are scored.
    """
    ctx = tok.encode(item["ctx"])
    rows = []
    for ending in item["endings"]:
        end = tok.encode(" " + ending)
        row = (ctx + end)[-(block_size + 1) :]
        rows.append((row, min(len(end), len(row) - 1)))
    return rows


@functools.partial(jax.jit, static_argnums=0)
def _ending_logprobs(graphdef, params, tokens_RT, mask_RT):
    """Sum of log p(token) over the masked (ending) tokens of each row, and their count."""
    logits_RTV = nnx.merge(graphdef, params)(tokens_RT[:, :-1])
    logp_RT = -optax.softmax_cross_entropy_with_integer_labels(logits_RTV, tokens_RT[:, 1:])
    mask_RT = mask_RT[:, 1:]
    return (logp_RT * mask_RT).sum(-1), mask_RT.sum(-1)


def score_hellaswag(
    graphdef,
    params,
    items: list[dict],
    tok: Tokenizer,
    block_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Log-likelihood sums [N, 4] and ending token counts [N, 4] of every item's endings."""
    rows = [r for item in items for r in hellaswag_rows(item, tok, block_size)]
    R = 4 * HELLASWAG_ITEMS_PER_BATCH
    results = []
    for b in range(0, len(rows), R):
        chunk = rows[b : b + R]
        longest = max(len(t) for t, _ in chunk)
        # Lengths rounded up to a power of two (>= 32): a handful of compiled shapes in all.
        T = min(max(32, 1 << (longest - 1).bit_length()), block_size + 1)
        tokens, mask = np.zeros((R, T), np.int32), np.zeros((R, T), np.float32)
        for r, (t, n_end) in enumerate(chunk):
            tokens[r, : len(t)] = t
            mask[r, len(t) - n_end : len(t)] = 1.0
        results.append(_ending_logprobs(graphdef, params, tokens, mask))
        stop_point(results)
    # One host sync at the end, so the device never waits for the host between batches.
    sums, counts = (
        np.concatenate(x)[: len(rows)] for x in zip(*jax.device_get(results), strict=True)
    )
    return sums.astype(np.float64).reshape(-1, 4), counts.astype(np.int64).reshape(-1, 4)


def hellaswag(
    graphdef,
    params,
    items: list[dict],
    tok: Tokenizer,
    block_size: int,
) -> dict:
    """HellaSwag accuracy (largest log-likelihood sum) and acc_norm (largest mean per token).
    Stops between batches (stop_point)."""
    sums, counts = score_hellaswag(graphdef, params, items, tok, block_size)
    labels = np.array([item["label"] for item in items])
    return {
        "hellaswag_acc": float(np.mean(sums.argmax(1) == labels)),
        "hellaswag_acc_norm": float(np.mean((sums / counts).argmax(1) == labels)),
        "hellaswag_items": len(items),
    }


# ---------------------------------------------------------------------------------------------
# Preference pairs


def preference_eval(
    policy, tok: Tokenizer, reference, tokens_N2T1: np.ndarray, *, beta: float, batch: int
) -> dict:
    """DPO's metrics of `policy` against `reference` (models) over the pairs, float64 means.
    Both are scored by one jitted function, so identical weights give a margin of exactly 0."""
    graphdef, params = nnx.split(policy)
    ref_graphdef, ref_params = nnx.split(reference)
    scores = {}
    for name, g, p in (("policy", graphdef, params), ("reference", ref_graphdef, ref_params)):
        step = jax.jit(lambda p, t, g=g: dpo.pair_logps(p, g, t, chunk=CHUNK_TOKENS))
        scores[name] = dpo.reference_logps(
            step, p, tokens_N2T1, batch=batch, rows_slice=slice(None), put=jnp.asarray
        )
    valid_N = (tokens_N2T1[:, :, 1:] >= 0).any(axis=(1, 2))
    loss, (n, sums) = dpo.pair_loss(
        jnp.asarray(scores["policy"]), jnp.asarray(scores["reference"]), valid_N, beta=beta
    )
    n = max(float(n), 1.0)
    out = {"pairs": int(valid_N.sum()), "dpo_loss": float(loss) / n}
    return out | {k: float(v) / n for k, v in sums.items()}


def _preference_main(
    model,
    tok: Tokenizer,
    step: int,
    out: dict,
    *,
    workdir: str,
    path: str,
    reference: str | None,
    seq_len: int,
    dpo_beta: float,
    batch: int,
) -> None:
    """Held-out pairs of `path` scored against the reference (`reference` or init_from)."""
    record = checkpoint.read_record(checkpoint.manager(workdir, read_only=True), step)
    source = reference or record.init_from
    if source == "scratch":
        raise EvalError(
            f"--data={path} holds preference pairs but {workdir} has no reference "
            "model (model.init_from=scratch): give --reference=WORKDIR"
        )
    reference_model, ref_tok, _ = checkpoint.load_model(source)
    if ref_tok.name != tok.name:
        raise EvalError(f"--reference={source} uses tokenizer {ref_tok.name}, {workdir} {tok.name}")
    seq_len = min(seq_len or record.seq_len, model.cfg.block_size)
    pairs = dpo.encode_split(tok, path, seq_len)[0]["val"]
    beta = dpo_beta or record.dpo_beta
    result = preference_eval(model, tok, reference_model, pairs, beta=beta, batch=batch)
    out.update({"reference": source, "dpo_beta": beta, "held_out": result})


# ---------------------------------------------------------------------------------------------
# CLI

FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    if not FLAGS.data and not FLAGS.hellaswag:
        raise EvalError("nothing to evaluate: give --data=PREPARED_DIR and/or --hellaswag")
    items = (
        load_hellaswag(hellaswag_path(FLAGS.hellaswag), FLAGS.hellaswag_items)
        if FLAGS.hellaswag
        else None
    )
    kind = batches.kind_of(FLAGS.data) if FLAGS.data else None  # as the trainer decides it
    if kind == "instruct":
        raise EvalError(f"--data={FLAGS.data}: a file must hold preference pairs (chosen/rejected)")
    preference = kind == "preference"
    model, tok, step = checkpoint.load_model(FLAGS.workdir)
    graphdef, params = nnx.split(model)
    out: dict = {"workdir": FLAGS.workdir, "step": step}
    if preference:
        _preference_main(
            model,
            tok,
            step,
            out,
            workdir=FLAGS.workdir,
            path=FLAGS.data,
            reference=FLAGS.reference,
            seq_len=FLAGS.seq_len,
            dpo_beta=FLAGS.dpo_beta,
            batch=FLAGS.batch_size,
        )
    elif FLAGS.data:
        record = checkpoint.read_record(checkpoint.manager(FLAGS.workdir, read_only=True), step)
        seq_len = min(FLAGS.seq_len or record.seq_len, model.cfg.block_size)
        data.check_dataset(FLAGS.data, tok.name, seq_len)
        out.update(
            val_loss(
                graphdef,
                params,
                FLAGS.data,
                seq_len=seq_len,
                batch=FLAGS.batch_size,
                vocab_size=tok.vocab_size,
                max_batches=FLAGS.max_batches,
            )
        )
    if items is not None:
        out.update(hellaswag(graphdef, params, items, tok, model.cfg.block_size))
    print(json.dumps(out))


def _define_flags() -> None:
    flags.DEFINE_string(
        "workdir", None, "workdir whose latest checkpoint is evaluated", required=True
    )
    flags.DEFINE_string(
        "data",
        None,
        "directory of prepared shards (its val split is used), or a preference file (its "
        "held-out pairs are scored)",
    )
    flags.DEFINE_string(
        "reference", None, "preference data: the reference workdir (default: model.init_from)"
    )
    flags.DEFINE_float("dpo_beta", 0.0, "preference data: beta of the rewards; 0 = the run's")
    flags.DEFINE_string("hellaswag", None, "HellaSwag val jsonl path, or 'download'")
    flags.DEFINE_integer("max_batches", 0, "validation batches; 0 = the whole val split")
    flags.DEFINE_integer("batch_size", 8, "sequences (or pairs) per validation batch")
    flags.DEFINE_integer("seq_len", 0, "validation window; 0 = the checkpoint's data.seq_len")
    flags.DEFINE_integer("hellaswag_items", 0, "first N HellaSwag items; 0 = all")


if __name__ == "__main__":
    _define_flags()
    errors.run(main)
