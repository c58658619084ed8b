"""Instruction data for finetuning: the chat template, datasets, and step-addressed batches.

Template (Phi-3 style), one turn per role, each closed by <|end|>:

    <|system|>\\n{system}<|end|>\\n<|user|>\\n{question}<|end|>\\n<|assistant|>\\n{answer}<|end|>\\n

Only assistant content and its closing <|end|> are scored. Batches are int32 [B, T+1] like the
pretraining ones; a token that is context only (template, system and user turns, padding) is stored
as -1 - id: the model reads it as `id`, the loss skips it as a target. So one train step serves both
pretraining and finetuning, and examples are padded (not packed): one example per row.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator

import numpy as np

from llmjax import data, loss
from llmjax.errors import UserError
from llmjax.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
# Asked every `train.sample_every` steps of a finetuning run; the answers are logged as text.
SAMPLE_QUESTIONS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Rewrite the sentence in passive voice: The cat chased the mouse.",
    "What is the opposite of 'ancient'?",
)


# A split's examples: [N, T+1] rows, or for preference pairs a dict of arrays with a leading N.
Rows = np.ndarray | dict[str, np.ndarray]


class InstructError(UserError):
    """A dataset file that cannot be used; the message names the file and the record."""


# Held-out share of an instruction set's examples (by a hash of each, see is_held_out).
VAL_FRACTION = 0.05


def objective(z_loss: float) -> loss.Objective:
    """Finetuning's objective: the language-model loss, which scores only the answers of these
    rows (their context is stored as context_only ids)."""
    return loss.language_model("instruct", z_loss)


def context_only(ids: np.ndarray) -> np.ndarray:
    """Marks tokens as read-but-not-scored (the encoding described in the module docstring)."""
    return -1 - ids


def render(
    tok: Tokenizer, messages: list[dict], *, add_generation_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation and, per token, whether it is scored (assistant content).

    With `add_generation_prompt`, the ids end with an open assistant turn for the model to fill.
    """
    sp = tok.special
    ids: list[int] = []
    scored: list[bool] = []
    newline = tok.encode("\n")
    for m in messages:
        role, content = m["role"], m["content"]
        head = [sp[f"<|{role}|>"]] + newline
        body = tok.encode(content) + [sp["<|end|>"]]
        ids += head + body + newline
        train = role == "assistant"
        scored += [False] * len(head) + [train] * len(body) + [False] * len(newline)
    if add_generation_prompt:
        ids += [sp["<|assistant|>"]] + newline
        scored += [False] * (1 + len(newline))
    return ids, scored


def parse(tok: Tokenizer, ids: list[int]) -> list[dict]:
    """The inverse of `render` (without generation prompt): ids -> messages."""
    sp = tok.special
    role_of = {sp[f"<|{r}|>"]: r for r in ROLES}
    messages, i = [], 0
    while i < len(ids):
        role = role_of[ids[i]]
        end = ids.index(sp["<|end|>"], i)
        text = tok.decode(ids[i + 1 : end])
        messages.append({"role": role, "content": text.removeprefix("\n")})
        i = end + 1 + len(tok.encode("\n"))
    return messages


def alpaca_question(ex: dict) -> str:
    """An Alpaca record's user turn: its instruction, then its input (if any) after a blank line."""
    return ex["instruction"] + (f"\n\n{ex['input']}" if ex.get("input") else "")


def alpaca_to_messages(ex: dict) -> list[dict]:
    """Alpaca (instruction, input, output) -> a user turn and an assistant turn."""
    question = alpaca_question(ex)
    return [{"role": "user", "content": question}, {"role": "assistant", "content": ex["output"]}]


def read_records(path: str) -> list:
    """The records of a JSON list or JSONL file, unchecked."""
    if not os.path.isfile(path):
        raise InstructError(f"data.path={path!r}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
    except json.JSONDecodeError as e:
        raise InstructError(f"{path}: not JSON or JSONL ({e})") from e


def is_messages(msgs) -> bool:
    """A non-empty list of {role: system|user|assistant, content: str}."""
    return (
        isinstance(msgs, list)
        and bool(msgs)
        and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            for m in msgs
        )
    )


def load_examples(path: str) -> list[list[dict]]:
    """Conversations from a JSON list or JSONL file, Alpaca or messages format."""
    records = read_records(path)
    out = []
    for n, r in enumerate(records):
        msgs = r.get("messages") if isinstance(r, dict) else None
        if msgs is None and isinstance(r, dict) and {"instruction", "output"} <= r.keys():
            msgs = alpaca_to_messages(r)
        if not is_messages(msgs) or not any(m["role"] == "assistant" for m in msgs):
            raise InstructError(
                f"{path}: record {n} is neither Alpaca (instruction, input, "
                "output) nor messages ([{role: user|assistant|system, content}]) "
                "with an assistant turn"
            )
        out.append(msgs)
    if not out:
        raise InstructError(f"{path}: no examples")
    return out


def is_held_out(messages: list[dict], val_fraction: float) -> bool:
    """Whether a conversation (or a pair's prompt) is in the validation split: by its hash, so the
    split does not depend on file order."""
    h = hashlib.blake2b(json.dumps(messages, sort_keys=True).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < val_fraction


def encode_row(tok: Tokenizer, messages: list[dict], seq_len: int) -> tuple[np.ndarray, bool]:
    """One conversation as an int32 row [seq_len+1] (context-only tokens encoded, EOT padding read
    as context) and whether it was truncated to fit."""
    ids, scored = render(tok, messages)
    cut = len(ids) > seq_len + 1
    ids, scored = np.asarray(ids[: seq_len + 1]), np.asarray(scored[: seq_len + 1])
    row = np.full(seq_len + 1, context_only(np.int32(tok.eot_id)), np.int32)
    row[: len(ids)] = np.where(scored, ids, context_only(ids))
    return row, cut


def encode_split(
    tok: Tokenizer, path: str, seq_len: int, val_fraction: float
) -> tuple[dict[str, np.ndarray], dict]:
    """Rows [N, seq_len+1] per split (context-only tokens encoded), and counts for the log.

    The split is by a hash of each example, so it does not depend on file order. Examples longer
    than seq_len+1 tokens are truncated (counted); padding is the EOT id, context-only.
    """
    examples = load_examples(path)
    rows: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    truncated = 0
    for msgs in examples:
        row, cut = encode_row(tok, msgs, seq_len)
        truncated += cut
        rows["val" if is_held_out(msgs, val_fraction) else "train"].append(row)
    split = stack_split(rows, f"{path}: too few examples for a train/val split")
    counts = {"examples": len(examples), "truncated": truncated}
    return split, counts | {k: len(v) for k, v in split.items()}


def stack_split(rows: dict[str, list[np.ndarray]], too_few: str) -> dict[str, np.ndarray]:
    """The train and val lists as arrays, with at least one val example (the last train one,
    deterministically); `too_few` is the InstructError when none is left to train on."""
    if not rows["val"]:
        rows["val"].append(rows["train"].pop())
    if not rows["train"]:
        raise InstructError(too_few)
    return {k: np.stack(v) for k, v in rows.items()}


def take(rows: Rows, idx) -> Rows:
    """Examples `idx` of rows: an array, or a dict of arrays indexed alike (DPO's tokens and
    reference log-probabilities of each pair)."""
    return {k: v[idx] for k, v in rows.items()} if isinstance(rows, dict) else rows[idx]


def count(rows: Rows) -> int:
    return len(next(iter(rows.values())) if isinstance(rows, dict) else rows)


class _Epochs:
    """Step -> this process's rows: example order reshuffled every epoch from (seed, epoch)."""

    def __init__(self, rows: Rows, seed: int, batch: int, sl: slice):
        self.rows, self.seed, self.batch, self.sl = rows, seed, batch, sl

    def __call__(self, step: int) -> Rows:
        n = count(self.rows)
        j = np.arange(step * self.batch, (step + 1) * self.batch)[self.sl]
        perms = {e: np.random.default_rng([self.seed, e]).permutation(n) for e in set(j // n)}
        return take(self.rows, [perms[e][i] for e, i in zip(j // n, j % n, strict=True)])


def train_batches(
    rows: Rows, *, batch: int, seed: int, start_step: int, steps: int, rows_slice: slice
) -> Iterator[Rows]:
    return data.iterate_steps(start_step, steps, _Epochs(rows, seed, batch, rows_slice))


def val_batches(rows: np.ndarray, *, batch: int, rows_slice: slice) -> Iterator[np.ndarray]:
    """Every validation example once, in order; the last batch is padded with rows that score
    nothing, so the mean over scored targets is exact."""
    pad = np.full((-len(rows) % batch, rows.shape[1]), context_only(np.int32(0)), np.int32)
    padded = np.concatenate([rows, pad])
    for k in range(len(padded) // batch):
        yield padded[k * batch : (k + 1) * batch][rows_slice]
