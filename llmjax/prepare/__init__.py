"""Sources -> documents -> tokens -> llm.c-format shards plus meta.json.

    python -m llmjax.prepare --source=hf:HuggingFaceFW/fineweb-edu --hf_config=sample-10BT \
        --out=data/fineweb10B
    python -m llmjax.prepare --source=jsonl:'my/*.jsonl' --text_field=content --dedup --out=data/my
    python -m llmjax.prepare --source=builtin:pydocs --tokenizer=bytes --out=data/pydocs

Every document is preceded by the end-of-text id, the delimiter GPT-2 and llm.c use. A document goes
wholly to train or wholly to val, decided by a stable hash of its text, so the split depends neither
on document order nor on the number of tokenizer processes; output is byte-identical for any
--workers. An interrupted run resumes when started again with the same options: finished shards
are checked (size, sha256) and kept, the unfinished tail is cut back to the last checkpoint, and
the source is re-read (not re-tokenized) up to that point.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import glob
import hashlib
import heapq
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from absl import flags

from llmjax import errors
from llmjax.data import PREPARE_STATE
from llmjax.prepare.sources import open_source
from llmjax.shards import (
    FORMAT,
    MAX_TOKENS,
    META_FILE,
    TOKEN_DTYPE,
    DataError,
    ShardFile,
    shard_bytes,
    shard_name,
)
from llmjax.tokenizer import get_tokenizer

BATCH_CHARS = 1 << 20  # text per tokenizer task: large enough to amortise IPC, small for smooth ETA
CHECKPOINT_SECONDS = 60.0  # also checkpoint between shards, so a crash loses at most this much
EMPTY, SHORT = 1, 2  # per-document filter verdicts computed by the tokenizer workers
DIGEST_BYTES = 16  # a document's blake2b digest: 128 bits


# ---------------------------------------------------------------------------------------------
# Tokenization: a pure function of a batch of texts, run in-process or in a pool of processes.


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


def encode_batch(texts: list[str], tokenizer: str, min_chars: int) -> Encoded:
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
            yield encode_batch(batch, tokenizer, min_chars)
        return
    pending: collections.deque = collections.deque()
    for batch in _text_batches(texts):
        pending.append(pool.submit(encode_batch, batch, tokenizer, min_chars))
        if len(pending) >= 2 * workers:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# ---------------------------------------------------------------------------------------------
# Output: shards written as they fill, and the split decision.


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Appends one split's tokens to {split}_{index:06d}.bin.tmp; a full shard gets its header and
    is renamed into place, so a .bin file is always whole. Only the tail after the last checkpoint
    can be lost, and resuming cuts the .tmp back to the checkpoint's length."""

    def __init__(
        self,
        out: str,
        split: str,
        shard_tokens: int,
        shards: list[dict] | None = None,
        partial: int = 0,
        docs: int = 0,
    ):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.shards: list[dict] = list(shards or [])
        self.docs, self.n, self.f = docs, 0, None
        self.finished = False  # a shard was completed since the last checkpoint
        tmp = self._tmp()
        if partial:
            self.f = ShardFile(tmp, partial)  # held open across add() calls
            self.n = partial
        elif os.path.exists(tmp):
            os.remove(tmp)

    def _tmp(self) -> str:
        return os.path.join(self.out, shard_name(self.split, len(self.shards)) + ".tmp")

    def add(self, tokens) -> None:
        arr = np.ascontiguousarray(tokens, np.uint16)
        while len(arr):
            if self.f is None:
                self.f = ShardFile(self._tmp())
            take = min(len(arr), self.shard_tokens - self.n)
            self.f.append(arr[:take])
            self.n += take
            arr = arr[take:]
            if self.n == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        """Finishes the current shard (if it holds any tokens)."""
        if self.f is None:
            return
        self.f.finish()
        tmp, self.f = self._tmp(), None
        self.shards.append(
            {
                "name": shard_name(self.split, len(self.shards)),
                "tokens": self.n,
                "sha256": file_sha256(tmp),
            }
        )
        os.replace(tmp, os.path.join(self.out, self.shards[-1]["name"]))
        self.n, self.finished = 0, True

    def sync(self) -> None:
        if self.f is not None:
            self.f.sync()

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self.n

    def state(self) -> dict:
        return {"shards": self.shards, "partial": self.n, "docs": self.docs}


class Router:
    """Sends each kept document wholly to train or val by its hash.

    --val_fraction: hash < fraction goes to val; the lowest-hash other document is held back to the
    end and goes to val if val would otherwise be empty. --val_docs=K: the K lowest hashes go to
    val, so they are held until the end (evicted ones go to train as they lose their place).
    Held documents are written in source order."""

    def __init__(
        self,
        writers: dict[str, ShardWriter],
        val_fraction: float,
        val_docs: int,
        held: list[tuple[float, int, np.ndarray]] = (),
    ):
        self.writers, self.val_fraction, self.val_docs = writers, val_fraction, val_docs
        self.held = [(-h, i, t) for h, i, t in held]  # max-heap on hash
        heapq.heapify(self.held)

    def _write(self, split: str, tokens: np.ndarray) -> None:
        self.writers[split].add(tokens)
        self.writers[split].docs += 1

    def route(self, h: float, index: int, tokens: np.ndarray) -> None:
        if not self.val_docs and h < self.val_fraction:
            return self._write("val", tokens)
        if len(self.held) < (self.val_docs or 1):
            return heapq.heappush(self.held, (-h, index, tokens))
        if h < -self.held[0][0]:
            _, _, tokens = heapq.heapreplace(self.held, (-h, index, tokens))
        self._write("train", tokens)

    def finish(self) -> None:
        to = "val" if self.val_docs or self.writers["val"].docs == 0 else "train"
        for _, _, tokens in sorted(self.held, key=lambda e: e[1]):
            self._write(to, tokens)
        self.held = []

    def state(self) -> list[dict]:
        return [
            {"hash": -h, "index": i, "tokens": base64.b64encode(t.tobytes()).decode()}
            for h, i, t in sorted(self.held, key=lambda e: e[1])
        ]

    @staticmethod
    def held_from(state: list[dict]) -> list[tuple[float, int, np.ndarray]]:
        return [
            (e["hash"], e["index"], np.frombuffer(base64.b64decode(e["tokens"]), np.uint16))
            for e in state
        ]


# ---------------------------------------------------------------------------------------------
# The run: options, resume, progress, summary.


class Progress:
    """One status line: documents/s, tokens/s, and ETA when the document or token total is known."""

    def __init__(self, total_docs: int | None, max_tokens: int, start: float):
        self.total_docs, self.max_tokens, self.start = total_docs, max_tokens, start
        self.tty, self.last = sys.stderr.isatty(), 0.0

    def update(self, docs: int, tokens: int, done: bool = False) -> None:
        now = time.time()
        if not done and now - self.last < (0.5 if self.tty else 30.0):
            return
        self.last = now
        dt = max(now - self.start, 1e-9)
        line = (
            f"prepare: {docs:,} docs ({docs / dt:,.0f}/s), {tokens:,} tokens ({tokens / dt:,.0f}/s)"
        )
        fractions = ([docs / self.total_docs] if self.total_docs else []) + (
            [tokens / self.max_tokens] if self.max_tokens else []
        )
        if fractions and not done and max(fractions) > 0:
            f = min(1.0, max(fractions))
            line += f", {100 * f:.1f}%, ETA {_duration(dt * (1 - f) / f)}"
        end = "\n" if done or not self.tty else ""
        print(
            ("\r" if self.tty else "") + line + "\x1b[K" * self.tty,
            end=end,
            file=sys.stderr,
            flush=True,
        )


def _duration(s: float) -> str:
    return f"{s / 3600:.1f}h" if s >= 3600 else f"{s / 60:.1f}m" if s >= 60 else f"{s:.0f}s"


def _check_options(o: dict) -> None:
    if not 0.0 <= o["val_fraction"] < 1.0:
        raise DataError(f"--val_fraction={o['val_fraction']} must be in [0, 1)")
    for key in ("val_docs", "min_chars", "max_docs", "max_tokens", "workers"):
        if o[key] < 0:
            raise DataError(f"--{key}={o[key]} must be >= 0")
    if not 1 <= o["shard_tokens"] <= MAX_TOKENS:
        raise DataError(f"--shard_tokens={o['shard_tokens']} must be in [1, 2**31)")


def _resume_state(out: str, options: dict) -> dict | None:
    """The checkpoint of an unfinished run with the same options whose finished shards verify."""
    path = os.path.join(out, PREPARE_STATE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        state = json.load(f)
    if state["options"] != options:
        diff = [
            f"{k}={state['options'].get(k)!r}"
            for k in options
            if state["options"].get(k) != options[k]
        ]
        raise DataError(
            f"--out={out} holds an unfinished prepare with other options "
            f"({', '.join(diff)}); rerun it with those, or use an empty --out"
        )
    for split, st in state["splits"].items():
        for s in st["shards"]:
            p = os.path.join(out, s["name"])
            ok = (
                os.path.exists(p)
                and os.path.getsize(p) == shard_bytes(s["tokens"])
                and file_sha256(p) == s["sha256"]
            )
            if not ok:
                print(f"prepare: {p} does not match its checkpoint; starting over", file=sys.stderr)
                return None
        tmp = os.path.join(out, shard_name(split, len(st["shards"])) + ".tmp")
        if st["partial"] and not (
            os.path.exists(tmp) and os.path.getsize(tmp) >= shard_bytes(st["partial"])
        ):
            print(f"prepare: {tmp} is shorter than its checkpoint; starting over", file=sys.stderr)
            return None
    return state


def _claim_out(out: str, options: dict) -> dict | None:
    """Refuses to overwrite a dataset we did not start; returns a finished identical run's meta."""
    meta_path = os.path.join(out, META_FILE)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("options") == options:
            return meta
        raise DataError(
            f"--out={out} already holds a prepared dataset with other options; "
            "use another --out or delete it"
        )
    ours = os.path.exists(os.path.join(out, PREPARE_STATE))
    if not ours and glob.glob(os.path.join(out, "*.bin")):
        raise DataError(
            f"--out={out} holds .bin shards that prepare did not start; "
            "use another --out or delete them"
        )
    return None


def _remove_stale(out: str, state: dict) -> None:
    """Shards and tails past the checkpoint (or of an abandoned run) would be read as data."""
    for split, st in state["splits"].items():
        keep = {s["name"] for s in st["shards"]}
        if st["partial"]:
            keep.add(shard_name(split, len(st["shards"])) + ".tmp")
        for path in glob.glob(os.path.join(out, f"{split}_*.bin*")):
            if os.path.basename(path) not in keep:
                os.remove(path)


def prepare(
    source: str,
    out: str,
    tokenizer: str = "gpt2",
    val_fraction: float = 0.01,
    shard_tokens: int = 100_000_000,
    *,
    val_docs: int = 0,
    workers: int = 0,
    dedup: bool = False,
    min_chars: int = 0,
    max_docs: int = 0,
    max_tokens: int = 0,
    text_field: str = "text",
    hf_config: str = "",
    hf_split: str = "train",
    verbose: bool = False,
) -> dict:
    """Tokenizes `source` into shards under `out` and returns the meta.json contents.

    The arguments are the CLI's flags (see define_flags), except that `workers` defaults to 0
    here (tokenize in this process) and to the CPU count on the command line. Starting it again
    on the same `out` with the same options resumes an interrupted run, or returns a finished
    run's meta; other options, or shards prepare did not write, are refused (ValueError)."""
    options = {
        "source": source,
        "tokenizer": tokenizer,
        "val_fraction": val_fraction,
        "val_docs": val_docs,
        "shard_tokens": shard_tokens,
        "dedup": dedup,
        "min_chars": min_chars,
        "max_docs": max_docs,
        "max_tokens": max_tokens,
        "text_field": text_field,
        "hf_config": hf_config,
        "hf_split": hf_split,
    }
    _check_options({**options, "workers": workers})
    tok = get_tokenizer(tokenizer)
    if tok.vocab_size > np.iinfo(TOKEN_DTYPE).max + 1:
        raise DataError(
            f"--tokenizer={tokenizer} has ids up to {tok.vocab_size - 1}, beyond "
            "uint16 (65535): llm.c shards hold uint16 tokens"
        )
    os.makedirs(out, exist_ok=True)
    done = _claim_out(out, options)
    if done is not None:
        if verbose:
            print(f"prepare: {out} is already complete", file=sys.stderr)
        return done
    state = _resume_state(out, options) or {
        "options": options,
        "consumed": 0,
        "seconds": 0.0,
        "text_bytes": 0,
        "kept_bytes": 0,
        "documents": {
            "seen": 0,
            "kept": 0,
            "dropped_empty": 0,
            "dropped_duplicate": 0,
            "dropped_short": 0,
        },
        "splits": {s: {"shards": [], "partial": 0, "docs": 0} for s in ("train", "val")},
        "held": [],
    }
    _remove_stale(out, state)
    pool = start_pool(workers, tokenizer)
    try:
        return _run(state, out, tok, pool, workers, verbose)
    finally:
        if pool is not None:
            # No waiting for the processes to exit: each finishes its task (if any) and goes.
            pool.shutdown(wait=False, cancel_futures=True)


class Pass:
    """One pass over the documents: its counters (continued from `state`, fresh or a checkpoint),
    the shard writers and router they feed, its checkpoint (prepare_state.json) and its
    meta.json."""

    def __init__(self, state: dict, out: str, tok) -> None:
        self.state, self.out, self.tok = state, out, tok
        o = self.options = state["options"]
        self.writers = {
            s: ShardWriter(out, s, o["shard_tokens"], **state["splits"][s]) for s in state["splits"]
        }
        self.router = Router(
            self.writers, o["val_fraction"], o["val_docs"], Router.held_from(state["held"])
        )
        self.docs = state["documents"]  # seen, kept and each reason for dropping
        self.consumed = state["consumed"]  # documents read from the source, dropped ones too
        self.text_bytes, self.kept_bytes = state["text_bytes"], state["kept_bytes"]
        self.total_tokens = sum(w.tokens for w in self.writers.values()) + sum(
            len(t) for *_, t in self.router.held
        )
        self.seen_digests: set[bytes] = set()  # --dedup
        self.t0 = time.time() - state["seconds"]
        self.last_ckpt = time.time()
        self.capped = False  # --max_tokens reached (or, at the end, --max_docs)

    def skip_done(self, texts: Iterator[str]) -> None:
        """Re-reads (not re-tokenizes) what the checkpoint already holds; --dedup needs its
        digests."""
        o = self.options
        for text in itertools.islice(texts, self.consumed):
            if o["dedup"] and text and not text.isspace() and len(text) >= o["min_chars"]:
                self.seen_digests.add(doc_digest(utf8(text)[1]))

    def add(self, enc: Encoded, i: int, offset: int) -> int:
        """Counts, filters and routes document `i` of a batch whose earlier documents' tokens end
        at `offset`; returns where its own end."""
        self.consumed += 1
        self.docs["seen"] += 1
        self.text_bytes += int(enc.nbytes[i])
        if enc.status[i] == EMPTY:
            self.docs["dropped_empty"] += 1
            return offset
        if enc.status[i] == SHORT:
            self.docs["dropped_short"] += 1
            return offset
        n = int(enc.lengths[i])
        digest = enc.digests[DIGEST_BYTES * i : DIGEST_BYTES * (i + 1)]
        tokens = enc.tokens[offset : offset + n]
        if self.options["dedup"]:
            if digest in self.seen_digests:
                self.docs["dropped_duplicate"] += 1
                return offset + n
            self.seen_digests.add(digest)
        self.docs["kept"] += 1
        self.kept_bytes += int(enc.nbytes[i])
        self.router.route(doc_hash(digest), self.consumed - 1, tokens)
        self.total_tokens += n
        if any(w.finished for w in self.writers.values()) or (
            time.time() - self.last_ckpt > CHECKPOINT_SECONDS
        ):
            self.checkpoint()
            self.last_ckpt = time.time()
        max_tokens = self.options["max_tokens"]
        self.capped = bool(max_tokens and self.total_tokens >= max_tokens)
        return offset + n

    def checkpoint(self) -> None:
        """Writes prepare_state.json: what a resumed pass starts from."""
        for w in self.writers.values():
            w.sync()
            w.finished = False
        self.state.update(
            consumed=self.consumed,
            seconds=time.time() - self.t0,
            text_bytes=self.text_bytes,
            kept_bytes=self.kept_bytes,
            splits={s: w.state() for s, w in self.writers.items()},
            held=self.router.state(),
        )
        tmp = os.path.join(self.out, PREPARE_STATE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.state, f)
        os.replace(tmp, os.path.join(self.out, PREPARE_STATE))

    def flush(self) -> None:
        """Writes out what the router holds back and every writer's partial shard."""
        max_docs = self.options["max_docs"]
        self.capped = self.capped or bool(max_docs and self.docs["seen"] >= max_docs)
        self.router.finish()
        for w in self.writers.values():
            w.flush()

    def write_meta(self) -> dict:
        """meta.json, the dataset card, in place of the checkpoint; a split left empty is a
        DataError instead, with the directory left as if never started."""
        o, tok, writers, out = self.options, self.tok, self.writers, self.out
        for split, w in writers.items():
            if not w.shards:
                _remove_stale(out, {"splits": {s: {"shards": [], "partial": 0} for s in writers}})
                if os.path.exists(os.path.join(out, PREPARE_STATE)):
                    os.remove(os.path.join(out, PREPARE_STATE))
                raise DataError(
                    f"--source={o['source']}: no document went to {split} "
                    f"({self.docs['kept']} kept of {self.docs['seen']}); a dataset needs at "
                    "least 2 kept documents"
                )
        meta = {
            "source": o["source"],
            "tokenizer": o["tokenizer"],
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "format": {**FORMAT, "eot": "before every document"},
            "options": o,
            "documents": {**self.docs, **{s: w.docs for s, w in writers.items()}},
            "text_bytes": {"seen": self.text_bytes, "kept": self.kept_bytes},
            "capped": self.capped,
            "tokens": {s: w.tokens for s, w in writers.items()},
            "shards": {s: w.shards for s, w in writers.items()},
            "command": " ".join(sys.argv),
            "seconds": round(time.time() - self.t0, 3),
        }
        tmp = os.path.join(out, META_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(tmp, os.path.join(out, META_FILE))
        if os.path.exists(os.path.join(out, PREPARE_STATE)):
            os.remove(os.path.join(out, PREPARE_STATE))
        return meta


def _run(
    state: dict, out: str, tok, pool: ProcessPoolExecutor | None, workers: int, verbose: bool
) -> dict:
    """The document loop of `prepare`, from `state` (fresh or a checkpoint) to meta.json."""
    o = state["options"]
    run = Pass(state, out, tok)
    texts, total_docs = open_source(o["source"], o["text_field"], o["hf_config"], o["hf_split"])
    if o["max_docs"]:
        total_docs = min(total_docs or o["max_docs"], o["max_docs"])
        texts = itertools.islice(texts, o["max_docs"])
    if run.consumed:
        if verbose:
            print(f"prepare: resuming after {run.consumed:,} documents", file=sys.stderr)
        run.skip_done(texts)
    progress = Progress(total_docs, o["max_tokens"], run.t0) if verbose else None
    batches = encoded_batches(texts, o["tokenizer"], o["min_chars"], pool, workers)
    try:
        for enc in batches:
            offset = 0
            for i in range(len(enc.status)):
                offset = run.add(enc, i, offset)
                if run.capped:
                    break
            if progress:
                progress.update(run.docs["seen"], run.total_tokens)
            if run.capped:
                break
    finally:
        batches.close()
    run.flush()
    if progress:
        progress.update(run.docs["seen"], run.total_tokens, done=True)
    return run.write_meta()


def summary(meta: dict, out: str) -> str:
    """The data card printed at the end of a run."""
    d, o = meta["documents"], meta["options"]
    tokens = sum(meta["tokens"].values())
    secs = max(meta["seconds"], 1e-9)
    rows = [
        f"dataset    {out}",
        f"source     {meta['source']}",
        f"tokenizer  {meta['tokenizer']} (vocab {meta['vocab_size']:,}, EOT {meta['eot_id']})",
        f"documents  {d['seen']:,} seen, {d['kept']:,} kept"
        + (" (stopped at --max_docs/--max_tokens)" if meta["capped"] else ""),
        f"dropped    {d['dropped_empty']:,} empty or whitespace, {d['dropped_duplicate']:,} "
        f"duplicate{'' if o['dedup'] else ' (--dedup off)'}, {d['dropped_short']:,} under "
        f"--min_chars={o['min_chars']}",
        "",
        f"{'split':<6} {'documents':>12} {'tokens':>16} {'shards':>7} {'tokens/doc':>11}",
    ]
    for s in ("train", "val"):
        n, t = meta["documents"][s], meta["tokens"][s]
        rows.append(f"{s:<6} {n:>12,} {t:>16,} {len(meta['shards'][s]):>7} {t / max(n, 1):>11,.1f}")
    seen, kept = meta["text_bytes"]["seen"], meta["text_bytes"]["kept"]
    rows += [
        "",
        f"text       {seen / 1e6:,.1f} MB read, {kept / 1e6:,.1f} MB kept, "
        f"{kept / max(tokens - d['kept'], 1):.2f} bytes/token (EOTs aside)",
        f"time       {secs:,.1f}s ({tokens / secs:,.0f} tokens/s, {seen / secs / 1e6:,.1f} MB/s)",
    ]
    return "\n".join(rows)


FLAGS = flags.FLAGS


def main(argv):
    del argv
    os.environ.setdefault("DATASETS_VERBOSITY", "critical")  # `datasets` logs the errors we report
    # Else `datasets` imports torch (seconds) for every stream, only to share ints with a
    # DataLoader's workers, which prepare never uses.
    os.environ.setdefault("USE_TORCH", "0")
    if FLAGS["val_fraction"].present and FLAGS.val_docs:
        raise DataError("pass --val_fraction or --val_docs, not both")
    try:
        meta = prepare(
            FLAGS.source,
            FLAGS.out,
            FLAGS.tokenizer,
            FLAGS.val_fraction,
            FLAGS.shard_tokens,
            val_docs=FLAGS.val_docs,
            workers=FLAGS.workers,
            dedup=FLAGS.dedup,
            min_chars=FLAGS.min_chars,
            max_docs=FLAGS.max_docs,
            max_tokens=FLAGS.max_tokens,
            text_field=FLAGS.text_field,
            hf_config=FLAGS.hf_config,
            hf_split=FLAGS.hf_split,
            verbose=True,
        )
    except OSError as e:  # an unreadable source or an unwritable --out: nothing half-done is kept
        errors.fail(e)
    except KeyboardInterrupt:
        errors.fail("prepare interrupted; run the same command again to resume", code=130)
    print(summary(meta, FLAGS.out))


def define_flags() -> None:
    # Defined only when run as a program, so importing this module never clashes with
    # another entry point's flags.
    flags.DEFINE_string(
        "source",
        None,
        "hf:NAME | jsonl:GLOB | parquet:GLOB | text:GLOB | paragraphs:GLOB | builtin:pydocs",
        required=True,
    )
    flags.DEFINE_string("out", None, "output directory for shards and meta.json", required=True)
    flags.DEFINE_string("tokenizer", "gpt2", "gpt2 | bytes (or their -chat variants)")
    flags.DEFINE_string("hf_config", "", "hf: the dataset's configuration, e.g. sample-10BT")
    flags.DEFINE_string("hf_split", "train", "hf: the split to stream")
    flags.DEFINE_string("text_field", "text", "hf/jsonl/parquet: the field holding the text")
    flags.DEFINE_float("val_fraction", 0.01, "share of documents that go to val (by stable hash)")
    flags.DEFINE_integer(
        "val_docs",
        0,
        "exactly this many documents go to val (the lowest hashes), instead of --val_fraction",
    )
    flags.DEFINE_integer("shard_tokens", 100_000_000, "tokens per shard")
    flags.DEFINE_integer("workers", os.cpu_count() or 1, "tokenizer processes (0: in-process)")
    flags.DEFINE_bool("dedup", False, "drop exact duplicates of an earlier document")
    flags.DEFINE_integer("min_chars", 0, "drop documents shorter than this many characters")
    flags.DEFINE_integer("max_docs", 0, "read at most this many source documents (0: all)")
    flags.DEFINE_integer("max_tokens", 0, "stop once this many tokens are written (0: no cap)")
