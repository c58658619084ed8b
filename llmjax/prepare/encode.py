"""Texts -> tokens: a pure function of a batch of texts (`encode_texts`), run in this process or
in a pool of tokenizer processes (`encoded_batches`), with each document's digest (its identity
for --dedup and its stable split hash) and its filter verdict."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from llmjax.tokenizer import get_tokenizer

BATCH_CHARS = 1 << 20  # text per tokenizer task: large enough to amortise IPC, small for smooth ETA
EMPTY, SHORT = 1, 2  # per-document filter verdicts computed by the tokenizer workers
DIGEST_BYTES = 16  # a document's blake2b digest: 128 bits


def doc_digest(data: bytes) -> bytes:
    """128-bit digest of a document's UTF-8 bytes: its identity for --dedup and its split hash."""
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def doc_hash(digest: bytes) -> float:
    """A document's stable position in [0, 1): independent of order and worker count."""
    return int.from_bytes(digest[:8], "little") / 2**64


@dataclasses.dataclass
class Encoded:
    """One batch of documents after tokenization (arrays, so they cross processes cheaply)."""

    status: np.ndarray  # int8 [n]: 0 kept so far, EMPTY, SHORT
    nbytes: np.ndarray  # int64 [n]: UTF-8 bytes of each text
    digests: bytes  # DIGEST_BYTES per document, zeros for filtered ones
    lengths: np.ndarray  # int64 [n]: tokens of each document, EOT included; 0 if filtered
    tokens: np.ndarray  # uint16: every kept document's [EOT, ids...], concatenated


def utf8(text: str) -> tuple[str, bytes]:
    try:
        return text, text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: replaced, as tiktoken itself does
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return text, text.encode("utf-8")


def encode_texts(texts: list[str], tokenizer: str, min_chars: int) -> Encoded:
    tok = get_tokenizer(tokenizer)  # cached: built once per process
    n = len(texts)
    status, nbytes = np.zeros(n, np.int8), np.zeros(n, np.int64)
    lengths, digests = np.zeros(n, np.int64), bytearray(DIGEST_BYTES * n)
    eot = np.array([tok.eot_id], np.uint32)
    parts = []
    for i, text in enumerate(texts):
        text, data = utf8(text)
        nbytes[i] = len(data)
        if not text or text.isspace():
            status[i] = EMPTY
            continue
        if len(text) < min_chars:
            status[i] = SHORT
            continue
        digests[DIGEST_BYTES * i : DIGEST_BYTES * (i + 1)] = doc_digest(data)
        ids = tok.encode_numpy(text)  # no Python lists
        parts += [eot, ids]
        lengths[i] = len(ids) + 1
    tokens = (
        np.concatenate(parts, dtype=np.uint16, casting="unsafe")
        if parts
        else np.zeros(0, np.uint16)
    )
    return Encoded(status, nbytes, bytes(digests), lengths, tokens)


def _text_batches(texts: Iterator[str]) -> Iterator[list[str]]:
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def start_pool(workers: int, tokenizer: str) -> ProcessPoolExecutor | None:
    """Tokenizer processes, started (and their tokenizer built) while the source opens.

    spawn, not fork: the parent may hold threads (JAX, datasets' HTTP), which fork breaks. An
    executor, not a Pool: a process that dies (out of memory) raises instead of hanging."""
    if workers == 0:
        return None
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    for _ in range(workers):  # each submit finds no idle process and spawns one
        pool.submit(_build_tokenizer, tokenizer)
    return pool


def _build_tokenizer(tokenizer: str) -> None:
    get_tokenizer(tokenizer)  # cached in the process; returns None, not a 50k-entry pickle


def encoded_batches(
    texts: Iterator[str],
    tokenizer: str,
    min_chars: int,
    pool: ProcessPoolExecutor | None,
    workers: int,
) -> Iterator[Encoded]:
    """Batches in source order. With a pool, at most 2 per worker are in flight, so reading
    never runs far ahead of tokenizing (a hub stream is never buffered whole)."""
    if pool is None:
        for batch in _text_batches(texts):
            yield encode_texts(batch, tokenizer, min_chars)
        return
    pending: collections.deque = collections.deque()
    for batch in _text_batches(texts):
        pending.append(pool.submit(encode_texts, batch, tokenizer, min_chars))
        if len(pending) >= 2 * workers:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
