"""The pass over the documents: read from the source, encoded in batches, filtered, routed to a
split and written, with a checkpoint (prepare_state.json) every CHECKPOINT_SECONDS and at every
finished shard, and meta.json at the end. `Pass` owns the counters, the checkpoint and the card;
`run_pass` is the loop."""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

from llmjax.data import PREPARE_STATE
from llmjax.prepare.dataset import remove_stale, write_json
from llmjax.prepare.encode import (
    DIGEST_BYTES,
    EMPTY,
    SHORT,
    Encoded,
    doc_digest,
    doc_hash,
    encoded_batches,
    utf8,
)
from llmjax.prepare.sources import open_source
from llmjax.prepare.writer import Router, ShardWriter
from llmjax.progress import Progress
from llmjax.shards import FORMAT, META_FILE, DataError

PROGRESS_SECONDS = 30.0  # a progress line this often where stderr is not a terminal (a log)
CHECKPOINT_SECONDS = 60.0  # also checkpoint between shards, so a crash loses at most this much


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

    def status(self, total_docs: int | None) -> tuple[str, float | None]:
        """The progress line's text, and the fraction done: of the documents (when the source or
        --max_docs says how many) or of --max_tokens, whichever is further; None if neither."""
        docs, tokens, max_tokens = self.docs["seen"], self.total_tokens, self.options["max_tokens"]
        dt = max(time.time() - self.t0, 1e-9)
        text = (
            f"prepare: {docs:,} docs ({docs / dt:,.0f}/s), {tokens:,} tokens ({tokens / dt:,.0f}/s)"
        )
        fractions = ([docs / total_docs] if total_docs else []) + (
            [tokens / max_tokens] if max_tokens else []
        )
        if not fractions:
            return text, None
        f = min(1.0, max(fractions))
        return f"{text}, {100 * f:.1f}%", f

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
        write_json(self.out, PREPARE_STATE, self.state)

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
                remove_stale(out, {"splits": {s: {"shards": [], "partial": 0} for s in writers}})
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
        write_json(out, META_FILE, meta, indent=2)
        if os.path.exists(os.path.join(out, PREPARE_STATE)):
            os.remove(os.path.join(out, PREPARE_STATE))
        return meta


def run_pass(
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
    progress = Progress(
        sys.stderr,
        log_every=PROGRESS_SECONDS,
        start_fraction=run.status(total_docs)[1] or 0.0,
        enabled=verbose,
    )
    batches = encoded_batches(texts, o["tokenizer"], o["min_chars"], pool, workers)
    try:
        for enc in batches:
            offset = 0
            for i in range(len(enc.status)):
                offset = run.add(enc, i, offset)
                if run.capped:
                    break
            progress.update(*run.status(total_docs))
            if run.capped:
                break
    finally:
        batches.close()
    run.flush()
    progress.update(run.status(total_docs)[0], done=True)
    return run.write_meta()
