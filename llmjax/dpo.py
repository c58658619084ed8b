"""Preference finetuning: DPO (Rafailov et al. 2023) on pairs of a chosen and a rejected answer.

A data.path whose records carry `chosen` and `rejected` switches the trainer to DPO. A pair is
one example [2, T+1]: the prompt followed by the chosen answer, then by the rejected one, each
encoded as in finetuning (instruct.py: template, system and user turns and padding context-only),
so both answers of a pair share a micro-batch and a device wherever the batch is split. Batches
are dicts {"tokens": int32 [P, 2, T+1], "ref": float32 [P, 2]}: `ref` is the reference model's
log-probability of each answer, computed once, before the first step, from the step-0 weights
(`model.init_from`, frozen), and cached in WORKDIR/dpo_reference.npz, so that a resumed run reads
the very numbers the interrupted one used instead of running the reference model again.

The loss of a pair, with implicit rewards r = beta * (log pi(answer) - log pi_ref(answer)) summed
over answer tokens, margin m = r_chosen - r_rejected and label smoothing e (conservative DPO):

    -(1 - e) * log sigmoid(m) - e * log sigmoid(-m)

Like the language-model loss it returns (sum over pairs, number of pairs), plus sums of the
metrics the loop logs: reward accuracy (a tie counts one half, so identical policy and reference
read 0.5), the chosen and rejected rewards and the margin.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from llmjax import checkpoint, data, instruct, metrics, sharding
from llmjax.init_from import load_params
from llmjax.instruct import InstructError
from llmjax.loss import Objective, read_batch
from llmjax.model import MASKED_LOGIT, constrain, soft_cap
from llmjax.tokenizer import Tokenizer

# Held-out share of the prompts (by a hash of each): ~110 of data/'s 1,094 pairs, so the held-out
# reward accuracy moves in steps of ~1%.
VAL_FRACTION = 0.1
REFERENCE_FILE = "dpo_reference.npz"
METRICS = ("reward_acc", "chosen_reward", "rejected_reward", "margin")
_PROMPT_KEYS = ("instruction", "prompt", "messages")  # the three record formats, by prompt key


# ---------------------------------------------------------------------------------------------
# Data


def _format(r) -> str | None:
    """A record's format: its prompt key, None if it is not a preference pair at all."""
    if not isinstance(r, dict) or not ({"chosen", "rejected"} & r.keys()):
        return None
    return next((k for k in _PROMPT_KEYS if k in r), "pair without a prompt")


def is_preference_file(path: str) -> bool:
    """Whether a data file holds preference pairs; a file that mixes pairs with anything else
    (finetuning examples, or pairs in another format) is an InstructError."""
    records = instruct.read_records(path)
    formats = [_format(r) for r in records]
    for n, f in enumerate(formats):
        if f != formats[0]:
            name = lambda f: "a finetuning example" if f is None else f"a pair with {f!r}"
            raise InstructError(
                f"{path}: record {n} is {name(f)} but record 0 is {name(formats[0])}: one file, "
                "one format"
            )
    return bool(formats) and formats[0] is not None


def _answer(x) -> list[dict] | None:
    if isinstance(x, str):
        return [{"role": "assistant", "content": x}]
    if instruct.is_messages(x) and all(m["role"] == "assistant" for m in x):
        return x
    return None


def load_pairs(path: str) -> list[tuple[list[dict], list[dict], list[dict]]]:
    """(prompt, chosen, rejected) conversations of a preference file: records
    {instruction, input?, chosen, rejected}, {prompt, chosen, rejected} or
    {messages, chosen, rejected}; a prompt is a string or a list of messages, an answer a string
    or a list of assistant messages."""
    if not is_preference_file(path):
        raise InstructError(f"{path}: no preference pairs (records with chosen and rejected)")
    out = []
    for n, r in enumerate(instruct.read_records(path)):
        prompt = None
        if isinstance(r.get("instruction"), str) and isinstance(r.get("input", ""), str):
            prompt = [{"role": "user", "content": instruct.alpaca_question(r)}]
        elif isinstance(r.get("prompt"), str):
            prompt = [{"role": "user", "content": r["prompt"]}]
        elif instruct.is_messages(r.get("prompt")) or instruct.is_messages(r.get("messages")):
            prompt = r.get("prompt") or r["messages"]
        chosen, rejected = _answer(r.get("chosen")), _answer(r.get("rejected"))
        if prompt is None or chosen is None or rejected is None:
            raise InstructError(
                f"{path}: record {n} is not a preference pair: it needs a prompt (instruction "
                "[+ input], prompt or messages) and chosen and rejected answers (strings or "
                "assistant messages)"
            )
        if chosen == rejected:
            raise InstructError(
                f"{path}: record {n}: chosen and rejected are the same answer (nothing to prefer)"
            )
        out.append((prompt, chosen, rejected))
    return out


def encode_split(
    tok: Tokenizer, path: str, seq_len: int, val_fraction: float = VAL_FRACTION
) -> tuple[dict[str, np.ndarray], dict]:
    """Pairs [N, 2, seq_len+1] per split (chosen row, rejected row; encoded as instruct.encode_row)
    and counts for the log. The split is by a hash of the prompt, so both answers to a question
    land on the same side and the split does not depend on file order."""
    pairs = load_pairs(path)
    rows: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    truncated = 0
    for prompt, chosen, rejected in pairs:
        (c, cut_c), (r, cut_r) = (
            instruct.encode_row(tok, prompt + a, seq_len) for a in (chosen, rejected)
        )
        truncated += cut_c or cut_r
        rows["val" if instruct.is_held_out(prompt, val_fraction) else "train"].append(
            np.stack([c, r])
        )
    split = instruct.stack_split(rows, f"{path}: too few pairs for a train/held-out split")
    counts = {"pairs": len(pairs), "truncated": truncated}
    return split, counts | {k: len(v) for k, v in split.items()}


def val_batches(pairs: dict[str, np.ndarray], *, batch: int, rows_slice: slice) -> Iterator[dict]:
    """Every held-out pair once, in order; the last batch is padded with pairs that score nothing
    (they count as no pair at all), so the means are exact."""
    n = instruct.count(pairs)
    pad = -n % batch
    tokens = np.concatenate(
        [pairs["tokens"], np.full((pad, *pairs["tokens"].shape[1:]), -1, np.int32)]
    )
    ref = np.concatenate([pairs["ref"], np.zeros((pad, 2), np.float32)])
    for k in range(len(tokens) // batch):
        sl = slice(k * batch, (k + 1) * batch)
        yield {"tokens": tokens[sl][rows_slice], "ref": ref[sl][rows_slice]}


# ---------------------------------------------------------------------------------------------
# Log-probabilities and the loss


def answer_logps(
    x_BTD: jax.Array,
    w_VD: jax.Array,
    targets_BT: jax.Array,
    weights_BT: jax.Array,
    *,
    valid_vocab: int,
    chunk: int,
    logit_cap: float = 0.0,
) -> jax.Array:
    """Per row, the summed log-probability of the scored targets [B], float32, from hidden
    states and the head (`GPT.head_VD`; soft-capped as `GPT.logits` does when `logit_cap` > 0),
    chunk by chunk over the sequence like loss.chunked_ce.

    The [B, T, V] logits never exist: each chunk's are formed, reduced to [B] and dropped, and
    rematerialised in the backward pass (jax.checkpoint). loss.py's fused variant computes the
    head's gradient in the forward pass for a scalar loss; DPO needs a separate cotangent per row,
    which that cannot take, so it pays one more head matmul per chunk instead."""
    B, T, _ = x_BTD.shape
    C = max(1, min(T, chunk // B))
    n = -(-T // C)
    pad = lambda a: jnp.pad(a, [(0, 0), (0, n * C - T)] + [(0, 0)] * (a.ndim - 2))
    # [n, B, C, ...]: chunk i is every row's positions i*C..(i+1)*C-1 (the batch's sharding kept).
    split = lambda a: jnp.moveaxis(pad(a).reshape(B, n, C, *a.shape[2:]), 1, 0)
    wc_VD = w_VD.astype(x_BTD.dtype)
    ids_V = jnp.arange(w_VD.shape[0])

    @jax.checkpoint
    def one(x_BCD, tgt_BC, wt_BC):
        logits_BCV = constrain(jnp.einsum("bcd,vd->bcv", x_BCD, wc_VD), "BTV")
        logits_BCV = soft_cap(logits_BCV.astype(jnp.float32), logit_cap)
        l_BCV = jnp.where(ids_V < valid_vocab, logits_BCV.astype(jnp.float32), MASKED_LOGIT)
        lse_BC = jax.nn.logsumexp(l_BCV, axis=-1)
        tgt_logit_BC = jnp.take_along_axis(l_BCV, tgt_BC[..., None], axis=-1)[..., 0]
        return jnp.sum((tgt_logit_BC - lse_BC) * wt_BC, axis=1)

    def body(total_B, xs):
        return total_B + one(*xs), None

    xs = (split(x_BTD), split(targets_BT), split(weights_BT.astype(jnp.float32)))
    total_B, _ = jax.lax.scan(body, jnp.zeros((B,), jnp.float32), xs)
    return total_B


def pair_logps(
    params,
    graphdef,
    tokens_P2T1: jax.Array,
    rng: jax.Array | None = None,
    deterministic: bool = True,
    *,
    chunk: int,
) -> tuple[jax.Array, jax.Array]:
    """(log-probability of each answer [P, 2], its number of scored tokens [P, 2])."""
    P, _, T1 = tokens_P2T1.shape
    batch_NT1 = tokens_P2T1.reshape(2 * P, T1)
    model, x_NTD, targets_NT, weights_NT = read_batch(
        params, graphdef, batch_NT1, rng, deterministic
    )
    lp_N = answer_logps(
        x_NTD,
        model.head_VD(),
        targets_NT,
        weights_NT,
        valid_vocab=model.cfg.valid_vocab_size,
        chunk=chunk,
        logit_cap=model.cfg.logit_cap,
    )
    return lp_N.reshape(P, 2), weights_NT.sum(1).reshape(P, 2)


def pair_loss(
    lp_P2: jax.Array,
    ref_P2: jax.Array,
    valid_P: jax.Array,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:
    """(summed loss, (number of pairs, summed metrics)) over the valid pairs (see the module
    docstring); [:, 0] is the chosen answer, [:, 1] the rejected one."""
    valid_P = valid_P.astype(jnp.float32)
    reward_P2 = beta * (lp_P2 - ref_P2)
    margin_P = reward_P2[:, 0] - reward_P2[:, 1]
    loss_P = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(margin_P)
    if label_smoothing:
        loss_P = loss_P - label_smoothing * jax.nn.log_sigmoid(-margin_P)
    acc_P = (margin_P > 0) + 0.5 * (margin_P == 0)
    per_pair = {
        "reward_acc": acc_P,
        "chosen_reward": reward_P2[:, 0],
        "rejected_reward": reward_P2[:, 1],
        "margin": margin_P,
    }
    # The rewards are reported, not trained on directly: no gradient flows through the metrics.
    sums = {k: jnp.sum(jax.lax.stop_gradient(v) * valid_P) for k, v in per_pair.items()}
    return jnp.sum(loss_P * valid_P), (jnp.sum(valid_P), sums)


def dpo_loss(
    params,
    graphdef,
    batch: dict,
    rng: jax.Array | None,
    deterministic: bool,
    *,
    beta: float,
    label_smoothing: float,
    chunk: int,
) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:
    """The train step's objective for a batch of pairs (the language-model loss's signature).
    A pair with no scored token (held-out padding, or both answers cut off) is no pair."""
    lp_P2, n_P2 = pair_logps(params, graphdef, batch["tokens"], rng, deterministic, chunk=chunk)
    valid_P = (n_P2 > 0).any(axis=1)
    return pair_loss(lp_P2, batch["ref"], valid_P, beta=beta, label_smoothing=label_smoothing)


# ---------------------------------------------------------------------------------------------
# The reference model's log-probabilities


def reference_logps(
    step: Callable, params, tokens_N2T1: np.ndarray, *, batch: int, rows_slice: slice, put
) -> np.ndarray:
    """log pi_ref of every answer [N, 2], float32: `step` (pair_logps jitted, its output
    replicated) over batches of `batch` pairs, the last padded; `put` places this process's
    rows of a batch (`rows_slice`) on the devices."""
    n = len(tokens_N2T1)
    pad = np.full((-n % batch, *tokens_N2T1.shape[1:]), -1, np.int32)
    tokens = np.concatenate([tokens_N2T1, pad])
    out = [
        step(params, put(tokens[k : k + batch][rows_slice]))[0]
        for k in range(0, len(tokens), batch)
    ]
    return np.concatenate(jax.device_get(out)).astype(np.float32)[:n]


def reference_key(tokens: dict[str, np.ndarray], source: dict) -> str:
    """What the cached log-probabilities depend on: the encoded pairs of both splits and the
    reference model (its path, checkpoint step, shape and dtype in `source`)."""
    h = hashlib.sha256(json.dumps(source, sort_keys=True).encode())
    for split in sorted(tokens):
        h.update(split.encode())
        h.update(np.ascontiguousarray(tokens[split]).tobytes())
    return h.hexdigest()


def cached_reference(
    workdir: str, key: str, compute: Callable[[], dict[str, np.ndarray]], *, write: bool
) -> tuple[dict[str, np.ndarray], bool]:
    """(log-probabilities per split, whether they were computed now): read from
    WORKDIR/dpo_reference.npz when its key matches, else computed and written (atomically, when
    `write`: process 0), so a run that resumes uses exactly the numbers it started with."""
    path = os.path.join(workdir, REFERENCE_FILE)
    if os.path.isfile(path):
        with np.load(path) as f:
            if str(f["key"]) == key:
                return {k: f[k] for k in f.files if k != "key"}, False
    values = compute()
    if write:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), **values)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return values, True


# ---------------------------------------------------------------------------------------------
# The objective the trainer is given


def objective(beta: float, label_smoothing: float) -> Objective:
    """DPO's objective: batches of pairs with their reference log-probabilities, which `prepare`
    (with_reference) computes before step 1."""
    loss = functools.partial(dpo_loss, beta=beta, label_smoothing=label_smoothing)
    return Objective(
        kind="preference",
        loss=loss,
        eval_loss=loss,
        batch_spec=lambda B, T1, sh: {
            "tokens": jax.ShapeDtypeStruct((B, 2, T1), jnp.int32, sharding=sh),
            "ref": jax.ShapeDtypeStruct((B, 2), jnp.float32, sharding=sh),
        },
        sequences_per_row=2,
        prepare=with_reference,
    )


def with_reference(run, d, params, workdir: str, *, fresh: bool):
    """DPO's batches (`d`: batches.Data holding the encoded pairs), with the reference
    log-probabilities of every answer: read from the workdir's cache when it matches the pairs
    and the source, else computed from the step-0 weights (`params` of a fresh run,
    `model.init_from` reloaded otherwise) and cached. `run`: the trainer's train.Run."""
    cfg, src = run.cfg, run.cfg.model.init_from
    B, micro = cfg.data.batch_size, cfg.data.batch_size // cfg.optim.grad_accum
    pid, n_proc = jax.process_index(), jax.process_count()
    steps = checkpoint.steps_on_disk(checkpoint.directory(src))
    source = {
        "init_from": os.path.abspath(src),
        "step": steps[-1] if steps else None,
        "model": dataclasses.asdict(run.model_cfg),
    }
    param_sh = run.state_shardings.params
    # train.loss_chunk counts one device's tokens; the pairs' forward pass sees the global batch.
    chunk = cfg.train.loss_chunk * sharding.data_parallel_size(run.mesh)
    logps_step = jax.jit(
        sharding.under_rules(
            lambda p, tokens: pair_logps(p, run.graphdef, tokens, chunk=chunk), run.mesh
        ),
        in_shardings=(param_sh, sharding.batch_sharding(run.mesh)),
        out_shardings=sharding.replicated(run.mesh),
    )

    def compute() -> dict[str, np.ndarray]:
        t0 = time.time()
        ref_params = params
        if not fresh:
            ref_params = jax.device_put(load_params(src, run.model_cfg), param_sh)
        put = lambda b: sharding.put_batch(b, run.mesh)
        out = {
            split: reference_logps(
                logps_step,
                ref_params,
                tokens,
                batch=micro,
                rows_slice=data.process_rows(micro, pid, n_proc),
                put=put,
            )
            for split, tokens in d.pairs.items()
        }
        metrics.console(
            f"reference log-probabilities of {sum(map(len, d.pairs.values()))} pairs from "
            f"{src} in {time.time() - t0:.1f}s (cached in {REFERENCE_FILE})"
        )
        return out

    ref, _ = cached_reference(workdir, reference_key(d.pairs, source), compute, write=pid == 0)
    rows = {k: {"tokens": v, "ref": ref[k]} for k, v in d.pairs.items()}
    train = lambda start: instruct.train_batches(
        rows["train"],
        batch=B,
        seed=cfg.train.seed,
        start_step=start,
        steps=cfg.train.steps,
        rows_slice=data.process_rows(B, pid, n_proc),
    )
    val = lambda: val_batches(
        rows["val"], batch=micro, rows_slice=data.process_rows(micro, pid, n_proc)
    )
    return dataclasses.replace(d, train=train, val=val)
